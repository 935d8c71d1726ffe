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

AutoAttack (``attack='autoattack'``, alone or beside PGD / FGSM: ``'pgd,autoattack'``) runs the
``pyautoattack`` package's ensemble on the same fused model with mean / std inside it (``eval.autoattack``),
on the first ``num_samples`` images (all without it) held in memory in [0, 1]. ``protocol='robustbench'`` is
RobustBench's ImageNet L-inf setting (``eval.robustbench``). A dual-BN checkpoint is evaluated through its
main BNs, its auxiliary BNs (``bn_route='aux'``; metrics prefixed ``aux_``) or both (``eval.routes``), each
route folded to a plain model and fused with its own BNs.
"""
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from ..attacks import ATTACKS, AttackConfig
from ..dual_bn import is_dual_bn
from ..fuse import fuse_bn
from ..images import unreadable_index, unreadable_names
from ..load import load_model
from ..version import __version__
from ..weights import sha256_file
from .accuracy import evaluate_accuracy
from .autoattack import (
    PixelImages, PixelSpaceModel, autoattack_adversary, autoattack_version, check_autoattack,
    check_autoattack_classes, require_autoattack, run_autoattack, version_attacks,
)
from .datasets import (
    ImageSubset, LogitSubset, check_dataset_name, check_img_mode, check_spec_classes,
    class_map_for, create_eval_dataset, create_spec_dataset, eval_loader, find_imagenet_c, first_examples,
    imagenet_a_indices, read_class_map, resolve_root, timm_prefix,
)
from .imagenet_c import imagenet_c_summary
from .results import SCHEMA, attack_name, autoattack_name, metrics_of, utc_now
from .robustbench import (
    PROTOCOLS, ROBUSTBENCH_DATA_CONFIG, ROBUSTBENCH_EPS, ROBUSTBENCH_VERSION, match_listed, read_image_list,
    robustbench_list_path,
)
from .routes import check_bn_route, route_model, route_names

__all__ = ['EvalConfig', 'EVAL_ATTACKS', 'parse_eps', 'parse_attacks', 'load_eval_weights', 'eval_data_config',
           'check_data_overrides', 'prepare_eval_model', 'run_eval']

EVAL_ATTACKS = ATTACKS + ('autoattack',)  # --attack's kinds: PGD / FGSM of advprop_zoo.attacks, and AutoAttack

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
    num_samples: Optional[int] = None  # the first N images of every set, for every run (RobustBench's n_examples)
    input_key: Optional[str] = None
    target_key: Optional[str] = None
    input_size: Optional[Sequence[int]] = None  # C H W; data-config overrides as resolve_data_config takes them
    crop_pct: Optional[float] = None
    crop_mode: Optional[str] = None
    interpolation: Optional[str] = None
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    # AutoAttack (attack 'autoattack' or e.g. 'pgd,autoattack'), RobustBench's protocol, the BN route
    autoattack_version: str = 'standard'  # standard | plus | rand | custom (with autoattack_attacks)
    autoattack_attacks: Optional[Sequence[str]] = None
    protocol: Optional[str] = None  # 'robustbench'
    robustbench_list: Optional[str] = None  # the 5000-image list (default: the installed robustbench's)
    bn_route: str = 'main'  # main | aux | both: a dual-BN checkpoint's main BNs, auxiliary BNs or both


def parse_attacks(text: Optional[str]) -> List[str]:
    """``'pgd,autoattack'`` -> ``['pgd', 'autoattack']``: the attack kinds of ``--attack``, each once."""
    if not text:
        return []
    kinds = [k.strip() for k in str(text).split(',')]
    unknown = [k for k in kinds if k not in EVAL_ATTACKS]
    if unknown:
        raise ValueError(f'unknown attack {unknown[0]!r}; choose one or more of {", ".join(EVAL_ATTACKS)} '
                         '(comma-separated)')
    if len(set(kinds)) != len(kinds):
        raise ValueError(f'--attack {text}: an attack is named twice')
    return kinds


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
        fold: bool = True,
) -> Tuple[nn.Module, Dict[str, Optional[str]]]:
    """The model to evaluate (``load_model``: a checkpoint, plain or dual-BN, its head read from the file,
    or timm's pretrained weights; ``use_ema``: the checkpoint's EMA weights) and ``{source, location, sha256}``
    of its weights for the report. A dual-BN checkpoint is folded to its main BNs unless ``fold=False``, which
    keeps it dual (``eval.routes`` then picks the BNs)."""
    if checkpoint is None and not pretrained:
        raise ValueError('no weights to evaluate: give --pretrained (timm\'s weights) or --checkpoint FILE')
    if pretrained and num_classes is not None:
        raise ValueError('--num-classes only applies to --checkpoint (pretrained weights keep their own head)')
    if use_ema and checkpoint is None:
        raise ValueError('--use-ema picks the EMA weights of a --checkpoint file (pretrained weights have no choice)')
    loaded = load_model(model_name, checkpoint=checkpoint, pretrained=pretrained, num_classes=num_classes,
                        use_ema=use_ema, fold=fold)
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


_PROTOCOL_FIXED = (('img_size', '--img-size'), ('input_size', '--input-size'), ('crop_pct', '--crop-pct'),
                   ('crop_mode', '--crop-mode'), ('interpolation', '--interpolation'))


def _check_protocol(cfg: EvalConfig) -> None:
    """``--protocol robustbench`` fixes the data, the preprocessing and the attack: anything that would change
    them is refused in one line."""
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f'unknown --protocol {cfg.protocol!r}; choose {", ".join(PROTOCOLS)}')
    if cfg.dataset != 'imagenet':
        raise ValueError(f'--protocol robustbench evaluates ImageNet val (--dataset imagenet), not {cfg.dataset}')
    given = [flag for name, flag in _PROTOCOL_FIXED if getattr(cfg, name) is not None]
    if given:
        raise ValueError(f'--protocol robustbench fixes the preprocessing (resize 256, center-crop 224, bilinear); '
                         f'drop {given[0]}')
    if cfg.attack not in (None, 'autoattack') or (cfg.attack and list(cfg.eps) != [ROBUSTBENCH_EPS]) \
            or cfg.autoattack_version != ROBUSTBENCH_VERSION or cfg.autoattack_attacks:
        raise ValueError('--protocol robustbench fixes the attack (standard AutoAttack, eps 4/255); drop --attack, '
                         '--eps and --autoattack-version')
    if cfg.split is not None or cfg.class_map:
        raise ValueError('--protocol robustbench reads ImageNet val by WordNet id; drop --split and --class-map')


def _protocol_config(cfg: EvalConfig) -> EvalConfig:
    """The configuration ``--protocol robustbench`` runs: standard AutoAttack at 4/255 on 224 px crops."""
    return replace(cfg, attack='autoattack', eps=[ROBUSTBENCH_EPS], autoattack_version=ROBUSTBENCH_VERSION,
                   input_size=ROBUSTBENCH_DATA_CONFIG['input_size'], crop_pct=ROBUSTBENCH_DATA_CONFIG['crop_pct'],
                   crop_mode=ROBUSTBENCH_DATA_CONFIG['crop_mode'],
                   interpolation=ROBUSTBENCH_DATA_CONFIG['interpolation'])


def _check_config(cfg: EvalConfig) -> None:
    check_dataset_name(cfg.dataset)
    check_bn_route(cfg.bn_route)
    if cfg.protocol is not None:
        _check_protocol(cfg)
    spec = timm_prefix(cfg.dataset)
    if cfg.split is not None and cfg.dataset == 'imagenet-c':
        raise ValueError('--split does not apply to --dataset imagenet-c (its folders are corruptions)')
    if not spec and (cfg.dataset_download or cfg.input_key or cfg.target_key):
        raise ValueError('--dataset-download, --input-key and --target-key apply to timm dataset '
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
    kinds = parse_attacks(cfg.attack)
    if kinds:
        if cfg.dataset == 'imagenet-c':
            raise ValueError('--attack is not combined with --dataset imagenet-c (run it on imagenet)')
        if not cfg.eps:
            raise ValueError('--attack needs at least one --eps value')
        if 'autoattack' in kinds:
            check_autoattack(cfg.autoattack_version, list(cfg.eps), cfg.autoattack_attacks)
            require_autoattack()  # a missing extra fails here, before anything is loaded
    elif cfg.autoattack_version != 'standard' or cfg.autoattack_attacks:
        raise ValueError('--autoattack-version and --autoattack-attacks need --attack autoattack')
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
    if cfg.bn_route != 'main' and cfg.checkpoint is None:
        raise ValueError(f'--bn-route {cfg.bn_route} needs a dual-BN --checkpoint (the train loop\'s weights before '
                         'folding); pretrained weights have main BNs only')


def _collect_pixels(dataset, data_config: Dict[str, Any], batch_size: int, device: torch.device, workers: int):
    """Every image of ``dataset`` in [0, 1] (timm's eval transform without normalisation) for AutoAttack:
    ``(images, labels, positions, excluded)``, ``positions`` being each kept image's place in the dataset's order,
    ``excluded`` the unreadable files left out (``advprop_zoo.images``)."""
    channels = int(data_config['input_size'][0])
    pixel_config = dict(data_config, mean=(0.0,) * channels, std=(1.0,) * channels)
    loader = eval_loader(dataset, pixel_config, batch_size, device, workers)
    images, labels, positions, bad = PixelImages(), [], [], []
    pos = 0
    for x, y in loader:
        y = y.cpu()
        keep = y >= 0
        bad += [unreadable_index(v) for v in y[~keep].tolist()]
        if not bool(keep.all()):
            x, y = x[keep.to(x.device)], y[keep]
        positions += (pos + keep.nonzero().flatten()).tolist()
        pos += len(keep)
        if len(y):
            images.add(x)
            labels.append(y)
    excluded = unreadable_names(dataset, bad)
    if not labels:
        if excluded:
            raise ValueError(f'no readable images to attack: {excluded[0]} and {len(excluded) - 1} more could not be '
                             'read')
        raise ValueError('evaluation loader yielded no images')
    return images.done(), torch.cat(labels), positions, excluded


def _dataset_files(dataset) -> Optional[List[str]]:
    """The files of a map-style eval set in its order (None where the set cannot name them)."""
    if isinstance(dataset, ImageSubset):
        return dataset.files()
    names = getattr(dataset, 'filenames', None)
    if names is None:
        return None
    try:
        return [str(n) for n in names()]
    except (TypeError, AttributeError, NotImplementedError):
        return None


def run_eval(cfg: EvalConfig) -> Dict[str, Any]:
    """Evaluate ``cfg.model`` on ``cfg.dataset``; returns the report (schema in ``eval.results``).

    Everything that can be checked before the model is loaded is checked first (data dir, layout,
    ImageNet-C severities, attack settings, RobustBench's list), then the class folders against the model's
    classes and the BN route against the weights."""
    _check_config(cfg)
    asked = cfg
    if cfg.protocol == 'robustbench':
        cfg = _protocol_config(cfg)
    device = _device(cfg.device)
    kinds = parse_attacks(cfg.attack)
    attacks = [AttackConfig(kind=k, eps=e, steps=cfg.steps, step_size=cfg.step_size, targeted=cfg.targeted)
               for k in kinds if k in ATTACKS for e in cfg.eps]
    aa_eps = list(cfg.eps) if 'autoattack' in kinds else []
    listed: Optional[List[str]] = None
    list_path = None
    if cfg.protocol == 'robustbench':
        list_path = robustbench_list_path(cfg.robustbench_list)
        listed = read_image_list(list_path)
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

    model, weights = load_eval_weights(cfg.model, cfg.checkpoint, cfg.pretrained, cfg.num_classes, cfg.use_ema,
                                       fold=cfg.bn_route == 'main')
    dual = any(is_dual_bn(m) for m in model.modules())
    if cfg.bn_route != 'main' and not dual:
        raise ValueError(f'--bn-route {cfg.bn_route} needs a dual-BN checkpoint (auxiliary BNs, as the train loop '
                         f'saves before folding); {weights["location"]} has none (a plain or folded file)')
    routes = route_names(cfg.bn_route)
    base = route_model(model, 'main') if dual else model  # the plain model: data config, parameter count
    num_classes = int(getattr(base, 'num_classes', None) or base.pretrained_cfg.get('num_classes'))
    if aa_eps:  # before any data is read
        check_autoattack_classes(cfg.autoattack_version, 200 if cfg.dataset == 'imagenet-a' else num_classes,
                                 cfg.autoattack_attacks)
    param_count = sum(p.numel() for p in base.parameters())  # as loaded (timm's validate counts it so), not fused
    data_config = eval_data_config(base, cfg.img_size, input_size=cfg.input_size, crop_pct=cfg.crop_pct,
                                   crop_mode=cfg.crop_mode, interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std)
    channels = int((base.pretrained_cfg.get('input_size') or (3,))[0])
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
    main_set = spec_set
    protocol_info = None
    if cfg.dataset != 'imagenet-c' and not spec:
        main_set = create_eval_dataset(root, clean_map, cfg.dataset, img_mode)
        if listed is not None:
            indices, missing = match_listed(main_set.filenames(), listed, root, cfg.num_samples)
            main_set = ImageSubset(main_set, indices)
            wanted = min(len(listed), cfg.num_samples or len(listed))
            protocol_info = {'name': 'robustbench', 'list': str(Path(list_path).resolve()), 'listed': wanted,
                             'found': len(indices), 'missing': missing}
            if missing:
                print(f'robustbench: {root} lacks {len(missing)} of the {wanted} listed images (e.g. {missing[0]}); '
                      f'evaluating the {len(indices)} found', file=sys.stderr, flush=True)
        else:
            main_set = first_examples(main_set, cfg.num_samples)

    pixels = None
    if aa_eps:  # AutoAttack's images, once for every eps and route: [0, 1], in the set's order
        pixels = _collect_pixels(main_set, data_config, cfg.batch_size, device, cfg.workers)
    amp = AMP_DTYPES.get(cfg.amp) if cfg.amp else None
    versions = {'advprop_zoo': __version__, 'timm': timm.__version__, 'torch': torch.__version__}
    if aa_eps:
        versions['pyautoattack'] = autoattack_version()

    def evaluate_route(route: str) -> Dict[str, Any]:
        plain = route_model(model, route) if dual else model
        net = prepare_eval_model(plain, data_config['input_size'], device, fuse=cfg.fuse,
                                 channels_last=cfg.channels_last)
        if cfg.dataset == 'imagenet-a':
            net = LogitSubset(net, imagenet_a_indices()).to(device)
        _warmup(net, data_config['input_size'], cfg.batch_size, device, amp, cfg.channels_last)
        tag = '' if len(routes) == 1 else f' [{route}]'

        def run(dataset, label: str, attack_cfg: Optional[AttackConfig] = None) -> Dict[str, float]:
            loader = eval_loader(dataset, data_config, cfg.batch_size, device, cfg.workers)
            return evaluate_accuracy(net, loader, mean, std, attack_cfg=attack_cfg, device=device,
                                     autocast_dtype=amp, channels_last=cfg.channels_last, seed=cfg.seed,
                                     progress=label + tag if cfg.progress else None)

        def folder_set(folder: Path, class_map: Dict[str, int], name: str):
            return first_examples(create_eval_dataset(folder, class_map, name, img_mode), cfg.num_samples)

        out: Dict[str, Any] = {}
        if cfg.dataset == 'imagenet-c':
            if clean_root is not None:
                out['clean'] = run(folder_set(clean_root, clean_map, 'imagenet'), 'imagenet (clean)')
            errors: Dict[str, Dict[int, float]] = {}
            images, excluded = 0, []
            for c, by in sets.items():
                errors[c] = {}
                for s, folder in by.items():
                    m = run(folder_set(folder, maps[(c, s)], 'imagenet-c'), f'{c} s{s}')
                    errors[c][s] = 100.0 - m['top1']
                    images += m['images']
                    excluded += [(folder.relative_to(root) / name).as_posix() for name in m['excluded']]
            clean_error = 100.0 - out['clean']['top1'] if 'clean' in out else None
            out['imagenet_c'] = dict(imagenet_c_summary(errors, clean_error), images=images, excluded=excluded)
            return out
        out['clean'] = run(main_set, cfg.dataset)
        if attacks:
            out['robust'] = []
            for a in attacks:
                r = a.resolved()
                m = run(main_set, f'{r.kind.upper()} eps {r.eps:g}', attack_cfg=a)
                out['robust'].append(dict(
                    name=attack_name(r.kind, r.eps, r.steps, r.targeted), kind=r.kind, eps=r.eps, steps=r.steps,
                    step_size=r.step_size, targeted=r.targeted, random_start=r.random_start, **m))
        if aa_eps:
            images, labels, positions, excluded = pixels
            wrapped = PixelSpaceModel(net, mean, std, channels_last=cfg.channels_last, autocast_dtype=amp)
            out['autoattack'] = []
            for e in aa_eps:
                adversary = autoattack_adversary(wrapped, e, cfg.autoattack_version, cfg.autoattack_attacks,
                                                 seed=cfg.seed, device=device)
                label = f'AutoAttack eps {e:g}{tag}' if cfg.progress else None
                res = run_autoattack(adversary, images, labels, cfg.batch_size, progress=label)
                out['autoattack'].append(dict(
                    name=autoattack_name(cfg.autoattack_version, e), version=cfg.autoattack_version, eps=e,
                    norm='Linf', attacks=[dict(name=a, top1=res.after[a], broken=[positions[i] for i in res.broken[a]],
                                               seconds=res.seconds[a]) for a in res.attacks],
                    images=res.images, clean_top1=res.clean_top1, top1=res.robust_top1,
                    robust=[positions[i] for i in res.robust.nonzero().flatten().tolist()],
                    seconds=res.total_seconds, images_per_s=res.images / max(res.total_seconds, 1e-9),
                    excluded=excluded))
        return out

    by_route = {route: evaluate_route(route) for route in routes}
    results: Dict[str, Any] = dict(by_route.get('main', {}))
    if 'aux' in by_route:
        results['aux'] = by_route['aux']
    if pixels is not None:
        files = _dataset_files(main_set)
        if files is not None:
            results['autoattack_images'] = files
    if protocol_info is not None:
        results['protocol'] = protocol_info

    settings = dict(batch_size=cfg.batch_size, device=str(device), amp=cfg.amp, channels_last=cfg.channels_last,
                    fused=cfg.fuse, seed=cfg.seed, workers=cfg.workers,
                    attack=(dict(kind=cfg.attack, eps=list(cfg.eps), steps=cfg.steps, step_size=cfg.step_size,
                                 targeted=cfg.targeted) if cfg.attack else None),
                    corruptions=list(sets) if sets else None,
                    clean_dir=str(clean_root.resolve()) if clean_root else None,
                    use_ema=cfg.use_ema, split=(cfg.split or 'validation') if spec else cfg.split,
                    class_map=cfg.class_map,
                    input_img_mode=img_mode, num_samples=cfg.num_samples,
                    autoattack=(dict(version=cfg.autoattack_version, eps=aa_eps, norm='Linf',
                                     attacks=version_attacks(cfg.autoattack_version, cfg.autoattack_attacks),
                                     seed=cfg.seed) if aa_eps else None),
                    protocol=asked.protocol, bn_route=cfg.bn_route)
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
        'versions': versions,
        'created': utc_now(),
        'metrics': {},
        'results': results,
    }
    report['metrics'] = metrics_of(report)
    return report
