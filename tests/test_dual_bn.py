"""Dual BN: main route is the original model, aux route uses only the auxiliary BNs, split is two passes."""
import copy

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d

from advprop_zoo.dual_bn import SyncBatchNorm2d

from advprop_zoo import (
    DualBatchNorm2d, SyncDualBatchNorm, bn_route, convert_sync_dual_bn, fold_dual_bn, is_dual_bn, to_dual_bn,
    use_aux_bn,
)

ARCHS = ['efficientnet_b0_advprop', 'resnet50', 'mobilenetv3_large_100']
SIZE = 32  # the invariants do not depend on resolution; small inputs keep the suite fast on 2 cores


def _assert_rel(actual, expected, rel=1e-5):
    """Max abs difference within ``rel`` of the output's max magnitude: float32 reassociation noise
    (batch- or layout-dependent conv algorithms) scales with the logits, not with each element."""
    diff = (actual - expected).abs().max().item()
    assert diff <= rel * expected.abs().max().item(), f'max abs diff {diff:.3g}, max |expected| {expected.abs().max():.3g}'


def _randomize_bns(model, seed=0):
    """Non-trivial BN statistics and affine params, so that a wrong branch is visible in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def _plain(arch, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=10, drop_rate=0.0, drop_path_rate=0.0)
    return _randomize_bns(model, seed).eval()


def _aux_as_main(dual):
    """A plain model whose (main) BNs hold the dual model's auxiliary BNs: the independent reference
    for the aux route."""
    state = {}
    for k, v in dual.state_dict().items():
        if '.aux_bn.0.' in k:
            state[k.replace('.aux_bn.0.', '.')] = v
    plain = copy.deepcopy(dual)
    fold_dual_bn(plain)
    plain.load_state_dict({**plain.state_dict(), **state})
    return plain


def _bns(model):
    return [m for m in model.modules() if is_dual_bn(m)]


def _perturb_aux(dual, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _bns(dual):
            aux = m.aux_bn[0]
            aux.running_mean.add_(torch.randn(aux.num_features, generator=g) * 0.2)
            aux.running_var.mul_(torch.rand(aux.num_features, generator=g) + 0.5)
            aux.weight.mul_(torch.rand(aux.num_features, generator=g) + 0.5)
            aux.bias.add_(torch.randn(aux.num_features, generator=g) * 0.1)


@pytest.fixture(scope='module', params=ARCHS)
def pair(request):
    plain = _plain(request.param)
    dual = to_dual_bn(copy.deepcopy(plain))
    return request.param, plain, dual


@pytest.fixture(scope='module')
def x():
    return torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def test_every_bn_is_dual_with_timm_split_bn_keys(pair):
    arch, plain, dual = pair
    plain_bns = [n for n, m in plain.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    dual_bns = [n for n, m in dual.named_modules() if is_dual_bn(m)]
    assert plain_bns == dual_bns and len(dual_bns) > 10
    sd, ref = dual.state_dict(), plain.state_dict()
    assert {k: v for k, v in sd.items() if '.aux_bn.' not in k}.keys() == ref.keys()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    suffixes = ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
    assert sorted(k for k in sd if '.aux_bn.' in k) == sorted(f'{n}.aux_bn.0.{s}' for n in dual_bns for s in suffixes)


def test_aux_starts_as_an_independent_copy(pair):
    _, _, dual = pair
    m = _bns(dual)[0]
    aux = m.aux_bn[0]
    for name in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'):
        assert torch.equal(getattr(m, name), getattr(aux, name))
        assert getattr(m, name).data_ptr() != getattr(aux, name).data_ptr()


def test_timm_bn_act_keeps_its_act_and_drop():
    plain = _plain('efficientnet_b0_advprop')
    act, drop = plain.bn1.act, plain.bn1.drop
    dual = to_dual_bn(plain)
    assert isinstance(dual.bn1, DualBatchNorm2d) and dual.bn1.act is act and dual.bn1.drop is drop
    assert not hasattr(to_dual_bn(_plain('resnet50')).bn1, 'act')  # plain nn.BatchNorm2d: no act added


def test_main_route_eval_is_bit_exact(pair, x):
    _, plain, dual = pair
    with torch.no_grad():
        assert torch.equal(dual(x), plain(x))
    assert torch.equal(dual(x), plain(x))  # and under autograd


def test_aux_route_uses_only_aux_stats(pair, x):
    _, plain, dual = pair
    dual = copy.deepcopy(dual)
    _perturb_aux(dual)
    reference = _aux_as_main(dual)
    with torch.no_grad():
        main = dual(x)
        with use_aux_bn(dual):
            aux = dual(x)
        assert torch.equal(main, plain(x))  # changing aux leaves the main route alone
        assert torch.equal(aux, reference(x))
        assert not torch.allclose(aux, main, atol=1e-3)


@pytest.mark.parametrize('train', [False, True])
def test_split_equals_two_passes(pair, train):
    _, _, dual = pair
    one, two = copy.deepcopy(dual), copy.deepcopy(dual)
    _perturb_aux(one), _perturb_aux(two)
    one.train(train), two.train(train)
    # 64 px: in training, a BN over the 1 x 1 maps of a 32 px input normalises 2 values per channel
    # and amplifies rounding noise beyond any sensible tolerance
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    clean, adv = x[:2], x[2:]
    with bn_route(one, 'split'):
        both = one(torch.cat([clean, adv]))
    ref_clean = two(clean)
    with use_aux_bn(two):
        ref_adv = two(adv)
    _assert_rel(both, torch.cat([ref_clean, ref_adv]))
    for (k, a), b in zip(one.state_dict().items(), two.state_dict().values()):  # same running-stat updates
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize('route', ['main', 'aux', 'split'])
def test_training_updates_only_the_routed_branch(route):
    dual = to_dual_bn(_plain('efficientnet_b0_advprop')).train()
    before = {k: v.clone() for k, v in dual.state_dict().items()}
    with bn_route(dual, route):
        dual(torch.randn(4, 3, SIZE, SIZE)).sum().backward()
    after = dual.state_dict()
    for k in before:
        if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')):
            continue
        is_aux = '.aux_bn.' in k
        should_move = route == 'split' or (route == 'aux') == is_aux
        assert torch.equal(before[k], after[k]) != should_move, k
    m = dual.bn1
    assert (m.weight.grad is not None) == (route != 'aux')
    assert (m.aux_bn[0].weight.grad is not None) == (route != 'main')


def test_route_context_restores_and_nests():
    dual = to_dual_bn(_plain('resnet50'))
    with bn_route(dual, 'split'):
        with use_aux_bn(dual):
            assert {m.route for m in _bns(dual)} == {'aux'}
        assert {m.route for m in _bns(dual)} == {'split'}
    assert {m.route for m in _bns(dual)} == {'main'}
    with pytest.raises(RuntimeError), use_aux_bn(dual):
        raise RuntimeError('inside')
    assert {m.route for m in _bns(dual)} == {'main'}


def test_bad_routes_and_models_fail_clearly():
    dual = to_dual_bn(_plain('resnet50'))
    with pytest.raises(ValueError, match='unknown BN route'), bn_route(dual, 'adv'):
        pass
    with pytest.raises(ValueError, match='no dual BN'), use_aux_bn(_plain('resnet50')):
        pass
    with pytest.raises(ValueError, match='even batch'), torch.no_grad(), bn_route(dual, 'split'):
        dual(torch.randn(3, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match='no BatchNorm2d'):
        to_dual_bn(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)))
    with pytest.raises(ValueError, match='only 2d'):
        to_dual_bn(torch.nn.Sequential(torch.nn.BatchNorm1d(3)))
    assert to_dual_bn(dual) is dual  # already dual: left alone


def test_channels_last_follows_the_route(x):
    dual = to_dual_bn(_plain('mobilenetv3_large_100'))
    _perturb_aux(dual)
    cl = copy.deepcopy(dual).to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        _assert_rel(cl(xc), dual(x))
        with use_aux_bn(cl), use_aux_bn(dual):
            _assert_rel(cl(xc), dual(x))


@pytest.mark.parametrize('train', [False, True])
def test_compile_follows_the_route(train):
    def net():
        torch.manual_seed(0)
        return _randomize_bns(torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8, act_layer=torch.nn.SiLU),
            torch.nn.Conv2d(8, 4, 1), torch.nn.BatchNorm2d(4)))
    eager, dual = to_dual_bn(net()).train(train), to_dual_bn(net()).train(train)
    _perturb_aux(eager), _perturb_aux(dual)
    compiled = torch.compile(dual, backend='aot_eager')  # dynamo + AOT autograd without codegen: fast on CPU
    x = torch.randn(4, 3, 8, 8)
    for route in ('main', 'aux', 'split', 'main'):  # a route change must reach the compiled graph
        with bn_route(eager, route), bn_route(dual, route):
            ref, out = eager(x), compiled(x)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
            if train:
                ref.square().sum().backward(), out.square().sum().backward()
    for (k, a), b in zip(eager.state_dict().items(), dual.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    for (k, a), b in zip(eager.named_parameters(), dual.parameters()):
        assert (a.grad is None) == (b.grad is None) == (not train), k
        if train:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=k)


def test_sync_conversion_keeps_both_branches():
    plain = _plain('mobilenetv3_large_100')
    dual = to_dual_bn(copy.deepcopy(plain))
    _perturb_aux(dual)
    dual.bn1.route = 'aux'
    before = {k: v.clone() for k, v in dual.state_dict().items()}
    params = {n: p for n, p in dual.named_parameters()}
    act = dual.bn1.act
    sync = convert_sync_dual_bn(dual)
    assert isinstance(sync.bn1, SyncDualBatchNorm) and isinstance(sync.bn1.aux_bn[0], SyncBatchNorm2d)
    assert sync.bn1.act is act and sync.bn1.route == 'aux'
    assert not any(type(m) in (DualBatchNorm2d, torch.nn.BatchNorm2d, BatchNormAct2d) for m in sync.modules())
    after = sync.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p is params[n] for n, p in sync.named_parameters())  # same tensors: optimizers / DDP keep them
    sync.bn1.route = 'main'
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():  # without a process group SyncBatchNorm computes locally: same numbers
        assert torch.equal(sync(x), plain(x))
        with use_aux_bn(sync):
            assert torch.equal(sync(x), _aux_as_main(dual)(x))
    folded = fold_dual_bn(sync)
    assert type(folded.bn1).__name__ == 'SyncBatchNorm2d' and folded.bn1.act is act


def test_sync_conversion_of_a_sync_model():
    plain = convert_sync_dual_bn(_plain('resnet50'))  # plain BNs: synchronised BNs that also work on CPU
    assert type(plain.bn1) is SyncBatchNorm2d
    dual = to_dual_bn(plain)
    assert isinstance(dual.bn1, SyncDualBatchNorm) and torch.equal(dual.bn1.weight, dual.bn1.aux_bn[0].weight)
