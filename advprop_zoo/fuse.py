"""Inference-time fusion: BatchNorm into the preceding conv, and TF 'same' padding made static.

An eval-mode BN is a per-channel affine map, so it can be folded into the conv that feeds it
(``w' = w * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``): one pass over the
activations less per BN, and nothing left for a runtime to fold. timm's ``Conv2dSame`` computes TF's
asymmetric 'same' padding from the input size on every call; for a fixed input size that padding is
a constant, which exporters and compilers handle better than shape arithmetic.

Conv -> BN pairs are found from the model's dataflow (an FX trace with timm's leaf modules), not from
module names, and a conv is only fused when the BN is its sole consumer. The model keeps its class,
module names and methods (``forward_features``, ``reset_classifier`` ...); only leaf modules change.
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import fx, nn
from timm.layers import Conv2dSame
from timm.layers._fx import get_notrace_functions, is_notrace_module
from timm.layers.padding import pad_same_arg

from .dual_bn import is_dual_bn

__all__ = ['StaticPadConv2d', 'fuse_bn', 'static_same_padding']

InputSize = Union[int, Sequence[int]]
_BN = nn.modules.batchnorm._BatchNorm


class StaticPadConv2d(nn.Conv2d):
    """A conv with a fixed, possibly asymmetric zero padding ``(left, right, top, bottom)``: TF 'same'
    padding precomputed for one input size (``nn.Conv2d`` only pads symmetrically)."""

    def __init__(self, *args, pad: Tuple[int, int, int, int] = (0, 0, 0, 0), **kwargs):
        super().__init__(*args, **kwargs)
        self.pad = tuple(int(p) for p in pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(F.pad(x, self.pad), self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f', pad={self.pad}'


def _spatial(input_size: InputSize) -> Tuple[int, int]:
    size = (input_size,) if isinstance(input_size, int) else tuple(input_size)
    if len(size) not in (1, 2, 3) or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f'input size must be H, (H, W) or (C, H, W) of positive ints, got {input_size!r}')
    return (size[-1], size[-1]) if len(size) == 1 else (size[-2], size[-1])


def _in_chans(model: nn.Module, input_size: InputSize) -> int:
    if not isinstance(input_size, int) and len(input_size) == 3:
        return input_size[0]
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent_name), child, new)


def static_same_padding(model: nn.Module, input_size: InputSize, pad_in_kernel: bool = False) -> nn.Module:
    """Replace every timm ``Conv2dSame`` (dynamic TF 'same' padding) by a conv with the padding it
    computes for ``input_size`` (H, (H, W) or (C, H, W)), in place; returns ``model``.

    Symmetric padding becomes an ordinary ``nn.Conv2d`` (weights shared). TF's asymmetric padding
    (one more row / column at the bottom / right, e.g. every stride-2 conv on an even size) becomes a
    ``StaticPadConv2d`` (weights shared; an explicit pad, which exporters turn into the Conv's own
    asymmetric pads) or, with ``pad_in_kernel``, an ``nn.Conv2d`` whose kernel gets the missing top /
    left padding as leading zero taps and pads symmetrically: the same sums without copying the
    activation into a padded buffer on every call (faster in PyTorch, eager or compiled; the weight
    is a new, larger tensor). The model is then only valid at that input size, which is measured
    here with one forward pass that records each conv's input size.
    """
    h, w = _spatial(input_size)
    convs = {name: m for name, m in model.named_modules() if type(m) is Conv2dSame}
    if not convs:
        return model
    sizes: Dict[str, Tuple[int, int]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: Tuple[torch.Tensor, ...]) -> None:
            sizes.setdefault(name, tuple(args[0].shape[-2:]))
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in convs.items()]
    ref = next(model.parameters())
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, _in_chans(model, input_size), h, w, device=ref.device, dtype=ref.dtype))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    for name, conv in convs.items():
        if name not in sizes:
            continue  # not on the forward path (e.g. an unused head): keep it dynamic
        left, right, top, bottom = pad_same_arg(list(sizes[name]), conv.weight.shape[-2:], conv.stride, conv.dilation)
        kwargs = dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                      stride=conv.stride, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                      device='meta')
        weight = conv.weight
        if left == right and top == bottom:
            new = nn.Conv2d(padding=(top, left), **kwargs)
        elif pad_in_kernel and conv.dilation == (1, 1):  # TF pads right >= left, bottom >= top
            kwargs['kernel_size'] = (conv.kernel_size[0] + bottom - top, conv.kernel_size[1] + right - left)
            new = nn.Conv2d(padding=(bottom, right), **kwargs)
            weight = nn.Parameter(F.pad(weight.detach(), (right - left, 0, bottom - top, 0)),
                                  requires_grad=weight.requires_grad)
        else:
            new = StaticPadConv2d(pad=(left, right, top, bottom), **kwargs)
        new.weight = weight
        if conv.bias is not None:
            new.bias = conv.bias
        new.train(conv.training)
        _replace_module(model, name, new)
    return model


class _LeafTracer(fx.Tracer):
    """FX tracer that stops at convs, BNs and timm's no-trace modules (e.g. ``Conv2dSame``,
    ``BatchNormAct2d``), as timm's own feature extraction does."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, _BN)) or is_notrace_module(type(m)) or super().is_leaf_module(m, qualname)


