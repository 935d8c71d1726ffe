"""Evaluation data: the folder layouts of ImageNet, ImageNet-C, ImageNet-A and Stylized-ImageNet,
their label spaces, and timm's loaders over them.

Every layout is an ImageFolder of WordNet-id folders, so labels are given by an explicit class map
(wnid -> index of the model's output) rather than by sorting whatever folders exist: a subset of
the 1000 classes then still gets the right ImageNet indices, and a folder that is not a class of the
dataset is an error instead of being silently dropped (timm's reader skips folders missing from a
class map). The class lists are timm's own (``timm/data/_info``), the same files timm's ImageNetInfo reads.

ImageNet-A has 200 of the 1000 classes: its labels are positions in its own sorted wnid list, and the
1000-way logits are cut to those 200 columns, in that order (``LogitSubset``), before top-k.

Beside these layouts, any timm dataset spec (``hfds/NAME``, ``hfids/NAME``, ``wds/NAME``, ``tfds/NAME``,
``torch/NAME``) is read through ``timm.data.create_dataset`` as timm's validate.py reads it (``--split``,
``--class-map``, ``--input-img-mode``, ``--num-samples``, ...); such a set is labelled by its own classes (or
the class map), like ``folder``, so the model's class count must match (``create_spec_dataset``,
``check_spec_classes``).

Every map-style timm ``ImageDataset`` (the folder layouts, ``hfds/``) reads through
``advprop_zoo.images.ReadableImageDataset``: an image that cannot be decoded is excluded from the counts
and named in the report, never replaced by another sample (timm's own ``ImageDataset`` substitutes the
next image, which an evaluation would then count twice). Iterable sets (``hfids/``, ``wds/``, ``tfds/``)
and torchvision's (``torch/``) are read by timm's readers as they are.
"""
import functools
import os
import pickle
import pkgutil
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from PIL import Image
from timm.data import ImageDataset, create_dataset, create_loader
from timm.data.readers.class_map import load_class_map
from torch import nn
from torch.utils.data import Dataset

from ..errors import AdvPropZooError, describe_error
from ..images import ReadableImageDataset
from .imagenet_c import BENCHMARK_CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES

__all__ = [
    'DATASETS', 'EvalDataError', 'imagenet_synsets', 'imagenet_a_synsets', 'imagenet_a_indices', 'LogitSubset',
    'resolve_root', 'class_map_for', 'find_imagenet_c', 'create_eval_dataset', 'create_eval_loader', 'eval_loader',
    'ImageSubset', 'first_examples', 'TIMM_PREFIXES',
    'ITERABLE_PREFIXES', 'KEYED_PREFIXES', 'timm_prefix', 'check_dataset_name', 'read_class_map', 'create_spec_dataset',
    'check_spec_classes', 'check_img_mode',
]

DATASETS = ('imagenet', 'imagenet-c', 'imagenet-a', 'stylized', 'folder')
_SPLITS = ('val', 'validation')  # a root that holds only these is searched one level down, as timm does
# timm's split synonyms (timm.data.dataset_factory): an explicit --split finds its folder under any of them
_SPLIT_SYNONYMS = (('train', 'training'), ('val', 'valid', 'validation', 'eval', 'evaluation'))
# timm dataset specs read through timm.data.create_dataset ('<prefix>/<name>'), and those of them that are iterable
TIMM_PREFIXES = ('hfds', 'hfids', 'wds', 'tfds', 'torch')
ITERABLE_PREFIXES = ('hfids', 'wds', 'tfds')
_ROOT_REQUIRED = ('wds', 'torch')  # the others take --data-dir as a cache / data dir, optional as in timm
KEYED_PREFIXES = ('hfds', 'hfids', 'wds', 'tfds')  # readers that take --input-key / --target-key


class EvalDataError(AdvPropZooError, ValueError):
    """A data folder that cannot be evaluated as the named dataset, with the reason in one line."""


