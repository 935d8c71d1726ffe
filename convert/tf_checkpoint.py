"""Finding and reading TF checkpoints: a release tarball, an extracted folder or a checkpoint prefix.

Reading goes through TF's own checkpoint reader, so every format detail TF knows (sharding, dtypes,
checksums) is TF's problem, not ours. Tarballs come from the internet: they are unpacked into a temp
dir that is removed on every exit path, and any member that is a link, a device or a path that would
land outside that dir (absolute, or climbing with ``..``) stops the unpacking.
"""
import os
import re
import tarfile
import tempfile
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Dict, Iterator, List, Tuple, Union

import numpy as np

from advprop_zoo.weights import WeightsError, sha256_file

__all__ = [
    'EMA_SUFFIX', 'TARBALL_SUFFIXES', 'Checkpoint', 'is_tarball', 'safe_extract', 'resolve_prefix',
    'open_checkpoint', 'is_bookkeeping',
]

PathLike = Union[str, os.PathLike]
EMA_SUFFIX = '/ExponentialMovingAverage'
TARBALL_SUFFIXES = ('.tar.gz', '.tgz', '.tar')
# optimizer slot variables (RMSProp in the release; the others for checkpoints trained elsewhere) and
# the step counter: training state, never weights
_SLOT = re.compile(r'/(RMSProp|Momentum|Adam|Adagrad|Adadelta|Ftrl|LARS|LAMB|AdamW)(_\d+)?$', re.IGNORECASE)
_BOOKKEEPING = {'global_step'}


def is_bookkeeping(name: str) -> bool:
    """True for optimizer slots and ``global_step``: ignored by rule, never reported as unexpected."""
    return name in _BOOKKEEPING or bool(_SLOT.search(name))


def is_tarball(path: PathLike) -> bool:
    return str(path).endswith(TARBALL_SUFFIXES)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _check_member(m: tarfile.TarInfo, tarball: Path) -> None:
    name = m.name
    if m.issym() or m.islnk():
        raise WeightsError(f'{tarball}: refused: member {name!r} is a link (to {m.linkname!r})')
    if not (m.isfile() or m.isdir()):
        raise WeightsError(f'{tarball}: refused: member {name!r} is a device, fifo or other special file')
    p = PurePosixPath(name.replace('\\', '/'))
    if p.is_absolute() or re.match(r'^[A-Za-z]:', name):
        raise WeightsError(f'{tarball}: refused: member {name!r} has an absolute path')
    if '..' in p.parts:
        raise WeightsError(f'{tarball}: refused: member {name!r} climbs out with ..')


def safe_extract(tarball: PathLike, dest: PathLike) -> None:
    """Unpack ``tarball`` into ``dest`` in one streaming pass, checking each member before it is
    written; Python's 'data' filter checks again. The caller owns (and removes) ``dest``."""
    tarball = Path(tarball)
    try:
        with tarfile.open(tarball, 'r|*') as tar:
            for member in tar:
                _check_member(member, tarball)
                tar.extract(member, dest, filter='data')
    except WeightsError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise WeightsError(f'{tarball}: cannot unpack ({_first_line(e)}); truncated or not a tarball') from None


def _indexes(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob('*.index') if p.is_file())


def _prefix_from_state_file(indexes: List[Path]) -> List[Path]:
    """Prefixes named by ``checkpoint`` state files (``model_checkpoint_path: "..."``) next to the indexes."""
    named = []
    for folder in sorted({p.parent for p in indexes}):
        state = folder / 'checkpoint'
        if state.is_file():
            m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', state.read_text(errors='replace'), re.MULTILINE)
            if m:
                prefix = folder / PurePosixPath(m.group(1)).name  # the training machine's path is not ours
                if Path(f'{prefix}.index') in indexes:
                    named.append(prefix)
    return named


def resolve_prefix(path: PathLike) -> Path:
    """The checkpoint prefix (``PREFIX.index`` + ``PREFIX.data-*``) that ``path`` names: a folder with
    one checkpoint (or a ``checkpoint`` state file naming one), a prefix, or one of its files."""
    path = Path(path)
    if path.is_dir():
        indexes = _indexes(path)
        if len(indexes) == 1:
            return Path(str(indexes[0])[:-len('.index')])
        if not indexes:
            raise WeightsError(f'{path}: no TF checkpoint in this folder (no *.index file)')
        named = _prefix_from_state_file(indexes)
        if len(named) == 1:
            return named[0]
        raise WeightsError(f'{path}: holds {len(indexes)} checkpoints ({", ".join(p.name for p in indexes[:3])}, ...); '
                           f'pass one prefix, e.g. {str(indexes[0])[:-len(".index")]}')
    prefix = re.sub(r'\.(index|meta|data-\d+-of-\d+)$', '', str(path))
    if not Path(prefix + '.index').is_file():
        what = 'no such file or folder' if not path.exists() else 'not a tarball, folder or checkpoint prefix'
        raise WeightsError(f'{path}: {what}; missing checkpoint index {prefix}.index')
    return Path(prefix)


