"""The embedded demo: AdvProp against its baselines on a real dataset that ships with scikit-learn.

``advprop-zoo train`` with no arguments trains timm's small ``test_efficientnet`` on the handwritten
digits (1,437 train / 360 val images, upsampled to 32x32 RGB, inputs in [-1, 1] like AdvProp's) in
``vanilla``, ``advprop`` and ``adv-train`` modes, then prints one table: clean top-1, top-1 under PGD,
top-1 under common corruptions (mean over six ImageNet-C-style corruptions x five severities), and
the time each took. Nothing is downloaded; on 2 CPU cores it takes a few minutes.
"""
import statistics
import time
from pathlib import Path
from typing import Dict, List, Sequence

from advprop_zoo.attacks import AttackConfig
from advprop_zoo.eval.accuracy import evaluate_accuracy
from advprop_zoo.eval.corruptions import TENSOR_CORRUPTIONS
from advprop_zoo.table import format_table

from .args import parse_args
from .loop import TrainResult, train

__all__ = ['DEMO_ARGS', 'DEMO_MODES', 'run_embedded']

DEMO_MODES = ('vanilla', 'advprop', 'adv-train')
DEMO_ARGS = [
    '--model', 'test_efficientnet', '--input-size', '3', '32', '32',
    '--mean', '0.5', '0.5', '0.5', '--std', '0.5', '0.5', '0.5',
    '--epochs', '12', '--batch-size', '64', '--opt', 'adamw', '--lr', '4e-3', '--weight-decay', '0.05',
    '--sched', 'cosine', '--warmup-epochs', '1', '--smoothing', '0.0', '--hflip', '0', '--scale', '0.6', '1.0',
    '--workers', '0', '--attack-eps', '4', '--attack-steps', '1', '--attack-step-size', '4',
]
EVAL_ATTACK = dict(eps=4.0, steps=5, step_size=1.0, targeted=False)  # PGD-5, eps 4: the paper's strongest


def _evaluate_robustness(result: TrainResult, seed: int) -> Dict[str, float]:
    """Clean top-1, top-1 under the PGD of ``EVAL_ATTACK``, and mean top-1 over every corruption and severity."""
    mean, std = result.data_config['mean'], result.data_config['std']
    model, loader = result.model, result.val_loader
    clean = evaluate_accuracy(model, loader, mean, std, seed=seed)['top1']
    pgd = evaluate_accuracy(model, loader, mean, std, attack_cfg=AttackConfig(**EVAL_ATTACK), seed=seed)['top1']
    corrupted = [evaluate_accuracy(model, loader, mean, std, corruption=(name, sev), seed=seed)['top1']
                 for name in TENSOR_CORRUPTIONS for sev in range(1, 6)]
    return {'clean': clean, 'pgd': pgd, 'corrupt': sum(corrupted) / len(corrupted)}


def run_embedded(argv: Sequence[str] = ()) -> int:
    """Train and evaluate each demo mode (or only ``--mode`` when given) for ``--seeds`` seeds and print
    the table (mean ± std over seeds when there are several). Flags in ``argv`` override the demo's
    defaults, so ``advprop-zoo train --epochs 3`` is a shorter demo. Returns 0."""
    user = parse_args([*DEMO_ARGS, *argv])
    modes = (user.mode,) if user.mode else DEMO_MODES
    seeds = range(user.seed, user.seed + max(1, user.seeds))
    progress = not user.no_progress
    stamp = time.strftime('%Y%m%d-%H%M%S')
    base = Path(user.output or Path('output') / 'train' / f'{stamp}-embedded')
    results: Dict[str, List[Dict[str, float]]] = {m: [] for m in modes}
    for seed in seeds:
        for mode in modes:
            args = parse_args(
                [*DEMO_ARGS, *argv, '--mode', mode, '--seed', str(seed), '--output', str(base / f'{mode}-seed{seed}')])
            t0 = time.perf_counter()
            result = train(args)
            row = _evaluate_robustness(result, seed)
            row['minutes'] = (time.perf_counter() - t0) / 60
            results[mode].append(row)
            if progress:
                print(f'[{mode} seed {seed}] clean {row["clean"]:.2f}%  PGD {row["pgd"]:.2f}%  '
                      f'corruptions {row["corrupt"]:.2f}%  ({row["minutes"]:.1f} min)')

    def cell(values: List[float]) -> str:
        if len(values) == 1:
            return f'{values[0]:.2f}'
        return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'

    attack = f'PGD{EVAL_ATTACK["steps"]} eps{EVAL_ATTACK["eps"]:g}'
    rows = [[m, cell([r['clean'] for r in results[m]]), cell([r['pgd'] for r in results[m]]),
             cell([r['corrupt'] for r in results[m]]), cell([r['minutes'] for r in results[m]])] for m in modes]
    print(f'\n{user.model} on scikit-learn digits (32x32, 360 val images), {len(seeds)} seed(s), {user.epochs} '
          f'epochs, trained with {user.attack.upper()} eps {user.attack_eps:g}; runs in {base}')
    print(format_table(['mode', 'clean top-1 %', f'{attack} top-1 %', 'corruptions top-1 %', 'minutes'], rows,
                       align='lrrrr'))
    return 0