@functools.lru_cache(maxsize=None)
def _timm_info(filename: str) -> Tuple[str, ...]:
    data = pkgutil.get_data('timm.data', os.path.join('_info', filename))
    if data is None:
        raise EvalDataError(f'timm does not ship {filename}; upgrade timm')
    return tuple(line.strip() for line in data.decode('utf-8').splitlines() if line.strip())


def imagenet_synsets() -> List[str]:
    """The 1000 ImageNet-1k WordNet ids in model-output order (``imagenet_synsets.txt``, the list timm's
    ImageNetInfo('imagenet-1k') reads; read directly because ImageNetInfo also parses every lemma)."""
    return list(_timm_info('imagenet_synsets.txt'))


def imagenet_a_synsets() -> List[str]:
    """ImageNet-A's 200 WordNet ids, in its label order (sorted, as its folders list)."""
    return list(_timm_info('imagenet_a_synsets.txt'))


def imagenet_a_indices() -> List[int]:
    """For each ImageNet-A label, the ImageNet-1k output index of the same wnid.

    Derived from the two wnid lists and checked against timm's shipped index list, so a mismatch
    between timm's files cannot go unnoticed."""
    position = {w: i for i, w in enumerate(imagenet_synsets())}
    wnids = imagenet_a_synsets()
    missing = [w for w in wnids if w not in position]
    if missing or len(wnids) != 200 or len(set(wnids)) != 200:
        raise EvalDataError(f'timm\'s ImageNet-A list is not 200 distinct ImageNet-1k wnids (e.g. {missing[:1]})')
    derived = [position[w] for w in wnids]
    shipped = [int(i) for i in _timm_info('imagenet_a_indices.txt')]
    if derived != shipped:
        raise EvalDataError('timm\'s imagenet_a_indices.txt disagrees with its wnid lists')
    return derived


