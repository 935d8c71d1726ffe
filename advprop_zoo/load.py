"""Model from weights: the one way a weights file or a pretrained tag becomes the model that holds it.

Export, evaluation, the Hub staging and the train loop's initial weights all come through
``load_model``, so they agree on every rule: the classifier size is read from the file (unless given),
a dual-BN (AdvProp-trained) file is recognised by its ``.aux_bn.`` keys and either folded to the plain
model or loaded into a dual-BN one, and a file that does not fit fails once, with the first offending
key and both shapes (``weights.check_state_dict``).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import timm
from torch import nn

from .dual_bn import is_aux_key, to_dual_bn
from .fold import fold_state_dict
from .fuse import fuse_bn
from .names import check_model_name
from .weights import (
    PathLike, cached_weights_path, check_pretrained_source, check_state_dict, classifier_size, load_weights,
    local_dir_weights,
)

__all__ = ['LoadedModel', 'load_model', 'resolve_input_size']

InputSize = Tuple[int, int, int]


@dataclass
class LoadedModel:
    """A model and where its weights came from."""
    model: nn.Module  # eval mode, on the CPU
    source: Optional[str]  # 'checkpoint', 'pretrained', or None for a freshly initialised model
    location: Optional[str]  # the resolved file, 'hf-hub:<repo>', or timm's file / local-dir location
    file: Optional[Path]  # the file the weights were read from, where there is one (to hash it)
    aux_bn_tensors: int  # auxiliary BN tensors the weights held (folded away unless load_model(fold=False))
    input_size: Optional[InputSize] = None  # the size 'same' padding was made static for (fuse=True)

    @property
    def dual_bn(self) -> bool:
        """The weights are a dual-BN (AdvProp-trained) checkpoint."""
        return self.aux_bn_tensors > 0


def resolve_input_size(input_size: Optional[Sequence[int]], model: nn.Module) -> InputSize:
    """``C H W``, ``H W`` or ``H`` completed from the model's own pretrained input size."""
    default = tuple(getattr(model, 'pretrained_cfg', {}).get('input_size') or (3, 224, 224))
    if input_size is None:
        return default
    size = tuple(input_size)
    if len(size) in (1, 2):
        size = (default[0],) + (size * 2 if len(size) == 1 else size)
    if len(size) != 3 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f'input size must be H, H W or C H W (positive ints), got {" ".join(map(str, input_size))}')
    return size


def _pretrained_file(source: str, loc: Any, model: nn.Module) -> Tuple[str, Optional[Path]]:
    """timm's ``(source, location)`` as a location string and the weights file it names, if local."""
    if source == 'hf-hub':
        repo = loc[0] if isinstance(loc, (tuple, list)) else loc
        return f'hf-hub:{repo}', cached_weights_path(repo, model.pretrained_cfg.get('hf_hub_filename')
                                                     or 'model.safetensors')
    if source == 'file':
        return str(loc), Path(loc)
    if source == 'local-dir':
        return str(loc), local_dir_weights(Path(loc))
    return str(loc), None


def load_model(
        model_name: str,
        checkpoint: Optional[PathLike] = None,
        pretrained: bool = False,
        num_classes: Optional[int] = None,
        fold: bool = True,
        fuse: bool = False,
        input_size: Optional[Sequence[int]] = None,
        use_ema: bool = False,
        **model_kwargs: Any,
) -> LoadedModel:
    """Build ``model_name`` holding the weights of ``checkpoint`` (safetensors, or a pickle loaded with
    ``weights_only=True``), or timm's pretrained weights (``pretrained``), or neither (fresh init).

    The classifier size of a checkpoint is read from the file unless ``num_classes`` says otherwise;
    with pretrained weights ``num_classes`` gives a fresh head, as in timm. A dual-BN checkpoint is folded
    to the plain model (``fold``), or loaded into the dual-BN model (``fold=False``). ``fuse`` folds every
    BN into its conv with 'same' padding static for ``input_size`` (default: the model's own), for
    inference and export. ``use_ema``: a checkpoint's EMA weights (``state_dict_ema`` of a timm train.py
    ``.pth.tar``; ``weights.load_weights``). ``model_kwargs`` go to ``timm.create_model`` (``drop_rate``, ...).
    """
    if ':' not in model_name:  # hf-hub: / local-dir: names are timm's to resolve; a .tag picks the weights
        check_model_name(model_name)
    if checkpoint is not None and pretrained:
        raise ValueError('give pretrained weights or a checkpoint, not both')
    if use_ema and checkpoint is None:
        raise ValueError('use_ema (--use-ema) picks the EMA weights of a checkpoint file; give one')
    kwargs = dict(model_kwargs)
    source = location = file = None
    aux = 0
    if checkpoint is not None:
        state_dict = load_weights(checkpoint, use_ema=use_ema)
        num_classes = num_classes if num_classes is not None else classifier_size(state_dict, model_name)
        if num_classes is not None:
            kwargs['num_classes'] = num_classes
        model = timm.create_model(model_name, **kwargs)
        aux = sum(1 for k in state_dict if is_aux_key(k))
        if aux and not fold:
            model = to_dual_bn(model)
            check_state_dict(state_dict, model)
            model.load_state_dict(state_dict)
        else:
            model.load_state_dict(fold_state_dict(state_dict, model))  # checked to fit strictly first
        source, file = 'checkpoint', Path(checkpoint)
        location = str(file.resolve())
    else:
        if num_classes is not None:
            kwargs['num_classes'] = num_classes
        if pretrained:
            origin, loc = check_pretrained_source(  # a missing or broken file fails here, in one line
                model_name, pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        if pretrained:
            source = 'pretrained'
            location, file = _pretrained_file(origin, loc, model)
    model.eval()
    size = None
    if fuse:
        size = resolve_input_size(input_size, model)
        model = fuse_bn(model, input_size=size)
    return LoadedModel(model, source, location, file, aux, size)
