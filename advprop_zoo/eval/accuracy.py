"""Accuracy of a model on a loader: clean, under attack, or under a corruption.

Inputs arrive normalised with the model's mean/std (timm's eval transform); attacks work in that
space directly, corruptions are applied in [0, 1] pixel space and the result normalised again.
Hits are counted on the device and read once at the end, so the loop never waits on the
accelerator between batches (the only sync is the final read).

Unreadable images (``advprop_zoo.images``: placeholders with a negative label) are excluded, never
counted: labels on the host are filtered before they move; labels already on the device (timm's CUDA
prefetcher) are kept there, where a negative label can never equal a top-k index, and the placeholders
are subtracted from the image count at the end. Their files are named in the result's ``excluded``.
"""
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm import tqdm

from ..attacks import AttackConfig, attack
from ..images import split_unreadable, unreadable_index, unreadable_names
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
        on_batch: Optional[Callable[[], None]] = None,
) -> Dict[str, Any]:
    """Top-1 / top-5 (in %), images counted, throughput of ``model`` in eval mode over ``loader``, and
    ``excluded``: the files of the unreadable images left out of every count (``advprop_zoo.images``;
    relative to the dataset root, in the order met).

    ``attack_cfg`` attacks every batch (eval-mode BNs, the model's main route); ``corruption`` is a
    ``(name, severity)`` from ``advprop_zoo.corruptions``. ``seed`` makes random starts and noise repeatable.
    ``on_batch()`` is called after each batch (the train loop's hung-rank watchdog).
    """
    was_training = model.training
    model.eval()
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    gen = torch.Generator(device=device).manual_seed(seed)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    hits = torch.zeros(2, dtype=torch.long, device=device)  # top-1, top-5
    total = 0
    excluded: List[int] = []  # dataset indices of placeholders dropped on the host
    device_labels: List[torch.Tensor] = []  # labels that arrived on the device, clamped to <= 0 (placeholders)
    bar = None
    if progress:
        bar = tqdm(desc=progress, unit='img', leave=False, dynamic_ncols=True,
                   total=_num_images(loader))
    start = time.perf_counter()
    try:
        for x, y in loader:
            n = len(y)
            if _on_host(y):
                x, y, dropped = split_unreadable(x, y)  # host labels: no device sync
                excluded += dropped
                if not len(y):
                    if bar is not None:
                        bar.update(n)
                    continue
            else:  # on the device already: keep the placeholders there, subtract them at the end
                device_labels.append(y.clamp(max=0))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if corruption is not None:
                x = (corrupt(x * s + m, corruption[0], corruption[1], generator=gen) - m) / s
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if attack_cfg is not None:
                # a placeholder still on the device is attacked towards class 0; it is never counted
                x = attack(model, x, y.clamp(min=0), attack_cfg, mean, std, mode='eval',
                           autocast_dtype=autocast_dtype, generator=gen)
            with torch.inference_mode(), amp:
                logits = model(x)
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hit = top == y[:, None]
            hits += torch.stack([hit[:, 0].sum(), hit.any(dim=-1).sum()])
            total += len(y)
            if bar is not None:
                bar.update(n)
            if on_batch is not None:
                on_batch()
        correct1, correct5 = hits.tolist()
        if device_labels:
            labels = torch.cat(device_labels)
            on_device = [unreadable_index(v) for v in labels[labels < 0].tolist()]
            excluded += on_device
            total -= len(on_device)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    names = unreadable_names(getattr(loader, 'dataset', None), excluded)
    if total == 0:
        if names:
            more = f' and {len(names) - 1} more' if len(names) > 1 else ''
            raise ValueError(f'no readable images to evaluate: {names[0]}{more} could not be read')
        raise ValueError('evaluation loader yielded no images')
    elapsed = time.perf_counter() - start
    return {'top1': 100.0 * correct1 / total, 'top5': 100.0 * correct5 / total, 'images': total,
            'images_per_s': total / elapsed, 'excluded': names}


def _on_host(labels: torch.Tensor) -> bool:
    """Whether a batch's labels are still in host memory, where dropping placeholders costs no device sync."""
    return labels.device.type == 'cpu'


def _num_images(loader: Iterable) -> Optional[int]:
    """Images a loader will yield, for the progress bar's total, when it can tell without iterating."""
    dataset = getattr(loader, 'dataset', None)
    try:
        return len(dataset) if dataset is not None else len(loader.sampler)
    except (TypeError, AttributeError):
        return None
