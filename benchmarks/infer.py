"""CPU inference speed of EfficientNet-B0: timm's model against the folded, fused, exported one.

    python benchmarks/infer.py            # B0, 224 px, batch 32, fp32, 1 thread, both allocator settings
    python benchmarks/infer.py --quick    # fewer repetitions

Every path runs the same weights on the same batch and is printed as a ratio to the anchor, timm's
``tf_efficientnet_b0`` in eager mode, NCHW, default allocator:

* fused: every BN folded into its conv (``fuse_bn``);
* + static padding: TF 'same' padding fixed for 224 px (an explicit pad per stride-2 conv);
* + pad in kernel: the asymmetric pad as leading zero taps of the kernel, so no pad copy runs at all;
* + channels_last: NHWC memory, which oneDNN's depthwise and 1x1 convs are much faster on;
* + torch.compile: inductor with ``freezing`` (weights as constants: oneDNN weight prepacking,
  conv + activation / add fusion) and ``conv_1x1_as_mm`` (pointwise convs as GEMMs);
* ONNX Runtime on the model ``advprop-zoo export`` writes (folded, fused, static padding).

Allocator: PyTorch on CPU gets each activation from malloc; glibc serves big blocks with fresh
``mmap``s and returns them on free, so every forward page-faults its activations in again (at batch
32 that is most of the anchor's time; ONNX Runtime keeps an arena and never pays it). ``--malloc
both`` (default) runs everything twice, in two processes: glibc's defaults, and glibc told to keep
freed memory for reuse (``advprop_zoo.keep_freed_memory()``, one ``mallopt`` call; the environment
setting ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` does the same with no code change). All
ratios are to the default-allocator anchor.

Timing: warmup, then repetitions round-robin over all paths (so load drift on a shared machine hits
all of them alike); the median of wall-clock time and of this process's CPU time per call. With one
thread, CPU time is the more stable figure when other processes compete for the cores.
Also measured: the eval overhead of a dual-BN model in its main route over the plain model (paired,
alternating calls), and each path's max difference to the anchor's logits relative to their size.

``--breakdown`` adds where the time goes in the compiled model and in ONNX Runtime, summed by kind of
op (depthwise convs, 1x1 convs, ...) over profiled calls (torch.profiler, which slows each op a little;
ONNX Runtime's own profiler).
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

ANCHOR = 'timm tf_efficientnet_b0, eager NCHW (anchor)'
COMPILED = '  + torch.compile'
ORT = 'ONNX Runtime, exported fused model'


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--quick', action='store_true', help='3 repetitions, 1 warmup, 3 dual-BN pairs')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--threads', type=int, default=1, help='intra-op threads for PyTorch and ONNX Runtime (default 1)')
    p.add_argument('--reps', type=int, default=7)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--pairs', type=int, default=15, help='paired calls for the dual-BN overhead (10x that at batch 1)')
    p.add_argument('--malloc', choices=['default', 'reuse', 'both'], default='both')
    p.add_argument('--no-compile', action='store_true', help='skip torch.compile (it takes 1-3 min on 2 cores)')
    p.add_argument('--breakdown', action='store_true',
                   help='also profile the compiled model and ONNX Runtime and sum their time per call by op kind')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.breakdown and args.no_compile:
        p.error('--breakdown profiles the compiled model; drop --no-compile')
    if args.quick:
        args.reps, args.warmup, args.pairs = 3, 1, 3
    args.warmup = max(args.warmup, 1)  # the first call also gives each path's difference to the anchor
    return args


def calibrated_b0(img_size: int):
    """timm's B0 with BN statistics averaged over the kinds of input the export is checked on (random
    and structured), so logits, and differences between paths, are of a realistic size (speed does
    not depend on the weights; no pretrained weights are needed)."""
    import timm
    import torch
    from advprop_zoo.export import check_inputs
    torch.manual_seed(0)
    model = timm.create_model('tf_efficientnet_b0')
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average
    with torch.no_grad():
        model.train()(check_inputs((3, img_size, img_size), batch_size=2))
    return model.eval()


def build_paths(args, anchor, x) -> Tuple[List[Tuple[str, Callable, object]], bytes]:
    """(label, callable, its input) per path, and the exported ONNX model (for --breakdown's profiling)."""
    import torch
    from advprop_zoo import export_model, fuse_bn

    size = args.img_size
    xc = x.contiguous(memory_format=torch.channels_last)
    fused = fuse_bn(copy.deepcopy(anchor))
    static = fuse_bn(copy.deepcopy(anchor), input_size=size)
    in_kernel = fuse_bn(copy.deepcopy(anchor), input_size=size, pad_in_kernel=True)
    cl = copy.deepcopy(in_kernel).to(memory_format=torch.channels_last)
    paths = [
        (ANCHOR, anchor, x),
        ('fused (BN in conv)', fused, x),
        ('fused + static padding', static, x),
        ('fused + static padding in kernel', in_kernel, x),
        ('  + channels_last', cl, xc),
    ]
    if not args.no_compile:
        log('compiling (inductor, freezing) ...')
        import torch._inductor.config
        torch._inductor.config.freezing = True  # this worker process only; options={'freezing': True} is not honoured
        torch._inductor.config.conv_1x1_as_mm = True  # pointwise convs as GEMMs: measured a few % faster here
        compiled = torch.compile(copy.deepcopy(cl))
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(xc)
        log(f'compiled in {time.perf_counter() - start:.0f} s')
        paths.append((COMPILED, compiled, xc))
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'b0.onnx'
        log('exporting to ONNX ...')
        export_model(copy.deepcopy(static), path, (3, size, size))
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        onnx_bytes = path.read_bytes()
    xn = x.numpy()
    paths.append((ORT, lambda _: torch.from_numpy(session.run(None, {'input': xn})[0]), None))
    return paths, onnx_bytes


def conv_kind(x_shape: List[int], w_shape: List[int]) -> str:
    """What a conv does in an EfficientNet, from its input and weight shapes."""
    if len(w_shape) != 4 or len(x_shape) != 4:
        return 'other convs'
    if w_shape[1] == 1 and w_shape[0] == x_shape[1] > 1:
        return 'depthwise convs'
    if w_shape[2:] == [1, 1]:
        return 'squeeze-excite convs' if x_shape[2:] == [1, 1] else '1x1 convs'
    return 'other convs (stem)'


def torch_breakdown(compiled, x, calls: int = 3) -> Dict[str, float]:
    """Seconds per call by op kind, over ``calls`` profiled calls of the compiled model: oneDNN's convs
    (their fused SiLU / residual add included), everything else (inductor's own kernels) as the rest."""
    from torch.profiler import ProfilerActivity, profile
    compiled(x)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            compiled(x)
        total = (time.perf_counter() - start) / calls
    out: Dict[str, float] = {}
    for e in prof.events():
        if not e.name.startswith('mkldnn::_convolution_pointwise'):
            continue
        shapes = [list(s) for s in e.input_shapes]
        xs, ws = (shapes[1], shapes[2]) if e.name.endswith('_') else (shapes[0], shapes[1])  # in-place: (other, X, W)
        kind = conv_kind(xs, ws)
        out[kind] = out.get(kind, 0.0) + e.cpu_time_total / 1e6 / calls
    out['everything else'] = total - sum(out.values())
    out['total (profiled call)'] = total
    return out


def ort_breakdown(onnx_bytes: bytes, xn, threads: int) -> Dict[str, float]:
    """Seconds by op kind in one ONNX Runtime call, the last of three (its own profiler's node kernel times)."""
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / 'ort')
        session = ort.InferenceSession(onnx_bytes, options, providers=['CPUExecutionProvider'])
        for _ in range(3):
            session.run(None, {'input': xn})
        events = json.loads(Path(session.end_profiling()).read_text())
    run = [e for e in events if e.get('name') == 'model_run'][-1]
    out: Dict[str, float] = {}
    for e in events:
        if e.get('cat') != 'Node' or not e['name'].endswith('_kernel_time') or not run['ts'] <= e['ts'] <= run['ts'] + run['dur']:
            continue
        op = e['args'].get('op_name', '')
        if op in ('Conv', 'FusedConv', 'NchwcConv'):
            shapes = [next(iter(s.values())) for s in e['args'].get('input_type_shape', [])]
            kind = conv_kind(shapes[0], shapes[1]) if len(shapes) >= 2 else 'other convs'
        elif op in ('QuickGelu', 'Sigmoid', 'Silu', 'Swish'):
            kind = 'activations (SiLU, run apart from the convs)'
        elif op.startswith('Reorder'):
            kind = 'layout reorders (NCHW <-> NCHWc)'
        else:
            continue  # counted in the rest below
        out[kind] = out.get(kind, 0.0) + e['dur'] / 1e6
    out['everything else'] = run['dur'] / 1e6 - sum(out.values())
    out['total (profiled call)'] = run['dur'] / 1e6
    return out


