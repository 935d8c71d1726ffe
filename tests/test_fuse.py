"""BN fusion and static padding: same logits as the unfused model, no BatchNorm left."""
import copy

import pytest
import timm
import torch
from torch import nn
from timm.layers import BatchNormAct2d, Conv2dSame

from advprop_zoo import fuse_bn, static_same_padding, to_dual_bn
from advprop_zoo.export import check_inputs
from advprop_zoo.fuse import StaticPadConv2d

# (timm model, input size): small inputs keep the suite fast; B3 has odd sizes (stride-2 on odd inputs)
MODELS = [('efficientnet_b0_advprop', 64), ('efficientnet_b3_advprop', 72), ('resnet50', 64)]


def calibrated(name, size, seed=0, branch_gain=0.2):
    """A model whose BNs hold real-looking statistics: random affine params, running stats averaged
    over a few batches (init values 0 / 1 would make fusion nearly a no-op).

    ``branch_gain`` scales the last BN of each residual branch, as training leaves it: trained residual
    nets add small branch outputs to the shortcut (the reason for timm's ``zero_init_last``). With gain 1
    every branch is as large as its shortcut and the random net is chaotic: a 1-ulp change anywhere grows
    about 1.2x per block (measured), so float32 logits carry 1e-5..1e-4 of noise of their own."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, drop_rate=0.0, drop_path_rate=0.0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None  # cumulative average
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
        for bn in residual_branch_ends(model):
            bn.weight.mul_(branch_gain)
        model.train()
        for seed in range(3):  # the kinds of input the tests use, so no layer sees wildly unexpected stats
            model(check_inputs((3, size, size), batch_size=2, seed=seed))
    return model.eval()


def residual_branch_ends(model):
    """The last BN of every residual branch: a block's last direct BN child, for timm's blocks that add
    a shortcut (EfficientNet's ``has_skip``, ResNet's blocks, which know their ``zero_init_last``)."""
    for block in model.modules():
        if getattr(block, 'has_skip', False) or hasattr(block, 'zero_init_last'):
            bns = [m for m in block.children() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if bns:
                yield bns[-1]


def rel_diff(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope='module', params=MODELS, ids=[m for m, _ in MODELS])
def models(request):
    name, size = request.param
    model = calibrated(name, size)
    return name, size, model, fuse_bn(copy.deepcopy(model)), fuse_bn(copy.deepcopy(model), input_size=size)


def test_no_batchnorm_remains_and_acts_are_kept(models):
    _, _, model, fused, static = models
    for m in (fused, static):
        assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())
        assert not m.training
        acts = [type(x) for x in m.modules() if isinstance(x, (nn.SiLU, nn.ReLU))]
        assert acts == [type(x) for x in model.modules() if isinstance(x, (nn.SiLU, nn.ReLU))]
    assert not any(isinstance(x, Conv2dSame) for x in static.modules())


def test_residual_branch_ends_are_found():
    for name, blocks in [('efficientnet_b0_advprop', 16 - 7), ('resnet50', 16)]:  # B0: 7 stages open with no skip
        model = timm.create_model(name)
        assert len(list(residual_branch_ends(model))) == blocks


def test_fused_logits_match(models):
    """Fused vs unfused float32 logits within 1e-5 of the logits' magnitude, for each input kind
    (random and structured); static padding bit-identical to the dynamic padding."""
    name, size, model, fused, static = models
    x = check_inputs((3, size, size), batch_size=2)
    with torch.no_grad():
        ref, out, out_static = model(x), fused(x), static(x)
    for kind, rows in enumerate(torch.arange(len(x)).split(2)):
        assert rel_diff(out[rows], ref[rows]) <= 1e-5, f'{name} input kind {kind}'
    assert torch.equal(out_static, out)


@pytest.mark.parametrize('name, size', MODELS[1:])
def test_fused_chaotic_model_is_as_close_to_float64(name, size):
    """Every residual branch at full gain (a random net in its chaotic regime): the unfused float32
    logits are themselves 1e-5..1e-4 from their float64 value, so the fused ones are held to that
    floor: about as close to float64 as the unfused (an error in the fusion, even a wrong eps, is
    orders of magnitude above it)."""
    model = calibrated(name, size, branch_gain=1.0)
    fused = fuse_bn(copy.deepcopy(model))
    x = check_inputs((3, size, size), batch_size=2)
    with torch.no_grad():
        ref, out, ref64 = model(x).double(), fused(x).double(), copy.deepcopy(model).double()(x.double())
    for kind, rows in enumerate(torch.arange(len(x)).split(2)):
        r, o, r64 = ref[rows], out[rows], ref64[rows]
        floor = (r - r64).abs().max().item()
        err = (o - r64).abs().max().item()
        assert err <= 3 * floor + 1e-6 * r64.abs().max().item(), f'{name} kind {kind}: fused {err:.3g}, unfused {floor:.3g}'


def test_fusion_is_exact_in_float64(models):
    name, size, model, _, _ = models
    m64 = copy.deepcopy(model).double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        ref = m64(x)
        assert rel_diff(fuse_bn(m64, input_size=size)(x), ref) < 1e-12


@pytest.mark.parametrize('pad_in_kernel', [False, True])
@pytest.mark.parametrize('size, asymmetric', [((64, 64), True), ((65, 97), False), ((33, 40), True)])
def test_static_padding_is_identical_to_dynamic(size, asymmetric, pad_in_kernel):
    model = calibrated('efficientnet_b0_advprop', 32)
    static = copy.deepcopy(model)
    stem_weight = static.conv_stem.weight
    static_same_padding(static, (3,) + size, pad_in_kernel=pad_in_kernel)
    assert not any(isinstance(m, Conv2dSame) for m in static.modules())
    kinds = {type(m) for m in static.modules() if isinstance(m, nn.Conv2d)}
    # TF pads stride-2 convs on even sizes asymmetrically: an explicit pad, or zero taps in a larger kernel
    assert (StaticPadConv2d in kinds) == (asymmetric and not pad_in_kernel)
    assert (static.conv_stem.kernel_size != (3, 3)) == (asymmetric and pad_in_kernel)
    x = check_inputs((3,) + size, batch_size=1)
    with torch.no_grad():
        assert torch.equal(static(x), model(x))  # the same sums: zero pads and zero taps add exact zeros
    assert (static.conv_stem.weight is stem_weight) == (not (asymmetric and pad_in_kernel))  # shared, not copied


def test_fuses_convs_with_bias_groups_and_lone_bn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8),
        Conv2dSame(8, 8, 3, stride=2, groups=4), BatchNormAct2d(8, act_layer=nn.PReLU),
        nn.Conv2d(8, 8, 1), nn.ReLU(), nn.BatchNorm2d(8),  # BN after an act: nothing to fuse into
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(), m.running_var.uniform_(0.5, 2), m.weight.normal_(), m.bias.normal_()
    model.eval()
    prelu = model[3].act
    x = torch.randn(2, 3, 11, 11)
    with torch.no_grad():
        ref = model(x)
        fused = fuse_bn(copy.deepcopy(model))
        assert rel_diff(fused(x), ref) < 1e-6
    assert isinstance(fused[1], nn.Identity)
    assert isinstance(fused[3].act, nn.PReLU) and torch.equal(fused[3].act.weight, prelu.weight)
    assert isinstance(fused[6], nn.Conv2d) and fused[6].groups == 8  # lone BN -> depthwise 1x1 affine
    assert 'act.weight' in dict(fused[3].named_parameters())  # the act keeps its state-dict key


def test_dual_models_must_be_folded_first():
    with pytest.raises(ValueError, match='fold them first with fold_dual_bn'):
        fuse_bn(to_dual_bn(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))))


def test_bad_input_size():
    with pytest.raises(ValueError, match='input size must be'):
        fuse_bn(calibrated('efficientnet_b0_advprop', 32), input_size=(3, 0, 64))