class LogitSubset(nn.Module):
    """A model whose logits are cut to some classes of its output, in a given order (ImageNet-A:
    the 200 columns of its wnids). Attacks and top-k then see the dataset's own label space."""

    def __init__(self, model: nn.Module, indices: Sequence[int]):
        super().__init__()
        self.model = model
        self.register_buffer('indices', torch.as_tensor(list(indices), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(-1, self.indices)


def timm_prefix(name: str) -> Optional[str]:
    """The reader prefix of a timm dataset spec (``'hfds'`` for ``hfds/NAME``, case-insensitive as in timm),
    or None for a name that is not one (the benchmark layouts)."""
    prefix, sep, rest = str(name).partition('/')
    return prefix.lower() if sep and rest and prefix.lower() in TIMM_PREFIXES else None


def check_dataset_name(name: str) -> None:
    """A benchmark layout (``DATASETS``) or a timm dataset spec; anything else fails in one line."""
    if name in DATASETS or timm_prefix(name):
        return
    prefix, sep, _ = str(name).partition('/')
    what = f'unknown dataset prefix {prefix + sep!r}' if sep else f'unknown dataset {name!r}'
    raise EvalDataError(f'{what}; choose one of {", ".join(DATASETS)}, or a timm dataset spec '
                        f'{", ".join(p + "/NAME" for p in TIMM_PREFIXES)}')


def resolve_root(data_dir: os.PathLike, dataset: str, split: Optional[str] = None) -> Path:
    """The folder holding the class (or corruption) folders: ``data_dir``, or its ``val/`` when that is
    all it holds (``--data-dir imagenet/`` works like ``imagenet/val``). An explicit ``split`` (``--split``)
    names the subfolder to use, under any of timm's synonyms (``validation`` finds ``val/``); a split
    that is not there is an error, where timm would fall back to ``data_dir`` itself."""
    root = Path(data_dir)
    if not root.exists():
        raise EvalDataError(f'{dataset}: data dir {root} does not exist')
    if not root.is_dir():
        raise EvalDataError(f'{dataset}: data dir {root} is not a folder')
    subdirs = _subdirs(root)
    if split is not None:
        base = split.split('[')[0]
        names = [base] + next((list(g) for g in _SPLIT_SYNONYMS if base in g), [])
        for name in dict.fromkeys(names):
            if name in subdirs:
                return root / name
        raise EvalDataError(f'{dataset}: no split {split!r} in {root} (no {"/, ".join(dict.fromkeys(names))}/ '
                            f'folder; found {", ".join(subdirs[:5]) or "none"}{", ..." if len(subdirs) > 5 else ""})')
    if dataset != 'imagenet-c':
        split = [d for d in subdirs if d in _SPLITS]
        if split and len(subdirs) <= 2 and all(d in _SPLITS or d == 'train' for d in subdirs):
            return root / split[0]
    return root


def _subdirs(root: Path) -> List[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))


def class_map_for(dataset: str, root: os.PathLike, num_classes: int,
                  class_map: Optional[Mapping[str, int]] = None) -> Dict[str, int]:
    """The class map (folder name -> label) for ``dataset`` under ``root``, after checking that every
    class folder belongs to the dataset and that the model's ``num_classes`` fits its label space.

    ``class_map`` (``folder`` only; ``read_class_map``, timm's ``--class-map``) gives the labels instead of
    the sorted folder names: every class folder must be in it and every label below ``num_classes``."""
    root = Path(root)
    folders = _subdirs(root)
    if not folders:
        raise EvalDataError(f'{dataset}: {root} has no class folders (expected one folder per class'
                            f'{", named by WordNet id" if dataset != "folder" else ""})')
    if class_map is not None:
        if dataset != 'folder':
            raise EvalDataError(f'{dataset}: --class-map applies to --dataset folder and timm dataset specs; '
                                f"{dataset}'s labels are its WordNet ids' places in timm's class lists")
        unknown = [f for f in folders if f not in class_map]
        if unknown:
            raise EvalDataError(f'folder: class folder {unknown[0]!r} in {root} is not in the class map'
                                + (f' ({len(unknown) - 1} more like it)' if len(unknown) > 1 else ''))
        _check_labels_fit('folder', {f: class_map[f] for f in folders}, num_classes)
        return {f: int(class_map[f]) for f in folders}
    if dataset == 'folder':
        if len(folders) != num_classes:
            raise EvalDataError(f'folder: {root} has {len(folders)} class folders but the model has {num_classes} '
                                'classes; they must match (pass --num-classes, or a checkpoint with that head)')
        return {name: i for i, name in enumerate(folders)}
    if num_classes != 1000:
        raise EvalDataError(f'{dataset}: the model has {num_classes} classes; {dataset} needs a 1000-class ImageNet '
                            'model (use --dataset folder for another label set)')
    if dataset == 'imagenet-a':
        wnids, what = imagenet_a_synsets(), "ImageNet-A's 200 classes"
    else:
        wnids, what = imagenet_synsets(), 'an ImageNet-1k class (WordNet id)'
    allowed = {w: i for i, w in enumerate(wnids)}
    unknown = [f for f in folders if f not in allowed]
    if unknown:
        more = f' ({len(unknown) - 1} more like it)' if len(unknown) > 1 else ''
        raise EvalDataError(f'{dataset}: folder {unknown[0]!r} in {root} is not {what}{more}')
    return {f: allowed[f] for f in folders}


def find_imagenet_c(
        data_dir: os.PathLike,
        corruptions: Optional[Sequence[str]] = None,
) -> Dict[str, Dict[int, Path]]:
    """``{corruption: {severity: folder}}`` of an ImageNet-C tree as released:
    ``<corruption>/<1..5>/<wnid>/*.JPEG``, each corruption either at the top or under its category
    folder (``noise/``, ``blur/``, ``weather/``, ``digital/``, ``extra/``).

    Without ``corruptions`` all 15 benchmark corruptions must be there (extras are taken when present);
    every corruption found or asked for must have all five severities."""
    root = resolve_root(data_dir, 'imagenet-c')
    known = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
    found: Dict[str, Path] = {}
    for name in _subdirs(root):
        if name in known:
            found.setdefault(name, root / name)
        else:
            for sub in _subdirs(root / name):
                if sub in known:
                    found.setdefault(sub, root / name / sub)
    if corruptions:
        unknown = [c for c in corruptions if c not in known]
        if unknown:
            raise EvalDataError(f'imagenet-c: unknown corruption {unknown[0]!r}; choose from {", ".join(known)}')
        wanted = list(corruptions)
    else:
        wanted = [c for c in known if c in found]
    missing = [c for c in (corruptions or BENCHMARK_CORRUPTIONS) if c not in found]
    if missing:
        raise EvalDataError(
            f'imagenet-c: {root} has no {missing[0]}/ folder'
            + (f' ({len(missing)} corruptions missing: {", ".join(missing)})' if len(missing) > 1 else '')
            + ('; mCE needs all 15 (or name a subset with --corruptions)' if not corruptions else ''))
    out: Dict[str, Dict[int, Path]] = {}
    for c in wanted:
        sev_dirs = {int(d): found[c] / d for d in _subdirs(found[c]) if d.isdigit()}
        lacking = [s for s in SEVERITIES if s not in sev_dirs]
        if lacking:
            have = ', '.join(str(s) for s in sorted(sev_dirs)) or 'none'
            raise EvalDataError(f'imagenet-c: {found[c]} lacks severity {", ".join(map(str, lacking))} '
                                f'(found {have}; each corruption needs severities 1-5)')
        out[c] = {s: sev_dirs[s] for s in SEVERITIES}
    return out


def create_eval_dataset(
        root: os.PathLike,
        class_map: Mapping[str, int],
        dataset_name: str = 'folder',
        input_img_mode: str = 'RGB',
) -> ReadableImageDataset:
    """timm's folder dataset over an ImageFolder ``root`` with explicit labels (``class_map``), wrapped in
    ``ReadableImageDataset``: an unreadable image arrives as a placeholder with a negative label, which
    ``evaluate_accuracy`` excludes. No images at all is one line (EvalDataError)."""
    try:
        dataset = create_dataset('', root=str(root), split='validation', search_split=False,
                                 class_map=dict(class_map), input_img_mode=input_img_mode)
    except RuntimeError as e:
        if 'Found 0 images' in str(e):
            raise EvalDataError(f'{dataset_name}: no images in {root} (looked for .jpg, .jpeg, .png, .webp '
                                'files in its class folders)') from None
        raise
    return ReadableImageDataset(dataset)


def create_eval_loader(
        root: os.PathLike,
        class_map: Mapping[str, int],
        data_config: Mapping[str, object],
        batch_size: int,
        device: torch.device,
        workers: int = 4,
        dataset_name: str = 'folder',
        input_img_mode: str = 'RGB',
):
    """timm's dataset and eval loader over an ImageFolder ``root`` with explicit labels (``create_eval_dataset``):
    transform from ``data_config`` (timm's ``resolve_data_config``: size, bicubic, crop_pct, mean/std), and on
    CUDA timm's prefetcher, which normalises on the GPU."""
    dataset = create_eval_dataset(root, class_map, dataset_name, input_img_mode)
    return eval_loader(dataset, data_config, batch_size, device, workers)


class ImageSubset(Dataset):
    """Some samples of a map-style eval dataset, in a given order (``--num-samples``: the first N; RobustBench's
    list: its images in its order). Samples, transform (settable, as timm's ``create_loader`` sets it) and file
    names are the wrapped dataset's; an unreadable image's placeholder label keeps the *wrapped* dataset's index,
    and ``filename`` takes that index, so ``unreadable_names`` names the right file. ``positions`` maps a
    wrapped index back to its place in the subset."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value) -> None:
        self.dataset.transform = value

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        """The file of the wrapped dataset's sample ``index`` (as a placeholder label encodes it); ``#index``
        for a dataset that cannot name its files."""
        name = getattr(self.dataset, 'filename', None)
        return str(name(index, basename=basename, absolute=absolute)) if name is not None else f'#{index}'

    def files(self) -> List[str]:
        """The subset's files, in its order (relative to the dataset root)."""
        return [self.filename(i) for i in self.indices]

    def positions(self) -> Dict[int, int]:
        return {idx: pos for pos, idx in enumerate(self.indices)}


def first_examples(dataset, n: Optional[int]):
    """The first ``n`` samples of a map-style dataset in its own order (``--num-samples``, RobustBench's
    ``n_examples``); the dataset itself when ``n`` is None or not smaller than it."""
    if n is None or n >= len(dataset):
        return dataset
    if isinstance(dataset, ImageSubset):
        return ImageSubset(dataset.dataset, dataset.indices[:n])
    return ImageSubset(dataset, range(n))


def eval_loader(dataset, data_config: Mapping[str, object], batch_size: int, device: torch.device, workers: int = 4):
    """timm's eval loader over a dataset (``create_eval_loader``'s, or ``create_spec_dataset``'s): the eval
    transform of ``data_config``; on CUDA timm's prefetcher, which normalises on the GPU."""
    cuda = device.type == 'cuda'
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=batch_size, is_training=False,
        use_prefetcher=cuda, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'),
        num_workers=workers, pin_memory=cuda, device=device, persistent_workers=False)



