"""Synthetic TF checkpoints laid out like the EfficientNet release, for the tests and the benchmark.

The variable names and shapes come from TF's own recipe (the release builder's block-argument strings,
``round_filters``/``round_repeats`` and its layer-naming rules), not from timm, so a converter whose
timm-derived name map is wrong fails on them. Values are deterministic and scaled so that a network
built from them gives finite logits of moderate size, which the numerical cross-check needs.
"""
import math
import re
import tarfile
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from advprop_zoo.efficientnet_advprop import VARIANTS

__all__ = ['release_shapes', 'release_tensors', 'write_checkpoint', 'write_release_tarball']

# efficientnet_builder.py of the TF release: repeats, kernel, stride, expand ratio, in, out, SE ratio
_BLOCKS_ARGS = [
    'r1_k3_s11_e1_i32_o16_se0.25', 'r2_k3_s22_e6_i16_o24_se0.25', 'r2_k5_s22_e6_i24_o40_se0.25',
    'r3_k3_s22_e6_i40_o80_se0.25', 'r3_k5_s11_e6_i80_o112_se0.25', 'r4_k5_s22_e6_i112_o192_se0.25',
    'r1_k3_s11_e6_i192_o320_se0.25',
]
_BN = ('gamma', 'beta', 'moving_mean', 'moving_variance')
EMA = 'ExponentialMovingAverage'
SLOTS = ('RMSProp', 'RMSProp_1')  # the release's RMSProp optimizer: ms and mom slots


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * filters else new)


def _decode(arg: str) -> Dict[str, str]:
    return re.fullmatch(r'r(?P<r>\d+)_k(?P<k>\d+)_s\d+_e(?P<e>\d+)_i(?P<i>\d+)_o(?P<o>\d+)_se(?P<se>[\d.]+)',
                        arg).groupdict()


def release_shapes(level: int, num_classes: int = 1000) -> Dict[str, Tuple[int, ...]]:
    """{variable name under the model scope: TF shape} for the weights of EfficientNet-B``level``."""
    width, depth = VARIANTS[level].width, VARIANTS[level].depth  # the compound-scaling coefficients
    shapes: Dict[str, Tuple[int, ...]] = {}

    def bn(scope: str, c: int) -> None:
        shapes.update({f'{scope}/{v}': (c,) for v in _BN})

    stem = _round_filters(32, width)
    shapes['stem/conv2d/kernel'] = (3, 3, 3, stem)
    bn('stem/tpu_batch_normalization', stem)
    i = 0
    for arg in _BLOCKS_ARGS:
        a = _decode(arg)
        cin, cout = _round_filters(int(a['i']), width), _round_filters(int(a['o']), width)
        k, e = int(a['k']), int(a['e'])
        for r in range(int(math.ceil(depth * int(a['r'])))):
            c_in = cin if r == 0 else cout
            s, cexp, n_bn, n_conv = f'blocks_{i}', c_in * e, 0, 0
            if e != 1:
                shapes[f'{s}/conv2d/kernel'] = (1, 1, c_in, cexp)
                bn(f'{s}/tpu_batch_normalization', cexp)
                n_bn, n_conv = 1, 1
            shapes[f'{s}/depthwise_conv2d/depthwise_kernel'] = (k, k, cexp, 1)
            bn(f'{s}/tpu_batch_normalization' + (f'_{n_bn}' if n_bn else ''), cexp)
            cr = max(1, int(c_in * float(a['se'])))
            shapes.update({f'{s}/se/conv2d/kernel': (1, 1, cexp, cr), f'{s}/se/conv2d/bias': (cr,),
                           f'{s}/se/conv2d_1/kernel': (1, 1, cr, cexp), f'{s}/se/conv2d_1/bias': (cexp,)})
            shapes[f'{s}/conv2d' + (f'_{n_conv}' if n_conv else '') + '/kernel'] = (1, 1, cexp, cout)
            bn(f'{s}/tpu_batch_normalization_{n_bn + 1}', cout)
            i += 1
    head = _round_filters(1280, width)
    shapes['head/conv2d/kernel'] = (1, 1, cout, head)
    bn('head/tpu_batch_normalization', head)
    shapes['head/dense/kernel'] = (head, num_classes)
    shapes['head/dense/bias'] = (num_classes,)
    return shapes


