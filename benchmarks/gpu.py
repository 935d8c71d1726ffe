"""The GPU check: the cuda tests, each training mode's step cost, clean eval and the data loader, on one GPU.

    python benchmarks/gpu.py                          # one H100 / H200: under 8 min (budget below); one table
    python benchmarks/gpu.py --json h200.json         # the same figures as JSON (default gpu_check.json)
    python benchmarks/gpu.py --device cpu --smoke     # the same code at toy size, no cuda tests: < 2 min on 2 cores
    python benchmarks/gpu.py --skip-tests             # the measurements only

Exit status 1 when a cuda test failed (the table and JSON are written all the same); a missed speed goal is a
MISS in the table, not an error. The cuda tests run on the default CUDA device (``CUDA_VISIBLE_DEVICES`` picks it).

It measures, each against an anchor run in the same process:

1. **cuda tests**: ``pytest -m cuda tests/test_cuda.py`` in a subprocess (every mode's step on the GPU against the
   CPU, synchronised dual BN under NCCL, bf16 autocast, channels_last, torch.compile, no host sync between log
   intervals of the real train loop): passed / failed / skipped. Goal: all pass.
2. **train step**: ``efficientnet_b0_advprop`` (random weights), 224 px, batch 256, bf16 autocast, channels_last,
   ``torch.compile`` (inductor, ``dynamic=False``), rmsproptf (the train command's default optimizer), label
   smoothing 0.1, all rows alike. Anchor: *vanilla*, timm's own train step (forward, ``LabelSmoothingCrossEntropy``,
   backward, optimizer step) on the plain model. Rows through ``advprop_zoo.modes.forward_loss`` on one dual-BN
   model, as ``advprop-zoo train`` steps in one process: advprop PGD-1 (eps 1) and PGD-5 (eps 4), the paper's step
   rule, two passes (the default), the clean loss back-propagated before the adversarial forward; fast-advprop
   (p_adv 0.2, eps 1). Each: images/s (batch images, clean ones), peak memory (``torch.cuda.max_memory_allocated``,
   reset before each row's timed steps; it includes every row's weights and optimizer state, < 0.2 GiB for B0)
   and the ratio of its step time to vanilla's. Goals: advprop PGD-1 <= 2.7x, fast-advprop <= 1.3x.
3. **clean eval**: ``advprop_zoo.eval.accuracy.evaluate_accuracy`` on ``prepare_eval_model``'s model (BNs fused,
   static padding in the kernel) against timm's validate.py loop (``torch.no_grad()``, ``output = model(x)``,
   cross-entropy, ``timm.utils.accuracy`` top-1/5 with ``.item()`` per batch) on the unfused timm model: same
   weights, same batches already on the device, both bf16 autocast and channels_last. Ratio: images/s over
   timm's. Goal: >= 1.0x.
4. **data loader alone**: ``advprop-zoo train``'s training loader (timm's ``create_dataset`` on a synthetic
   ImageFolder of 400-500 px JPEGs the script writes to a temp dir, its defaults: RandomResizedCrop, flip, colour
   jitter, in worker processes; uint8 batches copied to the device and normalised there), no model: images/s, and
   its ratio to the vanilla step's images/s (>= 1: this machine's CPUs keep a vanilla run fed).

Warm-up iterations are untimed (compilation, cuDNN's algorithm search, first allocations); ``torch.cuda.synchronize()``
brackets the timed iterations only; rounds are interleaved across rows (drift hits every row alike) and medians
reported. The cuda tests run in their subprocess beside this process's compilation of the train rows (CPU work,
untimed: its first calls autotune a few Triton reduction configurations on the GPU, which the tests' small kernels
may share at that moment); nothing is timed, and cuDNN's algorithm search (benchmark mode) does not start, until
the tests have finished.

Budget on one H200 (an estimate: no GPU has run this yet), about 6 min of the 8 (the JSON is rewritten after each
section, so a run cut short keeps what it measured; ``seconds`` says where the time went):

* cuda tests ~2-2.5 min (30 tests: two inductor compiles of test_efficientnet, six short train runs, NCCL set-ups),
  in parallel with the train rows' compilation, ~3-4 min (one fwd+bwd graph for vanilla, five for the dual-BN
  rows: attack, clean and auxiliary passes, fast-advprop's clean pass with input gradients and its auxiliary pass
  on 51 images; PGD-5 reuses PGD-1's graphs);
* warm-up and cuDNN's search ~15 s, timed steps ~25 s (3 rounds x 10 steps of 4 rows at ~5k vanilla images/s:
  PGD-5 ~0.3 s a step);
* eval ~15 s (fusion, 5 rounds over 20 batches of 256 on each path); loader ~30 s (4,096 JPEGs written by all
  cores, 1 + 3 epochs).

If it runs long: ``--skip-tests`` (run them alone: ``pytest -m cuda tests/test_cuda.py -rs``), fewer ``--iters`` /
``--rounds`` / ``--loader-images``.
"""
import argparse
import concurrent.futures
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import timm  # noqa: E402
from timm.data import resolve_data_config  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

