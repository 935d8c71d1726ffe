"""The nine models in timm's registry: names, configs against the reference facts, parity with timm."""
import pytest
import timm
import torch

import advprop_zoo
from advprop_zoo import VARIANTS, check_model_name, paper_attacker
from conftest import random_state_dict

NAMES = [f'efficientnet_b{i}_advprop' for i in range(9)]


def _meta(name, **kwargs):
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


def test_all_nine_registered_with_both_tags():
    assert timm.list_models('*_advprop') == NAMES
    pretrained = set(timm.list_pretrained('*_advprop*'))
    for name in NAMES:
        assert {f'{name}.ap_in1k', f'{name}.ap_in1k_zoo'} <= pretrained
        assert timm.models.get_pretrained_cfg(name).tag == 'ap_in1k'  # timm-hosted weights are the default


@pytest.mark.parametrize('index', range(9))
def test_config_matches_reference(reference, index):
    ref = reference['models'][index]
    model = _meta(ref['name'])
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, ref['res'], ref['res'])
    assert cfg['crop_pct'] == pytest.approx(ref['crop_pct'], abs=1e-3)
    assert cfg['crop_pct'] == pytest.approx(ref['res'] / (ref['res'] + 32), abs=1e-12)
    assert cfg['interpolation'] == reference['eval_preprocessing']['interpolation']
    assert list(cfg['mean']) == reference['input_normalization']['mean']
    assert list(cfg['std']) == reference['input_normalization']['std']
    assert cfg['num_classes'] == 1000 and cfg['license'] == 'apache-2.0' and '1911.09665' in cfg['paper_ids']
    assert cfg['hf_hub_id'] == ref['timm_weights']
    assert sum(p.numel() for p in model.parameters()) == ref['params']
    assert model.drop_rate == ref['dropout']
    assert str(paper_attacker(ref['name'])) == ref['best_attacker']
    assert model.conv_stem.out_channels == ref['stem'] and model.num_features == ref['head']
    assert VARIANTS[index].paper_top1 == ref['paper_advprop_top1']
    assert VARIANTS[index].timm_top1 == ref['timm_ap_top1']


def test_zoo_tag_points_at_our_org():
    cfg = timm.models.get_pretrained_cfg('efficientnet_b3_advprop.ap_in1k_zoo')
    assert cfg.hf_hub_id == f'{advprop_zoo.HUB_ORG}/efficientnet_b3_advprop.ap_in1k_zoo'
    assert cfg.mean == (0.5, 0.5, 0.5)


def test_attacker_rule_follows_the_paper(reference):
    # n = eps + 1 iterations, except a single step for eps = 1; step size 1
    for eps, steps in [(1, 1), (2, 3), (3, 4), (4, 5)]:
        a = advprop_zoo.PaperAttacker(eps)
        assert (a.steps, a.step_size) == (steps, 1.0)


@pytest.mark.parametrize('level', range(9))
def test_architecture_parity_with_timm_tf_port(level):
    ours = _meta(f'efficientnet_b{level}_advprop').state_dict()
    theirs = _meta(f'tf_efficientnet_b{level}').state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


@pytest.mark.parametrize('level', [0, 1])
def test_same_logits_as_timm_for_same_weights(level):
    ours = timm.create_model(f'efficientnet_b{level}_advprop').eval()
    theirs = timm.create_model(f'tf_efficientnet_b{level}').eval()
    sd = random_state_dict(theirs, seed=level)
    ours.load_state_dict(sd)
    theirs.load_state_dict(sd)
    # odd size: TF 'same' padding is asymmetric there, the case where a symmetric pad would differ
    x = torch.randn(2, 3, 97, 97, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_tf_same_padding_and_bn_eps():
    model = timm.create_model('efficientnet_b0_advprop')
    assert type(model.conv_stem).__name__ == 'Conv2dSame'
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_defaults_are_overridable_like_timm():
    model = timm.create_model('efficientnet_b4_advprop', drop_rate=0.1, drop_path_rate=0.0)
    assert model.drop_rate == 0.1
    assert timm.create_model('efficientnet_b4_advprop').blocks[-1][-1].drop_path.drop_prob > 0


def test_fresh_head_pooling_and_features():
    model = timm.create_model('efficientnet_b0_advprop', num_classes=10, global_pool='max')
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 10)
    assert model.global_pool.pool_type == 'max'
    assert timm.create_model('efficientnet_b0_advprop', num_classes=0)(x).shape == (2, 1280)
    feats = timm.create_model('efficientnet_b0_advprop', features_only=True, out_indices=(1, 4))
    assert [f.shape[1] for f in feats(x)] == [24, 320]
    assert feats.feature_info.reduction() == [4, 32]


@pytest.mark.parametrize('bad', [-1, 2.5, '10', True])
def test_bad_num_classes(bad):
    with pytest.raises(ValueError, match='num_classes'):
        timm.create_model('efficientnet_b0_advprop', num_classes=bad)


def test_unknown_variant_suggests_close_names():
    with pytest.raises(advprop_zoo.UnknownModelError, match="efficientnet_b0_advprop"):
        check_model_name('efficientnet_b0_advprp')
    with pytest.raises(advprop_zoo.UnknownModelError, match="'efficientnet_b3_advprop'"):
        check_model_name('efficientnet-b3')
    with pytest.raises(advprop_zoo.UnknownModelError, match='unknown model'):
        advprop_zoo.get_variant('efficientnet_b9_advprop')
    assert check_model_name('efficientnet_b8_advprop.ap_in1k') == 'efficientnet_b8_advprop'
