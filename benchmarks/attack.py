"""PGD-10 on EfficientNet-B0: this project's attack against torchattacks' PGD, same settings, one run.

    pip install --no-deps torchattacks   # its requests~=2.25 pin clashes with current huggingface-hub
    python benchmarks/attack.py [--quick] [--threads 1] [--device cuda]

Both attack the same eval-mode model on the same batch: L-inf eps 4/255, step 1/255, 10 steps, random
start, untargeted (torchattacks' defaults), torchattacks on [0, 1] images with its own normalisation,
ours in the model's [-1, 1] space. Rows: torchattacks (anchor); ours on the same model; ours on the
robust-eval path of ``advprop-zoo eval`` (``prepare_eval_model``: BNs fused into the convs, TF's 'same'
padding as kernel taps, channels_last), which computes the same function.
Target (issue 5): >= 1.3x torchattacks. Repetitions interleave; medians are reported.
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

import advprop_zoo  # noqa: E402,F401
from advprop_zoo.attacks import AttackConfig, attack  # noqa: E402
from advprop_zoo.eval.suite import prepare_eval_model  # noqa: E402
from advprop_zoo.table import format_table  # noqa: E402
from benchmarks.cpu_setup import add_cpu_args, apply_cpu_args, cpu_time_is_the_clock  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='efficientnet_b0_advprop')
    p.add_argument('--res', type=int, default=224)
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--device', default='cpu')
    add_cpu_args(p)
    p.add_argument('--quick', action='store_true', help='128 px, 2 rounds')
    args = p.parse_args()
    cpu_setup = apply_cpu_args(args)  # for both attacks alike: they share this process
    if args.quick:
        args.res, args.rounds = 128, 2
    try:
        import torchattacks
    except ImportError:
        sys.exit('benchmarks/attack.py needs torchattacks: pip install --no-deps torchattacks')
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval().to(device)
    mean, std = model.pretrained_cfg['mean'], model.pretrained_cfg['std']
    m, s = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std))
    pixels = torch.rand(args.batch, 3, args.res, args.res, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    # exactly what advprop-zoo eval attacks: BNs fused, 'same' padding in the kernel, channels_last
    fused = prepare_eval_model(copy.deepcopy(model), (3, args.res, args.res), device, channels_last=True)
    cfg = AttackConfig(eps=4, steps=10, step_size=1, targeted=False)

    ta = torchattacks.PGD(model, eps=4 / 255, alpha=1 / 255, steps=10, random_start=True)
    ta.set_normalization_used(mean=list(mean), std=list(std))
    runs = {
        'torchattacks PGD-10 (anchor)': lambda: ta(pixels, y),
        'advprop_zoo attack, same model': lambda: attack(model, (pixels - m) / s, y, cfg, mean, std, mode='eval'),
        'advprop_zoo attack, fused + channels_last': lambda: attack(
            fused, ((pixels - m) / s).contiguous(memory_format=torch.channels_last), y, cfg, mean, std, mode='eval'),
    }

    clock = time.process_time if cpu_time_is_the_clock(device) else time.perf_counter

    def timed(fn):
        t0 = clock()
        out = fn()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return clock() - t0, out

    for fn in runs.values():
        timed(fn)
    times = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            times[name].append(timed(fn)[0])
    anchor = statistics.median(times['torchattacks PGD-10 (anchor)'])
    rows = [[k, f'{statistics.median(t):.2f}', f'{anchor / statistics.median(t):.2f}x'] for k, t in times.items()]
    # the fused path is the same function: check it on one batch
    torch.manual_seed(1)
    a = attack(model, (pixels - m) / s, y, AttackConfig(eps=4, steps=2, random_start=False, targeted=False),
               mean, std, mode='eval')
    b = attack(fused, (pixels - m) / s, y, AttackConfig(eps=4, steps=2, random_start=False, targeted=False),
               mean, std, mode='eval')
    agree = (a - b).abs().le(1e-4).float().mean().item()
    print(f'{args.model} {args.res}px batch {args.batch} on {args.device}, median of {args.rounds} interleaved rounds, '
          f'torch {torch.__version__}, torchattacks {torchattacks.__version__}, {cpu_setup}')
    seconds = 'CPU seconds' if clock is time.process_time else 'seconds'
    print(format_table(['attack', seconds, 'speed vs torchattacks'], rows, align='lrr'))
    print(f'\nfused vs unfused adversarial examples (2 deterministic steps): {100 * agree:.2f}% of values identical')


if __name__ == '__main__':
    main()