import advprop_zoo  # noqa: E402,F401  registers the zoo's models
from advprop_zoo.attacks import AttackConfig  # noqa: E402
from advprop_zoo.dual_bn import to_dual_bn  # noqa: E402
from advprop_zoo.eval.accuracy import evaluate_accuracy  # noqa: E402
from advprop_zoo.eval.suite import prepare_eval_model  # noqa: E402
from advprop_zoo.modes import ModeConfig, forward_loss  # noqa: E402
from advprop_zoo.table import format_table  # noqa: E402
from advprop_zoo.weights import atomic_write  # noqa: E402
from benchmarks.cpu_setup import add_cpu_args, apply_cpu_args, cpu_name  # noqa: E402

# name (the JSON's, read by `advprop-zoo plan --measured`), label, step config (None: timm's step), goal (<= ratio)
TRAIN_ROWS = [
    ('vanilla', "vanilla: timm's train step (anchor)", None, None),
    ('advprop-pgd1', 'advprop PGD-1 (eps 1, two passes)', ModeConfig('advprop', AttackConfig(eps=1)), 2.7),
    ('advprop-pgd5', 'advprop PGD-5 (eps 4, two passes)', ModeConfig('advprop', AttackConfig(eps=4)), None),
    ('fast-advprop', 'fast-advprop (p_adv 0.2, eps 1)', ModeConfig('fast-advprop', AttackConfig(eps=1)), 1.3),
]
EVAL_GOAL = 1.0  # evaluate_accuracy's images/s over timm's validate.py loop's, at least
SMOKE = dict(model='test_efficientnet', res=64, batch=4, warmup=1, iters=1, rounds=1, compile='aot_eager',
             eval_batches=2, eval_rounds=1, loader_images=16, loader_rounds=1, workers=0,
             threads=1)  # one thread: on a small shared machine OpenMP threads spinning against others cost 3-10x
