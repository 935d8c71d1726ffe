"""What keeps the GPU path right, checked on the CPU: attacks under every autocast dtype, fp32 losses,
split BN against two passes under autocast, an attack that never computes weight gradients (eager or
compiled), and bounds made once instead of copied to the device in every attack."""
import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from advprop_zoo import AttackConfig, ModeConfig, attack, forward_loss, to_dual_bn
from advprop_zoo.attacks import pixel_bounds

ADVPROP = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model('test_efficientnet', num_classes=10)


def _batch(n=16, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def test_autocast_attacks_perturb_the_same_fraction_of_pixels():
    """PGD in fp32, bf16 and fp16 autocast (fp16 with the attack's fixed loss scale): the sign of the input
    gradient is what moves pixels, so each dtype changes the same share of them, within 1 %."""
    model = _model().eval()
    x, y = _batch()
    fractions = {}
    for dtype in (None, torch.bfloat16, torch.float16):
        x_adv = attack(model, x, y, AttackConfig(eps=4, steps=2, random_start=False), *ADVPROP,
                       autocast_dtype=dtype, generator=torch.Generator().manual_seed(1))
        fractions[dtype] = (x_adv != x).float().mean().item()
    assert fractions[None] > 0.5
    for dtype in (torch.bfloat16, torch.float16):
        assert abs(fractions[dtype] - fractions[None]) <= 0.01, fractions


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_split_bn_equals_two_passes_under_autocast(dtype):
    """One split-BN pass over [clean; adv] and two passes give the same losses and gradients, with the
    losses computed in fp32 in both (the split pass used to leave them in the autocast dtype)."""
    x, y = _batch(8)
    grads, losses = [], []
    for split in (False, True):
        model = to_dual_bn(_model()).train()
        cfg = ModeConfig('advprop', AttackConfig(eps=2, steps=1, random_start=False), split_bn=split)
        torch.manual_seed(3)
        out = forward_loss(model, x, y, torch.nn.CrossEntropyLoss(), cfg, *ADVPROP, autocast_dtype=dtype)
        assert out.loss.dtype == torch.float32
        out.loss.backward()
        losses.append((out.clean.item(), out.adv.item()))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[0] == pytest.approx(losses[1], rel=2e-2, abs=2e-2)
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0).item()
    assert cos > 0.99, cos


class _ConvBackwards(TorchDispatchMode):
    """Counts convolution backwards and how many of them computed a weight gradient."""

    def __init__(self):
        super().__init__()
        self.calls = self.weight_grads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.calls += 1
            self.weight_grads += bool(args[-1][1])  # output_mask: (input, weight, bias)
        return func(*args, **(kwargs or {}))