def check_img_mode(mode: str, channels: int) -> None:
    """``--input-img-mode`` must be a PIL mode with the model's number of input channels."""
    try:
        bands = Image.getmodebands(mode)  # the number of bands
    except (KeyError, ValueError):
        raise EvalDataError(f'--input-img-mode {mode!r} is not a PIL image mode (RGB, L, ...)') from None
    if bands != channels:
        raise EvalDataError(f'--input-img-mode {mode} gives {bands}-channel images; the model takes {channels}')


def read_class_map(path: os.PathLike, root: Optional[os.PathLike] = None) -> Dict[str, int]:
    """timm's ``--class-map`` file, read as timm reads it (``load_class_map``: a ``.txt`` of class names, one per
    line, label = line number; or a ``.pkl`` dict, unpickled with no classes allowed); relative to ``root`` when
    not found as given. A missing or malformed file fails in one line."""
    try:
        mapping = load_class_map(str(path), str(root) if root else '')
    except (AssertionError, ValueError, OSError, pickle.UnpicklingError, EOFError, UnicodeDecodeError) as e:
        raise EvalDataError(f'--class-map {path}: {describe_error(e)}') from None
    if not mapping or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in mapping.values()):
        raise EvalDataError(f'--class-map {path}: expected a non-empty map of class names to labels >= 0')
    return dict(mapping)


