"""Accuracy of a model on a loader: clean, under attack, or under a corruption.

Inputs arrive normalised with the model's mean/std (timm's eval transform); attacks work in that
space directly, corruptions are applied in [0, 1] pixel space and the result normalised again.
Hits are counted on the device and read once at the end, so the loop never waits on the
accelerator between batches (the only sync is the final read).
"""
import time
from contextlib import nullcontext
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm import tqdm

from ..attacks import AttackConfig, attack
from .corruptions import corrupt

__all__ = ['evaluate_accuracy']


def evaluate_accuracy(
        model: nn.Module,
        loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        mean: Sequence[float],
        std: Sequence[float],
        attack_cfg: Optional[AttackConfig] = None,
        corruption: Optional[Tuple[str, int]] = None,
        device: torch.device = torch.device('cpu'),
        autocast_dtype: Optional[torch.dtype] = None,
        channels_last: bool = False,
        seed: int = 0,
        progress: Optional[str] = None,
) -> Dict[str, float]:
    """Top-1 / top-5 (in %) and throughput of ``model`` in eval mode over ``loader``.

    ``attack_cfg`` attacks every batch (eval-mode BNs, the model's main route); ``corruption`` is a
    ``(name, severity)`` from ``advprop_zoo.corruptions``. ``seed`` makes random starts and noise repeatable.
    """
    was_training = model.training
    model.eval()
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    gen = torch.Generator(device=device).manual_seed(seed)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    hits = torch.zeros(2, dtype=torch.long, device=device)  # top-1, top-5
    total = 0
    bar = None
    if progress:
        bar = tqdm(desc=progress, unit='img', leave=False, dynamic_ncols=True,
                   total=_num_images(loader))
    start = time.perf_counter()
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if corruption is not None:
                x = (corrupt(x * s + m, corruption[0], corruption[1], generator=gen) - m) / s
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if attack_cfg is not None:
                x = attack(model, x, y, attack_cfg, mean, std, mode='eval', autocast_dtype=autocast_dtype,
                           generator=gen)
            with torch.inference_mode(), amp:
                logits = model(x)
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hit = top == y[:, None]
            hits += torch.stack([hit[:, 0].sum(), hit.any(dim=-1).sum()])
            total += len(y)
            if bar is not None:
                bar.update(len(y))
        correct1, correct5 = hits.tolist()
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if total == 0:
        raise ValueError('evaluation loader yielded no images')
    elapsed = time.perf_counter() - start
    return {'top1': 100.0 * correct1 / total, 'top5': 100.0 * correct5 / total, 'images': total,
            'images_per_s': total / elapsed}


def _num_images(loader: Iterable) -> Optional[int]:
    """Images a loader will yield, for the progress bar's total, when it can tell without iterating."""
    dataset = getattr(loader, 'dataset', None)
    try:
        return len(dataset) if dataset is not None else len(loader.sampler)
    except (TypeError, AttributeError):
        return None