def _conv_bn_pairs(model: nn.Module) -> Tuple[List[Tuple[str, str]], List[str]]:
    """``(conv, bn)`` name pairs where the BN is the conv's only consumer, and the BNs without such a conv."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as e:
        raise ValueError(f'fuse_bn: cannot trace {type(model).__name__} to find conv -> BN pairs '
                         f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from e
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == 'call_module':
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs, lone = [], []
    for node in graph.nodes:
        if node.op != 'call_module' or not isinstance(model.get_submodule(node.target), _BN):
            continue
        bn = model.get_submodule(node.target)
        src = node.args[0] if node.args else None
        conv = model.get_submodule(src.target) if isinstance(src, fx.Node) and src.op == 'call_module' else None
        if (isinstance(conv, nn.Conv2d) and len(src.users) == 1 and calls[src.target] == 1
                and calls[node.target] == 1 and conv.out_channels == bn.num_features):
            pairs.append((src.target, node.target))
        else:
            lone.append(node.target)
    return pairs, lone


def _bn_scale_shift(bn: _BN) -> Tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BN as ``y = x * scale + shift``, in float64 so the fused weights round once."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f'fuse_bn: {type(bn).__name__} without running statistics cannot be fused')
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        shift = shift + bn.bias.double()
    return scale, shift


def _after_bn(bn: _BN, first: Optional[nn.Module] = None) -> nn.Module:
    """What replaces a fused BN: nothing, or the drop and act of a timm BatchNormAct2d under their own
    names (so a parametric act keeps its state-dict key)."""
    parts = ([('affine', first)] if first is not None else []) + [
        (name, getattr(bn, name)) for name in ('drop', 'act') if hasattr(bn, name)]
    if not parts:
        return nn.Identity()
    return parts[0][1] if len(parts) == 1 and first is not None else nn.Sequential(OrderedDict(parts))


def fuse_bn(model: nn.Module, input_size: Optional[InputSize] = None, pad_in_kernel: bool = False) -> nn.Module:
    """Fold every BatchNorm of ``model`` into the conv that feeds it, in place; returns ``model`` in eval mode.

    Uses the BN running statistics (eval-mode BN). Regular, grouped / depthwise convs and timm's
    ``Conv2dSame`` are fused; timm ``BatchNormAct2d`` leaves its drop and act in its place. A BN without
    a conv of its own (rare) becomes an equivalent depthwise 1x1 conv, so no BatchNorm module remains.
    With ``input_size`` (H, (H, W) or (C, H, W)), TF 'same' padding is also made static for that size
    (see ``static_same_padding`` for ``pad_in_kernel``). Dual-BN models must be folded first (``fold_dual_bn``).
    """
    if any(is_dual_bn(m) for m in model.modules()):
        raise ValueError('fuse_bn: the model has dual BNs; fold them first with fold_dual_bn(model)')
    model.eval()
    if input_size is not None:
        static_same_padding(model, input_size, pad_in_kernel=pad_in_kernel)
    pairs, lone = _conv_bn_pairs(model)
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
            scale, shift = _bn_scale_shift(bn)
            weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
            bias = shift if conv.bias is None else conv.bias.double() * scale + shift
            conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
            _replace_module(model, bn_name, _after_bn(bn))
        for bn_name in lone:
            bn = model.get_submodule(bn_name)
            scale, shift = _bn_scale_shift(bn)
            ref = bn.running_mean
            affine = nn.Conv2d(bn.num_features, bn.num_features, 1, groups=bn.num_features, bias=True,
                               device=ref.device, dtype=ref.dtype).eval()
            affine.weight.copy_(scale.view(-1, 1, 1, 1))
            affine.bias.copy_(shift)
            _replace_module(model, bn_name, _after_bn(bn, first=affine))
    left = [name for name, m in model.named_modules() if isinstance(m, _BN)]
    if left:
        raise ValueError(f'fuse_bn: BatchNorm {left[0]!r} could not be fused ({len(left)} in all)')
    return model
