"""The evaluation suite behind ``advprop-zoo eval``: one model, one dataset, every number the paper reports.

clean top-1 / top-5 (ImageNet val, Stylized-ImageNet, ImageNet-A through its 200-class logit mask,
any ImageFolder), robust accuracy under a PGD / FGSM sweep over eps (``advprop_zoo.attacks``,
eval-mode BNs), and ImageNet-C per-corruption errors, CE, mCE and relative mCE. Preprocessing is the
model's own pretrained config through timm (``resolve_data_config`` + timm's dataset and loader), so
an AdvProp model gets mean = std = 0.5, bicubic resizing and its TF crop without being told; timm
validate.py's overrides (``input_size``, ``crop_pct``, ``crop_mode``, ``interpolation``, ``mean``, ``std``)
change it as they do there. The data is one of the benchmark layouts or any timm dataset spec
(``hfds/NAME``, ``wds/NAME``, ...; ``eval.datasets``), and the weights a checkpoint (a timm train.py
``.pth.tar`` too, its EMA weights with ``use_ema``) or timm's pretrained weights.

Unreadable images (a truncated JPEG, a non-image under an image name) are excluded from every count and
named in each run's ``excluded`` (``advprop_zoo.images``), never replaced by another sample.

For speed the model is evaluated BN-fused with TF 'same' padding made static for the eval size
(``fuse_bn``): the same function up to float rounding (checked in the tests; ``fuse=False`` turns it off).
"""
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from ..attacks import ATTACKS, AttackConfig
from ..fuse import fuse_bn
from ..load import load_model
from ..version import __version__
from ..weights import sha256_file
from .accuracy import evaluate_accuracy
from .datasets import (
    LogitSubset, check_dataset_name, check_img_mode, check_spec_classes, class_map_for,
    create_eval_loader, create_spec_dataset, eval_loader, find_imagenet_c, imagenet_a_indices, read_class_map,
    resolve_root, timm_prefix,
)
from .imagenet_c import imagenet_c_summary
from .results import SCHEMA, attack_name, metrics_of, utc_now

__all__ = ['EvalConfig', 'parse_eps', 'load_eval_weights', 'eval_data_config', 'check_data_overrides',
           'prepare_eval_model', 'run_eval']

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
INTERPOLATIONS = ('bicubic', 'bilinear', 'nearest', 'box', 'hamming', 'lanczos')  # timm's eval transform's
CROP_MODES = ('center', 'squash', 'border')


@dataclass
class EvalConfig:
    """What to evaluate and how; the fields of ``advprop-zoo eval`` (see its --help). ``dataset`` is a
    benchmark layout or a timm dataset spec; ``data_dir`` may be None only for ``hfds/``, ``hfids/``, ``tfds/``
    (timm's root: their cache / data dir). The fields after ``progress`` are timm validate.py's."""
    model: str
    data_dir: Optional[str]
    dataset: str = 'imagenet'
    checkpoint: Optional[str] = None
    pretrained: bool = False
    num_classes: Optional[int] = None
    attack: Optional[str] = None
    eps: Sequence[float] = (1.0, 2.0, 4.0)
    steps: Optional[int] = None
    step_size: Optional[float] = None
    targeted: bool = False
    batch_size: int = 64
    amp: Optional[str] = None
    channels_last: bool = False
    device: Optional[str] = None
    workers: int = 4
    fuse: bool = True
    img_size: Optional[int] = None
    corruptions: Optional[Sequence[str]] = None
    clean_dir: Optional[str] = None
    seed: int = 0
    progress: bool = True
    use_ema: bool = False  # a checkpoint's EMA weights (state_dict_ema of a timm .pth.tar)
    split: Optional[str] = None  # timm specs: default 'validation'; folder layouts: a subfolder, when given
    class_map: Optional[str] = None  # timm's class-map file (folder, timm specs)
    input_img_mode: Optional[str] = None  # PIL mode images are converted to (default RGB)
    dataset_download: bool = False
    num_samples: Optional[int] = None  # iterable sets
    input_key: Optional[str] = None
    target_key: Optional[str] = None
    input_size: Optional[Sequence[int]] = None  # C H W; data-config overrides as resolve_data_config takes them
    crop_pct: Optional[float] = None
    crop_mode: Optional[str] = None
    interpolation: Optional[str] = None
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None


