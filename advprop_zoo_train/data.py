"""Data for the train loop: datasets by timm's names, the embedded digits dataset, and loaders.

``--dataset`` takes what ``timm.data.create_dataset`` takes, and the datasets are timm's: a folder or tar
(no prefix), ``hfds/`` (Hugging Face datasets, map-style), ``torch/`` (torchvision) and the iterable
``wds/`` (webdataset shards), ``hfids/`` (datasets streaming) and ``tfds/``. What this module adds is the
checking (one line for a split, shard or size that is missing, before anything is written) and two
train loaders behind one interface, ``TrainLoader`` (``steps_per_epoch``, ``set_epoch``, ``unreadable``):

- map-style sets: a sampler whose order is a function of (seed, epoch) and that can start mid-epoch, and
  augmentation randomness drawn per image from (seed, epoch, index), so a sample looks the same whichever
  process, worker or restart loads it and a resumed run equals an uninterrupted one. The sampler shards
  like ``DistributedSampler``: rank r of w takes every w-th index of the epoch's permutation, so w ranks
  with batch b see the same images per step as one process with batch w * b.
- iterable sets: timm's ``IterableImageDataset``, built as timm's train.py builds it (batch size, number
  of samples, seed, training mode, this process's rank) and told the epoch as timm's ``_set_loader_epoch``
  does; its reader splits the shards over ranks and loader workers and pads every worker to the same
  whole number of batches, so every rank takes the same number of steps. A resume inside an epoch
  restarts that epoch from its first batch (a stream cannot seek), and says so.

Folder, tar and hfds sets read through the library's ``ReadableImageDataset`` (``advprop_zoo.images``): an
image that cannot be decoded arrives as a placeholder with a negative label instead of being silently
swapped for the next sample. ``UnreadableImages`` is the loop's side: it drops the placeholders from each
batch on the host, names each file in one warning the first time it is met (or, with ``--strict-images``,
stops with an error naming it), and the train loop counts them per epoch. torchvision sets decode in
memory (nothing to mark); in the iterable sets timm's readers log and skip what they cannot decode.
"""
import contextlib
import importlib.util
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import create_dataset, create_loader, create_transform
from timm.data.random_erasing import RandomErasing
from torch.utils.data import Dataset, Sampler, get_worker_info

from advprop_zoo.errors import AdvPropZooError
from advprop_zoo.images import ReadableImageDataset, split_unreadable, unreadable_names
from advprop_zoo.eval.datasets import ITERABLE_PREFIXES, KEYED_PREFIXES, TIMM_PREFIXES as DATASET_PREFIXES

__all__ = ['DataError', 'DATASET_PREFIXES', 'ITERABLE_PREFIXES', 'dataset_prefix', 'check_image_folder',
           'resolve_splits', 'digits_folder', 'create_loaders', 'ResumableSampler', 'SeededDataset',
           'UnreadableImages', 'CheckedLoader', 'TrainLoader', 'IterableTrainLoader']

_logger = logging.getLogger(__name__)

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.ppm', '.webp', '.tif', '.tiff')
DIGITS_SIZE = 32  # sklearn's 8x8 digits, upsampled so a real EfficientNet stem has room
# timm's split synonyms (timm.data.dataset_factory): a folder split is searched for under these names
TRAIN_SYNONYMS = ('train', 'training')
EVAL_SYNONYMS = ('val', 'valid', 'validation', 'eval', 'evaluation')
# what timm's readers and the libraries under them raise for a dataset they cannot open (not programming errors)
_OPEN_ERRORS = (ValueError, RuntimeError, AssertionError, OSError, KeyError, ImportError)


class DataError(AdvPropZooError, ValueError):
    """A dataset that cannot be trained or evaluated on, with the reason in one line."""