FULL = dict(model='efficientnet_b0_advprop', res=224, batch=256, warmup=3, iters=10, rounds=3, compile='inductor',
            eval_batches=20, eval_rounds=5, loader_images=4096, loader_rounds=3, workers=None, threads=None)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda', help='cuda, cuda:N or cpu (cpu: with --smoke)')
    p.add_argument('--smoke', action='store_true',
                   help='toy size (test_efficientnet, 64 px, batch 4, 1 step, aot_eager): checks the script, not speed')
    p.add_argument('--json', default='gpu_check.json', help='where the results go as JSON (written atomically)')
    p.add_argument('--model', default=None, help=f'default {FULL["model"]} ({SMOKE["model"]} with --smoke)')
    p.add_argument('--res', type=int, default=None, help=f'input size (default {FULL["res"]}, smoke {SMOKE["res"]})')
    p.add_argument('--batch', type=int, default=None, help=f'batch size (default {FULL["batch"]})')
    p.add_argument('--warmup', type=int, default=None, help=f'untimed steps per row (default {FULL["warmup"]})')
    p.add_argument('--iters', type=int, default=None, help=f'timed steps per row per round (default {FULL["iters"]})')
    p.add_argument('--rounds', type=int, default=None, help=f'interleaved rounds (default {FULL["rounds"]})')
    p.add_argument('--compile', default=None, choices=('inductor', 'aot_eager', 'eager', 'none'),
                   help='torch.compile backend of every train row (default inductor; aot_eager with --smoke)')
    p.add_argument('--amp', default='bf16', choices=('bf16', 'none'),
                   help='autocast dtype of every row (default bf16; none: fp32)')
    p.add_argument('--opt', default='rmsproptf', help='timm optimizer of every train row')
    p.add_argument('--eval-batches', type=int, default=None, help=f'eval batches (default {FULL["eval_batches"]})')
    p.add_argument('--eval-rounds', type=int, default=None, help=f'eval rounds (default {FULL["eval_rounds"]})')
    p.add_argument('--loader-images', type=int, default=None,
                   help=f'JPEGs of the loader check (default {FULL["loader_images"]})')
    p.add_argument('--loader-rounds', type=int, default=None,
                   help=f'timed loader epochs (default {FULL["loader_rounds"]})')
    p.add_argument('--workers', type=int, default=None, help='loader workers (default: the CPUs, at most 16)')
    p.add_argument('--skip-tests', action='store_true', help='do not run the cuda tests')
    add_cpu_args(p)  # --threads, --malloc: this process's CPU side (with --smoke, the whole run)
    p.add_argument('--tests-timeout', type=float, default=300.0, help='seconds the cuda tests may take')
    args = p.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.workers is None:
        args.workers = min(16, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count())
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        p.error(f'--device {args.device}: no CUDA device here (use --device cpu --smoke to check the script)')
    if device.type == 'cpu' and not args.smoke:
        p.error('--device cpu measures nothing this check is for: add --smoke')
    return args


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    """GPU: torch.cuda.max_memory_allocated since the last reset. CPU: the process's peak RSS (never reset)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 2 ** 20


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        return (f'{props.name} ({device}, {props.total_memory / 2 ** 30:.0f} GiB), CUDA {torch.version.cuda}, '
                f'cuDNN {torch.backends.cudnn.version()}, torch {torch.__version__}')
    return f'cpu: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}'


# ------------------------------------------------------------------------------------------------ 1. cuda tests
class CudaTests:
    """``pytest -m cuda tests/test_cuda.py`` in a subprocess, started at once and collected with ``result()``;
    counts from its JUnit XML."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.proc, self.reason, self.timeout = None, None, args.tests_timeout
        if args.skip_tests:
            self.reason = '--skip-tests'
        elif device.type != 'cuda':
            self.reason = f'--device {args.device}: the cuda tests need a CUDA device'
        if self.reason:
            return
        self.tmp = tempfile.TemporaryDirectory(prefix='advprop-zoo-gpu-tests-')
        self.report = Path(self.tmp.name) / 'junit.xml'
        self.log = open(Path(self.tmp.name) / 'output.txt', 'w+')  # a file, not a pipe: nothing blocks on it
        cmd = [sys.executable, '-m', 'pytest', '-m', 'cuda', 'tests/test_cuda.py', '-q', '-rs',
               '-p', 'no:cacheprovider', f'--junitxml={self.report}']
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, 'HF_HUB_OFFLINE': '1'}, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def stop(self) -> None:
        """End the tests if they still run (this process is being interrupted)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def result(self) -> Dict[str, Any]:
        if self.proc is None:
            return {'ran': False, 'reason': self.reason}
        try:
            self.proc.wait(timeout=max(1.0, self.timeout - (time.perf_counter() - self.t0)))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # pytest and what it started (compile workers)
            self.proc.wait()
            timed_out = True
        seconds = time.perf_counter() - self.t0
        self.log.seek(0)
        out = self.log.read()
        self.log.close()
        result: Dict[str, Any] = {'ran': True, 'returncode': self.proc.returncode, 'seconds': round(seconds, 1),
                                  'output_tail': out[-4000:]}
        try:
            if timed_out or not self.report.exists():
                why = f'timed out after {self.timeout:.0f} s' if timed_out else \
                    f'pytest wrote no report (exit {self.proc.returncode})'
                return {**result, 'passed': 0, 'failed': 0, 'errors': 1, 'skipped': 0, 'failures': [why]}
            counts = dict(tests=0, failures=0, errors=0, skipped=0)
            failures = []
            for suite in ET.parse(self.report).getroot().iter('testsuite'):
                for key in counts:
                    counts[key] += int(suite.get(key, 0))
                for case in suite.iter('testcase'):
                    if case.find('failure') is not None or case.find('error') is not None:
                        failures.append(case.get('name'))
        finally:
            self.tmp.cleanup()
        return {**result, 'passed': counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped'],
                'failed': counts['failures'], 'errors': counts['errors'], 'skipped': counts['skipped'],
                'failures': failures}


# ------------------------------------------------------------------------------------------------ 2. train step
def _compiled(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    return model if backend == 'none' else torch.compile(model, backend=backend, dynamic=False)


class TrainBench:
    """The TRAIN_ROWS steps on one batch: ``compile()`` (one step each), ``warm_up()``, ``measure()``."""

    def __init__(self, args: argparse.Namespace, device: torch.device, amp: Optional[torch.dtype]):
        self.args, self.device = args, device
        torch.manual_seed(0)
        base = timm.create_model(args.model)  # random weights: throughput does not depend on them
        mean, std = base.pretrained_cfg['mean'], base.pretrained_cfg['std']
        x = (torch.rand(args.batch, 3, args.res, args.res, device=device) - 0.5) / 0.5
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, base.num_classes, (args.batch,), device=device)
        loss_fn = LabelSmoothingCrossEntropy(smoothing=0.1)
        autocast = lambda: torch.autocast(device.type, dtype=amp) if amp else nullcontext()  # noqa: E731

        def setup(model):
            model = model.to(device).train().to(memory_format=torch.channels_last)
            eps = {'eps': 1e-3} if args.opt == 'rmsproptf' else {}  # the train command's rmsproptf epsilon
            return model, create_optimizer_v2(model, opt=args.opt, lr=1e-4, weight_decay=1e-5, **eps)

        plain, plain_opt = setup(copy.deepcopy(base))
        plain_step_model = _compiled(plain, args.compile)
        dual, dual_opt = setup(to_dual_bn(copy.deepcopy(base)))  # one model for every forward_loss row: shared graphs
        dual_step_model = _compiled(dual, args.compile)

        def timm_step():  # timm train.py's step: forward and loss under autocast, backward, optimizer step
            with autocast():
                output = plain_step_model(x)
                loss = loss_fn(output, y)
            loss.backward()
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)

        def zoo_step(cfg):
            def step():  # as advprop-zoo train's loop in one process: forward_loss, its attack through the same
                # compiled model, advprop's clean loss back-propagated before its adversarial forward
                losses = forward_loss(dual_step_model, x, y, loss_fn, cfg, mean, std, autocast_dtype=amp,
                                      backward_clean=lambda clean: clean.backward())
                losses.loss.backward()
                dual_opt.step()
                dual_opt.zero_grad(set_to_none=True)  # after the step: fast-advprop's clean grads are already there
            return step

        def optimizer_only():  # gradients of the vanilla step in place, then the optimizer step alone, timed
            with autocast():  # the vanilla row's graph again: no new compilation
                loss = loss_fn(plain_step_model(x), y)
            loss.backward()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                plain_opt.step()
            _sync(device)
            plain_opt.zero_grad(set_to_none=True)
            return 1000 * (time.perf_counter() - t0) / args.iters

        self.steps: Dict[str, Callable[[], None]] = {
            name: timm_step if cfg is None else zoo_step(cfg) for name, _, cfg, _ in TRAIN_ROWS}
        self.optimizer_only = optimizer_only
        self.warmup_s = {name: 0.0 for name in self.steps}

    def _run(self, steps: int) -> None:
        for name, fn in self.steps.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync(self.device)
            self.warmup_s[name] = round(self.warmup_s[name] + time.perf_counter() - t0, 1)

    def compile(self) -> None:
        """One step per row: compilation (CPU work), nothing timed."""
        self._run(1)

    def warm_up(self) -> None:
        """--warmup more untimed steps per row: cuDNN's algorithm search (benchmark mode), the allocator."""
        self._run(self.args.warmup)

    def measure(self) -> Dict[str, Any]:
        args, device = self.args, self.device
        times = {name: [] for name in self.steps}
        peaks = {name: 0.0 for name in self.steps}
        for _ in range(args.rounds):
            for name, fn in self.steps.items():
                _sync(device)
                _reset_peak(device)
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                _sync(device)
                times[name].append((time.perf_counter() - t0) / args.iters)
                peaks[name] = max(peaks[name], _peak_gib(device))
        opt_ms = self.optimizer_only()  # the part of every row's step that does not grow with the mode
        med = {name: statistics.median(t) for name, t in times.items()}
        rows = []
        for name, label, cfg, goal in TRAIN_ROWS:
            ratio = med[name] / med['vanilla']
            row = {'name': name, 'label': label, 'images_per_s': args.batch / med[name], 'ratio_to_vanilla': ratio,
                   'peak_mem_gib': peaks[name], 'step_ms': 1000 * med[name],
                   'step_ms_rounds': [round(1000 * t, 2) for t in times[name]], 'warmup_s': self.warmup_s[name],
                   'goal_max_ratio': goal, 'met': None if goal is None else ratio <= goal,
                   'mode': 'vanilla' if cfg is None else cfg.mode}
            if cfg is not None:
                row['attack'] = str(cfg.attack)
                if cfg.mode == 'fast-advprop':
                    row['p_adv'] = cfg.p_adv
            rows.append(row)
        return {'rows': rows, 'optimizer_step_ms': opt_ms}