def parse_eps(text: str) -> List[float]:
    """``'1,2,4'`` -> ``[1.0, 2.0, 4.0]``: a comma-separated list of eps in 0-255 pixel units."""
    values = []
    for part in str(text).split(','):
        try:
            v = float(part.strip())
        except ValueError:
            v = float('nan')
        if not 0 <= v <= 255:  # also rejects NaN
            raise ValueError(f'bad --eps {text!r}: expected comma-separated numbers in 0-255 pixel units, e.g. 1,2,4')
        values.append(v)
    if len(set(values)) != len(values):
        raise ValueError(f'bad --eps {text!r}: a value is repeated')
    return values


def load_eval_weights(
        model_name: str,
        checkpoint: Optional[os.PathLike] = None,
        pretrained: bool = False,
        num_classes: Optional[int] = None,
        use_ema: bool = False,
) -> Tuple[nn.Module, Dict[str, Optional[str]]]:
    """The model to evaluate (``load_model``: a checkpoint, plain or dual-BN, its head read from the file,
    or timm's pretrained weights; ``use_ema``: the checkpoint's EMA weights) and ``{source, location, sha256}``
    of its weights for the report."""
    if checkpoint is None and not pretrained:
        raise ValueError('no weights to evaluate: give --pretrained (timm\'s weights) or --checkpoint FILE')
    if pretrained and num_classes is not None:
        raise ValueError('--num-classes only applies to --checkpoint (pretrained weights keep their own head)')
    if use_ema and checkpoint is None:
        raise ValueError('--use-ema picks the EMA weights of a --checkpoint file (pretrained weights have no choice)')
    loaded = load_model(model_name, checkpoint=checkpoint, pretrained=pretrained, num_classes=num_classes,
                        use_ema=use_ema)
    info = {'source': loaded.source, 'location': loaded.location,
            'sha256': sha256_file(loaded.file) if loaded.file else None}
    return loaded.model, info


def eval_data_config(model: nn.Module, img_size: Optional[int] = None, **overrides: Any) -> Dict[str, Any]:
    """timm's ``resolve_data_config`` for ``model`` (its pretrained config), optionally at another size, with
    timm validate.py's overrides (``input_size``, ``crop_pct``, ``crop_mode``, ``interpolation``, ``mean``,
    ``std``; None: the model's own) taken as resolve_data_config takes them (one mean / std value: all channels).
    Check them first with ``check_data_overrides``."""
    args = {k: v for k, v in overrides.items() if v is not None}
    if img_size:
        args['img_size'] = img_size
    return resolve_data_config(args, model=model)


def check_data_overrides(input_size: Optional[Sequence[int]] = None, img_size: Optional[int] = None,
                         crop_pct: Optional[float] = None, crop_mode: Optional[str] = None,
                         interpolation: Optional[str] = None, mean: Optional[Sequence[float]] = None,
                         std: Optional[Sequence[float]] = None) -> None:
    """One line (ValueError) for a data-config override timm's ``resolve_data_config`` would assert on or
    take silently: mean / std of neither 1 nor C values (C: ``input_size``'s, else 3, as in timm), a std of
    0, a crop_pct out of (0, 1], an unknown interpolation or crop mode."""
    if input_size is not None:
        if len(input_size) != 3 or not all(int(v) > 0 for v in input_size):
            raise ValueError(f'--input-size takes C H W (three positive ints), got {" ".join(map(str, input_size))}')
        if img_size is not None:
            raise ValueError('give --img-size or --input-size, not both')
    channels = int(input_size[0]) if input_size is not None else 3
    for name, values in (('mean', mean), ('std', std)):
        if values is None:
            continue
        if len(values) not in (1, channels):
            raise ValueError(f'--{name} takes 1 value or {channels} (one per input channel), got {len(values)}: '
                             f'{" ".join(f"{v:g}" for v in values)}')
        if name == 'std' and not all(v > 0 for v in values):
            raise ValueError(f'--std values must be > 0, got {" ".join(f"{v:g}" for v in values)}')
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise ValueError(f'--crop-pct must be in (0, 1], got {crop_pct:g}')
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ValueError(f'unknown --interpolation {interpolation!r}; choose one of {", ".join(INTERPOLATIONS)}')
    if crop_mode is not None and crop_mode not in CROP_MODES:
        raise ValueError(f'unknown --crop-mode {crop_mode!r}; choose one of {", ".join(CROP_MODES)}')