def check_image_folder(root: os.PathLike) -> List[str]:
    """Check an ImageFolder tree (``root/class/*.jpg``) and return its class names, or raise DataError
    naming the missing folder, the empty class or the lack of classes."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f'{root}: data folder does not exist')
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith('.'))
    if not classes:
        raise DataError(f'{root}: no class folders (expected {root}/<class>/<image files>)')
    for c in classes:
        if not any(f.suffix.lower() in IMG_EXTENSIONS for f in (root / c).rglob('*') if f.is_file()):
            raise DataError(f'{root / c}: class folder holds no images')
    return classes


def dataset_prefix(dataset: Optional[str]) -> str:
    """The reader prefix of a ``--dataset`` name, lower case as timm reads it: ``''`` (folder or tar), or
    one of ``DATASET_PREFIXES``; DataError for any other."""
    prefix, sep, rest = (dataset or '').partition('/')
    if not sep:
        if prefix.lower() in DATASET_PREFIXES:
            raise DataError(f'--dataset {dataset}: name the dataset after the prefix, e.g. {prefix}/NAME')
        return ''  # timm: a name without a prefix is a folder or tar dataset
    if prefix.lower() not in DATASET_PREFIXES + ('',):
        raise DataError(f'--dataset {dataset}: unknown prefix {prefix + "/"!r}; timm reads hfds/, hfids/, wds/, '
                        'tfds/, torch/, or no prefix for a folder or tar')
    return prefix.lower()


def _one_line(e: BaseException) -> str:
    text = ' '.join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + '...'


def _is_remote(path: str) -> bool:
    return '://' in path or path.startswith('pipe:')


@dataclass(frozen=True)
class _Source:
    """Where ``create_dataset`` reads from: its name and root, and what the user called it (for messages)."""
    prefix: str
    name: str
    root: Optional[str]
    label: str

    @property
    def iterable(self) -> bool:
        return self.prefix in ITERABLE_PREFIXES


def _hf_source(args, prefix: str, rest: str) -> _Source:
    """hfds/hfids: ``NAME`` is what ``datasets.load_dataset`` takes, a Hub id or a local dataset folder
    (parquet, arrow, imagefolder ...), and ``--data-dir`` is timm's root, i.e. the datasets cache, as in timm
    and ``advprop-zoo eval``. Two conveniences: a ``NAME`` that is a folder under ``--data-dir`` is read from
    there, and ``hfds/`` alone reads ``--data-dir`` itself; a cache is never put inside the data it caches
    (datasets would take its files for data files), so those keep datasets' default cache."""
    data_dir = Path(args.data_dir) if args.data_dir else None
    if rest and Path(rest).expanduser().is_dir():  # timm's meaning: a local dataset, --data-dir its cache
        local = Path(rest).expanduser().resolve()
        inside = data_dir is not None and (data_dir.resolve() == local or local in data_dir.resolve().parents)
        return _Source(prefix, f'{prefix}/{local}', None if inside else str(data_dir) if data_dir else None,
                       args.dataset)
    under = (data_dir / rest if rest else data_dir) if data_dir is not None else None
    if under is not None and under.is_dir():
        return _Source(prefix, f'{prefix}/{under.resolve()}', None, args.dataset)
    if not rest:
        raise DataError(f'--dataset {args.dataset}: name the dataset ({prefix}/NAME: a Hub dataset or a local '
                        'dataset folder)' + (f'; --data-dir {data_dir} is not a folder' if data_dir else ''))
    if data_dir is not None and data_dir.is_file():
        raise DataError(f'--data-dir {data_dir}: is a file (for a Hub dataset --data-dir is the datasets cache folder)')
    return _Source(prefix, f'{prefix}/{rest}', str(data_dir) if data_dir else None, args.dataset)


# the package each reader needs (timm's readers print an install hint to stdout and re-raise when it is missing)
_READER_PACKAGES = {'hfds': ('datasets', 'datasets'), 'hfids': ('datasets', 'datasets'),
                    'wds': ('webdataset', 'webdataset'), 'tfds': ('tensorflow_datasets', 'tensorflow-datasets')}


def _source(args) -> _Source:
    prefix = dataset_prefix(args.dataset)
    rest = (args.dataset or '').partition('/')[2] if '/' in (args.dataset or '') else ''
    if prefix in _READER_PACKAGES:
        module, package = _READER_PACKAGES[prefix]
        if importlib.util.find_spec(module) is None:
            raise DataError(f'--dataset {args.dataset}: timm\'s {prefix}/ reader needs {package}: pip install '
                            f'"advprop-zoo[train]" (or pip install {package})')
    if prefix in ('hfds', 'hfids'):
        return _hf_source(args, prefix, rest)
    data_dir = args.data_dir
    if prefix == 'tfds':
        return _Source(prefix, args.dataset, data_dir, args.dataset)
    if data_dir is None:
        what = {'': 'a folder or tar dataset: the folder with the splits',
                'wds': 'the folder with the shards (and their _info.json)',
                'torch': 'where torchvision keeps (or with --dataset-download fetches) the dataset'}[prefix]
        raise DataError(f'--dataset {args.dataset or "(folder)"} needs --data-dir: {what}')
    if not _is_remote(data_dir) and not Path(data_dir).exists() and not (prefix == 'torch' and args.dataset_download):
        raise DataError(f'{data_dir}: data folder does not exist')
    return _Source(prefix, args.dataset or '', data_dir, args.dataset or str(data_dir))


