"""Data for the train loop: folder checks, the embedded digits dataset, and loaders.

Datasets and transforms are timm's (``create_dataset``, ``create_transform`` with the model's data
config; the eval loader is timm's ``create_loader``). The train loader adds two things timm's does not
have and resuming bit-exactly needs: a sampler whose order is a function of (seed, epoch) and that can
start mid-epoch, and augmentation randomness drawn per image from (seed, epoch, index), so a sample
looks the same whichever process, worker or restart loads it. The sampler shards like
``DistributedSampler``: rank r of w takes every w-th index of the epoch's permutation, so w ranks
with batch b see the same images per step as one process with batch w * b.

Both datasets read through the library's ``ReadableImageDataset`` (``advprop_zoo.images``): an image that
cannot be decoded arrives as a placeholder with a negative label instead of being silently swapped for
the next sample. ``UnreadableImages`` is the loop's side: it drops the placeholders from each batch on
the host, names each file in one warning the first time it is met (or, with ``--strict-images``, stops
with an error naming it), and the train loop counts them per epoch.
"""
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import create_dataset, create_loader, create_transform
from torch.utils.data import Dataset, Sampler

from advprop_zoo.errors import AdvPropZooError
from advprop_zoo.images import ReadableImageDataset, split_unreadable

__all__ = ['DataError', 'check_image_folder', 'digits_folder', 'create_loaders', 'ResumableSampler',
           'SeededDataset', 'UnreadableImages', 'CheckedLoader']

_logger = logging.getLogger(__name__)

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.ppm', '.webp', '.tif', '.tiff')
DIGITS_SIZE = 32  # sklearn's 8x8 digits, upsampled so a real EfficientNet stem has room


class DataError(AdvPropZooError, ValueError):
    """A dataset folder that cannot be trained or evaluated on, with the reason in one line."""


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


def _split_dir(data_dir: Path, names: Tuple[str, ...]) -> Optional[Path]:
    return next((data_dir / n for n in names if (data_dir / n).is_dir()), None)


def resolve_splits(data_dir: os.PathLike) -> Tuple[Path, Path, List[str]]:
    """``(train, val, classes)`` for an ImageNet-style folder with ``train/`` and ``val/`` (or
    ``validation/``) subfolders; both must hold the same classes."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f'{data_dir}: data folder does not exist')
    train = _split_dir(data_dir, ('train', 'training'))
    val = _split_dir(data_dir, ('val', 'validation'))
    if train is None or val is None:
        raise DataError(f'{data_dir}: expected train/ and val/ subfolders in ImageFolder layout')
    classes = check_image_folder(train)
    val_classes = check_image_folder(val)
    if val_classes != classes:
        extra = sorted(set(val_classes) ^ set(classes))
        raise DataError(f'{data_dir}: train/ and val/ hold different classes (e.g. {extra[0]!r})')
    return train, val, classes


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
    ``epoch`` draws its randomness (python, numpy, torch) from a seed of ``(seed, epoch, index)``, restoring the
    RNGs afterwards."""

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        h = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(h)
        np.random.seed(h % (2 ** 32))
        torch.manual_seed(h)
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class UnreadableImages:
    """The train process's account of the unreadable images of one dataset: ``exclude`` drops them from a
    batch (labels still on the host), warns once per file per run, naming it and why it cannot be read,
    and with ``strict`` raises DataError for the first one instead."""

    def __init__(self, dataset: ReadableImageDataset, strict: bool = False, what: str = 'training'):
        self.dataset, self.strict, self.what = dataset, strict, what
        self.reported: Set[int] = set()  # indices already named in a warning

    def exclude(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
        """``(x, y, names)``: the batch without its unreadable images, and their files (absolute paths)."""
        x, y, indices = split_unreadable(x, y)
        names = [self.dataset.filename(i, absolute=True) for i in indices]
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
        return self.dataset.read_error(index) or 'could not be read when loaded'


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


class TrainLoader:
    """What the train loop needs of a training loader, whatever the dataset: batches, ``steps_per_epoch``
    (the same on every rank), ``set_epoch(epoch, start_batch)`` (returns the batch it starts at: a map-style
    set resumes mid-epoch exactly, an iterable one only at an epoch boundary), and ``unreadable``."""

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


def create_loaders(args, data_config: Dict, rank: int = 0, world_size: int = 1):
    """Train loader (resumable, seeded) and timm eval loader for ``args.data_dir``.

    Both read through ``ReadableImageDataset``. The train loader carries ``.unreadable``, the
    ``UnreadableImages`` the loop drops each batch's unreadable images with; the eval loader is a
    ``CheckedLoader`` that drops them itself. ``args.strict_images`` makes either an error."""
    train_dir, val_dir, classes = resolve_splits(args.data_dir)
    common = dict(input_size=data_config['input_size'], interpolation=data_config['interpolation'],
                  mean=data_config['mean'], std=data_config['std'])
    ds_train = ReadableImageDataset(create_dataset('', root=str(train_dir), is_training=True))
    ds_train.transform = create_transform(
        is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, auto_augment=args.aa, re_prob=args.reprob, re_mode=args.remode,
        re_count=args.recount, **({'interpolation': args.train_interpolation} if args.train_interpolation else {}),
        **common)
    sampler = ResumableSampler(len(ds_train), args.batch_size, seed=args.seed, rank=rank, world_size=world_size)
    train = torch.utils.data.DataLoader(
        SeededDataset(ds_train, seed=args.seed), batch_size=args.batch_size, sampler=sampler,
        num_workers=args.workers, pin_memory=args.pin_mem, drop_last=True,
        persistent_workers=False, generator=torch.Generator().manual_seed(args.seed))  # leaves the global RNG alone
    train = TrainLoader(train, sampler, UnreadableImages(ds_train, strict=args.strict_images))
    ds_val = ReadableImageDataset(create_dataset('', root=str(val_dir), is_training=False))
    val = create_loader(
        ds_val, batch_size=args.validation_batch_size or args.batch_size, is_training=False,
        crop_pct=data_config['crop_pct'], num_workers=args.workers, distributed=world_size > 1,
        use_prefetcher=False, pin_memory=args.pin_mem, **common)
    val = CheckedLoader(val, UnreadableImages(ds_val, strict=args.strict_images, what='validation'))
    return train, val, classes
