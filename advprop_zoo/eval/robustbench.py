"""RobustBench's ImageNet L-inf protocol (Croce et al., NeurIPS 2021 Datasets and Benchmarks): the fixed
5000-image list of ImageNet val, resize 256 / center-crop 224 (bilinear, ``Res256Crop224``), eps = 4/255,
standard AutoAttack, each model with its own normalisation inside the model.

The list ships with the ``robustbench`` package (``robustbench/helper_files/imagenet_test_image_ids.txt``,
lines like ``n09468604/ILSVRC2012_val_00015253.JPEG``, in the order RobustBench evaluates and truncates to
``n_examples``). robustbench pins an older timm than this project needs, so it is never a dependency: the
list is read from an installed copy (``pip install --no-deps robustbench``), located with
``importlib.util.find_spec`` without importing robustbench (whose ``__init__`` imports its model zoo), or from
a file given with ``--robustbench-list``.
"""
import importlib.util
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .datasets import EvalDataError

__all__ = ['PROTOCOLS', 'ROBUSTBENCH_EPS', 'ROBUSTBENCH_VERSION', 'ROBUSTBENCH_DATA_CONFIG', 'ROBUSTBENCH_LIST',
           'robustbench_list_path', 'read_image_list', 'match_listed']

PROTOCOLS = ('robustbench',)
ROBUSTBENCH_EPS = 4.0  # pixel units: 4/255
ROBUSTBENCH_VERSION = 'standard'
# Res256Crop224 as timm's eval transform: Resize(224 / 0.875 = 256, bilinear) -> CenterCrop(224) -> ToTensor
ROBUSTBENCH_DATA_CONFIG = {'input_size': (3, 224, 224), 'crop_pct': 0.875, 'interpolation': 'bilinear',
                           'crop_mode': 'center'}
ROBUSTBENCH_LIST = ('helper_files', 'imagenet_test_image_ids.txt')
INSTALL_HINT = 'pip install --no-deps robustbench'


def robustbench_list_path(override: Optional[os.PathLike] = None) -> Path:
    """The 5000-image list file: ``override``, else the installed robustbench package's (found without
    importing it). One line when neither is there."""
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise EvalDataError(f'--robustbench-list {path}: no such file')
        return path
    try:
        spec = importlib.util.find_spec('robustbench')
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc).joinpath(*ROBUSTBENCH_LIST)
        if path.is_file():
            return path
    if spec is None:
        raise EvalDataError('--protocol robustbench reads its 5000-image list from the robustbench package, which is '
                            f'not installed: {INSTALL_HINT} (its timm pin conflicts with ours; --no-deps installs '
                            'only its files), or give the list with --robustbench-list FILE')
    raise EvalDataError(f'the installed robustbench package has no {"/".join(ROBUSTBENCH_LIST)}; reinstall it '
                        f'({INSTALL_HINT}) or give the list with --robustbench-list FILE')


def read_image_list(path: os.PathLike) -> List[str]:
    """The image names of a list file (``wnid/file.JPEG`` per line, RobustBench's format), in order; blank lines
    skipped. A file that lists nothing, or a line that is not ``folder/file``, fails in one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding='utf-8')
    except UnicodeDecodeError:
        raise EvalDataError(f'{path}: not a text file of image names') from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise EvalDataError(f'{path}: lists no images')
    for i, name in enumerate(names):
        parts = name.split('/')
        if len(parts) != 2 or not all(parts):
            raise EvalDataError(f'{path}: line {i + 1} {name!r} is not class-folder/file (e.g. '
                                'n09468604/ILSVRC2012_val_00015253.JPEG)')
    if len(set(names)) != len(names):
        raise EvalDataError(f'{path}: an image is listed twice')
    return names


def match_listed(files: Sequence[str], listed: Sequence[str], root: os.PathLike,
                 n_examples: Optional[int] = None) -> Tuple[List[int], List[str]]:
    """``(indices, missing)``: for the first ``n_examples`` listed images (all without it), in the list's order,
    the index of each in ``files`` (a dataset's files, relative to ``root``), and the listed names that are not
    there. None of them there is one line (EvalDataError)."""
    wanted = list(listed[:n_examples] if n_examples else listed)
    where: Dict[str, int] = {f.replace(os.sep, '/'): i for i, f in enumerate(files)}
    indices = [where[n] for n in wanted if n in where]
    missing = [n for n in wanted if n not in where]
    if not indices:
        raise EvalDataError(f'robustbench: none of the {len(wanted)} listed images is in {root} (e.g. {wanted[0]}); '
                            '--data-dir must be the ImageNet val folder with one folder per WordNet id')
    return indices, missing