def _value(name: str, shape: Tuple[int, ...], rng: np.random.Generator, last_bn: bool) -> np.ndarray:
    leaf = name.rsplit('/', 1)[-1]
    if leaf == 'gamma':  # a block's last BN scaled down, so 61 residual additions do not blow up
        return ((0.2 if last_bn else 1.0) + 0.05 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if leaf == 'moving_variance':
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if leaf in ('beta', 'moving_mean', 'bias'):
        return (0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    fan_in = int(np.prod(shape[:-1])) if leaf != 'depthwise_kernel' else shape[0] * shape[1]
    gain = 12.0 if 'dense' in name else 1.0  # logits of a few units: a 1e-4 tolerance then means something
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(gain * math.sqrt(1.0 / fan_in))


def release_tensors(
        level: int,
        seed: int = 0,
        ema: bool = True,
        raw: bool = True,
        slots: Iterable[str] = SLOTS,
        global_step: bool = True,
        aux_bn: bool = False,
) -> Dict[str, np.ndarray]:
    """Every variable of a release-like checkpoint of EfficientNet-B``level``, by full name.

    ``ema``/``raw`` choose whether the EMA twins / raw weights are present (raw = EMA x 1.01, so tests
    can tell which were converted); ``slots`` adds optimizer slots per raw weight; ``aux_bn`` adds an
    auxiliary BN beside every BN, numbered after the main BNs of its scope.
    """
    model_scope = f'efficientnet-b{level}'
    rng = np.random.default_rng(seed)
    shapes = release_shapes(level)
    last_bn: Dict[str, str] = {}  # block scope -> its last (projection) BN layer
    for name in shapes:
        block, layer = name.split('/', 1)[0], name.rsplit('/', 1)[0]
        if block.startswith('blocks_') and '/tpu_batch_normalization' in layer:
            last_bn[block] = max(last_bn.get(block, ''), layer)
    if aux_bn:
        shapes.update(_aux_bn_shapes(shapes))
    out: Dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        v = _value(name, shape, rng, name.rsplit('/', 1)[0] == last_bn.get(name.split('/', 1)[0]))
        full = f'{model_scope}/{name}'
        if ema:
            out[f'{full}/{EMA}'] = v
        if raw:
            out[full] = v * np.float32(1.01)
            for slot in slots:
                out[f'{full}/{slot}'] = np.zeros(shape, np.float32)
    if global_step:
        out['global_step'] = np.array(437898, np.int64)
    return out


def _aux_bn_shapes(shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    count: Dict[str, int] = {}
    for name in shapes:
        if name.endswith('/gamma'):
            scope = name.rsplit('/', 2)[0]
            count[scope] = count.get(scope, 0) + 1
    aux = {}
    for name, shape in shapes.items():
        layer, var = name.rsplit('/', 1)
        if var in _BN:
            scope, bn = layer.rsplit('/', 1)
            n = int(bn.rsplit('_', 1)[1]) if bn[-1].isdigit() else 0
            aux[f'{scope}/tpu_batch_normalization_{n + count[scope]}/{var}'] = shape
    return aux


def write_checkpoint(prefix: Path, tensors: Dict[str, np.ndarray]) -> Path:
    """Write ``tensors`` as a TF v2 checkpoint (PREFIX.index + PREFIX.data-00000-of-00001 + checkpoint)."""
    import tensorflow as tf
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    with tf.device('/cpu:0'):
        tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[''] * len(names),
                          tensors=[tensors[n] for n in names])
    (prefix.parent / 'checkpoint').write_text(
        f'model_checkpoint_path: "{prefix.name}"\nall_model_checkpoint_paths: "{prefix.name}"\n')
    return prefix


def write_release_tarball(path: Path, level: int, tensors: Dict[str, np.ndarray],
                          workdir: Optional[Path] = None) -> Path:
    """``efficientnet-bN.tar.gz`` holding ``efficientnet-bN/{model.ckpt.*, checkpoint}`` like the release."""
    path = Path(path)
    folder = Path(workdir or path.parent) / f'.{path.name}.src' / f'efficientnet-b{level}'
    write_checkpoint(folder / 'model.ckpt', tensors)
    with tarfile.open(path, 'w:gz', compresslevel=1) as tar:
        tar.add(folder, arcname=folder.name)
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    folder.parent.rmdir()
    return path
