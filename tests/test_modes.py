"""Training objectives: which BNs see which images, how losses compose, what Fast AdvProp reuses."""
import copy

import pytest
import timm
import torch

from advprop_zoo.attacks import AttackConfig, attack
from advprop_zoo.dual_bn import bn_route, to_dual_bn
from advprop_zoo.modes import ModeConfig, forward_loss

NORM = ((0.5,) * 3, (0.5,) * 3)
CE = torch.nn.CrossEntropyLoss()


def _dual(momentum=None, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model('test_efficientnet', num_classes=10, drop_rate=0.0, drop_path_rate=0.0)
    if momentum is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = momentum
    return to_dual_bn(model).train()


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize('split', [True, False])
def test_advprop_main_bns_see_clean_aux_bns_see_adversarial(split):
    model = _dual(momentum=1.0)  # running stats = the last batch's stats: directly checkable
    x, y = _batch()
    cfg = ModeConfig('advprop', AttackConfig(eps=4, steps=2), split_bn=split)
    torch.manual_seed(5)
    forward_loss(model, x, y, CE, cfg, *NORM)
    torch.manual_seed(5)  # same random start and targets: the same adversarial batch
    x_adv = attack(copy.deepcopy(model), x, y, cfg.attack, *NORM, bn_route='aux', mode='train')
    bn = model.bn1
    with torch.no_grad():
        assert torch.allclose(bn.running_mean, model.conv_stem(x).mean((0, 2, 3)), atol=1e-5)
        assert torch.allclose(bn.aux_bn[0].running_mean, model.conv_stem(x_adv).mean((0, 2, 3)), atol=1e-5)
    assert not torch.allclose(bn.running_mean, bn.aux_bn[0].running_mean)


def test_advprop_split_pass_equals_two_passes():
    x, y = _batch()
    cfg = ModeConfig('advprop', AttackConfig(eps=2, steps=1))
    out = {}
    for split in (True, False):
        model = _dual()
        torch.manual_seed(3)
        losses = forward_loss(model, x, y, CE, ModeConfig('advprop', cfg.attack, split_bn=split), *NORM)
        losses.loss.backward()
        out[split] = (losses, [p.grad.clone() for p in model.parameters()])
    (a, ga), (b, gb) = out[True], out[False]
    assert torch.allclose(a.clean, b.clean, atol=1e-5) and torch.allclose(a.adv, b.adv, atol=1e-5)
    assert all(torch.allclose(p, q, atol=1e-5) for p, q in zip(ga, gb))


def test_losses_compose_as_specified():
    x, y = _batch()
    model = _dual()
    s = forward_loss(model, x, y, CE, ModeConfig('advprop', AttackConfig(eps=1), adv_weight=0.7), *NORM)
    assert torch.allclose(s.loss, s.clean + 0.7 * s.adv)
    plain = timm.create_model('test_efficientnet', num_classes=10).train()
    s = forward_loss(plain, x, y, CE, ModeConfig('adv-train', AttackConfig(eps=1), clean_weight=0.3), *NORM)
    assert torch.allclose(s.loss, 0.3 * s.clean + 0.7 * s.adv)
    s = forward_loss(plain, x, y, CE, ModeConfig('adv-train', AttackConfig(eps=1), clean_weight=0.0), *NORM)
    assert torch.allclose(s.loss, s.adv) and torch.isnan(s.clean)  # Madry: adversarial only
    s = forward_loss(plain, x, y, CE, ModeConfig('vanilla'), *NORM)
    assert s.adv is None and s.n_adv == 0 and torch.allclose(s.loss, s.clean)


def test_fast_advprop_attacks_the_fraction_and_reuses_the_clean_pass_gradients():
    n, p_adv, eps = 10, 0.2, 2
    x, y = _batch(n)
    model = _dual(momentum=1.0)
    ref = copy.deepcopy(model)
    sizes = []
    model.conv_stem.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    cfg = ModeConfig('fast-advprop', AttackConfig(eps=eps), p_adv=p_adv)
    s = forward_loss(model, x, y, CE, cfg, *NORM)
    s.loss.backward()
    k = round(p_adv * n)
    assert s.n_adv == k == 2
    assert sizes == [n, k]  # the clean batch once, the attacked fraction once more: 1 + p_adv passes
    assert torch.allclose(s.loss, s.clean + s.adv)
    with torch.no_grad():  # main BN statistics saw exactly the clean batch, as in vanilla training
        assert torch.allclose(model.bn1.running_mean, model.conv_stem(x).mean((0, 2, 3)), atol=1e-5)

    # independent recomputation: FGSM (untargeted, eps pixels, from the clean image) on the clean
    # batch loss's input gradient, then clean loss over all n + adversarial loss through the aux BNs
    x_req = x.clone().requires_grad_(True)
    clean = CE(ref(x_req), y)
    (g,) = torch.autograd.grad(clean, x_req, retain_graph=True)
    x_adv = (x[:k] + eps * 2 / 255 * g[:k].sign()).clamp(-1, 1)
    with bn_route(ref, 'aux'):
        adv = CE(ref(x_adv), y[:k])
    (clean + adv).backward()
    assert torch.allclose(s.adv, adv) and torch.allclose(s.clean, clean)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_modes_needing_aux_bns_refuse_a_plain_model():
    x, y = _batch()
    plain = timm.create_model('test_efficientnet', num_classes=10)
    for mode in ('advprop', 'fast-advprop'):
        with pytest.raises(ValueError, match='to_dual_bn'):
            forward_loss(plain, x, y, CE, ModeConfig(mode), *NORM)


@pytest.mark.parametrize('kwargs, match', [(dict(mode='trades'), 'unknown training mode'),
                                           (dict(clean_weight=1.5), 'clean weight'), (dict(p_adv=0), 'p_adv'),
                                           (dict(attack_bn_mode='frozen'), 'attack BN mode')])
def test_bad_mode_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModeConfig(**kwargs)


def test_bf16_autocast_step():
    x, y = _batch()
    model = _dual()
    s = forward_loss(model, x, y, CE, ModeConfig('advprop', AttackConfig(eps=1)), *NORM, autocast_dtype=torch.bfloat16)
    s.loss.backward()
    assert torch.isfinite(s.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
