"""PGD / FGSM: budgets in pixel units, projection, targeting, BN handling, no weight-gradient work."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from advprop_zoo.attacks import AttackConfig, attack, pixel_bounds, signed_step
from advprop_zoo.efficientnet_advprop import paper_attacker
from advprop_zoo.dual_bn import is_dual_bn, to_dual_bn

ADVPROP = ((0.5,) * 3, (0.5,) * 3)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    model = timm.create_model('test_efficientnet', num_classes=10).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(30)  # confident logits, so losses react to small perturbations
    return model


def _images(n=8, size=32, norm=ADVPROP, seed=0):
    g = torch.Generator().manual_seed(seed)
    pix = torch.rand(n, 3, size, size, generator=g)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm)
    return pix, (pix - mean) / std, torch.randint(0, 10, (n,), generator=g)


def _to_pixels(x, norm):
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm)
    return x * std + mean


@pytest.mark.parametrize('norm', [ADVPROP, IMAGENET])
@pytest.mark.parametrize('cfg', [AttackConfig(eps=4, steps=5), AttackConfig(kind='fgsm', eps=3),
                                 AttackConfig(eps=2, targeted=False)])
def test_stays_in_pixel_budget_and_valid_range(model, norm, cfg):
    pix, x, y = _images(norm=norm)
    x_adv = attack(model, x, y, cfg, *norm)
    pix_adv = _to_pixels(x_adv, norm)
    assert (pix_adv - pix).abs().max() <= cfg.eps / 255 + 1e-5
    assert pix_adv.min() >= -1e-6 and pix_adv.max() <= 1 + 1e-6
    assert (pix_adv - pix).abs().max() > 0.5 * cfg.eps / 255  # it did move


def test_budget_conversion_through_mean_std():
    lo, hi, unit = pixel_bounds(*ADVPROP)
    assert torch.allclose(unit, torch.full_like(unit, 2 / 255))  # [-1, 1] space: eps 1 = 2/255
    assert torch.allclose(lo, -torch.ones_like(lo)) and torch.allclose(hi, torch.ones_like(hi))
    _, _, unit = pixel_bounds(*IMAGENET)
    assert torch.allclose(unit.flatten(), 1 / (255 * torch.tensor(IMAGENET[1])))


def test_fgsm_is_one_full_step(model):
    pix, x, y = _images(size=24)
    pix_adv = _to_pixels(attack(model, x, y, AttackConfig(kind='fgsm', eps=2, targeted=False), *ADVPROP), ADVPROP)
    delta = (pix_adv - pix).abs()
    inside = (pix > 3 / 255) & (pix < 1 - 3 / 255)  # away from clamping at 0 and 1
    assert torch.allclose(delta[inside], torch.full_like(delta[inside], 2 / 255), atol=1e-5)


def test_untargeted_pgd_beats_random_noise_of_same_size(model):
    _, x, y = _images(n=16)
    with torch.no_grad():
        y = model(x).argmax(-1)  # attack the model's own predictions
    cfg = AttackConfig(eps=4, steps=5, targeted=False)
    x_adv = attack(model, x, y, cfg, *ADVPROP)
    g = torch.Generator().manual_seed(1)
    noise = (torch.randint(0, 2, x.shape, generator=g) * 2 - 1) * (4 * 2 / 255)
    with torch.no_grad():
        loss_adv = F.cross_entropy(model(x_adv), y)
        loss_noise = F.cross_entropy(model((x + noise).clamp(-1, 1)), y)
        loss_clean = F.cross_entropy(model(x), y)
    assert loss_adv > loss_noise + 0.1 and loss_adv > loss_clean


def test_targeted_moves_toward_target(model):
    _, x, y = _images(n=16)
    target = (y + 3) % 10
    x_adv = attack(model, x, y, AttackConfig(eps=4, steps=5), *ADVPROP, target=target)
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), target) < F.cross_entropy(model(x), target) - 0.05
    with pytest.raises(ValueError, match='untargeted'):
        attack(model, x, y, AttackConfig(targeted=False), *ADVPROP, target=target)


def test_random_wrong_target_is_never_the_label(model):
    from advprop_zoo.attacks import _random_wrong_label
    y = torch.arange(10).repeat(50)
    t = _random_wrong_label(y, 10, torch.Generator().manual_seed(0))
    assert (t != y).all() and len(set(t.tolist())) == 10


def test_no_parameter_gradients_and_frozen_running_stats():
    torch.manual_seed(0)
    model = timm.create_model('test_efficientnet', num_classes=10).train()
    before = copy.deepcopy(model.state_dict())
    _, x, y = _images()
    attack(model, x, y, AttackConfig(eps=2), *ADVPROP, mode='train')
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats did not move
    assert model.training and all(m.track_running_stats for m in model.modules()
                                  if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def test_signed_step_stays_in_budget_and_valid_range():
    torch.manual_seed(0)
    _, x, _ = _images()
    grad = torch.randn_like(x)
    x_adv = signed_step(x, grad, 3.0, *ADVPROP)
    pixels = (x_adv - x) * 0.5 * 255  # [-1, 1] model space -> 0-255 pixel units
    assert pixels.abs().max() <= 3.0 + 1e-4 and x_adv.min() >= -1 and x_adv.max() <= 1
    moved = (x_adv != x)  # where not clamped, every pixel moved the full step along the gradient's sign
    assert torch.equal(torch.sign(x_adv - x)[moved], torch.sign(grad)[moved])
    assert moved.float().mean() > 0.9


def test_mode_eval_restores_training_flags():
    model = timm.create_model('test_efficientnet', num_classes=10).train()
    model.classifier.eval()  # a mixed state must survive
    _, x, y = _images(n=4)
    attack(model, x, y, AttackConfig(eps=1), *ADVPROP, mode='eval')
    assert model.training and not model.classifier.training


def test_attack_runs_through_auxiliary_bns():
    torch.manual_seed(0)
    model = to_dual_bn(timm.create_model('test_efficientnet', num_classes=10)).eval()
    routes = []
    duals = [m for m in model.modules() if is_dual_bn(m)]
    duals[0].register_forward_pre_hook(lambda m, a: routes.append(m.route))
    _, x, y = _images(n=4)
    attack(model, x, y, AttackConfig(eps=2, steps=3), *ADVPROP, bn_route='aux')
    assert routes == ['aux'] * 3 and duals[0].route == 'main'
    with pytest.raises(ValueError, match='to_dual_bn'):
        attack(timm.create_model('test_efficientnet'), x, y, AttackConfig(), *ADVPROP, bn_route='aux')


def test_bf16_autocast(model):
    pix, x, y = _images(n=4)
    x_adv = attack(model, x, y, AttackConfig(eps=2, steps=2), *ADVPROP, autocast_dtype=torch.bfloat16)
    assert x_adv.dtype == torch.float32
    assert (_to_pixels(x_adv, ADVPROP) - pix).abs().max() <= 2 / 255 + 1e-5


def test_paper_defaults():
    assert AttackConfig(eps=1).resolved().steps == 1
    assert AttackConfig(eps=3).resolved().steps == 4
    assert AttackConfig(eps=4).resolved().step_size == 1.0
    cfg = paper_attacker('efficientnet_b3_advprop').config()
    assert (cfg.eps, cfg.resolved().steps, cfg.targeted) == (3, 4, True)
    assert str(paper_attacker('efficientnet_b7_advprop').config()) == 'PGD5_eps4'


@pytest.mark.parametrize('kwargs, match', [(dict(eps=-1), 'eps'), (dict(kind='cw'), 'unknown attack'),
                                           (dict(steps=0), 'steps'), (dict(step_size=0), 'step size')])
def test_bad_attack_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttackConfig(**kwargs)