def _split_path(root: str, split: str, flag: str) -> Path:
    """The folder (or ``.tar``) of ``split`` under ``root``: ``split`` itself, else timm's synonyms of it
    (``val`` for ``validation`` ...), as timm's ``_search_split``, which would fall back to ``root``
    itself; here a split that is not there is an error."""
    root_p = Path(root)
    if root_p.is_file():
        raise DataError(f'--data-dir {root}: is a file; name the folder that holds the {split} split (a folder or '
                        f'{split}.tar)')
    name = split.split('[')[0]
    names = [name] + [s for s in (TRAIN_SYNONYMS if name in TRAIN_SYNONYMS else
                                   EVAL_SYNONYMS if name in EVAL_SYNONYMS else ()) if s != name]
    for n in names:
        for cand in (root_p / n, root_p / f'{n}.tar'):
            if cand.is_dir() or (cand.is_file() and cand.suffix == '.tar'):
                return cand
    also = f' (or {", ".join(n + "/" for n in names[1:])})' if len(names) > 1 else ''
    raise DataError(f'{root}: no {split!r} split for {flag}: expected {name}/{also} in ImageFolder layout, '
                    f'or {name}.tar')


@contextlib.contextmanager
def _quiet_wds_info():
    """timm's wds reader warns on every construction that it found no ``_info.json``; shards named by a
    pattern need none, and a size that is missing is this module's one-line error instead."""
    log = logging.getLogger('timm.data.readers.reader_wds')
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _check_tar_end(path: Path) -> None:
    """A tar ends in (at least) two zero blocks; a shard cut short (an interrupted copy or write) does not,
    and webdataset would only log it and repeat other samples in its place."""
    size = path.stat().st_size
    ok = size >= 1024 and size % 512 == 0
    if ok:
        with open(path, 'rb') as f:
            f.seek(size - 1024)
            ok = not any(f.read(1024))
    if not ok:
        raise DataError(f'{path}: shard is cut short (no end-of-archive blocks in its {size} bytes); rewrite or '
                        'remove it')


def _check_shards(src: _Source, split: str, flag: str, filenames) -> None:
    """Every local shard of a wds split exists and ends as a tar does."""
    paths = [Path(src.root) / f for f in filenames if not _is_remote(os.path.join(src.root, f))]
    missing = [p for p in paths if not p.is_file()]
    if paths and len(missing) == len(paths):
        raise DataError(f'{flag} {split}: matches no shard in {src.root} (e.g. {missing[0].name})')
    if missing:
        raise DataError(f'{flag} {split}: {len(missing)} of its {len(paths)} shards are missing in {src.root}, e.g. '
                        f'{missing[0].name}')
    for p in paths:
        _check_tar_end(p)


def _num_samples_error(src: _Source, split: str, training: bool) -> DataError:
    flag = '--train-num-samples' if training else '--val-num-samples'
    how = ' (or a "|N" after the shard pattern, or an _info.json with the split\'s shard_lengths)' \
        if src.prefix == 'wds' else ''
    return DataError(f'--dataset {src.label} split {split!r}: the dataset does not say how many samples it holds; '
                     f'give {flag}{how}')