# ------------------------------------------------------------------------------------------------ 3. clean eval
def timm_validate_loop(model: torch.nn.Module, batches, device: torch.device,
                       amp: Optional[torch.dtype]) -> Dict[str, float]:
    """timm validate.py's loop on batches already on the device: no_grad, channels_last, autocast forward,
    cross-entropy, top-1/5 accuracy, ``.item()`` per batch into AverageMeters."""
    from timm.utils import AverageMeter, accuracy
    criterion = torch.nn.CrossEntropyLoss().to(device)
    losses, top1, top5 = AverageMeter(), AverageMeter(), AverageMeter()
    model.eval()
    with torch.no_grad():
        for input, target in batches:
            input = input.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                output = model(input)
            loss = criterion(output, target)
            acc1, acc5 = accuracy(output.detach(), target, topk=(1, min(5, output.shape[-1])))
            losses.update(loss.item(), input.size(0))
            top1.update(acc1.item(), input.size(0))
            top5.update(acc5.item(), input.size(0))
    return {'top1': top1.avg, 'top5': top5.avg}


def eval_check(args: argparse.Namespace, device: torch.device, amp: Optional[torch.dtype]) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = timm.create_model(args.model)
    mean, std = model.pretrained_cfg['mean'], model.pretrained_cfg['std']
    input_size = (3, args.res, args.res)
    anchor = copy.deepcopy(model).to(device).eval().to(memory_format=torch.channels_last)
    ours = prepare_eval_model(copy.deepcopy(model), input_size, device, fuse=True, channels_last=True)
    g = torch.Generator(device=device).manual_seed(0)
    batches = [((torch.rand(args.batch, *input_size, device=device, generator=g) - 0.5) / 0.5,
                torch.randint(0, model.num_classes, (args.batch,), device=device, generator=g))
               for _ in range(args.eval_batches)]
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # both paths: one input size
    paths = {
        'timm': lambda data: timm_validate_loop(anchor, data, device, amp),
        'advprop_zoo': lambda data: evaluate_accuracy(ours, data, mean, std, device=device, autocast_dtype=amp,
                                                      channels_last=True),
    }
    for fn in paths.values():  # warm-up: cuDNN's algorithm search, allocations
        fn(batches[:2])
    _sync(device)
    rates = {name: [] for name in paths}
    top1 = {}
    for _ in range(args.eval_rounds):
        for name, fn in paths.items():
            _sync(device)
            t0 = time.perf_counter()
            out = fn(batches)
            _sync(device)
            rates[name].append(len(batches) * args.batch / (time.perf_counter() - t0))
            top1[name] = out['top1']
    timm_ips, zoo_ips = statistics.median(rates['timm']), statistics.median(rates['advprop_zoo'])
    return {'anchor': "timm validate.py loop, unfused model", 'measured': 'evaluate_accuracy, fused eval model',
            'timm_images_per_s': timm_ips, 'advprop_zoo_images_per_s': zoo_ips, 'ratio': zoo_ips / timm_ips,
            'goal_min_ratio': EVAL_GOAL, 'met': zoo_ips / timm_ips >= EVAL_GOAL, 'images': len(batches) * args.batch,
            'rounds': args.eval_rounds, 'top1': top1,
            'rounds_images_per_s': {k: [round(r, 1) for r in v] for k, v in rates.items()}}