def log(msg: str) -> None:
    print(f'[infer bench] {msg}', file=sys.stderr, flush=True)


def timed(fn: Callable, arg) -> Tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(arg)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def worker(args: argparse.Namespace) -> Dict:
    import torch
    from advprop_zoo import to_dual_bn

    torch.set_num_threads(args.threads)
    if args.malloc == 'reuse':
        from advprop_zoo.malloc import keep_freed_memory
        assert keep_freed_memory(), 'keep_freed_memory needs glibc'
    anchor = calibrated_b0(args.img_size)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(1))
    paths, onnx_bytes = build_paths(args, anchor, x)
    results = {label: {'wall': [], 'cpu': []} for label, _, _ in paths}
    with torch.inference_mode():
        ref = anchor(x)
        diffs = {}
        for label, fn, arg in paths:
            for _ in range(args.warmup):
                out = fn(arg)
            diffs[label] = ((out - ref).abs().max() / ref.abs().max()).item()
        for rep in range(args.reps):
            log(f'repetition {rep + 1}/{args.reps}')
            for label, fn, arg in paths:
                wall, cpu, _ = timed(fn, arg)
                results[label]['wall'].append(wall)
                results[label]['cpu'].append(cpu)

        log('dual BN overhead ...')
        dual = to_dual_bn(copy.deepcopy(anchor))
        assert torch.equal(dual(x), ref), 'dual BN main route must be bit-exact'
        # at the benchmark batch, and at batch 1 where the per-layer Python cost weighs most (more pairs:
        # each call is short)
        overhead = {str(len(x)): dual_overhead(anchor, dual, x, args.pairs),
                    '1': dual_overhead(anchor, dual, x[:1], args.pairs * 10)}
        breakdown = {}
        if args.breakdown:
            log('profiling the compiled model and ONNX Runtime ...')
            fn, arg = next((fn, arg) for label, fn, arg in paths if label == COMPILED)
            breakdown = {'torch': torch_breakdown(fn, arg), 'ort': ort_breakdown(onnx_bytes, x.numpy(), args.threads)}
    return {
        'breakdown': breakdown,
        'paths': {label: {'wall': statistics.median(r['wall']), 'cpu': statistics.median(r['cpu']),
                          'rel_diff': diffs[label]} for label, r in results.items()},
        'dual_overhead': overhead,
    }


