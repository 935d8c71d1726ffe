"""Training objectives: AdvProp and the baselines the paper and Fast AdvProp compare it with.

One function, ``forward_loss``, computes the loss of one mini-batch for any mode, so every loop
(ours, a user's own, a Lightning module) trains the same objective:

* ``vanilla``: clean loss.
* ``advprop`` (Xie et al., Algorithm 1): adversarial examples made through the auxiliary BNs; clean
  loss through the main BNs plus adversarial loss through the auxiliary BNs, equal weights.
* ``adv-train``: shared BNs, ``a * J(x) + (1 - a) * J(x_adv)`` (Kurakin et al.); ``a = 0`` is Madry's
  min-max (adversarial loss only).
* ``fast-advprop`` (Mei et al., ICLR 2022): only a fraction ``p_adv`` of the batch is attacked, with an
  untargeted single step (``attack.eps`` pixels, no random start) made from the input gradients of the
  clean training pass itself, so the step costs about ``1 + p_adv`` vanilla passes instead of 3.
"""
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from .attacks import AttackConfig, attack, signed_step
from .dual_bn import bn_route, is_dual_bn

__all__ = ['MODES', 'ModeConfig', 'StepLosses', 'forward_loss']

MODES = ('vanilla', 'advprop', 'adv-train', 'fast-advprop')
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModeConfig:
    """How a step trains. ``attack`` budgets are in 0-255 pixel units (see ``advprop_zoo.attacks``)."""
    mode: str = 'advprop'
    attack: AttackConfig = field(default_factory=AttackConfig)
    adv_weight: float = 1.0  # advprop / fast-advprop: loss = clean + adv_weight * adversarial
    clean_weight: float = 0.5  # adv-train: a in a * J(x) + (1 - a) * J(x_adv)
    p_adv: float = 0.2  # fast-advprop: fraction of each batch that is attacked
    # advprop: one pass over [clean; adv] through split BNs instead of two passes. Off by default: on CPU
    # two passes measured faster (benchmarks/dual_bn.py, benchmarks/train_step.py); the update is the same
    split_bn: bool = False
    attack_bn_mode: str = 'train'  # BN statistics the attack sees: batch ('train') or running ('eval')

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f'unknown training mode {self.mode!r}; choose one of {", ".join(MODES)}')
        if not 0 <= self.clean_weight <= 1:
            raise ValueError(f'clean weight must be in [0, 1], got {self.clean_weight}')
        if not 0 < self.p_adv <= 1:
            raise ValueError(f'p_adv must be in (0, 1], got {self.p_adv}')
        if self.attack_bn_mode not in ('train', 'eval'):
            raise ValueError(f"attack BN mode must be 'train' or 'eval', got {self.attack_bn_mode!r}")

    @property
    def needs_dual_bn(self) -> bool:
        return self.mode in ('advprop', 'fast-advprop')


@dataclass
class StepLosses:
    """``loss`` is what to back-propagate (Fast AdvProp's attack-pass gradients are already in
    ``param.grad``); ``clean``/``adv`` are detached parts for logging; ``n_adv`` images were attacked."""
    loss: torch.Tensor
    clean: torch.Tensor
    adv: Optional[torch.Tensor] = None
    n_adv: int = 0