# ------------------------------------------------------------------------------------------------ 4. data loader
def _write_jpegs(root: str, wnids: List[str], start: int, stop: int, size: tuple, seed: int) -> None:
    """ImageNet-like JPEGs: smooth random images, sides drawn from ``size`` (decode + resize cost like real ones)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(start, stop):
        h, w = (int(s) for s in rng.integers(size[0], size[1], size=2))
        low = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        folder = Path(root) / wnids[i % len(wnids)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(low).resize((w, h), Image.BILINEAR).save(folder / f'{i:08d}.JPEG', quality=90)


def _image_folder(root: Path, images: int, classes: int, size: tuple, workers: int) -> None:
    from advprop_zoo.eval.datasets import imagenet_synsets
    wnids = imagenet_synsets()[:classes]
    chunks = [(i, min(images, i + 256)) for i in range(0, images, 256)]
    if workers <= 1 or len(chunks) == 1:
        for k, (a, b) in enumerate(chunks):
            _write_jpegs(str(root), wnids, a, b, size, k)
        return
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(chunks))) as pool:
        list(pool.map(_write_jpegs, *zip(*[(str(root), wnids, a, b, size, k) for k, (a, b) in enumerate(chunks)])))


def loader_check(args: argparse.Namespace, device: torch.device, vanilla_ips: float) -> Dict[str, Any]:
    """advprop-zoo train's training loader alone over a synthetic ImageFolder: decode + augment in its workers,
    uint8 to the device and normalised there (what the train loop gets), no model."""
    from advprop_zoo_train import build_parser
    from advprop_zoo_train.data import create_loaders
    size = (72, 96) if args.smoke else (400, 500)
    classes = 8 if args.smoke else 100
    with tempfile.TemporaryDirectory(prefix='advprop-zoo-gpu-loader-') as tmp:
        t0 = time.perf_counter()
        _image_folder(Path(tmp) / 'train', args.loader_images, classes, size, args.workers)
        _image_folder(Path(tmp) / 'val', classes, classes, size, 1)
        write_s = time.perf_counter() - t0
        targs = build_parser().parse_args(
            ['--data-dir', tmp, '--device', str(device), '--batch-size', str(args.batch),
             '--workers', str(args.workers), '--input-size', '3', str(args.res), str(args.res)]
            + (['--pin-mem'] if device.type == 'cuda' else []))
        data_config = resolve_data_config({'input_size': (3, args.res, args.res)},
                                          model=timm.create_model(args.model, pretrained=False))
        train, _, _ = create_loaders(targs, data_config)
        rates = []
        try:
            for epoch in range(1 + args.loader_rounds):  # epoch 0 untimed: worker start-up
                train.set_epoch(epoch)
                _sync(device)
                t0, n = time.perf_counter(), 0
                for xb, yb in train:
                    xb, yb = train.to_device(xb), yb.to(device, non_blocking=True)
                    n += len(yb)
                _sync(device)
                if epoch:
                    rates.append(n / (time.perf_counter() - t0))
        finally:
            del train  # persistent workers end before the folder goes
    ips = statistics.median(rates)
    return {'measured': "advprop-zoo train's training loader (timm create_dataset, its default augmentation), "
                        'to the device, no model',
            'images_per_s': ips, 'ratio_to_vanilla_step': ips / vanilla_ips, 'workers': args.workers,
            'images': args.loader_images, 'jpeg_sides_px': list(size), 'batch': args.batch,
            'augmentation': {k: getattr(targs, k) for k in ('scale', 'hflip', 'color_jitter', 'aa', 'reprob')},
            'rounds_images_per_s': [round(r, 1) for r in rates], 'write_s': round(write_s, 1)}


# ------------------------------------------------------------------------------------------------ report
def _x(v: float) -> str:
    return f'{v:.2f}x'


def _verdict(met: Optional[bool]) -> str:
    return '-' if met is None else ('PASS' if met else 'MISS')


def build_table(result: Dict[str, Any]) -> str:
    rows = []
    tests = result['cuda_tests']
    if tests['ran']:
        bad = tests['failed'] + tests['errors']
        said = f"{tests['passed']} passed, {bad} failed, {tests['skipped']} skipped ({tests.get('seconds', 0):.0f} s)"
        verdict = 'PASS' if bad == 0 and tests['passed'] > 0 else ('FAIL' if bad else 'MISS')
        rows.append(['cuda tests (pytest -m cuda tests/test_cuda.py)', said, '-', '-', 'all pass', verdict])
    else:
        rows.append(['cuda tests (pytest -m cuda tests/test_cuda.py)', f"not run: {tests['reason']}", '-', '-',
                     'all pass', 'SKIP'])
    for r in result['rows']:
        goal = f"<= {r['goal_max_ratio']}x" if r['goal_max_ratio'] else '-'
        rows.append([f"train step: {r['label']}", f"{r['images_per_s']:,.1f} img/s", _x(r['ratio_to_vanilla']),
                     f"{r['peak_mem_gib']:.2f}", goal, _verdict(r['met'])])
    ev = result['eval']
    rows.append(["eval: timm validate.py loop, unfused (anchor)", f"{ev['timm_images_per_s']:,.1f} img/s", _x(1.0),
                 '-', '-', '-'])
    rows.append(['eval: evaluate_accuracy, fused eval model', f"{ev['advprop_zoo_images_per_s']:,.1f} img/s",
                 _x(ev['ratio']), '-', f">= {ev['goal_min_ratio']}x", _verdict(ev['met'])])
    ld = result['loader']
    rows.append([f"loader alone: train loader, {ld['workers']} workers (vs the vanilla step)",
                 f"{ld['images_per_s']:,.1f} img/s", _x(ld['ratio_to_vanilla_step']), '-', '-', '-'])
    return format_table(['check', 'measured', 'vs anchor', 'peak GiB', 'goal', 'result'], rows, align='lrrrll')


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    apply_cpu_args(args)
    amp = {'bf16': torch.bfloat16, 'none': None}[args.amp]
    started = time.perf_counter()
    seconds: Dict[str, float] = {}
    result: Dict[str, Any] = {
        'complete': False, 'device': device_name(device), 'model': args.model,
        'settings': {'res': args.res, 'batch': args.batch, 'amp': args.amp, 'channels_last': True,
                     'compile': args.compile, 'dynamic': False, 'optimizer': args.opt, 'smoothing': 0.1,
                     'warmup': args.warmup, 'iters': args.iters, 'rounds': args.rounds, 'smoke': args.smoke,
                     'peak_mem': ('torch.cuda.max_memory_allocated, reset before each row' if device.type == 'cuda'
                                  else 'process peak RSS (VmHWM), never reset')},
        'ratio_to_vanilla': "step time over the vanilla step's (vanilla images/s over the row's); goals are maxima",
        'versions': {'torch': torch.__version__, 'timm': timm.__version__, 'advprop_zoo': advprop_zoo.__version__},
        'seconds': seconds,
    }

    def save(**parts):  # after every section: a run cut short still leaves what it measured
        result.update(parts)
        seconds['total'] = round(time.perf_counter() - started, 1)
        with atomic_write(args.json, 'w') as f:
            json.dump(result, f, indent=2, allow_nan=False, default=_json_default)
            f.write('\n')

    def say(what):  # progress on stderr: stdout holds the one table
        print(f'[{time.perf_counter() - started:5.0f} s] {what}', file=sys.stderr, flush=True)

    tests = CudaTests(args, device)  # runs beside the compilation below; nothing is timed until it is done
    if device.type == 'cuda':
        if device.index is not None:
            torch.cuda.set_device(device)
        # as timm's train.py: TF32 where fp32 remains (bf16 autocast covers convs and matmuls); set before any
        # compilation (a TF32 flag is part of what a compiled graph is guarded on)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False  # cuDNN's timed algorithm search waits for an idle GPU (warm_up)
    import torch._dynamo.config as dynamo_config
    # every row's graphs share EfficientNet.forward's cache (vanilla 1 + dual-BN 5 entries): room, so that none
    # falls back to eager silently
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 32)

    t0 = time.perf_counter()
    say(f'cuda tests: {"running beside the compilation" if tests.proc else tests.reason}; compiling the train rows')
    try:
        bench = TrainBench(args, device, amp)
        bench.compile()
    except KeyboardInterrupt:
        tests.stop()
        raise
    except BaseException:  # the train rows failed: the tests' verdict is still worth having
        save(cuda_tests=tests.result())
        raise
    seconds['train_compile'] = round(time.perf_counter() - t0, 1)
    say('train rows compiled; waiting for the cuda tests' if tests.proc else 'train rows compiled')
    t0 = time.perf_counter()
    cuda_tests = tests.result()
    seconds['cuda_tests_wait'] = round(time.perf_counter() - t0, 1)
    save(cuda_tests=cuda_tests)
    if cuda_tests['ran']:
        say(f"cuda tests: {cuda_tests['passed']} passed, {cuda_tests['failed'] + cuda_tests['errors']} failed, "
            f"{cuda_tests['skipped']} skipped in {cuda_tests['seconds']:.0f} s")

    t0 = time.perf_counter()
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # as timm's train.py and advprop-zoo train
    bench.warm_up()
    train = bench.measure()
    seconds['train_measure'] = round(time.perf_counter() - t0, 1)
    save(rows=train['rows'], optimizer_step_ms=train['optimizer_step_ms'])
    say('train rows measured')
    del bench
    if device.type == 'cuda':
        torch.cuda.empty_cache()

    t0 = time.perf_counter()
    ev = eval_check(args, device, amp)
    seconds['eval'] = round(time.perf_counter() - t0, 1)
    save(eval=ev)
    say('eval measured')
    vanilla_ips = next(r['images_per_s'] for r in train['rows'] if r['name'] == 'vanilla')
    t0 = time.perf_counter()
    loader = loader_check(args, device, vanilla_ips)
    seconds['loader'] = round(time.perf_counter() - t0, 1)
    save(loader=loader, complete=True)

    print(f"{args.model} {args.res}px batch {args.batch}, {'bf16 autocast' if amp else 'fp32'}, channels_last, "
          f"compile {args.compile} (dynamic=False), {args.opt}; {args.rounds} rounds x {args.iters} steps, medians; "
          f"on {result['device']}{' [SMOKE: toy size, not a measurement]' if args.smoke else ''}")
    print("vs anchor: train rows = step time / vanilla step time (lower is cheaper); eval = images/s / timm's "
          "(higher is faster); loader = images/s / the vanilla step's")
    print(build_table(result))
    print(f'\nwritten: {args.json} ({seconds["total"]:.0f} s in all: ' +
          ', '.join(f'{k} {v:.0f} s' for k, v in seconds.items() if k != 'total') + ')')
    return 1 if cuda_tests['ran'] and cuda_tests['failed'] + cuda_tests['errors'] else 0  # goals missed: still 0


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f'not JSON: {value!r}')


if __name__ == '__main__':
    sys.exit(main())