def create_spec_dataset(
        spec: str,
        root: Optional[os.PathLike] = None,
        split: str = 'validation',
        class_map: Optional[Mapping[str, int]] = None,
        input_img_mode: str = 'RGB',
        download: bool = False,
        num_samples: Optional[int] = None,
        input_key: Optional[str] = None,
        target_key: Optional[str] = None,
        batch_size: int = 1,
        seed: int = 42,
        progress: bool = True,
):
    """The eval set a timm dataset spec names (``hfds/NAME``, ...; ``root``: ``--data-dir``), read by
    ``timm.data.create_dataset`` with timm validate.py's arguments. A timm ``ImageDataset`` (``hfds/``) is
    wrapped in ``ReadableImageDataset`` (unreadable images excluded and named); iterable and torchvision sets
    are returned as timm builds them. ``num_samples``: the first N samples, for an iterable set as timm's
    ``--num-samples`` (the stream's length), for a map-style one in its own order (``first_examples``). A missing split, an unknown name or a reader that fails to start is one
    line (EvalDataError). ``progress=False`` silences Hugging Face datasets' progress bars while it loads."""
    prefix = timm_prefix(spec)
    if prefix is None:
        check_dataset_name(spec)
        raise EvalDataError(f'{spec!r} is a benchmark layout, not a timm dataset spec')
    if prefix in _ROOT_REQUIRED and not root:
        raise EvalDataError(f'{spec}: --data-dir is required ({"the shard folder" if prefix == "wds" else "its root"})')
    if root and prefix in ('wds',) and not Path(root).is_dir():
        raise EvalDataError(f'{spec}: data dir {root} does not exist')
    if (input_key or target_key) and prefix not in KEYED_PREFIXES:
        raise EvalDataError(f'--input-key / --target-key apply to {", ".join(p + "/" for p in KEYED_PREFIXES)} sets')
    if class_map is not None and prefix == 'torch':
        raise EvalDataError(f'{spec}: --class-map does not apply to torchvision sets (their labels are their own)')
    keys = {k: v for k, v in (('input_key', input_key), ('target_key', target_key)) if v}
    try:
        with _hf_progress(progress) if prefix in ('hfds', 'hfids') else nullcontext():
            dataset = create_dataset(
                spec, root=str(root) if root else None, split=split, class_map=dict(class_map) if class_map else None,
                download=download, num_samples=num_samples if prefix in ITERABLE_PREFIXES else None,
                input_img_mode=input_img_mode, is_training=False,
                batch_size=batch_size, seed=seed, **keys)
    except (AssertionError, ValueError, KeyError, TypeError, RuntimeError, OSError, ImportError) as e:
        raise EvalDataError(f'{spec}: cannot read split {split!r}: {describe_error(e)}') from None
    if isinstance(dataset, ImageDataset):
        dataset = ReadableImageDataset(dataset)
    return dataset if prefix in ITERABLE_PREFIXES else first_examples(dataset, num_samples)


