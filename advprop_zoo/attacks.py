"""L-inf PGD and FGSM in pixel units, for AdvProp training and robust evaluation.

Budgets are given the way the paper gives them, in 0-255 pixel units, and converted through the
model's own mean/std: for AdvProp inputs in [-1, 1] (std 0.5) eps = 1 becomes 2/255 in model space,
for an ImageNet-normalised model it becomes 1/255/std per channel. Projection clamps both to the eps
ball and to the image's valid range, so an adversarial example is always a real image.

The attack runs through whichever BNs the caller names (the auxiliary ones while training with
AdvProp), in an explicit BN mode, and by default computes input gradients only: no weight-gradient
work and nothing left in ``param.grad``.
"""
import functools
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dual_bn import bn_route as _route  # as _route: attack() takes a bn_route argument

__all__ = ['AttackConfig', 'attack', 'signed_step', 'pixel_bounds', 'bn_mode', 'input_grads_only', 'paper_steps', 'PAPER_STEPS_RULE']

ATTACKS = ('pgd', 'fgsm')
PAPER_STEPS_RULE = 'eps + 1 iterations, 1 for eps <= 1'  # for --help texts; paper_steps is the rule itself
_FP16_LOSS_SCALE = 1024.0  # only the sign of the input gradient is used: a fixed scale keeps fp16 grads off zero


def paper_steps(eps: float) -> int:
    """The AdvProp paper's PGD iteration count for a budget of ``eps`` pixels at step 1: ``eps + 1``,
    a single step for eps <= 1 (PGD1 eps1, PGD4 eps3, PGD5 eps4)."""
    return 1 if eps <= 1 else int(round(eps)) + 1


@dataclass(frozen=True)
class AttackConfig:
    """An L-inf attack. ``eps`` and ``step_size`` are in 0-255 pixel units.

    Defaults follow the AdvProp paper: PGD, step 1, n = eps + 1 iterations (1 for eps <= 1), random
    start, targeted towards a random wrong label. FGSM is one step of size eps from the clean image.
    """
    kind: str = 'pgd'
    eps: float = 1.0
    steps: Optional[int] = None
    step_size: Optional[float] = None
    targeted: bool = True
    random_start: Optional[bool] = None

    def __post_init__(self):
        if self.kind not in ATTACKS:
            raise ValueError(f'unknown attack {self.kind!r}; choose one of {", ".join(ATTACKS)}')
        if not self.eps >= 0:
            raise ValueError(f'attack eps must be >= 0 (0-255 pixel units), got {self.eps}')
        if self.steps is not None and self.steps < 1:
            raise ValueError(f'attack steps must be >= 1, got {self.steps}')
        if self.step_size is not None and not self.step_size > 0:
            raise ValueError(f'attack step size must be > 0, got {self.step_size}')

    def resolved(self) -> 'AttackConfig':
        """The same attack with every default filled in."""
        if self.kind == 'fgsm':
            return replace(self, steps=1, step_size=self.step_size or self.eps,
                           random_start=bool(self.random_start))
        steps = self.steps or paper_steps(self.eps)
        return replace(self, steps=steps, step_size=self.step_size or 1.0,
                       random_start=True if self.random_start is None else self.random_start)

    def __str__(self) -> str:
        c = self.resolved()
        name = 'FGSM' if c.kind == 'fgsm' else f'PGD{c.steps}'
        return f'{name}_eps{c.eps:g}' + ('' if c.targeted else '_untargeted')


