"""Dual BatchNorm: a main and an auxiliary BN per layer, the core of AdvProp.

AdvProp (Xie et al. 2020, section 4.2) normalises adversarial images with their own *auxiliary* BNs,
because clean and adversarial batches have different statistics; the main BNs only ever see clean
images and are the ones kept for inference.

The layers here extend timm's ``SplitBatchNorm2d`` with two splits, so the state dict uses timm's
naming: the main BN keeps the ordinary keys (``bn1.weight``, ``bn1.running_mean`` ...), the auxiliary
lives at ``bn1.aux_bn.0.*``. Dropping every ``.aux_bn.`` key gives a plain timm state dict
(see ``advprop_zoo.fold``).

Which BN a batch goes through is a *route* set on every dual layer of a model:

* ``'main'`` (default): the whole batch through the main BNs (clean training, evaluation);
* ``'aux'``: the whole batch through the auxiliary BNs (generating attacks, the adversarial loss);
* ``'split'``: the concatenated ``[clean; adv]`` batch in one pass, first half through main, second
  half through aux (timm's ``SplitBatchNorm2d`` semantics, but in eval mode too).

Routes hold in training and eval mode alike: the aux route in eval uses the aux running statistics.
"""
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from timm.layers import SplitBatchNorm2d

__all__ = [
    'AUX_KEY', 'aux_key', 'is_aux_key', 'main_key', 'ROUTES', 'DualBatchNorm2d', 'SyncBatchNorm2d', 'SyncDualBatchNorm', 'is_dual_bn', 'to_dual_bn', 'convert_sync_dual_bn',
    'bn_route', 'use_aux_bn',
]

ROUTES = ('main', 'aux', 'split')
AUX_KEY = '.aux_bn.'  # timm SplitBatchNorm2d's namespace for the auxiliary BNs: <bn>.aux_bn.0.<tensor>


def aux_key(bn_name: str, tensor: str) -> str:
    """The state-dict key of an auxiliary BN tensor: ``aux_key('bn1', 'weight')`` -> ``'bn1.aux_bn.0.weight'``."""
    return f'{bn_name}{AUX_KEY}0.{tensor}'


def is_aux_key(key: str) -> bool:
    """Whether a state-dict key belongs to an auxiliary BN."""
    return AUX_KEY in key


def main_key(key: str) -> str:
    """The main BN's key an auxiliary key shadows: ``'bn1.aux_bn.0.weight'`` -> ``'bn1.weight'``."""
    prefix, _, rest = key.partition(AUX_KEY)
    return prefix + '.' + rest.split('.', 1)[-1]


class _DualRouting:
    """The routing shared by the local and the synchronised dual BN: ``aux_bn[0]`` is the auxiliary BN,
    ``_main_forward`` the BN the layer itself is; ``drop``/``act`` exist when converted from a timm
    ``BatchNormAct2d`` and run after either BN, as in timm's ``SplitBatchNorm2d``."""
    route: str

    def _main_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.route
        if route == 'main':
            x = self._main_forward(x)
        elif route == 'aux':
            x = self.aux_bn[0](x)
        else:  # 'split': [clean; adv], normalised each by its own BN in one pass
            half = x.shape[0] // 2
            if x.shape[0] != 2 * half:
                raise ValueError(f'split BN route needs an even batch ([clean; adv]), got {x.shape[0]}')
            x = torch.cat([self._main_forward(x[:half]), self.aux_bn[0](x[half:])], dim=0)
        if hasattr(self, 'drop'):
            x = self.drop(x)
        if hasattr(self, 'act'):
            x = self.act(x)
        return x

    def extra_repr(self) -> str:
        return super().extra_repr() + f', route={self.route!r}'