def test_the_attack_computes_no_weight_gradient_eager():
    model = to_dual_bn(_model()).train()
    x, y = _batch(4)
    with _ConvBackwards() as counter:
        attack(model, x, y, AttackConfig(eps=2, steps=2), *ADVPROP, bn_route='aux', mode='train')
    assert counter.calls > 0 and counter.weight_grads == 0, (counter.calls, counter.weight_grads)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_the_attack_computes_no_weight_gradient_compiled():
    """Under torch.compile, AOT autograd builds one backward graph for what requires grad: with the weights
    still requiring it, all 17 convolution backwards of the graph computed weight gradients (17/17)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    masks = []

    def backward_compiler(gm, example_inputs):
        masks.extend(n.args[-1] for n in gm.graph.nodes if n.target is torch.ops.aten.convolution_backward.default)
        return make_boxed_func(gm.forward)
    backend = aot_autograd(fw_compiler=lambda gm, ex: make_boxed_func(gm.forward), bw_compiler=backward_compiler)
    model = to_dual_bn(_model()).train()
    x, y = _batch(4)
    attack(torch.compile(model, backend=backend, dynamic=False), x, y, AttackConfig(eps=2, steps=2), *ADVPROP,
           bn_route='aux', mode='train')
    assert len(masks) > 0 and sum(bool(m[1]) for m in masks) == 0, masks
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_pixel_bounds_are_made_once():
    a = pixel_bounds([0.5, 0.5, 0.5], (0.5, 0.5, 0.5), device='cpu')
    b = pixel_bounds((0.5, 0.5, 0.5), [0.5, 0.5, 0.5], device=torch.device('cpu'))
    assert all(u is v for u, v in zip(a, b))
    lo, hi, unit = a
    assert torch.equal(lo.flatten(), torch.full((3,), -1.0)) and torch.allclose(unit.flatten(), torch.full((3,), 2 / 255))


def _count_host_reads(monkeypatch):
    """Counts reads of a tensor's value back to the host (item, tolist, bool, float, int) made by this
    project's step code. On a GPU each is a sync; the data side (labels read on the host before they go to
    the device: advprop_zoo/images.py, advprop_zoo_train/data.py) is left out."""
    import sys as _sys
    counts = {'n': 0}

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            caller = _sys._getframe(1).f_code.co_filename
            if ('/advprop_zoo/' in caller or '/advprop_zoo_train/' in caller) and \
                    not caller.endswith(('images.py', 'data.py')):
                counts['n'] += 1
            return real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    for name in ('item', 'tolist', '__bool__', '__float__', '__int__'):
        counting(name)
    return counts


@pytest.mark.parametrize('mode', ['advprop', 'fast-advprop', 'adv-train', 'vanilla'])
def test_no_host_read_between_log_intervals(tmp_path, monkeypatch, mode):
    """A step reads nothing back from the device: sums and finiteness flags stay there until a check
    (every --log-interval batches, a checkpoint, the epoch end). Counted per step by wrapping forward_loss."""
    import advprop_zoo.modes as modes
    from advprop_zoo_train import build_parser, train
    from test_train import TINY, _make_folder
    folder = _make_folder(tmp_path / 'data', classes=3, train=16, val=4)
    counts = _count_host_reads(monkeypatch)
    at_step = []
    real = modes.forward_loss

    def marking(*a, **k):
        at_step.append(counts['n'])
        return real(*a, **k)
    monkeypatch.setattr(modes, 'forward_loss', marking)
    argv = [*TINY, '--data-dir', str(folder), '--output', str(tmp_path / 'run'), '--mode', mode, '--attack-eps', '2',
            '--log-interval', '1000', '--batch-size', '8', '--clip-grad', '5']
    train(build_parser().parse_args(argv))
    per_step = [b - a for a, b in zip(at_step, at_step[1:])]
    assert len(per_step) == 5 and per_step == [0] * 5, per_step  # 6 steps: no read between any two


def test_compiled_training_recompiles_at_most_4_times_in_10_steps(tmp_path):
    """dynamic=False and nothing that changes between steps: the step and the attack each compile their
    graphs once (attack, clean and auxiliary passes), never again per step (torch's own counters)."""
    from torch._dynamo.utils import counters
    from advprop_zoo_train import build_parser, train
    from test_train import TINY, _make_folder
    folder = _make_folder(tmp_path / 'data', classes=2, train=20, val=2)
    torch._dynamo.reset()
    counters.clear()
    argv = [*TINY, '--data-dir', str(folder), '--output', str(tmp_path / 'run'), '--mode', 'advprop',
            '--attack-eps', '2', '--batch-size', '4', '--torchcompile', 'aot_eager', '--max-steps', '10', '--split-bn']
    assert train(build_parser().parse_args(argv)).summary['steps'] == 10
    recompiles = sum(counters['recompiles'].values())
    assert recompiles <= 4, dict(counters['recompiles'])
    print(f'recompiles over 10 compiled AdvProp steps: {recompiles} ({dict(counters["recompiles"])}); '
          f"unique graphs: {counters['stats']['unique_graphs']}; {sorted(counters)}")


def test_batches_travel_as_uint8_and_are_normalised_on_the_device(tmp_path):
    """The train loader's batches are uint8 (a quarter of float32's bytes across the worker pipe and to the
    GPU); DeviceNormalize gives the values timm's float pipeline would (ToTensor + Normalize)."""
    from PIL import Image
    from timm.data import create_transform
    from advprop_zoo_train import build_parser
    from advprop_zoo_train.data import DeviceNormalize, create_loaders
    from test_train import TINY, _make_folder
    folder = _make_folder(tmp_path / 'data', classes=2, train=4, val=2)
    args = build_parser().parse_args([*TINY, '--data-dir', str(folder), '--device', 'cpu', '--batch-size', '4'])
    config = dict(input_size=(3, 32, 32), interpolation='bicubic', mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                  crop_pct=0.875)
    train, _, _ = create_loaders(args, config)
    train.set_epoch(0)
    x, _ = next(iter(train))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32)
    img = Image.open(next((folder / 'train' / 'class0').iterdir())).convert('RGB')
    plain = create_transform(32, is_training=False, crop_pct=1.0, mean=config['mean'], std=config['std'])
    uint8 = create_transform(32, is_training=False, crop_pct=1.0, use_prefetcher=True)
    ours = DeviceNormalize(config['mean'], config['std'], 'cpu')(uint8(img)[None])
    assert torch.allclose(ours, plain(img)[None], atol=1e-5)
    erased = DeviceNormalize(config['mean'], config['std'], 'cpu', re_prob=1.0)(uint8(img)[None].repeat(8, 1, 1, 1))
    assert not torch.allclose(erased, ours.repeat(8, 1, 1, 1))  # --reprob erases on the device


def test_clean_backward_before_the_adversarial_forward_gives_the_same_update():
    """AdvProp's two passes with the clean loss back-propagated first (its activations freed before the
    adversarial forward): the gradients are the two-graph backward's, and the clean gradients are already
    in place when the adversarial forward starts."""
    x, y = _batch(8)
    cfg = ModeConfig('advprop', AttackConfig(eps=2, steps=1, random_start=False))
    grads, seen = [], []
    for early in (False, True):
        model = to_dual_bn(_model()).train()
        hook = model.conv_stem.register_forward_pre_hook(
            lambda m, a: seen.append(m.weight.grad is not None) if early else None)
        torch.manual_seed(3)
        out = forward_loss(model, x, y, torch.nn.CrossEntropyLoss(), cfg, *ADVPROP,
                           backward_clean=(lambda t: t.backward()) if early else None)
        out.loss.backward()
        hook.remove()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert seen[-1] is True  # the adversarial forward (the last one) ran after the clean backward