@contextmanager
def _hf_progress(show: bool) -> Iterator[None]:
    """Hugging Face datasets' progress bars on or off for a block, restored after it."""
    import datasets  # only for hfds/ and hfids/, which need it anyway
    was_disabled = datasets.are_progress_bars_disabled()
    if not show:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_disabled:
            datasets.enable_progress_bars()


def _spec_classes(dataset) -> Optional[Dict[str, int]]:
    """A timm-built set's class -> label map (its reader's, or torchvision's ``classes``); None if it has none."""
    reader = getattr(dataset, 'reader', None)
    mapping = getattr(reader, 'class_to_idx', None) if reader is not None else None
    if mapping:
        return dict(mapping)
    classes = getattr(dataset, 'classes', None)
    return {str(c): i for i, c in enumerate(classes)} if classes else None


def check_spec_classes(spec: str, dataset, num_classes: int, class_map: Optional[Mapping[str, int]] = None) -> None:
    """A timm-built set is labelled by its own classes, like ``folder``: their count must equal the model's
    ``num_classes``; with a class map, every label must be below it (and, where the set names its source
    classes, every one of them must be in the map). A set that names no classes (labels as plain integers)
    is not checked."""
    if class_map is not None:
        _check_labels_fit(spec, class_map, num_classes)
        source = getattr(getattr(dataset, 'reader', None), '_source_names', None)
        missing = [n for n in (source or {}).values() if n not in class_map]
        if missing:
            raise EvalDataError(f'{spec}: class {missing[0]!r} is not in the class map'
                                + (f' ({len(missing) - 1} more like it)' if len(missing) > 1 else ''))
        return
    classes = _spec_classes(dataset)
    if classes and len(classes) != num_classes:
        raise EvalDataError(f'{spec}: the set has {len(classes)} classes but the model has {num_classes}; they must '
                            'match (pass --num-classes, a checkpoint with that head, or --class-map)')


def _check_labels_fit(dataset: str, mapping: Mapping[str, int], num_classes: int) -> None:
    top = max(mapping.values(), default=-1)
    if top >= num_classes:
        name = next(k for k, v in mapping.items() if v == top)
        raise EvalDataError(f'{dataset}: class {name!r} has label {top} but the model has {num_classes} classes')