def prepare_eval_model(
        model: nn.Module,
        input_size: Sequence[int],
        device: torch.device,
        fuse: bool = True,
        channels_last: bool = False,
) -> nn.Module:
    """The model as the suite runs it: on ``device``, eval mode, BNs fused into the convs with static
    'same' padding for ``input_size`` (``fuse``), channels_last memory format if asked."""
    model = model.to(device).eval()
    if fuse:  # TF's asymmetric 'same' pad as zero kernel taps: the same sums without a padded copy per conv
        model = fuse_bn(model, input_size=tuple(input_size), pad_in_kernel=True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _warmup(net: nn.Module, input_size: Sequence[int], batch_size: int, device: torch.device,
            amp: Optional[torch.dtype], channels_last: bool) -> None:
    """One untimed batch before the loop, as timm's validate.py does: first-call allocations and (CUDA)
    cuDNN's algorithm search stay out of the measured images/s."""
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # one input size for the whole run
    x = torch.zeros((batch_size, *input_size), device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), (torch.autocast(device.type, dtype=amp) if amp else nullcontext()):
        net(x)


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f'--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {name}: CUDA is not available on this machine')
    return device


def _check_config(cfg: EvalConfig) -> None:
    check_dataset_name(cfg.dataset)
    spec = timm_prefix(cfg.dataset)
    if cfg.split is not None and cfg.dataset == 'imagenet-c':
        raise ValueError('--split does not apply to --dataset imagenet-c (its folders are corruptions)')
    if not spec and (cfg.dataset_download or cfg.num_samples is not None or cfg.input_key or cfg.target_key):
        raise ValueError('--dataset-download, --num-samples, --input-key and --target-key apply to timm dataset '
                         f'specs (hfds/NAME, ...), not to --dataset {cfg.dataset}')
    if cfg.class_map and not spec and cfg.dataset != 'folder':
        raise ValueError(f'--class-map applies to --dataset folder and timm dataset specs; {cfg.dataset}\'s labels '
                         'are its WordNet ids\' places in timm\'s class lists')
    if cfg.num_samples is not None and cfg.num_samples < 1:
        raise ValueError(f'--num-samples must be >= 1, got {cfg.num_samples}')
    if not cfg.data_dir and not (spec and spec in ('hfds', 'hfids', 'tfds')):
        raise ValueError('--data-dir is required' + (f' for {cfg.dataset}' if spec else ''))
    check_data_overrides(cfg.input_size, cfg.img_size, cfg.crop_pct, cfg.crop_mode, cfg.interpolation,
                         cfg.mean, cfg.std)
    if cfg.attack is not None:
        if cfg.attack not in ATTACKS:
            raise ValueError(f'unknown attack {cfg.attack!r}; choose one of {", ".join(ATTACKS)}')
        if cfg.dataset == 'imagenet-c':
            raise ValueError('--attack is not combined with --dataset imagenet-c (run it on imagenet)')
        if not cfg.eps:
            raise ValueError('--attack needs at least one --eps value')
    if cfg.dataset != 'imagenet-c' and (cfg.corruptions or cfg.clean_dir):
        raise ValueError('--corruptions and --clean-dir only apply to --dataset imagenet-c')
    if cfg.batch_size < 1:
        raise ValueError(f'--batch-size must be >= 1, got {cfg.batch_size}')
    if cfg.workers < 0:
        raise ValueError(f'--workers must be >= 0, got {cfg.workers}')
    if cfg.amp is not None and cfg.amp not in AMP_DTYPES:
        raise ValueError(f'unknown --amp {cfg.amp!r}; choose bf16 or fp16')
    if cfg.img_size is not None and cfg.img_size < 8:
        raise ValueError(f'--img-size must be >= 8, got {cfg.img_size}')


