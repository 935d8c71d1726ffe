"""The embedded demo: AdvProp against its baselines on a real dataset that ships with scikit-learn.

``advprop-zoo train`` with no arguments trains timm's small ``test_efficientnet`` on the handwritten
digits (1,437 train / 360 val images, upsampled to 32x32 RGB, inputs in [-1, 1] like AdvProp's) in
``vanilla``, ``advprop`` and ``adv-train`` modes, then prints one table: clean top-1, top-1 under PGD,
top-1 under APGD-CE (AutoAttack's first attack, as its standard version runs it: 100 iterations, one
restart; from the pyautoattack package) at the same eps, top-1 under common corruptions (mean over six
ImageNet-C-style corruptions x five severities), and the time each took. Nothing is downloaded; on 2 CPU
cores it takes a few minutes.

Under torchrun every rank trains (DDP), and rank 0 alone evaluates each trained model on the whole
validation set (not its shard) and prints the one table; the other ranks wait for it at a barrier.
"""
import copy
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from advprop_zoo.attacks import AttackConfig
from advprop_zoo.eval.accuracy import evaluate_accuracy
from advprop_zoo.eval.autoattack import (
    AutoAttackMissing, PixelImages, PixelSpaceModel, autoattack_adversary, require_autoattack, run_autoattack,
)
from advprop_zoo.eval.corruptions import TENSOR_CORRUPTIONS
from advprop_zoo.eval.suite import prepare_eval_model
from advprop_zoo.images import split_unreadable
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
APGD_BATCH = 128  # APGD-CE's batch (the whole 360-image set in three)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _whole_set(loader):
    """The validation loader over the whole set: under torchrun the run's loader holds this rank's shard
    (timm's eval sampler, padded), so rank 0 reads the dataset itself, in order, once."""
    if not _distributed():
        return loader
    batch_size = getattr(getattr(loader, 'loader', loader), 'batch_size', None) or 64
    return torch.utils.data.DataLoader(loader.dataset, batch_size=batch_size, shuffle=False, num_workers=0)


def _apgd_ce(model: torch.nn.Module, loader, mean, std, eps: float, seed: int, channels_last: bool = False) -> float:
    """Top-1 (%) under APGD-CE at ``eps`` pixels: the package's attack, configured as AutoAttack's standard
    version runs it, through ``advprop_zoo.eval.autoattack`` (images in [0, 1], mean/std inside the model)."""
    device = next(model.parameters()).device
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    images, labels = PixelImages(), []
    for x, y in loader:
        x, y, _ = split_unreadable(x.cpu(), y.cpu())  # unreadable images: never counted
        if len(y):
            images.add((x * s + m).clamp_(0, 1))
            labels.append(y)
    wrapped = PixelSpaceModel(model, mean, std, channels_last=channels_last)
    adversary = autoattack_adversary(wrapped, eps, 'standard', seed=seed, device=device)
    adversary.attacks_to_run = ['apgd-ce']  # the standard version's first attack, with its settings
    return run_autoattack(adversary, images.done(), torch.cat(labels), batch_size=APGD_BATCH).robust_top1


def _evaluate_robustness(result: TrainResult, seed: int, apgd: bool = True) -> Dict[str, Optional[float]]:
    """Clean top-1, top-1 under the PGD of ``EVAL_ATTACK`` and under APGD-CE at its eps (None without
    ``apgd``), and mean top-1 over every corruption and severity, on the whole validation set; measured as
    ``advprop-zoo eval`` measures, on the model with its BNs fused into the convs, channels_last."""
    mean, std = result.data_config['mean'], result.data_config['std']
    device = next(result.model.parameters()).device
    model = prepare_eval_model(copy.deepcopy(result.model), result.data_config['input_size'], device,
                               channels_last=True)
    loader = _whole_set(result.val_loader)

    def top1(**kw) -> float:
        return evaluate_accuracy(model, loader, mean, std, device=device, channels_last=True, seed=seed, **kw)['top1']
    clean = top1()
    pgd = top1(attack_cfg=AttackConfig(**EVAL_ATTACK))
    corrupted = [top1(corruption=(name, sev)) for name in TENSOR_CORRUPTIONS for sev in range(1, 6)]
    apgd_top1 = _apgd_ce(model, loader, mean, std, EVAL_ATTACK['eps'], seed, channels_last=True) if apgd else None
    return {'clean': clean, 'pgd': pgd, 'apgd': apgd_top1, 'corrupt': sum(corrupted) / len(corrupted)}


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
    try:
        require_autoattack()
        missing = None
    except AutoAttackMissing as e:
        missing = str(e)
    results: Dict[str, List[Dict[str, Optional[float]]]] = {m: [] for m in modes}
    primary = True
    for seed in seeds:
        for mode in modes:
            args = parse_args(
                [*DEMO_ARGS, *argv, '--mode', mode, '--seed', str(seed), '--output', str(base / f'{mode}-seed{seed}')])
            t0 = time.perf_counter()
            result = train(args)
            primary = not _distributed() or dist.get_rank() == 0
            if primary:  # the whole validation set, measured once
                row = _evaluate_robustness(result, seed, apgd=missing is None)
                row['minutes'] = (time.perf_counter() - t0) / 60
                results[mode].append(row)
                if progress:
                    apgd = f'APGD-CE {row["apgd"]:.2f}%  ' if row['apgd'] is not None else ''
                    print(f'[{mode} seed {seed}] clean {row["clean"]:.2f}%  PGD {row["pgd"]:.2f}%  {apgd}'
                          f'corruptions {row["corrupt"]:.2f}%  ({row["minutes"]:.1f} min)')
            if _distributed():
                dist.barrier()  # the other ranks wait for rank 0's evaluation before the next run
    if not primary:
        return 0

    def cell(values: List[Optional[float]]) -> str:
        if any(v is None for v in values):
            return 'n/a'
        if len(values) == 1:
            return f'{values[0]:.2f}'
        return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'

    eps = f'eps{EVAL_ATTACK["eps"]:g}'
    attack = f'PGD{EVAL_ATTACK["steps"]} {eps}'
    rows = [[m] + [cell([r[k] for r in results[m]]) for k in ('clean', 'pgd', 'apgd', 'corrupt', 'minutes')]
            for m in modes]
    print(f'\n{user.model} on scikit-learn digits (32x32, 360 val images), {len(seeds)} seed(s), {user.epochs} '
          f'epochs, trained with {user.attack.upper()} eps {user.attack_eps:g}; runs in {base}')
    print(format_table(['mode', 'clean top-1 %', f'{attack} top-1 %', f'APGD-CE {eps} top-1 %', 'corruptions top-1 %',
                        'minutes'], rows, align='lrrrrr'))
    if missing:
        print(f'APGD-CE n/a: {missing}')
    return 0
