"""The GPU path against the CPU path it was written and tested on: marked ``cuda``, skipped with the reason shown
where there is no CUDA device (``pytest -m cuda tests/test_cuda.py -rs``; ``benchmarks/gpu.py`` runs them first).

What is checked, on a dual-BN ``test_efficientnet`` (10 classes, batch 32 at 32 px, fixed seed):

* every mode's train step (``forward_loss`` + backward) on the GPU against the same step on the CPU, fp32 (TF32
  off): losses, gradients and BN running statistics;
* synchronised dual BN (``convert_sync_dual_bn``) under a 1-process NCCL group against the plain dual BN, both as
  it runs there (one rank: the local BN) and forced through the all-reduce path a multi-GPU run takes;
* bf16 autocast against fp32, channels_last against NCHW, ``torch.compile`` (inductor, ``dynamic=False``) against eager;
* no host sync in steps 2..N of the real train loop (``torch.cuda.set_sync_debug_mode('error')``).

The attacks here are untargeted without a random start, so the CPU and the GPU (whose random streams differ) make
the same adversarial batch up to the rounding of the input gradient's sign.

Tolerances (relative; gradients as the L2 norm of the difference over the reference's, all tensors together) were
set from the same comparisons on a CPU: fp32 against fp64 differs by <= 1e-6 in losses and <= 1.3e-5 in gradients;
channels_last against NCHW by <= 7e-6 in losses and <= 7.4e-4 in gradients, where a few pixels whose input gradient
is ~0 change the sign of their attack step; bf16 autocast against fp32 by <= 1.2e-3 in losses, <= 0.056 in gradients
(cosine >= 0.998) and <= 5.5e-4 in running statistics. Each bound below leaves a margin of 10x or more over those.
"""
import socket
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, Optional

import pytest
import timm
import torch
import torch.distributed as dist

from advprop_zoo import AttackConfig, ModeConfig, SyncDualBatchNorm, convert_sync_dual_bn, forward_loss, to_dual_bn

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]

MEAN = STD = (0.5, 0.5, 0.5)
ATTACK = AttackConfig(eps=2, steps=2, targeted=False, random_start=False)  # the same on any device
CONFIGS = {
    'vanilla': ModeConfig('vanilla'),
    'advprop': ModeConfig('advprop', ATTACK),
    'advprop-split': ModeConfig('advprop', ATTACK, split_bn=True),
    'adv-train': ModeConfig('adv-train', ATTACK),
    'fast-advprop': ModeConfig('fast-advprop', ATTACK),
}


@dataclass(frozen=True)
class Tol:
    """Relative bounds: losses, gradients (all together), running statistics; optional minimum gradient cosine."""
    loss: float
    grad: float
    buffers: float
    cosine: Optional[float] = None


FP32 = Tol(loss=1e-4, grad=1e-3, buffers=1e-4)  # the same fp32 step on two devices or two code paths
FP32_ATTACKED = Tol(loss=5e-4, grad=1e-2, buffers=1e-3)  # + a few attack steps whose sign rounding flipped
BF16 = Tol(loss=1e-2, grad=0.25, buffers=1e-2, cosine=0.99)  # bf16 autocast against fp32


def _fp32_tol(mode: str) -> Tol:
    return FP32 if mode == 'vanilla' else FP32_ATTACKED


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 on the GPU means fp32: cuDNN convolutions default to TF32 on Ampere and later (10-bit mantissa)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return to_dual_bn(timm.create_model('test_efficientnet', num_classes=10)).train()


def _batch(device, n: int = 32, size: int = 32):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


@dataclass
class Step:
    loss: float
    clean: float
    adv: Optional[float]
    grads: Dict[str, torch.Tensor]  # fp64, on the CPU
    buffers: Dict[str, torch.Tensor]  # BN running statistics after the step


def _step(model: torch.nn.Module, mode: str, device, autocast: Optional[torch.dtype] = None,
          channels_last: bool = False, compile_backend: Optional[str] = None, early_backward: bool = True) -> Step:
    """One train step of ``mode`` as the loop takes it (loss, then backward); what it leaves. ``early_backward``:
    advprop's clean loss back-propagated before its adversarial forward, as one process does (under torchrun the
    loop leaves it to the one backward DDP's reducer wants)."""
    model = model.to(device)
    x, y = _batch(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    net = torch.compile(model, backend=compile_backend, dynamic=False) if compile_backend else model
    out = forward_loss(net, x, y, torch.nn.CrossEntropyLoss(), CONFIGS[mode], MEAN, STD, autocast_dtype=autocast,
                       backward_clean=(lambda clean: clean.backward()) if early_backward else None)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.detach().double().cpu() for n, b in model.named_buffers() if 'running' in n}
    return Step(out.loss.item(), out.clean.item(), None if out.adv is None else out.adv.item(), grads, buffers)


