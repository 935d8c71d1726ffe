"""Folding: the dual model and checkpoint back to the plain timm model, exactly; the `fold` command."""
import copy

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import BatchNormAct2d

from advprop_zoo import (
    WeightsError, bn_route, fold_checkpoint, fold_dual_bn, fold_state_dict, is_dual_bn, load_weights, to_dual_bn,
)
from advprop_zoo.cli import main
from conftest import cli_fails

ARCH = 'efficientnet_b0_advprop'


@pytest.fixture(scope='module')
def trained_dual():
    """A dual B0 after a few split-route training steps, so main and aux BNs hold different numbers."""
    torch.manual_seed(0)
    dual = to_dual_bn(timm.create_model(ARCH, num_classes=10)).train()
    opt = torch.optim.SGD(dual.parameters(), lr=0.1)
    with bn_route(dual, 'split'):
        for _ in range(2):
            x = torch.randn(4, 3, 32, 32)
            dual(torch.cat([x, x.sign()])).logsumexp(1).mean().backward()
            opt.step(), opt.zero_grad()
    return dual.eval()


def _main_branch(dual):
    return {k: v for k, v in dual.state_dict().items() if '.aux_bn.' not in k}


def test_trained_branches_differ(trained_dual):
    bn = trained_dual.bn1
    assert not torch.equal(bn.running_mean, bn.aux_bn[0].running_mean)
    assert not torch.equal(bn.weight, bn.aux_bn[0].weight)


def test_fold_model_is_the_main_branch_exactly(trained_dual):
    main = _main_branch(trained_dual)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = trained_dual(x)
    plain = fold_dual_bn(copy.deepcopy(trained_dual))
    assert not any(is_dual_bn(m) for m in plain.modules())
    assert type(plain.bn1) is BatchNormAct2d and isinstance(plain.bn1.act, torch.nn.SiLU)
    sd = plain.state_dict()
    assert sd.keys() == main.keys() and all(torch.equal(sd[k], main[k]) for k in main)
    fresh = timm.create_model(ARCH, num_classes=10).eval()
    fresh.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert torch.equal(plain(x), expected) and torch.equal(fresh(x), expected)


def test_fold_state_dict(trained_dual):
    sd = trained_dual.state_dict()
    with torch.device('meta'):
        plain = timm.create_model(ARCH, num_classes=10)
    folded = fold_state_dict(sd, plain)
    assert folded.keys() == _main_branch(trained_dual).keys() and all(folded[k] is sd[k] for k in folded)
    orphan = dict(sd)
    orphan['head.aux_bn.0.weight'] = torch.zeros(3)
    with pytest.raises(WeightsError, match="'head.aux_bn.0.weight' has no main BN entry 'head.weight'"):
        fold_state_dict(orphan)
    bad = dict(sd)
    bad['bn1.aux_bn.0.weight'] = torch.zeros(3)
    with pytest.raises(WeightsError, match=r'shape \(3,\), its main BN entry'):
        fold_state_dict(bad)
    with pytest.raises(WeightsError, match='shape mismatch'):
        fold_state_dict(sd, timm.create_model(ARCH))  # 1000-class head


@pytest.fixture(scope='module')
def dual_file(trained_dual, tmp_path_factory):
    path = tmp_path_factory.mktemp('fold') / 'dual.safetensors'
    save_file({k: v.contiguous() for k, v in trained_dual.state_dict().items()}, str(path))
    return path


def test_fold_command(dual_file, trained_dual, capsys):
    out = dual_file.parent / 'plain.safetensors'
    assert main(['fold', str(dual_file), str(out), '--model', ARCH, '--num-classes', '10']) == 0
    line = capsys.readouterr().out
    assert 'dropped 245 auxiliary BN tensors' in line and 'loads strictly' in line
    sd = load_file(str(out))
    main_branch = _main_branch(trained_dual)
    assert sd.keys() == main_branch.keys() and all(torch.equal(sd[k], main_branch[k]) for k in sd)
    timm.create_model(ARCH, num_classes=10).load_state_dict(sd, strict=True)
    assert fold_checkpoint(out, out, ARCH, overwrite=True, num_classes=10)[1:] == (len(sd), 0)  # plain: idempotent


def test_fold_command_errors_leave_no_file(dual_file, tmp_path, capsys):
    out = tmp_path / 'out.safetensors'
    cli_fails(capsys, ['fold', str(dual_file), str(out), '--model', 'efficientnet-b0'],
           "unknown model 'efficientnet-b0'", "did you mean 'efficientnet_b0_advprop'")
    cli_fails(capsys, ['fold', str(dual_file), str(out), '--model', 'efficientnet_b3_advprop', '--num-classes', '10'],
           "shape mismatch for 'blocks.0.0.bn1.bias': weights have (32,), model EfficientNet expects (40,)")
    cli_fails(capsys, ['fold', str(dual_file), str(out), '--model', 'efficientnet_b1_advprop', '--num-classes', '10'],
           "weights lack 'blocks.0.1.conv_dw.weight' that the model expects")
    # the head size is read from the file (as load_model does); an explicit one that does not fit is named
    cli_fails(capsys, ['fold', str(dual_file), str(out), '--model', ARCH, '--num-classes', '1000'],
              "shape mismatch for 'classifier.bias': weights have (10,), model EfficientNet expects (1000,)")
    cli_fails(capsys, ['fold', str(tmp_path / 'nope.safetensors'), str(out), '--model', ARCH], 'no such weights file')
    cut = tmp_path / 'cut.safetensors'
    cut.write_bytes(dual_file.read_bytes()[:5000])
    cli_fails(capsys, ['fold', str(cut), str(out), '--model', ARCH], 'truncated')
    cli_fails(capsys, ['fold', str(dual_file), str(tmp_path / 'no' / 'out.safetensors'), '--model', ARCH],
           'does not exist')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['cut.safetensors']  # no output, no temp files
    out.write_bytes(b'keep me')
    cli_fails(capsys, ['fold', str(dual_file), str(out), '--model', ARCH, '--num-classes', '10'], 'output exists', '--force')
    assert out.read_bytes() == b'keep me'
    assert main(['fold', str(dual_file), str(out), '--model', ARCH, '--num-classes', '10', '--force']) == 0
    assert load_weights(out).keys() == fold_state_dict(load_weights(dual_file)).keys()
