"""Step time of each training mode as a ratio to the vanilla timm step, measured in one run.

    python benchmarks/train_step.py                 # B0, 224 px, batch 16, CPU
    python benchmarks/train_step.py --quick         # 128 px, fewer repetitions
    python benchmarks/train_step.py --device cuda --amp bf16 --channels-last
    python benchmarks/train_step.py --malloc default   # glibc's malloc as it comes (see advprop_zoo.malloc)

Every configuration runs on the same batch; repetitions are interleaved (one step of each config per
round) so drift on a shared machine hits all of them alike; the median of the rounds is reported, by
wall clock and by this process's CPU time (the targets use CPU time with one CPU thread, where it is
the figure other processes on the machine disturb least).
Targets (issue 5): advprop PGD-1 <= 2.7x vanilla (the naive cost is 3x), fast-advprop <= 1.3x.
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

import advprop_zoo  # noqa: E402,F401
from advprop_zoo.attacks import AttackConfig  # noqa: E402
from advprop_zoo.dual_bn import to_dual_bn  # noqa: E402
from advprop_zoo.modes import ModeConfig, forward_loss  # noqa: E402
from advprop_zoo.table import format_table  # noqa: E402
from benchmarks.cpu_setup import add_cpu_args, apply_cpu_args, cpu_time_is_the_clock  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='efficientnet_b0_advprop')
    p.add_argument('--res', type=int, default=224)
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', default=None, choices=('bf16', 'fp16'))
    p.add_argument('--channels-last', action='store_true')
    add_cpu_args(p)
    p.add_argument('--quick', action='store_true', help='128 px, 3 rounds')
    args = p.parse_args()
    cpu_setup = apply_cpu_args(args)
    if args.quick:
        args.res, args.rounds = 128, 3
    device = torch.device(args.device)
    amp = {'bf16': torch.bfloat16, 'fp16': torch.float16, None: None}[args.amp]
    torch.manual_seed(0)
    base = timm.create_model(args.model)
    mean, std = base.pretrained_cfg['mean'], base.pretrained_cfg['std']
    x = (torch.rand(args.batch, 3, args.res, args.res, device=device) - 0.5) / 0.5
    y = torch.randint(0, 1000, (args.batch,), device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ce = torch.nn.CrossEntropyLoss()

    configs = {  # name -> (mode config, dual BN?)
        'vanilla (timm step, anchor)': (ModeConfig('vanilla'), False),
        'advprop PGD-1 (two passes, the default)': (ModeConfig('advprop', AttackConfig(eps=1)), True),
        'advprop PGD-1, split BN pass': (ModeConfig('advprop', AttackConfig(eps=1), split_bn=True), True),
        'advprop PGD-5': (ModeConfig('advprop', AttackConfig(eps=4)), True),
        'adv-train PGD-1': (ModeConfig('adv-train', AttackConfig(eps=1)), False),
        'fast-advprop (p_adv 0.2)': (ModeConfig('fast-advprop', AttackConfig(eps=1)), True),
    }
    runs = {}
    for name, (cfg, dual) in configs.items():
        model = copy.deepcopy(base)
        model = (to_dual_bn(model) if dual else model).to(device).train()
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        opt = create_optimizer_v2(model, opt='rmsproptf', lr=1e-4, weight_decay=1e-5)
        runs[name] = (model, opt, cfg)

    def step(model, opt, cfg):
        wall, cpu = time.perf_counter(), time.process_time()
        losses = forward_loss(model, x, y, ce, cfg, mean, std, autocast_dtype=amp)
        losses.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    for run in runs.values():  # warm-up
        step(*run)
    times = {name: {'wall': [], 'cpu': []} for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            wall, cpu = step(*run)
            times[name]['wall'].append(wall)
            times[name]['cpu'].append(cpu)
    med = {name: {clock: statistics.median(v) for clock, v in t.items()} for name, t in times.items()}
    anchor = med['vanilla (timm step, anchor)']
    rows = [[name, f'{1000 * m["wall"]:.0f}', f'{m["wall"] / anchor["wall"]:.2f}x', f'{1000 * m["cpu"]:.0f}',
             f'{m["cpu"] / anchor["cpu"]:.2f}x'] for name, m in med.items()]
    print(f'{args.model} {args.res}px batch {args.batch} on {args.device}'
          f'{" " + args.amp if args.amp else ""}{" channels_last" if args.channels_last else ""}, '
          f'median of {args.rounds} interleaved rounds, torch {torch.__version__}, {cpu_setup}')
    print(format_table(['step', 'wall ms', 'vs vanilla', 'CPU ms', 'vs vanilla (CPU)'], rows, align='lrrrr'))
    clock = 'cpu' if cpu_time_is_the_clock(device) else 'wall'
    split = med['advprop PGD-1, split BN pass'][clock]
    two = med['advprop PGD-1 (two passes, the default)'][clock]
    print(f'\nsplit-BN one pass vs two passes: {two / split:.2f}x faster' if two >= split else
          f'\nsplit-BN one pass vs two passes: {split / two:.2f}x slower')
    if Path('/proc/self/status').exists():
        peak = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM'))
        print(f'peak RSS of this process (all configurations): {peak / 2**20:.2f} GiB')
    fast = med['fast-advprop (p_adv 0.2)'][clock] / anchor[clock]
    print(f'targets ({clock} time): advprop PGD-1 <= 2.7x ({min(two, split) / anchor[clock]:.2f}x, the faster pass '
          f'layout), fast-advprop <= 1.3x ({fast:.2f}x)')


if __name__ == '__main__':
    main()