def pixel_bounds(
        mean: Sequence[float], std: Sequence[float], device=None, dtype=torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lo, hi, unit)`` per channel in model space: the image of pixel 0 and 255, and the size of
    one 0-255 pixel step; each shaped (1, C, 1, 1). Made once per (mean, std, device, dtype): a
    host-to-device copy in every attack would make the host wait for the device each step."""
    return _pixel_bounds(tuple(float(m) for m in mean), tuple(float(s) for s in std), torch.device(device or 'cpu'),
                         dtype)


@functools.lru_cache(maxsize=64)
def _pixel_bounds(mean: Tuple[float, ...], std: Tuple[float, ...], device: torch.device, dtype: torch.dtype):
    m = torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1).to(device)
    s = torch.tensor(std, dtype=dtype).view(1, -1, 1, 1).to(device)
    return -m / s, (1 - m) / s, 1 / (255 * s)


@contextmanager
def input_grads_only(model: nn.Module) -> Iterator[nn.Module]:
    """Parameters stop requiring grad while the attack runs: its backward then computes input gradients
    only, compiled or not (AOT autograd otherwise builds the weight gradients too and throws them away)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def bn_mode(model: nn.Module, mode: Optional[str]) -> Iterator[nn.Module]:
    """Run ``model`` in an explicit mode and restore every module's own flag afterwards.

    ``'eval'``: running statistics. ``'train'``: batch statistics, with running statistics frozen so
    that attack iterations do not move them. ``None``: leave the model as it is.
    """
    if mode is None:
        yield model
        return
    if mode not in ('train', 'eval'):
        raise ValueError(f"bn mode must be 'train' or 'eval', got {mode!r}")
    flags = [(m, m.training) for m in model.modules()]
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracking = [(m, m.track_running_stats) for m in bns]
    model.train(mode == 'train')
    if mode == 'train':
        for m in bns:
            m.track_running_stats = False  # use batch stats, update nothing
    try:
        yield model
    finally:
        for m, t in tracking:
            m.track_running_stats = t
        for m, f in flags:
            m.training = f


def attack(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        config: AttackConfig,
        mean: Sequence[float],
        std: Sequence[float],
        bn_route: Optional[str] = None,
        mode: Optional[str] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        generator: Optional[torch.Generator] = None,
        target: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Return adversarial examples for model-space inputs ``x`` (normalised with ``mean``/``std``).

    Args:
        bn_route: on a dual-BN model, which BNs to attack through ('aux' while training with AdvProp).
        mode: 'train' (batch stats, running stats frozen), 'eval', or None (model as it is).
        autocast_dtype: run the forward passes under autocast (bf16 / fp16).
        target: labels a targeted attack moves towards; default a random wrong label per image.
    """
    c = config.resolved()
    if target is not None and not c.targeted:
        raise ValueError('target labels given to an untargeted attack')
    lo, hi, unit = pixel_bounds(mean, std, device=x.device, dtype=x.dtype)
    x = x.detach()
    eps, alpha = c.eps * unit, c.step_size * unit
    if c.random_start and c.eps > 0:
        noise = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x_adv = torch.maximum(torch.minimum(x + (2 * noise - 1) * eps, hi), lo)
    else:
        x_adv = x.clone()
    if c.eps == 0:
        return x_adv
    amp = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    scale = _FP16_LOSS_SCALE if autocast_dtype == torch.float16 else 1.0
    route = nullcontext()
    if bn_route is not None:
        route = _route(model, bn_route)
    with route, bn_mode(model, mode), input_grads_only(model), torch.enable_grad():
        for _ in range(c.steps):
            x_adv.requires_grad_(True)
            with amp:
                logits = model(x_adv)
            if target is None:
                target = _random_wrong_label(y, logits.shape[-1], generator) if c.targeted else y
            loss = F.cross_entropy(logits.float(), target)
            (grad,) = torch.autograd.grad(loss * scale, x_adv)
            x_adv = _project(x_adv.detach() + (-alpha if c.targeted else alpha) * grad.sign(), x, eps, lo, hi)
    return x_adv.detach()


def signed_step(
        x: torch.Tensor, grad: torch.Tensor, eps: float, mean: Sequence[float], std: Sequence[float],
) -> torch.Tensor:
    """One untargeted FGSM step of ``eps`` pixels from ``x`` along ``sign(grad)``, clamped to valid pixels.

    For callers that already hold the input gradient of a pass they needed anyway (Fast AdvProp's
    clean pass), so the attack costs no extra forward/backward.
    """
    lo, hi, unit = pixel_bounds(mean, std, device=x.device, dtype=x.dtype)
    x = x.detach()
    return _project(x + eps * unit * grad.sign(), x, eps * unit, lo, hi).detach()


def _project(x_adv, x, eps, lo, hi):
    """Into the eps ball around ``x``, then into the valid pixel range."""
    x_adv = torch.maximum(torch.minimum(x_adv, x + eps), x - eps)
    return torch.maximum(torch.minimum(x_adv, hi), lo)


def _random_wrong_label(y: torch.Tensor, num_classes: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    if num_classes < 2:
        raise ValueError('a targeted attack needs at least 2 classes')
    shift = torch.randint(1, num_classes, y.shape, device=y.device, generator=generator)
    return (y + shift) % num_classes