def run_eval(cfg: EvalConfig) -> Dict[str, Any]:
    """Evaluate ``cfg.model`` on ``cfg.dataset``; returns the report (schema in ``eval.results``).

    Everything that can be checked before the model is loaded is checked first (data dir, layout,
    ImageNet-C severities, attack settings), then the class folders against the model's classes."""
    _check_config(cfg)
    device = _device(cfg.device)
    attacks = [AttackConfig(kind=cfg.attack, eps=e, steps=cfg.steps, step_size=cfg.step_size,
                            targeted=cfg.targeted) for e in cfg.eps] if cfg.attack else []
    spec = timm_prefix(cfg.dataset)
    img_mode = cfg.input_img_mode or 'RGB'
    spec_set = None
    if cfg.dataset == 'imagenet-c':
        sets = find_imagenet_c(cfg.data_dir, cfg.corruptions)
        clean_root = resolve_root(cfg.clean_dir, 'imagenet') if cfg.clean_dir else None
        root = resolve_root(cfg.data_dir, 'imagenet-c')
    elif spec:  # a timm dataset spec: timm's create_dataset reads it (a missing split fails here)
        root = Path(cfg.data_dir) if cfg.data_dir else None
        sets, clean_root = {}, None
    else:
        root = resolve_root(cfg.data_dir, cfg.dataset, cfg.split)
        sets, clean_root = {}, None
    user_map = read_class_map(cfg.class_map, root if not spec else None) if cfg.class_map else None
    if spec:
        spec_set = create_spec_dataset(
            cfg.dataset, root, cfg.split or 'validation', user_map, img_mode, cfg.dataset_download, cfg.num_samples,
            cfg.input_key, cfg.target_key, batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress)

    model, weights = load_eval_weights(cfg.model, cfg.checkpoint, cfg.pretrained, cfg.num_classes, cfg.use_ema)
    num_classes = int(getattr(model, 'num_classes', None) or model.pretrained_cfg.get('num_classes'))
    param_count = sum(p.numel() for p in model.parameters())  # as loaded (timm's validate counts it so), not fused
    data_config = eval_data_config(model, cfg.img_size, input_size=cfg.input_size, crop_pct=cfg.crop_pct,
                                   crop_mode=cfg.crop_mode, interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std)
    channels = int((model.pretrained_cfg.get('input_size') or (3,))[0])
    if int(data_config['input_size'][0]) != channels:
        raise ValueError(f'--input-size {" ".join(map(str, data_config["input_size"]))}: the model takes '
                         f'{channels}-channel input')
    check_img_mode(img_mode, channels)
    mean, std = data_config['mean'], data_config['std']

    # class maps for every folder first: a bad folder fails before minutes of evaluation
    if cfg.dataset == 'imagenet-c':
        maps = {(c, s): class_map_for('imagenet-c', d, num_classes) for c, by in sets.items() for s, d in by.items()}
        clean_map = class_map_for('imagenet', clean_root, num_classes) if clean_root else None
    elif spec:
        check_spec_classes(cfg.dataset, spec_set, num_classes, user_map)
        clean_map = None
    else:
        clean_map = class_map_for(cfg.dataset, root, num_classes, user_map)

    net = prepare_eval_model(model, data_config['input_size'], device, fuse=cfg.fuse, channels_last=cfg.channels_last)
    if cfg.dataset == 'imagenet-a':
        net = LogitSubset(net, imagenet_a_indices()).to(device)
    amp = AMP_DTYPES.get(cfg.amp) if cfg.amp else None
    _warmup(net, data_config['input_size'], cfg.batch_size, device, amp, cfg.channels_last)

    def run(folder: Optional[Path], class_map: Optional[Dict[str, int]], label: str,
            attack_cfg: Optional[AttackConfig] = None, name: str = 'data') -> Dict[str, float]:
        if spec_set is not None:
            loader = eval_loader(spec_set, data_config, cfg.batch_size, device, cfg.workers)
        else:
            loader = create_eval_loader(folder, class_map, data_config, cfg.batch_size, device, cfg.workers, name,
                                        input_img_mode=img_mode)
        return evaluate_accuracy(net, loader, mean, std, attack_cfg=attack_cfg, device=device, autocast_dtype=amp,
                                 channels_last=cfg.channels_last, seed=cfg.seed,
                                 progress=label if cfg.progress else None)

    results: Dict[str, Any] = {}
    if cfg.dataset == 'imagenet-c':
        if clean_root is not None:
            results['clean'] = run(clean_root, clean_map, 'imagenet (clean)', name='imagenet')
        errors: Dict[str, Dict[int, float]] = {}
        images, excluded = 0, []
        for c, by in sets.items():
            errors[c] = {}
            for s, folder in by.items():
                m = run(folder, maps[(c, s)], f'{c} s{s}', name='imagenet-c')
                errors[c][s] = 100.0 - m['top1']
                images += m['images']
                excluded += [(folder.relative_to(root) / name).as_posix() for name in m['excluded']]
        clean_error = 100.0 - results['clean']['top1'] if 'clean' in results else None
        results['imagenet_c'] = dict(imagenet_c_summary(errors, clean_error), images=images, excluded=excluded)
    else:
        results['clean'] = run(root, clean_map, cfg.dataset, name=cfg.dataset)
        if attacks:
            results['robust'] = []
            for a in attacks:
                r = a.resolved()
                m = run(root, clean_map, f'{r.kind.upper()} eps {r.eps:g}', attack_cfg=a, name=cfg.dataset)
                results['robust'].append(dict(
                    name=attack_name(r.kind, r.eps, r.steps, r.targeted), kind=r.kind, eps=r.eps, steps=r.steps,
                    step_size=r.step_size, targeted=r.targeted, random_start=r.random_start, **m))

    settings = dict(batch_size=cfg.batch_size, device=str(device), amp=cfg.amp, channels_last=cfg.channels_last,
                    fused=cfg.fuse, seed=cfg.seed, workers=cfg.workers,
                    attack=(dict(kind=cfg.attack, eps=list(cfg.eps), steps=cfg.steps, step_size=cfg.step_size,
                                 targeted=cfg.targeted) if cfg.attack else None),
                    corruptions=list(sets) if sets else None,
                    clean_dir=str(clean_root.resolve()) if clean_root else None,
                    use_ema=cfg.use_ema, split=(cfg.split or 'validation') if spec else cfg.split,
                    class_map=cfg.class_map,
                    input_img_mode=img_mode, num_samples=cfg.num_samples)
    report = {
        'schema': SCHEMA,
        'model': cfg.model,
        'num_classes': num_classes,
        'param_count': param_count,
        'weights': weights,
        'dataset': cfg.dataset,
        'data_dir': str(root.resolve()) if root is not None else None,
        'data_config': {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()},
        'settings': settings,
        'versions': {'advprop_zoo': __version__, 'timm': timm.__version__, 'torch': torch.__version__},
        'created': utc_now(),
        'metrics': {},
        'results': results,
    }
    report['metrics'] = metrics_of(report)
    return report

