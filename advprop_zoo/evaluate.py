"""Accuracy of a model on a loader: clean, under attack, or under a corruption.

Inputs arrive normalised with the model's mean/std (timm's eval transform); attacks work in that
space directly, corruptions are applied in [0, 1] pixel space and the result normalised again.
"""
import time
from contextlib import nullcontext
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .attacks import AttackConfig, attack
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
    correct1 = correct5 = total = 0
    start = time.perf_counter()
    batches = loader
    if progress:
        from tqdm import tqdm
        batches = tqdm(loader, desc=progress, unit='batch', leave=False)
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            if corruption is not None:
                x = (corrupt(x * s + m, corruption[0], corruption[1], generator=gen) - m) / s
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if attack_cfg is not None:
                x = attack(model, x, y, attack_cfg, mean, std, mode='eval', autocast_dtype=autocast_dtype,
                           generator=gen)
            with torch.no_grad(), amp:
                logits = model(x)
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hit = top == y[:, None]
            correct1 += hit[:, 0].sum().item()
            correct5 += hit.any(dim=-1).sum().item()
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError('evaluation loader yielded no images')
    elapsed = time.perf_counter() - start
    return {'top1': 100.0 * correct1 / total, 'top5': 100.0 * correct5 / total, 'images': total,
            'images_per_s': total / elapsed}