def _open(args, src: _Source, split: str, training: bool, input_img_mode: str = 'RGB'):
    """The timm dataset of one split, as timm's train.py creates it; DataError for what cannot be read."""
    flag = '--train-split' if training else '--val-split'
    if not split:
        raise DataError(f'{flag}: name the split')
    num_samples = args.train_num_samples if training else args.val_num_samples
    kwargs = dict(class_map=args.class_map, download=args.dataset_download, input_img_mode=input_img_mode)
    keys = {k: v for k in ('input_key', 'target_key') if (v := getattr(args, k, None))}
    if keys and src.prefix not in KEYED_PREFIXES:
        raise DataError(f'--input-key / --target-key apply to {", ".join(p + "/" for p in KEYED_PREFIXES)} datasets, '
                        f'not {src.label}')
    kwargs.update(keys)
    if src.iterable:
        kwargs.update(is_training=training, batch_size=args.batch_size, seed=args.seed, num_samples=num_samples,
                      repeats=0)
    root, split_arg, search = src.root, split, True
    if src.prefix == '' or (src.prefix == 'torch' and src.name.split('/', 2)[-1].lower() in ('folder', 'image_folder')):
        root, search = str(_split_path(src.root, split, flag)), False
        if Path(root).is_dir():
            check_image_folder(root)
    try:
        with _quiet_wds_info():
            ds = create_dataset(src.name, root=root, split=split_arg, search_split=search, **kwargs)
    except _OPEN_ERRORS as e:
        if isinstance(e, ImportError):
            raise DataError(f'--dataset {src.label}: {_one_line(e)} (pip install the package of the {src.prefix}/ '
                            'reader: datasets, webdataset, tensorflow-datasets, torchvision)') from None
        if src.iterable and num_samples is None and 'num_samples' in str(e):
            raise _num_samples_error(src, split, training) from None
        if src.prefix == 'torch' and 'download' in str(e) and not args.dataset_download:
            raise DataError(f'--dataset {src.label}: {_one_line(e)} (add --dataset-download to fetch it into '
                            f'{src.root})') from None
        where = f' in {src.root}' if src.root else ''
        raise DataError(f'--dataset {src.label} split {split!r}{where}: {_one_line(e)}') from None
    if src.prefix == 'wds':
        _check_shards(src, split, flag, ds.reader.split_info.filenames)
    if not src.iterable and len(ds) == 0:
        raise DataError(f'--dataset {src.label} split {split!r}: holds no samples')
    return ds


def _class_names(ds) -> List[str]:
    """The class names of a timm (or torchvision) dataset in label order; [] when it does not name them."""
    reader = getattr(ds, 'reader', None)
    mapping = getattr(reader, 'class_to_idx', None) or getattr(reader, 'class_name_to_idx', None)
    if mapping:
        try:
            indices = {int(i): str(name) for name, i in mapping.items()}
        except (TypeError, ValueError):
            return []
        return [indices.get(i, str(i)) for i in range(max(indices) + 1)]
    classes = getattr(ds, 'classes', None)
    return [str(c) for c in classes] if classes else []


def _classes(args, src: _Source, train, val) -> List[str]:
    """The classes the model's head is sized for: the dataset's (train and validation must agree), or
    ``--num-classes`` where the dataset does not name them."""
    classes, val_classes = _class_names(train), _class_names(val)
    if classes and val_classes and classes != val_classes:
        extra = sorted(set(val_classes) ^ set(classes)) or ['(same names, other order)']
        raise DataError(f'--dataset {src.label}: the {args.train_split!r} and {args.val_split!r} splits hold different '
                        f'classes (e.g. {extra[0]!r})')
    if args.num_classes is not None:
        if args.num_classes < 1 or (classes and args.num_classes < len(classes)):
            raise DataError(f'--num-classes {args.num_classes}: the dataset has {len(classes)} classes')
        return classes or [str(i) for i in range(args.num_classes)]
    if not classes:
        raise DataError(f'--dataset {src.label}: the dataset does not name its classes; give --num-classes')
    return classes


# resolve_splits → create_loaders: the splits resolve_splits opened, taken (once) by the create_loaders that
# follows it in setup with the same flags, so a large folder is not listed twice
_opened: Dict[tuple, tuple] = {}


def _open_key(args, src: _Source, input_img_mode: str) -> tuple:
    return (src, input_img_mode, *(getattr(args, k) for k in (
        'train_split', 'val_split', 'train_num_samples', 'val_num_samples', 'class_map', 'dataset_download',
        'input_key', 'target_key', 'batch_size', 'seed')))