def forward_loss(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        criterion: Criterion,
        cfg: ModeConfig,
        mean: Sequence[float],
        std: Sequence[float],
        autocast_dtype: Optional[torch.dtype] = None,
        grad_scale: Union[float, Callable[[torch.Tensor], torch.Tensor]] = 1.0,
        attack_model: Optional[nn.Module] = None,
        backward_clean: Optional[Callable[[torch.Tensor], None]] = None,
) -> StepLosses:
    """The loss of one batch ``x`` (model space, normalised with ``mean``/``std``) under ``cfg.mode``. ``y``
    holds class indices, or soft targets (mixup / cutmix) whose argmax the attack then targets around.

    ``grad_scale`` (a factor, or a function of the loss such as ``GradScaler.scale``, which keeps the
    scale on the device) is applied to the gradients Fast AdvProp accumulates during its attack pass so
    they match the scaled loss the caller back-propagates.
    ``attack_model`` is what the attack runs (default ``model``): under DDP, the wrapped module, since
    DDP must only see the training passes (Fast AdvProp's attack-pass gradients, accumulated in
    ``param.grad``, are still averaged over ranks by the training backward).

    ``backward_clean`` (advprop, two passes): back-propagate the clean loss with it as soon as it exists,
    before the adversarial forward, so the clean pass's activations are freed first (peak memory: one
    pass's graph, not two); the returned loss then carries the clean term detached, as Fast AdvProp's
    does, and the caller's backward adds the adversarial gradients. The update is the same sum.
    """
    if cfg.needs_dual_bn and not any(is_dual_bn(m) for m in model.modules()):
        raise ValueError(f'{cfg.mode} needs auxiliary BNs: convert the model with advprop_zoo.to_dual_bn(model)')
    amp = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()

    attacked = model if attack_model is None else attack_model

    def fp32_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return criterion(logits.float(), target)  # every mode's loss in fp32, inside autocast or not
    labels = y.argmax(-1) if y.dim() > 1 else y  # soft (mixup / cutmix) targets: the attack takes their argmax

    def make_adv(route):
        return attack(attacked, x, labels, cfg.attack, mean, std, bn_route=route, mode=cfg.attack_bn_mode,
                      autocast_dtype=autocast_dtype)

    if cfg.mode == 'vanilla':
        with amp:
            clean = fp32_loss(model(x), y)
        return StepLosses(clean, clean.detach())

    if cfg.mode == 'advprop':
        x_adv = make_adv('aux')
        if cfg.split_bn:
            with bn_route(model, 'split'), amp:
                logits = model(torch.cat([x, x_adv]))
            clean, adv = fp32_loss(logits[:len(x)], y), fp32_loss(logits[len(x):], y)
        else:
            with amp:
                clean = fp32_loss(model(x), y)
            if backward_clean is not None:
                backward_clean(clean)
                clean = clean.detach()
            with bn_route(model, 'aux'), amp:
                adv = fp32_loss(model(x_adv), y)
        return StepLosses(clean + cfg.adv_weight * adv, clean.detach(), adv.detach(), len(x))

    if cfg.mode == 'adv-train':
        x_adv = make_adv(None)
        a = cfg.clean_weight
        if a == 0:  # Madry: adversarial examples only
            with amp:
                adv = fp32_loss(model(x_adv), y)
            return StepLosses(adv, torch.full_like(adv.detach(), float('nan')), adv.detach(), len(x))
        with amp:  # shared BNs: one batch of clean and adversarial images, as Kurakin et al.
            logits = model(torch.cat([x, x_adv]))
        clean, adv = fp32_loss(logits[:len(x)], y), fp32_loss(logits[len(x):], y)
        return StepLosses(a * clean + (1 - a) * adv, clean.detach(), adv.detach(), len(x))

    # fast-advprop: one clean pass over all n images (main BNs, the model's own BN mode, so running
    # statistics update as in vanilla training) yields both the clean-loss parameter gradients and the
    # input gradients of the first k images, which make their single-step attack: Mei et al.'s reuse,
    # without a separate attack pass. Its backward runs here, outside DDP's forward (see attack_model);
    # the training backward of the adversarial loss then all-reduces the accumulated gradients.
    n = len(x)
    k = min(n, max(1, round(cfg.p_adv * n)))
    x_in = x.detach().requires_grad_(True)
    params = [p for p in attacked.parameters() if p.requires_grad]
    with bn_route(attacked, 'main'), amp:
        clean = fp32_loss(attacked(x_in), y)
    (grad_scale(clean) if callable(grad_scale) else clean * grad_scale).backward(inputs=params + [x_in])
    x_adv = signed_step(x[:k], x_in.grad[:k], cfg.attack.eps, mean, std)
    with bn_route(model, 'aux'), amp:
        adv = fp32_loss(model(x_adv), y[:k])
    # the clean term is already in param.grad: carried detached so that ``loss`` still reads clean + adv
    return StepLosses(clean.detach() + cfg.adv_weight * adv, clean.detach(), adv.detach(), k)
