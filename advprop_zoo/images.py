"""Unreadable images: found where a sample is read, excluded where the batch is consumed, named always.

timm's ``ImageDataset`` answers an image it cannot decode (a truncated JPEG, a text file called
``.png``) by logging a line and returning the *next* sample in its place, so an evaluation counts that
sample twice and a training epoch skips the bad file without saying which it was.
``ReadableImageDataset`` wraps a timm ``ImageDataset`` and reads each sample itself
(``dataset.reader[index]``, PIL open + ``convert(input_img_mode)``, then the dataset's transform and
target transform). An image that cannot be read becomes a placeholder instead: the transform applied
to a blank image (the right shape and dtype for any eval or train transform, so batches still collate)
with the label ``-(index + 1)``. Real labels are never negative, so the consumer tells placeholders
apart on the label tensor alone: ``split_unreadable`` drops them from a batch on the host (no device
sync), and a loop whose labels are already on the device can mask them there (negative labels never
equal a top-k index). ``unreadable_index`` turns a placeholder's label back into its dataset index,
``dataset.filename(index)`` into the file's name.

The wrapped dataset may read any of timm's map-style sources whose reader returns a file object or an
image: a folder, a tar, or Hugging Face datasets (``hfds/``, whose reader hands over each row's encoded
image bytes, so a row holding a truncated or non-image blob is marked like a bad file). A sample whose
reader knows no file name (an ``hfds/`` row stored as bytes only) is named ``<split>[#index]``.
"""
from typing import Any, List, Optional, Sequence, Tuple

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = ['UNREADABLE_ERRORS', 'ReadableImageDataset', 'unreadable_label', 'unreadable_index', 'split_unreadable',
           'unreadable_names']

# what PIL raises for a file it cannot decode: OSError (UnidentifiedImageError, 'image file is truncated',
# a file that vanished), SyntaxError (e.g. a broken PNG chunk), DecompressionBombError (over PIL's pixel limit)
UNREADABLE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)
PLACEHOLDER_SIZE = 32  # side of the blank image a placeholder is transformed from (any size works)


def unreadable_label(index: int) -> int:
    """The label of the placeholder for unreadable sample ``index``: ``-(index + 1)``, always negative."""
    return -(int(index) + 1)


def unreadable_index(label: int) -> int:
    """The dataset index a placeholder's (negative) label encodes; inverse of ``unreadable_label``."""
    return -int(label) - 1


class ReadableImageDataset(Dataset):
    """A timm ``ImageDataset`` (folder, tar or hfds) whose unreadable images become placeholders labelled
    ``-(index + 1)`` instead of being silently replaced by the next sample (see the module docstring).

    ``transform`` and ``target_transform`` are the wrapped dataset's (reading and setting them here
    reaches it, so timm's ``create_loader`` sets the transform as usual); ``filename`` / ``filenames``
    are its reader's. Readable samples come out exactly as timm's ``__getitem__`` returns them."""

    def __init__(self, dataset: Dataset):
        for attr in ('reader', 'input_img_mode', 'transform', 'target_transform'):
            if not hasattr(dataset, attr):
                raise TypeError(f'ReadableImageDataset wraps a timm ImageDataset; {type(dataset).__name__} '
                                f'has no {attr!r}')
        if getattr(dataset, 'load_bytes', False) or getattr(dataset, 'additional_features', None) is not None:
            raise ValueError('ReadableImageDataset decodes images: load_bytes and additional_features are not '
                             'supported')
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def reader(self):
        return self.dataset.reader

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value) -> None:
        self.dataset.transform = value

    @property
    def target_transform(self):
        return self.dataset.target_transform

    @target_transform.setter
    def target_transform(self, value) -> None:
        self.dataset.target_transform = value

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        """Sample ``index``'s file: relative to the dataset root (the default), its base name, or absolute;
        ``<split>[#index]`` for a sample its reader knows no file name of (an hfds row stored as bytes)."""
        try:
            name = self.dataset.filename(index, basename=basename, absolute=absolute)
        except (KeyError, TypeError, AttributeError, IndexError):  # e.g. an hfds row without an image path
            name = None
        if not name:
            split = getattr(self.dataset.reader, 'split', None)
            return f'{split}[#{index}]' if split else f'#{index}'
        return str(name)

    def filenames(self, basename: bool = False, absolute: bool = False) -> List[str]:
        return [self.filename(i, basename=basename, absolute=absolute) for i in range(len(self))]

    def _read(self, index: int) -> Tuple[Image.Image, Any]:
        """Sample ``index``'s decoded image (in ``input_img_mode``) and raw target; raises UNREADABLE_ERRORS."""
        source, target, *_ = self.dataset.reader[index]
        try:
            img = source if isinstance(source, Image.Image) else Image.open(source)
            mode = self.dataset.input_img_mode
            if mode:
                img = img.convert(mode)  # decodes every pixel: a truncated file fails here, not in the transform
            else:
                img.load()
        finally:
            if hasattr(source, 'close') and not isinstance(source, Image.Image):
                source.close()  # the pixels are in memory now; timm leaves the reader's file to the GC
        return img, target

    def read_error(self, index: int) -> Optional[str]:
        """Why sample ``index`` cannot be read (the decoder's message), or None when it can."""
        try:
            self._read(index)
        except UnidentifiedImageError:
            return 'not an image file PIL can identify'  # PIL's own message names the reader's file object
        except UNREADABLE_ERRORS as e:
            return str(e).strip() or type(e).__name__
        return None

    def __getitem__(self, index: int):
        transform = self.dataset.transform
        try:
            img, target = self._read(index)
        except UNREADABLE_ERRORS:
            blank = Image.new(self.dataset.input_img_mode or 'RGB', (PLACEHOLDER_SIZE, PLACEHOLDER_SIZE))
            return (transform(blank) if transform is not None else blank), unreadable_label(index)
        if target is None:
            raise ValueError(f'{self.filename(index)}: sample has no label (ReadableImageDataset needs labelled '
                             'samples: a negative label marks an unreadable image)')
        if transform is not None:
            img = transform(img)
        if self.dataset.target_transform is not None:
            target = self.dataset.target_transform(target)
        return img, target


def split_unreadable(x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """``(x, y, indices)``: the batch without its placeholders, and the dataset indices of those dropped.

    Meant for labels still on the host (before ``.to(device)``), where the check costs no device sync;
    a batch without placeholders comes back as the same tensors."""
    bad = y < 0
    if not bool(bad.any()):
        return x, y, []
    keep = ~bad
    return x[keep], y[keep], [unreadable_index(v) for v in y[bad].tolist()]


def unreadable_names(dataset: Any, indices: Sequence[int], absolute: bool = False) -> List[str]:
    """The file of each unreadable sample ``indices`` of ``dataset`` (relative to its root unless ``absolute``);
    ``#<index>`` for a dataset that cannot name its files."""
    filename = getattr(dataset, 'filename', None)
    if filename is None:
        return [f'#{i}' for i in indices]
    return [str(filename(i, absolute=absolute)) for i in indices]
