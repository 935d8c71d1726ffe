"""Benchmark convert/tf_to_timm.py: wall time and peak RSS against the floor of reading the checkpoint.

    python benchmarks/convert.py [--levels 0 8] [--repeat 2] [--slots]

For B0- and B8-shaped checkpoints laid out like the release (EMA twins + raw weights, no optimizer
slots unless --slots), each measurement runs in a fresh subprocess:

- floor: TF's reader opens the checkpoint and reads every tensor, nothing else;
- convert: ``convert()`` from the same prefix to a safetensors file (EMA choice, completeness checks,
  layout transposes, source sha256, the output streamed to disk as tensors are read, fsynced and
  renamed into place; no --verify).

Imports happen before the clock starts in both. Peak RSS is the child's VmHWM; "extra" is the peak
minus the RSS right after the imports, i.e. what the work itself needed, set against the bytes of
weights written. Targets: time <= 1.5x the floor, extra RSS <= 2.5x the weight bytes.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIME_TARGET = 1.5
RSS_TARGET = 2.5
PHASES = ('open', 'structure', 'read+write', 'source hash wait', 'fsync+rename')  # ConversionResult.phases


def _rss(field: str = 'VmRSS') -> int:
    """This process's RSS (VmRSS) or peak RSS (VmHWM). Not ru_maxrss: Linux carries that over from the
    parent across fork + exec, so a child would report the benchmark driver's peak."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024
    return 0


def _child(kind: str, prefix: str, out: str) -> None:
    """Runs in the fresh subprocess; prints one JSON line."""
    from convert.tf_to_timm import convert as run_convert  # imports timm before TF (see convert/__init__.py)
    import tensorflow as tf  # imported up front in both, so neither pays for it on the clock
    base = _rss()
    start = time.perf_counter()
    if kind == 'floor':
        reader = tf.train.load_checkpoint(prefix)
        nbytes = sum(reader.get_tensor(n).nbytes for n in reader.get_variable_to_shape_map())
    else:
        result = run_convert(prefix, out, model=None, force=True)
        from advprop_zoo.weights import read_safetensors_header
        header = read_safetensors_header(result.output)
        nbytes = sum(e['data_offsets'][1] - e['data_offsets'][0] for k, e in header.items() if k != '__metadata__')
    seconds = time.perf_counter() - start
    peak = _rss('VmHWM')
    extra = {} if kind == 'floor' else {'phases': result.phases, 'hash_seconds': result.hash_seconds}
    if kind == 'floor':  # context for the ratio: the other work a conversion cannot skip, timed alone
        from safetensors.torch import load_file
        from advprop_zoo.weights import save_weights, sha256_file
        from convert.tf_to_timm import _expected, model_for_checkpoint
        scope = next(n.split('/', 1)[0] for n in reader.get_variable_to_shape_map() if n.startswith('efficientnet-b'))
        t = time.perf_counter()
        _expected(model_for_checkpoint(scope, {}))  # this process's first model build + name map, as in a conversion
        extra['structure_seconds'] = time.perf_counter() - t
        t = time.perf_counter()
        for f in Path(prefix).parent.glob(Path(prefix).name + '.*'):
            sha256_file(f)
        extra['sha256_seconds'] = time.perf_counter() - t
        if Path(out).exists():
            weights = load_file(out)
            t = time.perf_counter()
            save_weights(weights, Path(out).with_suffix('.copy'))
            extra['write_seconds'] = time.perf_counter() - t
            Path(out).with_suffix('.copy').unlink()
    print(json.dumps(dict(seconds=seconds, peak=peak, base=base, nbytes=nbytes, **extra)))


def _measure(kind: str, prefix: Path, out: Path, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        if kind == 'convert':
            out.unlink(missing_ok=True)  # every conversion writes a new file, none replaces an old one
        r = subprocess.run([sys.executable, __file__, '--child', kind, str(prefix), str(out)],
                           capture_output=True, text=True, check=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return min(runs, key=lambda r: r['seconds'])  # least disturbed by the other work on the machine


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--levels', type=int, nargs='+', default=[0, 8], help='EfficientNet-B levels (default: 0 8)')
    p.add_argument('--repeat', type=int, default=2, help='runs per measurement; the fastest counts (default: 2)')
    p.add_argument('--slots', action='store_true', help='also write RMSProp slots (floor reads 4x the weights)')
    p.add_argument('--child', nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(*args.child)
        return 0

    from advprop_zoo.table import format_table
    from convert.tf_fixture import SLOTS, release_tensors, write_checkpoint
    rows, phases, ok = [], [], True
    with tempfile.TemporaryDirectory(prefix='advprop-zoo-bench-') as tmp:
        for level in args.levels:
            prefix = Path(tmp) / f'b{level}' / 'model.ckpt'
            tensors = release_tensors(level, slots=SLOTS if args.slots else ())
            write_checkpoint(prefix, tensors)
            ckpt_bytes = sum(a.nbytes for a in tensors.values())
            del tensors
            out = Path(tmp) / f'b{level}.safetensors'
            conv = _measure('convert', prefix, out, args.repeat)
            floor = _measure('floor', prefix, out, args.repeat)  # after: it also times rewriting the output
            t_ratio = conv['seconds'] / floor['seconds']
            extra = conv['peak'] - conv['base']
            r_ratio = extra / conv['nbytes']
            ok &= t_ratio <= TIME_TARGET and r_ratio <= RSS_TARGET
            phases.append([f'B{level}', f'{conv["seconds"]:.2f}']
                          + [f'{conv["phases"].get(k, 0.0):.2f}' for k in PHASES] + [f'{conv["hash_seconds"]:.2f}'])
            rows.append([f'B{level}', f'{ckpt_bytes / 2**20:.0f}', f'{conv["nbytes"] / 2**20:.0f}',
                         f'{floor["seconds"]:.2f}', f'{conv["seconds"]:.2f}', f'{t_ratio:.2f}x',
                         f'{floor["structure_seconds"]:.2f}', f'{floor["sha256_seconds"]:.2f}',
                         f'{floor["write_seconds"]:.2f}',
                         f'{(floor["peak"] - floor["base"]) / 2**20:.0f}', f'{extra / 2**20:.0f}',
                         f'{conv["peak"] / 2**20:.0f}', f'{r_ratio:.2f}x'])
            out.unlink(missing_ok=True)
    print(format_table(['model', 'ckpt MiB', 'weights MiB', 'floor s', 'convert s', 'time ratio', 'structure s',
                        'sha256 s', 'write s', 'floor extra RSS MiB', 'convert extra RSS MiB',
                        'convert peak RSS MiB', 'RSS ratio'], rows))
    print(f'\ntime ratio = convert / floor (target <= {TIME_TARGET}x), floor = TF reader reading every tensor; '
          "structure s, sha256 s and write s time alone three things a conversion must also do (build timm's "
          'model structure for the name map, hash the source for the metadata, write + fsync the output). '
          f'RSS ratio = convert extra RSS / weight bytes (target <= {RSS_TARGET}x), '
          'extra = peak RSS minus RSS after imports. ' + ('Both targets met.' if ok else 'A target was missed.'))
    print('\nWhere the fastest conversion spent its time (wall s on the main thread, in order; the source hash '
          'runs on its own thread from the start, "source hash wait" is the main thread waiting for it):\n')
    print(format_table(['model', 'convert s', *PHASES, 'hash thread s'], phases))
    return 0


if __name__ == '__main__':
    sys.exit(main())