def _open_splits(args, src: _Source, input_img_mode: str = 'RGB') -> tuple:
    """``(train, val)`` timm datasets; the pair ``resolve_splits`` just opened with the same flags if any."""
    key = _open_key(args, src, input_img_mode)
    pair = _opened.pop(key, None)
    _opened.clear()
    if pair is None:
        pair = (_open(args, src, args.train_split, training=True, input_img_mode=input_img_mode),
                _open(args, src, args.val_split, training=False, input_img_mode=input_img_mode))
    return pair


def resolve_splits(args) -> List[str]:
    """Check ``args``' dataset the way ``create_loaders`` will read it (the prefix, both splits, their
    sizes and shards, their classes) and return its class names; DataError, in one line, for anything
    that would fail later. Writes nothing but what the datasets library caches."""
    src = _source(args)
    img_mode = args.input_img_mode or 'RGB'
    train, val = _open_splits(args, src, img_mode)
    classes = _classes(args, src, train, val)
    _opened[_open_key(args, src, img_mode)] = (train, val)
    return classes


def digits_folder(cache_dir: Optional[os.PathLike] = None) -> Path:
    """scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes) as an RGB ImageFolder with a
    fixed 80/20 train/val split, upsampled to 32x32; written once, atomically, under the cache."""
    try:  # optional (the [train] extra), and only the demo needs it
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError('the embedded dataset needs scikit-learn: pip install "advprop-zoo[train]"') from None

    base = Path(cache_dir or os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'advprop-zoo'
    root = base / f'digits{DIGITS_SIZE}'
    if (root / 'val').is_dir():
        return root
    base.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.target))
    n_train = int(0.8 * len(order))
    tmp = Path(tempfile.mkdtemp(prefix='.digits-', dir=base))
    try:
        for rank, i in enumerate(order):
            split = 'train' if rank < n_train else 'val'
            folder = tmp / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
            img = Image.fromarray(pixels, mode='L').resize((DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC).convert('RGB')
            img.save(folder / f'{i:04d}.png')
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first
            if not (root / 'val').is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


class ResumableSampler(Sampler):
    """Yields ``(epoch, index)`` for this rank's share of the epoch's permutation, from batch ``start``.

    The permutation depends only on ``(seed, epoch)``; the tail that does not fill a batch on every rank
    is dropped, so every rank takes the same number of steps and batches stay even.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        self.steps_per_epoch = size // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise DataError(f'{size} training images are fewer than one global batch '
                            f'({batch_size} x {world_size} process(es))')

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=g)[:self.steps_per_epoch * self.batch_size * self.world_size]
        mine = order[self.rank::self.world_size].tolist()
        for i in mine[self.start * self.batch_size:]:
            yield self.epoch, i

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start) * self.batch_size


class SeededDataset(Dataset):
    """Wraps a dataset (timm's, read through ``ReadableImageDataset``) so the transform of sample ``index`` in
    ``epoch`` draws its randomness (python, numpy, torch's CPU generator) from a seed of ``(seed, epoch, index)``,
    restoring the RNGs afterwards in the main process (a loader worker's RNGs serve nothing else)."""

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        h = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        cpu = torch.default_generator  # what CPU transforms draw from; torch.manual_seed would also seed every
        # accelerator's generators, at ~0.3 ms a call (more than reading and augmenting a small image)
        if get_worker_info() is not None:  # a loader worker: every sample reseeds, nothing to restore
            random.seed(h)
            np.random.seed(h % (2 ** 32))
            cpu.manual_seed(h)
            return self.dataset[index]
        saved = random.getstate(), np.random.get_state(), cpu.get_state()
        random.seed(h)
        np.random.seed(h % (2 ** 32))
        cpu.manual_seed(h)
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            cpu.set_state(saved[2])


class UnreadableImages:
    """The train process's account of the unreadable images of one dataset: ``exclude`` drops them from a
    batch (labels still on the host), warns once per file per run, naming it and why it cannot be read,
    and with ``strict`` raises DataError for the first one instead."""

    def __init__(self, dataset: Any, strict: bool = False, what: str = 'training'):
        self.dataset, self.strict, self.what = dataset, strict, what
        self.reported: Set[int] = set()  # indices already named in a warning

    def exclude(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
        """``(x, y, names)``: the batch without its unreadable images, and their files (absolute paths)."""
        x, y, indices = split_unreadable(x, y)
        names = unreadable_names(self.dataset, indices, absolute=True)
        for i, name in zip(indices, names):
            if self.strict:
                raise DataError(f'{name}: unreadable {self.what} image ({self._why(i)}); remove or replace it, or '
                                'drop --strict-images to skip unreadable images with a warning')
            if i not in self.reported:
                self.reported.add(i)
                _logger.warning(f'{name}: unreadable {self.what} image ({self._why(i)}); left out of every batch '
                                'it falls in (warned once; --strict-images makes it an error)')
        return x, y, names

    def _why(self, index: int) -> str:
        read_error = getattr(self.dataset, 'read_error', None)
        return (read_error(index) if read_error else None) or 'could not be read when loaded'


class CheckedLoader:
    """A loader whose batches come without their unreadable images (``UnreadableImages.exclude``): the
    validation loader of a run, so its files are warned about (or refused) like the training set's."""

    def __init__(self, loader, unreadable: UnreadableImages):
        self.loader, self.unreadable = loader, unreadable

    def __iter__(self):
        for x, y in self.loader:
            x, y, _ = self.unreadable.exclude(x, y)
            if len(y):
                yield x, y

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def sampler(self):
        return self.loader.sampler


class DeviceNormalize:
    """Training batches travel from the workers as uint8 (a quarter of float32's bytes) and become model
    inputs on the device: normalised there, randomly erased there when ``--reprob`` asks (timm's prefetcher
    does the same two steps on the GPU)."""

    def __init__(self, mean, std, device: torch.device, re_prob: float = 0.0, re_mode: str = 'pixel',
                 re_count: int = 1):
        self.device = torch.device(device)
        self.mean = torch.tensor([255 * m for m in mean], device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor([255 * s for s in std], device=self.device).view(1, -1, 1, 1)
        self.erase = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device=self.device) \
            if re_prob > 0 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        return self.erase(x) if self.erase is not None else x


class TrainLoader:
    """What the train loop needs of a training loader, whatever the dataset: batches, ``steps_per_epoch``
    (the same on every rank), ``set_epoch(epoch, start_batch)`` (returns the batch it starts at: a map-style
    set resumes mid-epoch exactly, an iterable one only at an epoch boundary), and ``unreadable``.

    This one is the map-style loader: ``ResumableSampler`` over ``SeededDataset``."""

    def __init__(self, loader, sampler: ResumableSampler, unreadable: UnreadableImages):
        self.loader, self.sampler, self.unreadable = loader, sampler, unreadable
        self.steps_per_epoch = sampler.steps_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> int:
        self.sampler.set_epoch(epoch, start_batch)
        return start_batch

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


class IterableTrainLoader(TrainLoader):
    """The training loader of an iterable set (timm's ``IterableImageDataset``): ``steps_per_epoch`` is the
    reader's padded per-worker sample count over the batch size, the same on every rank; ``set_epoch`` tells
    the dataset the epoch (timm's ``_set_loader_epoch``: its shard and sample shuffles follow it) and seeds the
    loader's workers from (seed, epoch, rank). A stream cannot start mid-epoch: asked to, it says so in one
    line (rank 0) and starts the epoch from its first batch (returns 0)."""

    def __init__(self, loader, dataset, unreadable: UnreadableImages, seed: int, rank: int, label: str):
        self.loader, self.dataset, self.unreadable, self.sampler = loader, dataset, unreadable, None
        self.seed, self.rank, self.label = seed, rank, label
        self.steps_per_epoch = len(dataset) // loader.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> int:
        self.dataset.set_epoch(epoch)
        self.loader.generator.manual_seed((self.seed * 100_003 + epoch) * 1_009 + self.rank)
        if start_batch > 0 and self.rank == 0:
            print(f'resume: {self.label} is an iterable dataset and cannot start mid-epoch: epoch {epoch + 1} '
                  f'restarts from its first batch, not batch {start_batch + 1} (its first {start_batch} steps are '
                  'trained again)')
        return 0


class _ConvertedTransform:
    """A torchvision dataset's transform: the image converted to ``mode`` (as timm's readers do with
    ``--input-img-mode``; MNIST is grey), then ``transform``."""

    def __init__(self, mode: str, transform):
        self.mode, self.transform = mode, transform

    def __call__(self, img):
        if isinstance(img, Image.Image) and self.mode and img.mode != self.mode:
            img = img.convert(self.mode)
        return self.transform(img) if self.transform is not None else img


class TorchvisionDataset(Dataset):
    """A ``torch/`` dataset whose ``transform`` (set by the loaders, as on timm's datasets) converts the image
    mode first. Its images are decoded in memory, so there is nothing unreadable to mark."""

    def __init__(self, dataset: Dataset, input_img_mode: str):
        self.dataset, self.input_img_mode = dataset, input_img_mode
        self._transform = None

    @property
    def transform(self):
        return self._transform

    @transform.setter
    def transform(self, value) -> None:
        self._transform = value
        self.dataset.transform = _ConvertedTransform(self.input_img_mode, value)

    @property
    def classes(self):
        return getattr(self.dataset, 'classes', None)

    def __getitem__(self, index: int):
        return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)


def _set_rank(ds, rank: int, world_size: int) -> None:
    """Tell an iterable set's reader this process's rank, as it reads it from ``torch.distributed`` itself
    under torchrun (explicit, so a process group is not needed to build one rank's loader)."""
    reader = ds.reader
    if hasattr(reader, 'dist_rank'):
        reader.dist_rank, reader.dist_num_replicas = rank, world_size


def _check_iterable_workers(args, src: _Source, ds, split: str, rank: int, world_size: int) -> None:
    """The reader gives every (rank, loader worker) whole shards; one left without any would yield nothing
    (a rank short of steps; timm's hfids reader stops with an error in the worker), so too few shards for
    ranks x workers is a DataError here. Shards that do not split evenly are a warning: timm's wds reader
    then repeats some samples and leaves others out of an epoch."""
    workers = max(1, args.workers)
    if src.prefix == 'wds':
        shards = len(ds.reader.split_info.filenames)
        feeders = world_size * workers
        if shards < feeders:
            raise DataError(f'--train-split {split}: {shards} shard(s) cannot feed {world_size} rank(s) x {workers} '
                            f'loader worker(s) (each takes whole shards); use --workers '
                            f'{max(0, shards // world_size)} or fewer, or more shards')
        if shards % feeders and rank == 0:
            _logger.warning(f'--train-split {split}: {shards} shards do not split evenly over {feeders} rank x worker '
                            'readers: each epoch repeats some samples and leaves others out (timm\'s wds reader); a '
                            'shard count divisible by ranks x --workers sees each sample once per epoch')
    elif src.prefix == 'hfids' and args.workers > 1 and not args.dataset_download:
        try:
            shards = ds.reader.builder.as_streaming_dataset(split=split).num_shards
        except Exception:  # noqa: BLE001  the reader reports it itself when it starts
            return
        per_rank = shards // world_size if shards % world_size == 0 else shards
        if per_rank < args.workers:
            raise DataError(f'--dataset {src.label} split {split!r}: {shards} shard(s), {per_rank} per rank, cannot '
                            f'feed --workers {args.workers} (each worker takes whole shards); use --workers '
                            f'{per_rank} or fewer, or write more shards')


def _iterable_val_readers(args, src: _Source, ds, rank: int, world_size: int) -> int:
    """Loader workers for an iterable validation split, its reader set up for this rank.

    Under torchrun timm's wds reader gives each (rank, worker) whole shards and, to keep ranks in step, a
    quota of ``--val-num-samples`` / readers (repeating its shards to fill it): a rank without a shard would
    evaluate nothing. So the workers are capped to what the shards can feed, and a split with fewer shards than
    ranks is read whole on every rank (each rank's counts are then the same, and the reduced accuracy is exact).
    Single-process validation reads each sample once whatever the worker count."""
    workers = args.workers
    if world_size == 1 or src.prefix != 'wds':
        if world_size > 1 and not getattr(ds.reader, 'num_samples', 0):
            raise _num_samples_error(src, args.val_split, training=False)  # each rank must know its share
        return workers
    shards = len(ds.reader.split_info.filenames)
    if shards < world_size:
        _set_rank(ds, 0, 1)
        if rank == 0:
            _logger.warning(f'--val-split {args.val_split}: {shards} shard(s) for {world_size} ranks: every rank '
                            'evaluates the whole split (write at least one shard per rank to share it)')
        return min(workers, shards)
    if not getattr(ds.reader, 'num_samples', 0):
        raise _num_samples_error(src, args.val_split, training=False)  # each rank's quota is a share of it
    workers = min(workers, shards // world_size)
    readers = world_size * max(1, workers)
    if shards % readers and rank == 0:
        _logger.warning(f'--val-split {args.val_split}: {shards} shards do not split evenly over {readers} rank x '
                        'worker readers: validation counts some images twice and leaves others out (timm\'s wds '
                        'reader keeps ranks in step that way)')
    return workers


def create_loaders(args, data_config: Dict, rank: int = 0, world_size: int = 1):
    """``(train, val, classes)``: the training loader (a ``TrainLoader``), the validation loader and the class
    names, for ``args``' dataset (``--dataset``, ``--data-dir``, the splits; see the module docstring).

    The train loader carries ``.unreadable``, the ``UnreadableImages`` the loop drops each batch's unreadable
    images with; the eval loader is a ``CheckedLoader`` that drops them itself. ``args.strict_images`` makes
    either an error."""
    src = _source(args)
    img_mode = args.input_img_mode or ('RGB' if data_config['input_size'][0] == 3 else 'L')  # as timm's train.py
    common = dict(input_size=data_config['input_size'], interpolation=data_config['interpolation'],
                  mean=data_config['mean'], std=data_config['std'])
    train_transform = create_transform(
        is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, auto_augment=args.aa, use_prefetcher=True,  # uint8 out: see DeviceNormalize
        **({'interpolation': args.train_interpolation} if args.train_interpolation else {}), **common)
    pin = args.pin_mem
    to_device = DeviceNormalize(data_config['mean'], data_config['std'], args.device, args.reprob, args.remode,
                                args.recount)
    ds_train, ds_val = _open_splits(args, src, img_mode)
    classes = _classes(args, src, ds_train, ds_val)
    if src.iterable:
        for ds in (ds_train, ds_val):
            _set_rank(ds, rank, world_size)
        _check_iterable_workers(args, src, ds_train, args.train_split, rank, world_size)
        val_workers = _iterable_val_readers(args, src, ds_val, rank, world_size)
        ds_train.set_loader_cfg(num_workers=args.workers)
        ds_train.transform = train_transform
        if len(ds_train) < args.batch_size:
            raise DataError(f'--dataset {src.label}: {len(ds_train)} training samples per rank are fewer than one '
                            f'batch ({args.batch_size})')
        loader = torch.utils.data.DataLoader(
            ds_train, batch_size=args.batch_size, num_workers=args.workers, pin_memory=pin, drop_last=True,
            persistent_workers=args.workers > 0, generator=torch.Generator().manual_seed(args.seed))
        train = IterableTrainLoader(loader, ds_train, UnreadableImages(ds_train, strict=args.strict_images),
                                    seed=args.seed, rank=rank, label=src.label)
    else:
        if src.prefix == 'torch':
            ds_train, ds_val = TorchvisionDataset(ds_train, img_mode), TorchvisionDataset(ds_val, img_mode)
        else:  # folder, tar, hfds: timm ImageDatasets, their unreadable images marked
            ds_train, ds_val = ReadableImageDataset(ds_train), ReadableImageDataset(ds_val)
        ds_train.transform = train_transform
        sampler = ResumableSampler(len(ds_train), args.batch_size, seed=args.seed, rank=rank, world_size=world_size)
        loader = torch.utils.data.DataLoader(
            SeededDataset(ds_train, seed=args.seed), batch_size=args.batch_size, sampler=sampler,
            num_workers=args.workers, pin_memory=pin, drop_last=True, persistent_workers=args.workers > 0,
            generator=torch.Generator().manual_seed(args.seed))  # leaves the global RNG alone
        train = TrainLoader(loader, sampler, UnreadableImages(ds_train, strict=args.strict_images))
        val_workers = args.workers
    val = create_loader(
        ds_val, batch_size=args.validation_batch_size or args.batch_size, is_training=False,
        crop_pct=data_config['crop_pct'], num_workers=val_workers, distributed=world_size > 1, use_prefetcher=False,
        pin_memory=pin, **common)
    val = CheckedLoader(val, UnreadableImages(ds_val, strict=args.strict_images, what='validation'))
    train.to_device = to_device
    return train, val, classes
