"""load_model: the one way weights become a model, for export, eval, hub and the train loop alike."""
import pytest
import timm
import torch

from advprop_zoo import (
    WeightsError, bn_route, is_dual_bn, load_model, resolve_input_size, save_weights, to_dual_bn,
)
from advprop_zoo.eval.suite import load_eval_weights
from advprop_zoo.weights import sha256_file
from conftest import random_state_dict

ARCH = 'efficientnet_b0_advprop'


@pytest.fixture(scope='module')
def dual_file(tmp_path_factory):
    """A 10-class dual-BN checkpoint whose auxiliary BNs hold other numbers than the main ones."""
    dual = to_dual_bn(timm.create_model(ARCH, num_classes=10))
    sd = random_state_dict(dual, seed=1)
    path = save_weights(sd, tmp_path_factory.mktemp('dual') / 'dual.safetensors')
    return path, sd


def _has_dual_bns(model):
    return any(is_dual_bn(m) for m in model.modules())


def _x(size=64):
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_head_size_and_folding_come_from_the_file(dual_file):
    path, sd = dual_file
    loaded = load_model(ARCH, checkpoint=path)
    assert loaded.model.num_classes == 10 and not _has_dual_bns(loaded.model) and not loaded.model.training
    assert loaded.dual_bn and loaded.aux_bn_tensors == sum('.aux_bn.' in k for k in sd)
    assert (loaded.source, loaded.file) == ('checkpoint', path) and loaded.location == str(path.resolve())
    # folded = the main branch of the file, exactly
    assert all(torch.equal(v, sd[k]) for k, v in loaded.model.state_dict().items())
    assert len(loaded.model.state_dict()) == len(sd) - loaded.aux_bn_tensors


def test_dual_file_kept_dual_routes_through_its_aux_bns(dual_file):
    path, sd = dual_file
    dual = load_model(ARCH, checkpoint=path, fold=False).model
    assert _has_dual_bns(dual) and dual.state_dict().keys() == sd.keys()
    plain = load_model(ARCH, checkpoint=path).model
    with torch.no_grad():
        main, folded = dual(_x()), plain(_x())
        with bn_route(dual, 'aux'):
            aux = dual(_x())
    assert torch.equal(main, folded)
    assert not torch.allclose(main, aux)


def test_fused_model_gives_the_unfused_logits(dual_file):
    path, _ = dual_file
    plain = load_model(ARCH, checkpoint=path).model
    fused = load_model(ARCH, checkpoint=path, fuse=True, input_size=[64])
    assert fused.input_size == (3, 64, 64)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.model.modules())
    with torch.no_grad():
        a, b = plain(_x()), fused.model(_x())
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_explicit_head_size_that_does_not_fit_names_the_key(dual_file):
    with pytest.raises(WeightsError, match=r"shape mismatch for 'classifier\.(weight|bias)': weights have \(10"):
        load_model(ARCH, checkpoint=dual_file[0], num_classes=1000)


def test_fresh_model_has_no_weights_source():
    torch.manual_seed(0)
    loaded = load_model(ARCH, num_classes=3, drop_rate=0.0)
    torch.manual_seed(0)
    ref = timm.create_model(ARCH, num_classes=3, drop_rate=0.0)
    assert (loaded.source, loaded.file, loaded.dual_bn) == (None, None, False)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in loaded.model.state_dict().items())


def test_pretrained_from_the_hub_cache_is_located_and_hashed(hub_cache, tmp_path):
    model = timm.create_model(ARCH)
    weights = save_weights(random_state_dict(model), tmp_path / 'b0.safetensors')
    hub_cache('timm/tf_efficientnet_b0.ap_in1k', 'model.safetensors', weights.read_bytes())
    loaded = load_model(ARCH, pretrained=True)
    assert loaded.source == 'pretrained' and loaded.location == 'hf-hub:timm/tf_efficientnet_b0.ap_in1k'
    assert sha256_file(loaded.file) == sha256_file(weights)
    _, info = load_eval_weights(ARCH, pretrained=True)  # eval reports the same file's hash
    assert info == {'source': 'pretrained', 'location': loaded.location, 'sha256': sha256_file(weights)}


def test_both_or_wrong_inputs_are_refused(dual_file):
    with pytest.raises(ValueError, match='not both'):
        load_model(ARCH, checkpoint=dual_file[0], pretrained=True)
    with pytest.raises(ValueError, match='unknown model'):
        load_model('efficientnet_b9_advprop')
    with pytest.raises(ValueError, match='C H W'):
        resolve_input_size([3, 0, 4], timm.create_model(ARCH))