def dual_overhead(plain, dual, x, pairs: int) -> Dict[str, float]:
    """Median over alternating pairs of (dual main-route time / plain time) - 1, by wall and CPU clock."""
    dual(x), plain(x)
    ratios = {'wall': [], 'cpu': []}
    for pair in range(pairs):
        order = [(plain, 'plain'), (dual, 'dual')][:: 1 if pair % 2 == 0 else -1]  # alternate who goes first
        t = {name: timed(m, x)[:2] for m, name in order}
        ratios['wall'].append(t['dual'][0] / t['plain'][0])
        ratios['cpu'].append(t['dual'][1] / t['plain'][1])
    return {k: statistics.median(v) - 1 for k, v in ratios.items()}


def run_config(argv: List[str], malloc: str) -> Dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}  # the worker sets its own
    log(f'--- allocator: {malloc} ---')
    cmd = [sys.executable, __file__, *argv, '--worker', '--malloc', malloc]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f'benchmark worker ({malloc} allocator) failed with exit code {proc.returncode}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: List[str]) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from advprop_zoo.table import format_table
    from benchmarks.cpu_setup import cpu_name

    configs = ['default', 'reuse'] if args.malloc == 'both' else [args.malloc]
    worker_args = ['--batch-size', str(args.batch_size), '--img-size', str(args.img_size), '--threads', str(args.threads),
                   '--reps', str(args.reps), '--warmup', str(args.warmup), '--pairs', str(args.pairs)]
    worker_args += ['--no-compile'] if args.no_compile else []
    worker_args += ['--breakdown'] if args.breakdown else []
    runs = {cfg: run_config(worker_args, cfg) for cfg in configs}
    base = runs[configs[0]]['paths'][ANCHOR]
    rows = []
    for cfg, run in runs.items():
        for label, r in run['paths'].items():
            rows.append([label, cfg, f"{r['wall']:.3f}", f"{base['wall'] / r['wall']:.2f}x",
                         f"{r['cpu']:.3f}", f"{base['cpu'] / r['cpu']:.2f}x", f"{r['rel_diff']:.1e}"])
    print(f'\nEfficientNet-B0, {args.img_size}x{args.img_size}, batch {args.batch_size}, fp32, CPU, '
          f'{args.threads} thread(s), {cpu_name()}, median of {args.reps} (ratios to the {configs[0]}-allocator anchor)\n')
    print(format_table(['path', 'malloc', 'wall s', 'x anchor', 'CPU s', 'x anchor (CPU)', 'max |diff| / max |logit|'],
                       rows, align='llrrrrr'))
    print()
    for cfg, run in runs.items():
        for batch, o in run['dual_overhead'].items():
            pairs = args.pairs * (10 if batch == '1' else 1)
            print(f"dual BN, main route, eval, batch {batch}, {cfg} allocator: {o['cpu'] * 100:+.1f}% CPU time, "
                  f"{o['wall'] * 100:+.1f}% wall over the plain model (median of {pairs} paired calls; target <= 3%)")
    for cfg, run in runs.items():
        torch_paths = {k: v for k, v in run['paths'].items() if k not in (ANCHOR, ORT)}
        for clock in ('cpu', 'wall'):
            best = min(torch_paths, key=lambda k: torch_paths[k][clock])
            speedup = base[clock] / torch_paths[best][clock]
            vs_ort = run['paths'][ORT][clock] / torch_paths[best][clock]
            print(f'{cfg} allocator, {clock}: best PyTorch path "{best.strip()}" {speedup:.2f}x the anchor '
                  f'(target >= 3.5x: {"met" if speedup >= 3.5 else "NOT met"}), {vs_ort:.2f}x ONNX Runtime\'s speed '
                  f'(target >= 1: {"met" if vs_ort >= 1 else "NOT met"})')
    for cfg, run in runs.items():
        if run['breakdown']:
            t, o = run['breakdown']['torch'], run['breakdown']['ort']
            kinds = [k for k in [*t, *o] if not k.startswith('total')]
            kinds = sorted(dict.fromkeys(kinds), key=lambda k: -(t.get(k, 0.0) + o.get(k, 0.0))) + ['total (profiled call)']
            print(f'\nWhere the time goes, {cfg} allocator (profiled calls, seconds per call; the compiled '
                  "model's convs include their fused SiLU / residual add, ONNX Runtime runs SiLU apart):\n")
            print(format_table(['op kind', 'torch.compile s', 'ONNX Runtime s'],
                               [[k, f'{t[k]:.3f}' if k in t else '-', f'{o[k]:.3f}' if k in o else '-'] for k in kinds],
                               align='lrr'))


if __name__ == '__main__':
    main(sys.argv[1:])
