"""The TF variable behind every tensor of a timm EfficientNet, derived from the model's structure.

TF names an unnamed layer after its type and numbers repeats within a variable scope (``conv2d``,
``conv2d_1``, ...; ``tpu_batch_normalization``, ``tpu_batch_normalization_1``, ...). The release's
builder gives the stem, every block (numbered flat across stages: ``blocks_0`` ... ``blocks_{n-1}``)
and the head a scope of their own, and the squeeze-excite convs a nested ``se`` scope. Replaying that
numbering over the timm modules in forward order yields every name of every variant, including the
shift in expand_ratio-1 blocks (no expansion conv, so the projection is ``conv2d`` and its BN
``tpu_batch_normalization_1``), with no table per variant to keep in sync.
"""
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from torch import nn
from timm.models._efficientnet_blocks import SqueezeExcite

__all__ = ['CONV', 'DEPTHWISE', 'DENSE', 'VECTOR', 'TFTensor', 'tf_name_map', 'tf_to_timm_layout', 'BN_VARIABLES']

CONV = 'conv'  # TF HWIO -> torch OIHW
DEPTHWISE = 'depthwise'  # TF [k, k, C, 1] -> torch [C, 1, k, k]
DENSE = 'dense'  # TF [in, out] -> torch [out, in]
VECTOR = 'vector'  # biases and BN vectors: same in both
_TF_TO_TORCH = {CONV: (3, 2, 0, 1), DEPTHWISE: (2, 3, 0, 1), DENSE: (1, 0), VECTOR: (0,)}

# timm BatchNorm tensor -> TF batch-norm variable (num_batches_tracked has no TF counterpart)
BN_VARIABLES = {'weight': 'gamma', 'bias': 'beta', 'running_mean': 'moving_mean', 'running_var': 'moving_variance'}


@dataclass(frozen=True)
class TFTensor:
    """One timm tensor and the TF variable that fills it."""
    tf_name: str  # under the model's scope, e.g. 'blocks_3/depthwise_conv2d/depthwise_kernel'
    timm_key: str  # e.g. 'blocks.1.0.conv_dw.weight'
    layout: str  # CONV, DEPTHWISE, DENSE or VECTOR
    shape: Tuple[int, ...]  # the timm shape

    @property
    def tf_shape(self) -> Tuple[int, ...]:
        perm = _TF_TO_TORCH[self.layout]
        out = [0] * len(perm)
        for torch_dim, tf_dim in enumerate(perm):
            out[tf_dim] = self.shape[torch_dim]
        return tuple(out)

    @property
    def tf_layer(self) -> str:
        """The TF layer (scope path) the variable belongs to, e.g. 'stem/tpu_batch_normalization'."""
        return self.tf_name.rsplit('/', 1)[0]


def tf_to_timm_layout(array: np.ndarray, layout: str, out: Optional[np.ndarray] = None) -> np.ndarray:
    """A TF checkpoint array as a C-contiguous array in timm's layout (a copy only where it transposes).

    ``out``: a flat float buffer of at least ``array.size`` to transpose into, for a caller that uses
    each result before asking for the next (a reused buffer is not page-faulted in for every tensor)."""
    perm = _TF_TO_TORCH[layout]
    if array.ndim != len(perm):
        raise ValueError(f'a {layout} tensor needs {len(perm)} dims, got shape {array.shape}')
    if layout == VECTOR:
        return np.ascontiguousarray(array)
    moved = array.transpose(perm)
    if out is None or out.dtype != array.dtype or out.size < array.size:
        return np.ascontiguousarray(moved)
    view = out[:array.size].reshape(moved.shape)
    np.copyto(view, moved)
    return view


def _scopes(model: nn.Module) -> Iterator[Tuple[str, str, nn.Module]]:
    """(TF scope, timm key prefix, module) in forward order: stem, blocks_i, head."""
    after_blocks = False
    for name, child in model.named_children():
        if name == 'blocks':
            after_blocks = True
            i = 0
            for s, stage in child.named_children():
                for j, block in stage.named_children():
                    yield f'blocks_{i}', f'blocks.{s}.{j}', block
                    i += 1
        else:
            yield 'head' if after_blocks else 'stem', name, child


def _tf_layer(path: str, m: nn.Module) -> Tuple[str, Dict[str, Tuple[str, str]]]:
    """TF layer type of a timm leaf module, and its tensors as {timm name: (TF variable, layout)}."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return 'tpu_batch_normalization', {k: (v, VECTOR) for k, v in BN_VARIABLES.items()}
    if isinstance(m, nn.Linear):
        return 'dense', {'weight': ('kernel', DENSE), 'bias': ('bias', VECTOR)}
    if isinstance(m, nn.Conv2d):
        if m.groups == 1:
            return 'conv2d', {'weight': ('kernel', CONV), 'bias': ('bias', VECTOR)}
        if m.groups == m.in_channels == m.out_channels:
            return 'depthwise_conv2d', {'weight': ('depthwise_kernel', DEPTHWISE), 'bias': ('bias', VECTOR)}
    raise ValueError(f'{path}: {type(m).__name__} has no counterpart in TF EfficientNet checkpoints')


def tf_name_map(model: nn.Module) -> List[TFTensor]:
    """Every TF-backed tensor of a timm EfficientNet (a meta-device model is enough), in forward order.

    Relies on timm registering each block's layers in forward order (checked by the tests against
    names built from TF's own block arguments). BN ``num_batches_tracked`` buffers are not listed:
    TF has no such variable.
    """
    entries = []
    counters: Dict[str, Counter] = defaultdict(Counter)
    for scope, prefix, module in _scopes(model):
        se_prefixes = [f'{prefix}.{n}' if n else prefix for n, m in module.named_modules()
                       if isinstance(m, SqueezeExcite)]
        for path, m in module.named_modules(prefix=prefix):
            tensors = dict(m.named_parameters(recurse=False))
            tensors.update((k, v) for k, v in m.named_buffers(recurse=False) if k != 'num_batches_tracked')
            if not tensors:
                continue
            in_se = any(path.startswith(p + '.') for p in se_prefixes)
            sub = f'{scope}/se' if in_se else scope
            layer, variables = _tf_layer(path, m)
            n = counters[sub][layer]
            counters[sub][layer] += 1
            tf_layer = f'{sub}/{layer}_{n}' if n else f'{sub}/{layer}'
            for name, t in tensors.items():
                if name not in variables:
                    raise ValueError(f'{path}.{name}: no TF variable holds this tensor')
                var, layout = variables[name]
                entries.append(TFTensor(f'{tf_layer}/{var}', f'{path}.{name}', layout, tuple(t.shape)))
    return entries
