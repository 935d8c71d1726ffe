"""AdvProp EfficientNet-B0…B8 as timm models.

Each ``efficientnet_bX_advprop`` is built by timm's own EfficientNet builder with TF 'same' padding
and BN eps 1e-3, so it is architecturally identical to timm's ``tf_efficientnet_bX`` (same keys,
shapes and outputs for the same weights). What differs is what a user of AdvProp weights needs by
default: the [-1, 1] input normalisation (mean = std = 0.5), TF's crop and dropout, and the paper's
attacker, recorded here so the train loop can find it.

Importing this module (``import advprop_zoo``) registers the models with ``@register_model``.
"""
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import torch
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError
from timm.models import generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._efficientnet_builder import BN_EPS_TF_DEFAULT
from timm.models.efficientnet import EfficientNet, _gen_efficientnet

from .attacks import AttackConfig, paper_steps
from .names import check_model_name
from .weights import WeightsError, check_pretrained_source, check_state_dict

__all__ = [
    'AdvPropVariant', 'PaperAttacker', 'VARIANTS', 'HUB_ORG', 'DEFAULT_TAG', 'ZOO_TAG',
    'get_variant', 'paper_attacker',
]

HUB_ORG = 'advprop-zoo'  # Hugging Face org that hub/publish.py uploads this project's conversions to
DEFAULT_TAG = 'ap_in1k'  # AdvProp weights timm already hosts (converted by timm from the TF release)
ZOO_TAG = 'ap_in1k_zoo'  # the same weights produced by this project's convert/ and published by hub/
DROP_PATH_RATE = 0.2  # TF's drop_connect_rate for every B-series model
PAPER_ID = 'arXiv:1911.09665'
PAPER_NAME = 'Adversarial Examples Improve Image Recognition'


@dataclass(frozen=True)
class PaperAttacker:
    """The AdvProp paper's PGD attacker: L-inf budget ``eps`` in 0-255 pixel units, step 1,
    ``eps + 1`` iterations (a single step for eps 1; ``attacks.paper_steps``)."""
    eps: int
    step_size: float = 1.0

    @property
    def steps(self) -> int:
        return paper_steps(self.eps)

    def config(self) -> AttackConfig:
        """The attack itself: targeted PGD with a random start, as the paper trains with."""
        return AttackConfig(eps=self.eps, steps=self.steps, step_size=self.step_size)

    def __str__(self) -> str:
        return f'PGD{self.steps}_eps{self.eps}'


@dataclass(frozen=True)
class AdvPropVariant:
    """One member of the family: EfficientNet compound scaling plus the paper's facts about it."""
    level: int  # the X in B-X
    width: float  # channel multiplier
    depth: float  # depth (repeat) multiplier
    res: int  # training / eval resolution
    dropout: float  # TF classifier dropout
    attack_eps: int  # the paper's best attacker for this size (PGD, 0-255 units)
    paper_top1: float  # ImageNet top-1 reported in the AdvProp paper
    timm_top1: float  # top-1 timm measured for tf_efficientnet_bX.ap_in1k (results-imagenet.csv)

    @property
    def name(self) -> str:
        return f'efficientnet_b{self.level}_advprop'

    @property
    def timm_arch(self) -> str:
        """timm's architecturally identical TF-port model."""
        return f'tf_efficientnet_b{self.level}'

    @property
    def tf_scope(self) -> str:
        """Variable scope of the released TF checkpoint."""
        return f'efficientnet-b{self.level}'

    @property
    def crop_pct(self) -> float:
        # TF eval resizes to res + CROP_PADDING (32) and crops the res x res centre. Kept unrounded so
        # timm's floor(res / crop_pct) gives exactly res + 32 (timm's rounded 0.904 / 0.942 / 0.954 give
        # 331 / 559 / 703 for B3 / B6 / B8)
        return self.res / (self.res + 32)

    @property
    def attacker(self) -> PaperAttacker:
        return PaperAttacker(self.attack_eps)


# EfficientNet (width, depth, resolution, dropout) from TF's efficientnet_builder.efficientnet_params;
# attacker and accuracies from the AdvProp paper and timm's published results.
VARIANTS: List[AdvPropVariant] = [
    AdvPropVariant(0, 1.0, 1.0, 224, 0.2, 1, 77.6, 77.100),
    AdvPropVariant(1, 1.0, 1.1, 240, 0.2, 1, 79.6, 79.288),
    AdvPropVariant(2, 1.1, 1.2, 260, 0.3, 1, 80.5, 80.300),
    AdvPropVariant(3, 1.2, 1.4, 300, 0.3, 3, 81.9, 81.842),
    AdvPropVariant(4, 1.4, 1.8, 380, 0.4, 4, 83.3, 83.246),
    AdvPropVariant(5, 1.6, 2.2, 456, 0.4, 4, 84.3, 84.258),
    AdvPropVariant(6, 1.8, 2.6, 528, 0.5, 4, 84.8, 84.794),
    AdvPropVariant(7, 2.0, 3.1, 600, 0.5, 4, 85.2, 85.132),
    AdvPropVariant(8, 2.2, 3.6, 672, 0.5, 4, 85.5, 85.358),
]
_BY_NAME: Dict[str, AdvPropVariant] = {v.name: v for v in VARIANTS}


def get_variant(model_name: str) -> AdvPropVariant:
    """The variant behind a zoo model name (a ``.tag`` suffix is ignored)."""
    base = model_name.split('.', 1)[0]
    if base not in _BY_NAME:
        check_model_name(base, choices=list(_BY_NAME))
    return _BY_NAME[base]


