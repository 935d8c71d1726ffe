"""Training recipes as presets of flag values: ``--recipe paper`` is the published ImageNet recipe for the
chosen size, ``--recipe finetune`` a short transfer recipe from pretrained weights.

A preset only changes defaults: a flag given on the command line (or in a ``-c`` config file) still wins,
and ``describe`` says which preset a run used and which of its values were overridden.
"""
import argparse
from typing import Any, Callable, Dict, Optional

from advprop_zoo.efficientnet_advprop import DROP_PATH_RATE, VARIANTS

__all__ = ['RECIPES', 'recipe_values', 'describe']

_BY_NAME = {v.name: v for v in VARIANTS}


def _paper(model: str) -> Dict[str, Any]:
    """Tan & Le's EfficientNet ImageNet recipe, as AdvProp (Xie et al. 2020) trained with it: RMSProp-TF
    (decay 0.9, momentum 0.9, eps 1e-3), lr 0.016 per 256 images decayed x0.97 every 2.4 epochs after 5
    warm-up epochs, 350 epochs, weight decay 1e-5, label smoothing 0.1, EMA 0.9999, AutoAugment (TF's policy
    v0), dropout by size and drop-connect 0.2; the attacker is the paper's for the size (the loop's default
    for a zoo model)."""
    variant = _BY_NAME.get(model.split('.', 1)[0])
    values = dict(opt='rmsproptf', opt_eps=1e-3, momentum=0.9, lr=None, lr_base=0.016, lr_base_size=256,
                  lr_base_scale='linear', sched='step', decay_epochs=2.4, decay_rate=0.97, warmup_epochs=5,
                  warmup_lr=1e-6, epochs=350, weight_decay=1e-5, smoothing=0.1, model_ema=True,
                  model_ema_decay=0.9999, aa='v0', mode='advprop')
    if variant is not None:
        values.update(drop=variant.dropout, drop_path=DROP_PATH_RATE)
    return values


def _finetune(model: str) -> Dict[str, Any]:
    """Transfer to a new dataset from pretrained weights: AdamW at a small lr (5e-4 per 256 images) on a
    30-epoch cosine schedule with one warm-up epoch, weight decay 0.05, smoothing 0.1; the auxiliary BNs
    start as copies of the pretrained main BNs (``to_dual_bn``)."""
    return dict(opt='adamw', opt_eps=None, lr=None, lr_base=5e-4, lr_base_size=256, lr_base_scale='linear',
                sched='cosine', epochs=30, warmup_epochs=1, warmup_lr=1e-6, min_lr=1e-6, weight_decay=0.05,
                smoothing=0.1, model_ema=False, mode='advprop')


RECIPES: Dict[str, Callable[[str], Dict[str, Any]]] = {'paper': _paper, 'finetune': _finetune}


def recipe_values(name: Optional[str], model: Optional[str]) -> Dict[str, Any]:
    """The flag values preset ``name`` gives ``model`` (nothing for no preset)."""
    if not name:
        return {}
    if name not in RECIPES:
        raise ValueError(f'unknown --recipe {name!r}; choose one of {", ".join(RECIPES)}')
    return RECIPES[name](model or '')


def describe(args: argparse.Namespace) -> Optional[str]:
    """One line: the preset a run used and the flags that override it; None without a preset."""
    preset = recipe_values(args.recipe, args.model)
    if not preset:
        return None
    over = [f'--{k.replace("_", "-")} {getattr(args, k)} (preset {v})' for k, v in preset.items()
            if getattr(args, k, v) != v]
    return f'recipe {args.recipe} for {args.model}' + (f'; overridden: {", ".join(over)}' if over else '')