def _relative(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]):
    """(relative L2 error over all tensors, cosine, the tensor with the largest relative error and its error)."""
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
    a, b = torch.cat([got[k].flatten() for k in ref]), torch.cat([ref[k].flatten() for k in ref])
    worst = max(ref, key=lambda k: ((got[k] - ref[k]).norm() / ref[k].norm().clamp(min=1e-12)).item())
    worst_err = ((got[worst] - ref[worst]).norm() / ref[worst].norm().clamp(min=1e-12)).item()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return ((a - b).norm() / b.norm()).item(), cos, worst, worst_err


def _assert_close(got: Step, ref: Step, tol: Tol, what: str) -> None:
    problems = []
    for name in ('loss', 'clean', 'adv'):
        a, b = getattr(got, name), getattr(ref, name)
        if (a is None) != (b is None) or (a is not None and a != pytest.approx(b, rel=tol.loss, abs=1e-6)):
            problems.append(f'{name} loss {a} against {b} (relative bound {tol.loss:g})')
    err, cos, worst, worst_err = _relative(got.grads, ref.grads)
    if err > tol.grad or (tol.cosine is not None and cos < tol.cosine):
        problems.append(f'gradients: relative error {err:.2e} (bound {tol.grad:g}), cosine {cos:.6f}'
                        f'{f" (bound {tol.cosine:g})" if tol.cosine else ""}; worst tensor {worst} {worst_err:.2e}')
    berr, _, bworst, bworst_err = _relative(got.buffers, ref.buffers)
    if berr > tol.buffers:
        problems.append(f'running statistics: relative error {berr:.2e} (bound {tol.buffers:g}); worst {bworst} '
                        f'{bworst_err:.2e}')
    assert not problems, f'{what}:\n  ' + '\n  '.join(problems)


# ------------------------------------------------------------------------------------- the step on two devices
@pytest.mark.parametrize('mode', list(CONFIGS))
def test_step_on_the_gpu_matches_the_cpu(mode):
    cpu = _step(_model(), mode, 'cpu')
    gpu = _step(_model(), mode, 'cuda')
    _assert_close(gpu, cpu, _fp32_tol(mode), f'{mode}: GPU step against the CPU step (fp32)')


@pytest.mark.parametrize('mode', list(CONFIGS))
def test_bf16_autocast_step_is_close_to_fp32(mode):
    fp32 = _step(_model(), mode, 'cuda')
    bf16 = _step(_model(), mode, 'cuda', autocast=torch.bfloat16)
    _assert_close(bf16, fp32, BF16, f'{mode}: bf16 autocast against fp32 on the GPU')


@pytest.mark.parametrize('mode', list(CONFIGS))
def test_channels_last_step_matches_nchw(mode):
    nchw = _step(_model(), mode, 'cuda')
    nhwc = _step(_model(), mode, 'cuda', channels_last=True)
    _assert_close(nhwc, nchw, _fp32_tol(mode), f'{mode}: channels_last against NCHW on the GPU (fp32)')


@pytest.mark.parametrize('mode', ['advprop', 'fast-advprop'])
def test_compiled_step_matches_eager(mode):
    """inductor, dynamic=False, as ``advprop-zoo train --torchcompile`` compiles (the attack through the same
    compiled module). advprop compiles the attack, main and auxiliary passes; fast-advprop the clean pass with
    input gradients and the auxiliary pass of the attacked fraction."""
    from torch._dynamo.utils import counters
    eager = _step(_model(), mode, 'cuda')
    torch._dynamo.reset()
    counters.clear()
    compiled = _step(_model(), mode, 'cuda', compile_backend='inductor')
    assert counters['stats']['unique_graphs'] >= 1, dict(counters['stats'])  # it did compile
    _assert_close(compiled, eager, _fp32_tol(mode), f'{mode}: torch.compile (inductor) against eager on the GPU')


# -------------------------------------------------------------------------------------------- synchronised BN
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def nccl_group():
    """A 1-process NCCL group (tcp://127.0.0.1), torn down after the test."""
    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip('this torch build has no NCCL')
    if dist.is_initialized():
        pytest.skip('a process group is already initialised in this process')
    dist.init_process_group('nccl', init_method=f'tcp://127.0.0.1:{_free_port()}', rank=0, world_size=1,
                            timeout=timedelta(seconds=120))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('path', ['local', 'all-reduce'])
