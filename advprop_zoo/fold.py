"""Folding: from a dual-BN (AdvProp-trained) model or checkpoint back to a plain timm one.

After AdvProp training only the main BNs are kept (the paper evaluates with them alone). Because the
auxiliary BNs live under ``.aux_bn.`` and the main BNs keep timm's ordinary keys, folding is dropping
those keys or modules; what this module adds is checking that the result really is the plain model,
so a checkpoint of the wrong architecture fails here, with the key and both shapes, and not later.
"""
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import timm
import torch
from torch import nn
from timm.layers import BatchNormAct2d

from .dual_bn import (
    DualBatchNorm2d, SyncBatchNorm2d, SyncDualBatchNorm, _bn_kwargs, _carry_act, _copy_bn_state, _replace, is_aux_key,
    main_key,
)
from .names import check_model_name
from .weights import (
    PathLike, WeightsError, check_output_path, check_state_dict, classifier_size, load_weights, save_weights,
)

__all__ = ['fold_dual_bn', 'fold_state_dict', 'fold_checkpoint']


def fold_dual_bn(model: nn.Module) -> nn.Module:
    """Replace every dual BN of ``model`` by its main BN, in place; returns ``model``.

    ``DualBatchNorm2d`` becomes ``nn.BatchNorm2d``, or timm's ``BatchNormAct2d`` (with the same drop and
    act) when it came from one; ``SyncDualBatchNorm`` becomes ``SyncBatchNorm2d`` (drop and act kept).
    The main parameter and buffer tensors are kept, so the state dict is exactly
    the main branch's and loads strictly into the plain timm model. Deep-copy first to keep the dual one.
    """
    def convert(m: nn.Module) -> Optional[nn.Module]:
        if isinstance(m, SyncDualBatchNorm):
            plain = SyncBatchNorm2d(process_group=m.process_group, **_bn_kwargs(m))
        elif isinstance(m, DualBatchNorm2d):
            has_act = hasattr(m, 'act')
            plain = BatchNormAct2d(apply_act=False, **_bn_kwargs(m)) if has_act else nn.BatchNorm2d(**_bn_kwargs(m))
        else:
            return None
        _copy_bn_state(m, plain, share=True)
        _carry_act(m, plain)
        return plain

    return _replace(model, convert)


def fold_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        model: Optional[nn.Module] = None,
) -> Dict[str, torch.Tensor]:
    """The state dict without its auxiliary BN entries (``*.aux_bn.*``).

    Each auxiliary entry must shadow a main entry of the same shape (else it is not a dual-BN state
    dict and WeightsError says which key). With ``model`` (a plain model, e.g. built on the meta
    device), the result is checked to load strictly into it.
    """
    folded = {}
    for key, value in state_dict.items():
        if not is_aux_key(key):
            folded[key] = value
            continue
        main = main_key(key)
        if main not in state_dict:
            raise WeightsError(f'auxiliary BN entry {key!r} has no main BN entry {main!r}')
        if tuple(state_dict[main].shape) != tuple(value.shape):
            raise WeightsError(f'auxiliary BN entry {key!r} has shape {tuple(value.shape)}, its main BN entry '
                               f'{main!r} {tuple(state_dict[main].shape)}')
    if model is not None:
        check_state_dict(folded, model)
    return folded


def fold_checkpoint(
        src: PathLike,
        dst: PathLike,
        model_name: str,
        overwrite: bool = False,
        **model_kwargs: Any,
) -> Tuple[Path, int, int]:
    """Fold the weights file ``src`` (safetensors, or a pickle loaded with ``weights_only=True``) into the
    safetensors file ``dst``, checked against ``timm.create_model(model_name, **model_kwargs)``.

    Everything is checked before ``dst`` is written, and it is written atomically, so a failure leaves
    no file. Returns ``(dst, tensors kept, auxiliary tensors dropped)``.
    """
    model_name = check_model_name(model_name)
    dst = check_output_path(dst, overwrite=overwrite)
    state_dict = load_weights(src)
    if model_kwargs.get('num_classes') is None:  # the head size the file has, as load_model reads it
        model_kwargs['num_classes'] = classifier_size(state_dict, model_name)
    with torch.device('meta'):  # shapes only: no memory, no init time
        model = timm.create_model(model_name, **{k: v for k, v in model_kwargs.items() if v is not None})
    folded = fold_state_dict(state_dict, model)
    metadata = {'format': 'pt', 'model': model_name, 'advprop_zoo': f'folded from {Path(src).name}'}
    save_weights(folded, dst, metadata=metadata)
    return dst, len(folded), len(state_dict) - len(folded)
