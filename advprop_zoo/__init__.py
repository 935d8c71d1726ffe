"""advprop-zoo: AdvProp EfficientNets for timm.

``import advprop_zoo`` registers ``efficientnet_b0_advprop`` ... ``efficientnet_b8_advprop`` in timm's
model registry; everything else (weights, dual BN, folding and fusion, export, attacks, training
objectives, evaluation) is reached from here. The train loop itself is the separate ``advprop_zoo_train``.
"""
from .efficientnet_advprop import (
    DEFAULT_TAG, HUB_ORG, VARIANTS, ZOO_TAG, AdvPropVariant, PaperAttacker, get_variant, paper_attacker,
)
from .names import UnknownModelError, check_model_name
from .attacks import AttackConfig, attack, paper_steps, signed_step
from .modes import MODES, ModeConfig, StepLosses, forward_loss
from .dual_bn import (
    AUX_KEY, DualBatchNorm2d, SyncBatchNorm2d, SyncDualBatchNorm, aux_key, bn_route, convert_sync_dual_bn, is_aux_key,
    is_dual_bn, main_key, to_dual_bn, use_aux_bn,
)
from .fold import fold_checkpoint, fold_dual_bn, fold_state_dict
from .fuse import fuse_bn, static_same_padding
from .load import LoadedModel, load_model, resolve_input_size
from .export import ExportError, export_model
from .weights import WeightsError, check_output_path, check_state_dict, load_weights, save_weights
from .eval.accuracy import evaluate_accuracy
from .eval.datasets import EvalDataError, LogitSubset, imagenet_a_indices
from .eval.suite import EvalConfig, load_eval_weights, run_eval
from .eval.results import compare_results, describe_metric, format_results, plot_results, read_results, write_results
from .eval.imagenet_c import imagenet_c_summary
from .malloc import keep_freed_memory
from .version import __version__

__all__ = [
    'DEFAULT_TAG', 'HUB_ORG', 'VARIANTS', 'ZOO_TAG', 'AdvPropVariant', 'PaperAttacker', 'get_variant', 'paper_attacker',
    'UnknownModelError', 'check_model_name',
    'AttackConfig', 'attack', 'paper_steps', 'signed_step',
    'MODES', 'ModeConfig', 'StepLosses', 'forward_loss',
    'AUX_KEY', 'DualBatchNorm2d', 'SyncBatchNorm2d', 'SyncDualBatchNorm', 'aux_key', 'bn_route', 'convert_sync_dual_bn',
    'is_aux_key', 'is_dual_bn', 'main_key', 'to_dual_bn', 'use_aux_bn',
    'fold_checkpoint', 'fold_dual_bn', 'fold_state_dict',
    'fuse_bn', 'static_same_padding',
    'LoadedModel', 'load_model', 'resolve_input_size',
    'ExportError', 'export_model',
    'WeightsError', 'check_output_path', 'check_state_dict', 'load_weights', 'save_weights',
    'evaluate_accuracy',
    'EvalDataError', 'LogitSubset', 'imagenet_a_indices',
    'EvalConfig', 'load_eval_weights', 'run_eval',
    'compare_results', 'describe_metric', 'format_results', 'plot_results', 'read_results', 'write_results',
    'imagenet_c_summary',
    'keep_freed_memory',
    '__version__',
]
