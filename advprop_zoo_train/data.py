"""Data for the train loop: folder checks, the embedded digits dataset, and timm loaders.

Loading is timm's (``create_dataset`` / ``create_loader`` / ``create_transform`` with the model's data
config); this module only checks a folder before a long run starts and materialises the one dataset
that ships with a registry package, so ``advprop-zoo train`` runs with no download.
"""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

__all__ = ['DataError', 'check_image_folder', 'digits_folder', 'create_loaders']

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.ppm', '.webp', '.tif', '.tiff')
DIGITS_SIZE = 32  # sklearn's 8x8 digits, upsampled so a real EfficientNet stem has room


class DataError(ValueError):
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
    from PIL import Image
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError('the embedded dataset needs scikit-learn: pip install "advprop-zoo[train]"') from None
    import numpy as np

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


def create_loaders(args, data_config: Dict, distributed: bool = False):
    """timm train and eval loaders for ``args.data_dir`` with the model's ``data_config``."""
    from timm.data import create_dataset, create_loader

    train_dir, val_dir, classes = resolve_splits(args.data_dir)
    ds_train = create_dataset('', root=str(train_dir), is_training=True, seed=args.seed)
    ds_val = create_dataset('', root=str(val_dir), is_training=False)
    common = dict(
        input_size=data_config['input_size'], interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], num_workers=args.workers,
        distributed=distributed, use_prefetcher=False, pin_memory=args.device.startswith('cuda'),
    )
    train = create_loader(
        ds_train, batch_size=args.batch_size, is_training=True, scale=tuple(args.scale), hflip=args.hflip,
        auto_augment=args.aa, re_prob=args.reprob, **common)
    val = create_loader(
        ds_val, batch_size=args.eval_batch_size or args.batch_size, is_training=False,
        crop_pct=data_config['crop_pct'], **common)
    return train, val, classes