def _data_files(prefix: Path) -> List[Path]:
    files = sorted(prefix.parent.glob(f'{prefix.name}.data-*-of-*'))
    if not files:
        raise WeightsError(f'{prefix}: checkpoint index without data file ({prefix.name}.data-00000-of-00001 missing)')
    expected = int(files[0].name.rsplit('-of-', 1)[1])
    if len(files) != expected:
        raise WeightsError(f'{prefix}: {len(files)} of {expected} data shards present')
    return files


@dataclass
class Checkpoint:
    """An opened checkpoint: its prefix, TF's reader, and the variables' shapes and dtypes."""
    source: Path  # what the user named (tarball, folder or prefix)
    prefix: Path
    shapes: Dict[str, Tuple[int, ...]]
    dtypes: Dict[str, str]
    _reader: object = field(repr=False)
    _digests: Dict[str, str] = field(default_factory=dict, repr=False)
    _hasher: threading.Thread = field(default=None, repr=False)
    _hash_timing: Dict[str, float] = field(default_factory=dict, repr=False)

    def read(self, name: str) -> np.ndarray:
        """One variable as a numpy array; a truncated or corrupt data file fails here, in one line."""
        try:
            return self._reader.get_tensor(name)
        except Exception as e:  # TF raises its OpErrors, or ValueError/RuntimeError from pybind
            raise WeightsError(f'{self.source}: cannot read {name!r} ({_first_line(e)}); '
                               'the data file is truncated or corrupt') from None

    def source_sha256(self) -> Dict[str, str]:
        """sha256 of the files the user handed in (the tarball, else index and data files), by name."""
        if self._hasher is not None:
            self._hasher.join()
        return dict(self._digests)

    @property
    def hash_seconds(self) -> float:
        """Wall time the source hash took on its thread (0 until it is done)."""
        return self._hash_timing.get('seconds', 0.0)


def _open_reader(prefix: Path, label: Path):
    import tensorflow as tf
    try:
        reader = tf.train.load_checkpoint(str(prefix))
        shapes = {n: tuple(int(d) for d in s) for n, s in reader.get_variable_to_shape_map().items()}
        dtypes = {n: d.name for n, d in reader.get_variable_to_dtype_map().items()}
    except Exception as e:
        raise WeightsError(f'{label}: not a readable TF checkpoint ({_first_line(e)})') from None
    return reader, shapes, dtypes


@contextmanager
def open_checkpoint(path: PathLike) -> Iterator[Checkpoint]:
    """Open a tarball, folder or prefix for reading; a tarball's temp dir is removed on exit, always.
    Hashing the source starts in a background thread right away."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix='advprop-zoo-tf-') as tmp:
        if is_tarball(path):
            if not path.is_file():
                raise WeightsError(f'{path}: no such tarball')
            hashed = [path]
            safe_extract(path, tmp)
            try:
                prefix = resolve_prefix(tmp)
                data = _data_files(prefix)
            except WeightsError as e:  # name the tarball the user gave, not the temp dir it went into
                said = str(e).replace(f'{tmp}/', f'{path}:').replace(tmp, str(path))
                raise WeightsError(said.replace('in this folder', 'in this tarball')) from None
        else:
            prefix = resolve_prefix(path)
            data = _data_files(prefix)
            hashed = [Path(f'{prefix}.index')] + data
        digests: Dict[str, str] = {}
        timing: Dict[str, float] = {}
        stop = threading.Event()

        def hash_all() -> None:
            start = time.perf_counter()
            for f in hashed:
                digests[f.name] = sha256_file(f, stop)
            timing['seconds'] = time.perf_counter() - start

        hasher = threading.Thread(target=hash_all, daemon=True)
        hasher.start()
        try:
            reader, shapes, dtypes = _open_reader(prefix, path)
            yield Checkpoint(path, prefix, shapes, dtypes, reader, digests, hasher, timing)
        finally:
            stop.set()  # done or failed: a digest still running is not wanted any more
            hasher.join()  # the temp dir may only go once nothing reads from it
