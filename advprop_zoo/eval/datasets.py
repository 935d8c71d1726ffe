"""Evaluation data: the folder layouts of ImageNet, ImageNet-C, ImageNet-A and Stylized-ImageNet,
their label spaces, and timm's loaders over them.

Every layout is an ImageFolder of WordNet-id folders, so labels are given by an explicit class map
(wnid -> index of the model's output) rather than by sorting whatever folders exist: a subset of
the 1000 classes then still gets the right ImageNet indices, and a folder that is not a class of the
dataset is an error instead of being silently dropped (timm's reader skips folders missing from a
class map). The class lists are timm's own (``timm/data/_info``), the same files timm's ImageNetInfo reads.

ImageNet-A has 200 of the 1000 classes: its labels are positions in its own sorted wnid list, and the
1000-way logits are cut to those 200 columns, in that order (``LogitSubset``), before top-k.

Every loader reads through ``advprop_zoo.images.ReadableImageDataset``: an image that cannot be decoded
is excluded from the counts and named in the report, never replaced by another sample (timm's own
``ImageDataset`` substitutes the next image, which an evaluation would then count twice).
"""
import functools
import os
import pkgutil
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from timm.data import create_dataset, create_loader
from torch import nn

from ..errors import AdvPropZooError
from ..images import ReadableImageDataset
from .imagenet_c import BENCHMARK_CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES

__all__ = [
    'DATASETS', 'EvalDataError', 'imagenet_synsets', 'imagenet_a_synsets', 'imagenet_a_indices', 'LogitSubset',
    'resolve_root', 'class_map_for', 'find_imagenet_c', 'create_eval_loader',
]

DATASETS = ('imagenet', 'imagenet-c', 'imagenet-a', 'stylized', 'folder')
_SPLITS = ('val', 'validation')  # a root that holds only these is searched one level down, as timm does


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


def resolve_root(data_dir: os.PathLike, dataset: str) -> Path:
    """The folder holding the class (or corruption) folders: ``data_dir``, or its ``val/`` when that is
    all it holds (``--data-dir imagenet/`` works like ``imagenet/val``)."""
    root = Path(data_dir)
    if not root.exists():
        raise EvalDataError(f'{dataset}: data dir {root} does not exist')
    if not root.is_dir():
        raise EvalDataError(f'{dataset}: data dir {root} is not a folder')
    subdirs = _subdirs(root)
    if dataset != 'imagenet-c':
        split = [d for d in subdirs if d in _SPLITS]
        if split and len(subdirs) <= 2 and all(d in _SPLITS or d == 'train' for d in subdirs):
            return root / split[0]
    return root


def _subdirs(root: Path) -> List[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))


def class_map_for(dataset: str, root: os.PathLike, num_classes: int) -> Dict[str, int]:
    """The class map (folder name -> label) for ``dataset`` under ``root``, after checking that every
    class folder belongs to the dataset and that the model's ``num_classes`` fits its label space."""
    root = Path(root)
    folders = _subdirs(root)
    if not folders:
        raise EvalDataError(f'{dataset}: {root} has no class folders (expected one folder per class'
                            f'{", named by WordNet id" if dataset != "folder" else ""})')
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


def create_eval_loader(
        root: os.PathLike,
        class_map: Mapping[str, int],
        data_config: Mapping[str, object],
        batch_size: int,
        device: torch.device,
        workers: int = 4,
        dataset_name: str = 'folder',
):
    """timm's dataset and eval loader over an ImageFolder ``root`` with explicit labels: transform from
    ``data_config`` (timm's ``resolve_data_config``: size, bicubic, crop_pct, mean/std), and on CUDA timm's
    prefetcher, which normalises on the GPU. The dataset is wrapped in ``ReadableImageDataset``: an
    unreadable image arrives as a placeholder with a negative label, which ``evaluate_accuracy`` excludes."""
    try:
        dataset = create_dataset('', root=str(root), split='validation', search_split=False,
                                 class_map=dict(class_map))
    except RuntimeError as e:
        if 'Found 0 images' in str(e):
            raise EvalDataError(f'{dataset_name}: no images in {root} (looked for .jpg, .jpeg, .png, .webp '
                                'files in its class folders)') from None
        raise
    dataset = ReadableImageDataset(dataset)
    cuda = device.type == 'cuda'
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=batch_size, is_training=False,
        use_prefetcher=cuda, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'),
        num_workers=workers, pin_memory=cuda, device=device, persistent_workers=False)