def paper_attacker(model_name: str) -> PaperAttacker:
    """The attacker the AdvProp paper found best for this model size (B0-B2 PGD1 eps1, B3 PGD4 eps3,
    B4-B8 PGD5 eps4); the train loop uses it when no attack is given."""
    return get_variant(model_name).attacker


def _cfg(v: AdvPropVariant, **kwargs) -> Dict[str, Any]:
    pool = (v.res + 31) // 32
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, v.res, v.res),
        'pool_size': (pool, pool),
        'crop_pct': v.crop_pct,
        'crop_mode': 'center',
        'interpolation': 'bicubic',
        # AdvProp checkpoints were trained on x * 2 / 255 - 1: ImageNet mean/std silently costs accuracy
        'mean': (0.5, 0.5, 0.5),
        'std': (0.5, 0.5, 0.5),
        'first_conv': 'conv_stem',
        'classifier': 'classifier',
        'license': 'apache-2.0',
        'paper_ids': PAPER_ID,
        'paper_name': PAPER_NAME,
        'origin_url': 'https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    **{f'{v.name}.{DEFAULT_TAG}': _cfg(v, hf_hub_id=f'timm/{v.timm_arch}.{DEFAULT_TAG}') for v in VARIANTS},
    **{f'{v.name}.{ZOO_TAG}': _cfg(v, hf_hub_id=f'{HUB_ORG}/{v.name}.{ZOO_TAG}') for v in VARIANTS},
})


def _checkpoint_filter(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Check pretrained weights against the model before timm loads them, so a wrong file fails with
    the first offending key and both shapes instead of a wall of size-mismatch lines."""
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    ignore = set()
    if getattr(model, 'num_classes', cfg.get('num_classes')) != cfg.get('num_classes'):
        ignore |= {'classifier.weight', 'classifier.bias'}  # fresh head: timm drops these
    if model.conv_stem.in_channels != (cfg.get('input_size') or (3,))[0]:
        ignore.add('conv_stem.weight')  # timm adapts the stem to in_chans
    # a features_only model lacks the head: timm loads non-strictly, extra keys are expected
    check_state_dict(state_dict, model, ignore=ignore, allow_unexpected=not hasattr(model, 'classifier'))
    return state_dict


def _create(variant: AdvPropVariant, pretrained: bool = False, **kwargs) -> EfficientNet:
    num_classes = kwargs.get('num_classes')
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 0):
        raise ValueError(
            f'{variant.name}: num_classes must be a positive int (or 0 for a headless feature model, as in timm), '
            f'got {num_classes!r}')
    kwargs.setdefault('bn_eps', BN_EPS_TF_DEFAULT)
    kwargs.setdefault('pad_type', 'same')
    kwargs.setdefault('drop_rate', variant.dropout)
    kwargs.setdefault('drop_path_rate', DROP_PATH_RATE)
    source = None
    if pretrained:
        try:
            source = check_pretrained_source(
                variant.name,
                pretrained_cfg=kwargs.get('pretrained_cfg'),
                pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'),
                cache_dir=kwargs.get('cache_dir'),
            )
        except WeightsError as e:
            raise WeightsError(f'{e}{_unpublished_hint(variant, kwargs)}') from None
        kwargs.setdefault('pretrained_filter_fn', _checkpoint_filter)
    try:
        return _gen_efficientnet(
            variant.name,
            channel_multiplier=variant.width,
            depth_multiplier=variant.depth,
            pretrained=pretrained,
            **kwargs,
        )
    except WeightsError:
        raise
    except Exception as e:  # translate loader failures that slipped past the pre-checks
        if pretrained and _is_weights_failure(e):
            first = (str(e).strip().splitlines() or [''])[0]
            hint = _unpublished_hint(variant, kwargs) if source and source[0] == 'hf-hub' else ''
            raise WeightsError(f'{variant.name}: loading pretrained weights failed: {type(e).__name__}: {first}'
                               f'{hint}') from e
        raise


def _unpublished_hint(variant: AdvPropVariant, kwargs: Dict[str, Any]) -> str:
    """For the .ap_in1k_zoo tag: its Hub repo exists only once this project's conversion is published."""
    cfg = resolve_pretrained_cfg(variant.name, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    hub_id = (cfg.hf_hub_id or '') if cfg is not None and not cfg.file else ''
    if not hub_id.startswith(f'{HUB_ORG}/'):
        return ''
    return (f'. {hub_id} is this project\'s own conversion, not yet published on the Hub as of this release: '
            f'convert the TF release yourself (python convert/tf_to_timm.py --checkpoint {variant.tf_scope}.tar.gz --output '
            f'b{variant.level}.safetensors), publish it with hub/publish.py, or load the default tag .{DEFAULT_TAG}')


def _is_weights_failure(e: Exception) -> bool:
    return isinstance(e, (pickle.UnpicklingError, SafetensorError, LocalEntryNotFoundError, HfHubHTTPError,
                          FileNotFoundError))


def _make_entrypoint(variant: AdvPropVariant) -> Callable[..., EfficientNet]:
    def entrypoint(pretrained: bool = False, **kwargs) -> EfficientNet:
        return _create(variant, pretrained=pretrained, **kwargs)
    entrypoint.__name__ = entrypoint.__qualname__ = variant.name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (
        f'EfficientNet-B{variant.level} trained with AdvProp ({PAPER_ID}); architecture of timm\'s '
        f'{variant.timm_arch}, inputs in [-1, 1], {variant.res}px, paper top-1 {variant.paper_top1}.')
    return entrypoint


for _v in VARIANTS:
    globals()[_v.name] = register_model(_make_entrypoint(_v))  # also appends the name to __all__