class DualBatchNorm2d(_DualRouting, SplitBatchNorm2d):
    """timm's ``SplitBatchNorm2d`` with two splits (main + ``aux_bn[0]``) and an explicit route."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, num_splits=2,
                         device=device, dtype=dtype)
        self.route = 'main'

    def _main_forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.BatchNorm2d.forward(self, x)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm whose batch statistics are reduced over all ranks while training under torch.distributed,
    on GPU and on CPU (gloo) alike, and which runs the ``drop``/``act`` it may carry from a timm
    ``BatchNormAct2d``.

    torch's ``nn.SyncBatchNorm`` refuses CPU tensors and DDP refuses it in CPU modules, and its CUDA path
    is private API that reads the batch counts back to the host in every layer; so this is a
    ``BatchNorm2d`` that, on any device, all-reduces the per-channel sum, sum of squares and count with
    torch's public autograd-aware collective. Forward, backward and running statistics match one process
    holding the global batch. Outside a distributed run, or in eval mode, it is an ordinary BatchNorm2d.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if not (self.training and group is not None and dist.get_world_size(group) > 1):
            return nn.BatchNorm2d.forward(self, x)
        return _sync_batch_norm(self, x, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._normalize(x)
        if hasattr(self, 'drop'):
            x = self.drop(x)
        if hasattr(self, 'act'):
            x = self.act(x)
        return x


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks (the backward sums the gradient), on public ``dist.all_reduce``: queued on
    the device's stream, no host sync. torch.distributed.nn.functional.all_reduce did this until torch
    deprecated it (a FutureWarning) for a private module."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllReduceSum.apply(grad, ctx.group), None


def _all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(t, group)


def _sync_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, group) -> torch.Tensor:
    """Batch norm over the global batch of every rank: one all-reduce of per-channel sums, sums of squares
    and the count, on any device. Public API only, and nothing read back to the host (the count is made on
    the device), so a training forward costs no host sync per layer."""
    c = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    shape = [1, c] + [1] * (x.dim() - 2)
    xf = x.float()
    # sums of (x - k) around the running mean (the same on every rank): E[x^2] - E[x]^2 on raw values
    # would cancel catastrophically in float32 when the mean is large against the spread
    k = bn.running_mean.detach().float() if bn.running_mean is not None else xf.new_zeros(c)
    d = xf - k.view(shape)
    local = torch.cat([d.sum(dims), (d * d).sum(dims), torch.full((1,), x.numel() / c, device=x.device)])
    total = _all_reduce_sum(local, group)
    n = total[-1]
    shift = total[:c] / n
    mean = k + shift
    var = (total[c:2 * c] / n - shift * shift).clamp(min=0)
    if bn.training and bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - factor).add_(factor * mean.detach())
            bn.running_var.mul_(1 - factor).add_(factor * var.detach() * n / (n - 1).clamp(min=1))
    y = (xf - mean.view(shape)) * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


class SyncDualBatchNorm(_DualRouting, SyncBatchNorm2d):
    """Dual BN for DDP: main and auxiliary are both synchronised BNs, so each branch's batch statistics
    are reduced across ranks (every rank must use the same route, as DDP requires anyway)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group,
                         device=device, dtype=dtype)
        self.aux_bn = nn.ModuleList([SyncBatchNorm2d(
            num_features, eps, momentum, affine, track_running_stats, process_group, device=device, dtype=dtype)])
        self.route = 'main'

    def _main_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._normalize(x)


def is_dual_bn(module: nn.Module) -> bool:
    return isinstance(module, _DualRouting)


def _copy_bn_state(src: nn.modules.batchnorm._BatchNorm, dst: nn.modules.batchnorm._BatchNorm, share: bool) -> None:
    """Give ``dst`` the parameters and buffers of ``src``: the same tensors (``share``, so an optimizer or
    DDP built on them keeps working) or independent copies (a fresh auxiliary)."""
    def take(t):
        return t if t is None or share else t.detach().clone()
    if src.affine:
        dst.weight = src.weight if share else nn.Parameter(take(src.weight), requires_grad=src.weight.requires_grad)
        dst.bias = src.bias if share else nn.Parameter(take(src.bias), requires_grad=src.bias.requires_grad)
    dst.running_mean = take(src.running_mean)
    dst.running_var = take(src.running_var)
    dst.num_batches_tracked = take(src.num_batches_tracked)
    dst.train(src.training)


def _carry_act(src: nn.Module, dst: nn.Module) -> None:
    for name in ('drop', 'act'):  # timm BatchNormAct2d / SyncBatchNormAct / SplitBatchNorm2d with act
        if hasattr(src, name):
            dst.add_module(name, getattr(src, name))


def _replace(model: nn.Module, convert) -> nn.Module:
    """Replace every module for which ``convert`` returns a new one, in place; the root too."""
    root = convert(model)
    if root is not None:
        return root
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = convert(child)
            if new is not None:
                setattr(parent, name, new)
    return model


def _bn_kwargs(bn: nn.modules.batchnorm._BatchNorm) -> Dict:
    ref = bn.running_mean if bn.running_mean is not None else bn.weight
    dd = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
    return dict(num_features=bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                track_running_stats=bn.track_running_stats, **dd)