@pytest.mark.parametrize('mode', ['advprop', 'advprop-split', 'fast-advprop'])
def test_sync_dual_bn_under_nccl_matches_dual_bn(nccl_group, monkeypatch, mode, path):
    """``local``: one rank, as it runs (the synchronised BN takes the local BN). ``all-reduce``: the group is made
    to report 2 ranks to the BN layers, so every BN (both branches, forward and backward) goes through the
    NCCL all-reduce of sums, sums of squares and counts that a multi-GPU run takes; with one real rank the sums
    are this rank's, so the step must equal the plain dual BN's."""
    ref = _step(_model(), mode, 'cuda', early_backward=False)
    model = convert_sync_dual_bn(_model())
    assert sum(isinstance(m, SyncDualBatchNorm) for m in model.modules()) > 0
    reduces = []
    if path == 'all-reduce':
        real_size, real_reduce = dist.get_world_size, dist.all_reduce
        monkeypatch.setattr(dist, 'get_world_size', lambda group=None: max(2, real_size(group)))

        def counting(tensor, *a, **k):
            reduces.append(tensor.device.type)
            return real_reduce(tensor, *a, **k)
        monkeypatch.setattr(dist, 'all_reduce', counting)
    got = _step(model, mode, 'cuda', early_backward=False)  # as under torchrun
    if path == 'all-reduce':
        assert reduces and set(reduces) == {'cuda'}, reduces  # the synchronised path ran, on the device
    _assert_close(got, ref, _fp32_tol(mode), f'{mode}: synchronised dual BN ({path}) against dual BN, NCCL')


# ------------------------------------------------------------------------------------------ host syncs per step
def test_sync_debug_mode_flags_a_host_read():
    """The instrument of the next test: in 'error' mode a device-to-host read raises."""
    t = torch.ones(4, device='cuda')
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        with pytest.raises(RuntimeError, match='synchroniz'):
            t.sum().item()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize('mode,extra', [
    ('vanilla', []), ('advprop', []), ('adv-train', []), ('fast-advprop', []), ('advprop', ['--split-bn']),
    ('advprop', ['--amp', '--amp-dtype', 'bfloat16', '--channels-last']),
], ids=['vanilla', 'advprop', 'adv-train', 'fast-advprop', 'advprop-split', 'advprop-bf16-channels-last'])
def test_no_host_sync_between_log_intervals(tmp_path, monkeypatch, mode, extra):
    """The real train loop on the GPU, 6 steps, --log-interval 1000: from the start of step 2 to the epoch's
    first check (``_check_health``, the one place a run reads its flags back) every synchronising CUDA call
    raises (``torch.cuda.set_sync_debug_mode('error')``). That window holds whole steps 2..6: the batch's copy
    to the device, forward_loss, backward, gradient norm and clipping, optimizer and schedule. 0 host syncs."""
    import advprop_zoo.modes as modes
    import advprop_zoo_train.loop as loop
    from advprop_zoo_train import build_parser, train
    from test_train import TINY, _make_folder
    folder = _make_folder(tmp_path / 'data', classes=3, train=16, val=4)  # 48 images, batch 8: 6 steps
    steps, window = [], {}
    real_step, real_check = modes.forward_loss, loop._check_health

    def stepping(*a, **k):
        steps.append(len(steps) + 1)
        if len(steps) == 2:  # step 1 (cuDNN's algorithm search, first allocations) is done before the window
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode('error')
            window['opened_at'] = 2
        return real_step(*a, **k)

    def checking(*a, **k):
        if torch.cuda.get_sync_debug_mode() != 0:
            torch.cuda.set_sync_debug_mode(0)
            window['closed_after'] = len(steps)
        return real_check(*a, **k)
    monkeypatch.setattr(modes, 'forward_loss', stepping)
    monkeypatch.setattr(loop, '_check_health', checking)
    argv = [*TINY, '--data-dir', str(folder), '--output', str(tmp_path / 'run'), '--mode', mode, '--attack-eps', '2',
            '--log-interval', '1000', '--batch-size', '8', '--clip-grad', '5', '--device', 'cuda', *extra]
    try:
        train(build_parser().parse_args(argv))
    except RuntimeError as e:
        if 'synchroniz' not in str(e):
            raise
        pytest.fail(f'{mode} {" ".join(extra)}: a host sync in step {len(steps)} (window opened at step 2):\n'
                    + ''.join(traceback.format_exception(e)[-12:]))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(steps) == 6, steps
    assert window == {'opened_at': 2, 'closed_after': 6}, window  # steps 2..6 ran whole inside the window
