"""A second opinion on a conversion: the same TF variables in Keras's own EfficientNet, same input, same logits?

Keras's ``keras.applications`` EfficientNet is written independently of timm (its own layer names,
its own padding: explicit ZeroPadding2D instead of 'same'), and it takes TF-layout arrays as they are,
with no transposes. Its layers are mapped to the release's variable names here, from Keras's names and
the TF layer-naming rule, not from the timm-derived map, so an error in either shows as a logit gap.
"""
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Set

import numpy as np
import timm
import torch

from advprop_zoo.efficientnet_advprop import VARIANTS
from advprop_zoo.fold import fold_state_dict
from advprop_zoo.weights import WeightsError

__all__ = ['TOLERANCE', 'Verification', 'keras_efficientnet', 'keras_variable_names', 'verify_against_keras']

TOLERANCE = 1e-4  # fp32: max |logit difference| allowed between timm and Keras
BATCH = 2  # deterministic inputs per check: enough for top-1 agreement to mean something, cheap at B8's 672px

# Keras block layer -> TF layer under blocks_i, (with an expansion conv, without one: the names shift down)
_BLOCK_LAYERS = {
    'expand_conv': ('conv2d', None),
    'expand_bn': ('tpu_batch_normalization', None),
    'dwconv': ('depthwise_conv2d', 'depthwise_conv2d'),
    'bn': ('tpu_batch_normalization_1', 'tpu_batch_normalization'),
    'se_reduce': ('se/conv2d', 'se/conv2d'),
    'se_expand': ('se/conv2d_1', 'se/conv2d_1'),
    'project_conv': ('conv2d_1', 'conv2d'),
    'project_bn': ('tpu_batch_normalization_2', 'tpu_batch_normalization_1'),
}
_OUTER_LAYERS = {'stem_conv': 'stem/conv2d', 'stem_bn': 'stem/tpu_batch_normalization',
                 'top_conv': 'head/conv2d', 'top_bn': 'head/tpu_batch_normalization', 'predictions': 'head/dense'}


@dataclass
class Verification:
    """timm vs Keras logits on the same input."""
    keras_model: str
    max_abs_diff: float
    top1_agree: int
    n: int
    logit_scale: float  # max |logit|, so the difference can be read against it

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= TOLERANCE and self.top1_agree == self.n

    def __str__(self) -> str:
        return (f'verify vs Keras {self.keras_model}: max |Δlogit| {self.max_abs_diff:.2e} '
                f'(logits up to {self.logit_scale:.1f}, tolerance {TOLERANCE:g}), '
                f'top-1 agreement {self.top1_agree}/{self.n}')


def keras_efficientnet(level: int, num_classes: int = 1000):
    """Keras's EfficientNet-B``level`` (B8 through the generic constructor) taking [-1, 1] input directly:
    the model starts after Keras's Rescaling/Normalization layers, with logits out."""
    import keras
    v = VARIANTS[level]
    kwargs = dict(weights=None, classes=num_classes, classifier_activation=None, input_shape=(v.res, v.res, 3))
    if hasattr(keras.applications, f'EfficientNetB{level}'):
        model = getattr(keras.applications, f'EfficientNetB{level}')(**kwargs)
    else:  # Keras exports B0-B7 only; the generic constructor behind them builds B8
        from keras.src.applications.efficientnet import EfficientNet
        model = EfficientNet(v.width, v.depth, v.res, v.dropout, name=f'efficientnetb{level}', **kwargs)
    return keras.Model(model.get_layer('stem_conv_pad').input, model.output, name=model.name)


def keras_variable_names(model) -> Dict[str, List[str]]:
    """{Keras layer name: [TF variable name under the scope, one per Keras weight, in order]}."""
    names = {layer.name for layer in model.layers}
    blocks: Dict[str, int] = {}
    out = {}
    for layer in model.layers:
        if not layer.weights:
            continue
        m = re.fullmatch(r'(block\d+[a-z]_)(.+)', layer.name)
        if m:
            block, role = m.groups()
            i = blocks.setdefault(block, len(blocks))
            tf_layer = _BLOCK_LAYERS[role][0 if f'{block}expand_conv' in names else 1]
            scope = f'blocks_{i}/{tf_layer}'
        else:
            scope = _OUTER_LAYERS[layer.name]
        leaves = [w.path.rsplit('/', 1)[-1] for w in layer.weights]
        if type(layer).__name__ == 'DepthwiseConv2D':  # Keras 3 calls it 'kernel', TF 'depthwise_kernel'
            leaves = ['depthwise_kernel' if leaf == 'kernel' else leaf for leaf in leaves]
        out[layer.name] = [f'{scope}/{leaf}' for leaf in leaves]
    return out


def verify_against_keras(read: Callable[[str], np.ndarray], tf_names: Set[str], model_name: str, level: int,
                         state_dict: Dict[str, torch.Tensor]) -> Verification:
    """Load the TF variables (``read(name under scope)``) into Keras by name and ``state_dict`` into timm's
    ``model_name``; compare logits on the same deterministic [-1, 1] input.

    Fails when Keras needs a variable other than ``tf_names`` (the ones the conversion filled the timm
    model from), or the logits differ by more than TOLERANCE, or the top-1 classes disagree."""
    keras_model = keras_efficientnet(level)
    keras_names = keras_variable_names(keras_model)
    used = {n for names in keras_names.values() for n in names}
    if used != tf_names:
        odd = sorted(used ^ tf_names)
        raise WeightsError(f'verify: Keras and the conversion use different variables ({len(odd)}, first: {odd[0]})')
    for layer_name, names in keras_names.items():
        keras_model.get_layer(layer_name).set_weights([read(n) for n in names])
    model = timm.create_model(model_name, pretrained=False).eval()
    model.load_state_dict(fold_state_dict(state_dict), strict=True)
    v = VARIANTS[level]
    x = torch.rand(BATCH, 3, v.res, v.res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = model(x).numpy()
    theirs = np.asarray(keras_model(x.permute(0, 2, 3, 1).numpy(), training=False))
    result = Verification(keras_model.name, float(np.abs(ours - theirs).max()),
                          int((ours.argmax(1) == theirs.argmax(1)).sum()), BATCH, float(np.abs(theirs).max()))
    if not (np.isfinite(ours).all() and result.ok):
        raise WeightsError(f'verification failed: {result}')
    return result
