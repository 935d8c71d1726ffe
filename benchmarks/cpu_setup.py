"""CPU settings the benchmarks share: threads, glibc memory reuse, which clock to trust, what CPU it was.

The train-step and attack benchmarks compare configurations inside one process, so each setting
applies to the anchor and to the measured paths alike.
"""
import argparse
from pathlib import Path

import torch

from advprop_zoo.malloc import keep_freed_memory


def add_cpu_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--threads', type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 avoids OpenMP oversubscription on a shared machine)")
    p.add_argument('--malloc', choices=('reuse', 'default'), default='reuse',
                   help="CPU: 'reuse' keeps freed memory in the process (advprop_zoo.keep_freed_memory, as "
                        "advprop-zoo eval and train do on CPU; default), 'default' leaves glibc's malloc as it is")


def apply_cpu_args(args: argparse.Namespace) -> str:
    """Set the threads and, on CPU, the malloc mode; return the header words that say so."""
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cpu = torch.device(args.device).type == 'cpu'
    if on_cpu and args.malloc == 'reuse':
        keep_freed_memory()
    return f'{torch.get_num_threads()} threads' + (f', malloc {args.malloc}, {cpu_name()}' if on_cpu else '')


def cpu_name() -> str:
    """The processor and the vector ISA torch's CPU kernels use: ratios between runtimes depend on it
    (oneDNN's depthwise convs trail ONNX Runtime's on AVX2 and keep up on AVX-512), so every figure says it."""
    cpuinfo = Path('/proc/cpuinfo')
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(':', 1)[1].strip() for line in lines if line.startswith('model name')), 'unknown CPU')
    return f'{model}, torch kernels {torch.backends.cpu.get_cpu_capability()}'


def cpu_time_is_the_clock(device: torch.device) -> bool:
    """One thread on a CPU: this process's CPU time, which does not count the time other processes held
    the core, is the steadier figure on a shared machine."""
    return device.type == 'cpu' and torch.get_num_threads() == 1