def to_dual_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm2d of ``model`` an auxiliary twin, in place; returns ``model``.

    Handles ``nn.BatchNorm2d``, timm's ``BatchNormAct2d`` (its drop and act are kept and run after
    either BN), ``nn.SyncBatchNorm``, timm's ``SyncBatchNormAct`` and ``SyncBatchNorm2d`` (these become
    ``SyncDualBatchNorm``).
    The main BN keeps its parameter and buffer tensors, so keys and values are unchanged; the auxiliary
    starts as an independent copy of it. Layers that are already dual are left alone. The route starts
    as ``'main'``, so the converted model computes exactly what the original did.
    """
    found = []

    def convert(m: nn.Module) -> Optional[nn.Module]:
        if is_dual_bn(m) or not isinstance(m, nn.modules.batchnorm._BatchNorm):
            found.append(is_dual_bn(m))
            return None
        found.append(True)
        if isinstance(m, (nn.SyncBatchNorm, SyncBatchNorm2d)):
            dual = SyncDualBatchNorm(process_group=m.process_group, **_bn_kwargs(m))
        elif isinstance(m, nn.BatchNorm2d):
            if isinstance(m, SplitBatchNorm2d):
                raise ValueError(f'to_dual_bn: {type(m).__name__} already has {m.num_splits - 1} auxiliary BNs')
            dual = DualBatchNorm2d(**_bn_kwargs(m))
        else:
            raise ValueError(f'to_dual_bn: {type(m).__name__} is not supported; only 2d BatchNorms are')
        _copy_bn_state(m, dual, share=True)
        _copy_bn_state(m, dual.aux_bn[0], share=False)
        _carry_act(m, dual)
        return dual

    model = _replace(model, convert)
    if not any(found):
        raise ValueError(f'to_dual_bn: {type(model).__name__} has no BatchNorm2d to give an auxiliary BN')
    return model


def convert_sync_dual_bn(model: nn.Module, process_group=None) -> nn.Module:
    """Make every BN of ``model`` synchronised across DDP ranks, in place; returns ``model``.

    Dual BNs become ``SyncDualBatchNorm`` with *both* branches synchronised (timm's and torch's
    ``convert_sync_batchnorm`` would turn a dual BN into a single ``SyncBatchNorm`` and lose the
    auxiliary); both branches keep their parameter and buffer tensors, route, drop and act. Other BNs
    become ``SyncBatchNorm2d`` (drop and act kept, like timm's ``convert_sync_batchnorm``), which unlike
    torch's also synchronises CPU tensors, so gloo runs on CPU reduce statistics too.
    """
    def convert(m: nn.Module) -> Optional[nn.Module]:
        if isinstance(m, SyncDualBatchNorm):
            return None
        if isinstance(m, DualBatchNorm2d):
            sync = SyncDualBatchNorm(process_group=process_group, **_bn_kwargs(m))
            _copy_bn_state(m, sync, share=True)
            _copy_bn_state(m.aux_bn[0], sync.aux_bn[0], share=True)
            _carry_act(m, sync)
            sync.route = m.route
            return sync
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, SyncBatchNorm2d):
            sync = SyncBatchNorm2d(process_group=process_group or getattr(m, 'process_group', None), **_bn_kwargs(m))
            _copy_bn_state(m, sync, share=True)
            _carry_act(m, sync)
            return sync
        return None

    return _replace(model, convert)


@contextmanager
def bn_route(model: nn.Module, route: str) -> Iterator[nn.Module]:
    """Send batches through the ``route`` BNs of every dual layer in ``model`` inside the ``with`` block;
    the previous routes are restored on exit. ``route`` is ``'main'``, ``'aux'`` or ``'split'``.

    A model without dual BNs is an error rather than a silent no-op: it would quietly train the
    adversarial batch through the clean BNs.
    """
    if route not in ROUTES:
        raise ValueError(f'unknown BN route {route!r}; use one of {", ".join(ROUTES)}')
    duals = [m for m in model.modules() if is_dual_bn(m)]
    if not duals:
        raise ValueError(f'{type(model).__name__} has no dual BN layers; convert it with to_dual_bn(model) first')
    before = [m.route for m in duals]
    for m in duals:
        m.route = route
    try:
        yield model
    finally:
        for m, r in zip(duals, before):
            m.route = r


def use_aux_bn(model: nn.Module):
    """``with use_aux_bn(model):`` sends whole batches through the auxiliary BNs (same as ``bn_route(model, 'aux')``)."""
    return bn_route(model, 'aux')
