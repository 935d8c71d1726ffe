"""Weight files: safetensors validation, atomic writes, safe loading and state-dict checks.

Everything that reads or writes weights goes through here so that a truncated file, a pickle with
code in it or a state dict of the wrong model fails once, early, with a message that names the file,
the key and both shapes, and so that a crash mid-write never leaves a file that loads but is wrong.
"""
import argparse
import hashlib
import json
import os
import pickle
import re
import struct
import sys
import tempfile
import threading
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Tuple, Union

import numpy as np
import timm
import torch
from huggingface_hub import constants as hf_constants, try_to_load_from_cache
from safetensors.torch import load_file, save_file
from timm.models import resolve_pretrained_cfg
from timm.models._builder import _resolve_pretrained_source  # timm's own resolution order
from timm.models._hub import _EXT_PRIORITY, _PREFERRED_FILES

from .errors import AdvPropZooError

__all__ = [
    'WeightsError', 'read_safetensors_header', 'check_weights_file', 'load_weights', 'save_weights', 'SafetensorsWriter',
    'atomic_write', 'check_output_path', 'sha256_file', 'check_state_dict', 'check_pretrained_source',
    'cached_weights_path', 'local_dir_weights', 'current_umask', 'classifier_size',
]

PathLike = Union[str, os.PathLike]
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_SAFETENSORS_ITEMSIZE = {'BOOL': 1, 'U8': 1, 'I8': 1, 'F8_E5M2': 1, 'F8_E4M3': 1, 'I16': 2, 'U16': 2, 'F16': 2,
                         'BF16': 2, 'F8_E8M0': 1, 'I32': 4, 'U32': 4, 'F32': 4, 'I64': 8, 'U64': 8, 'F64': 8}


class WeightsError(AdvPropZooError, RuntimeError):
    """A weight file or state dict that cannot be used, with the reason in one line."""


def read_safetensors_header(path: PathLike) -> Dict[str, Any]:
    """Parse and validate a safetensors header without reading tensor data.

    Checks what the format promises: a sane header length, valid JSON, dtype/shape/offset entries
    that tile the data section exactly, and a file exactly as long as the header says (so a
    truncated download or copy is caught before any tensor is used).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, 'rb') as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f'{path}: not a safetensors file ({size} bytes, too short for a header)')
        (n,) = struct.unpack('<Q', head)
        if n > _HEADER_LIMIT or n > size - 8:
            raise WeightsError(
                f'{path}: not a valid safetensors file (header length {n} does not fit a {size}-byte file; '
                f'truncated or not safetensors)')
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f'{path}: corrupt safetensors header ({e})') from None
    if not isinstance(header, dict):
        raise WeightsError(f'{path}: corrupt safetensors header (not a JSON object)')
    spans = []
    for key, entry in header.items():
        if key == '__metadata__':
            continue
        try:
            start, stop = entry['data_offsets']
            shape, dtype = list(entry['shape']), entry['dtype']
            ok = all(isinstance(v, int) and v >= 0 for v in [start, stop, *shape])
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise WeightsError(f'{path}: corrupt safetensors header entry for {key!r}')
        if dtype not in _SAFETENSORS_ITEMSIZE:
            raise WeightsError(f'{path}: tensor {key!r} has unknown dtype {dtype!r} in its safetensors header')
        nbytes = int(np.prod(shape, dtype=np.int64)) * _SAFETENSORS_ITEMSIZE[dtype]
        if stop - start != nbytes:
            raise WeightsError(f'{path}: corrupt safetensors header: {key!r} is {dtype} {tuple(shape)} ({nbytes} bytes) '
                               f'but its data offsets span {stop - start} bytes')
        spans.append((start, stop, key))
    end = 0
    for start, stop, key in sorted(spans):
        if start != end:
            raise WeightsError(f'{path}: corrupt safetensors header: the data of {key!r} starts at byte {start}, '
                               f'expected {end} (tensors overlap or leave a gap)')
        end = stop
    data = size - 8 - n
    if end != data:
        what = 'truncated' if end > data else 'has trailing bytes'
        raise WeightsError(f'{path}: {what}: header describes {end} bytes of tensor data, file holds {data}')
    return header


def check_weights_file(path: PathLike) -> Path:
    """Fail clearly if ``path`` is not a readable weights file; validate safetensors headers."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f'{path}: no such weights file')
    if not path.is_file():
        raise WeightsError(f'{path}: not a file')
    if path.suffix == '.safetensors':
        read_safetensors_header(path)
    return path


# what a timm train.py checkpoint (``*.pth.tar``, ``model_best.pth.tar``) holds beside tensors and plain values:
# its flags as an argparse.Namespace. Allowed for the load and nothing else; a Namespace holding anything
# but plain values still fails, on that value's class.
_TIMM_CHECKPOINT_GLOBALS = (argparse.Namespace,)
_STATE_KEYS = ('state_dict', 'model')  # timm's load_state_dict: the training weights
_EMA_KEYS = ('state_dict_ema', 'model_ema')  # ... and with use_ema, the EMA weights
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')  # DDP / torch.compile wrappers, as timm's clean_state_dict strips
_UNSUPPORTED_GLOBAL = re.compile(r'unsupported (?:global: )?GLOBAL ([\w.]+)', re.IGNORECASE)  # torch's two wordings
_UNPICKLER_ERROR = re.compile(r'WeightsUnpickler error: ([^\n]+)')


def _torch_load(path: Path, device: Union[str, torch.device]) -> Any:
    """``torch.load(weights_only=True)`` with exactly a timm train.py checkpoint's extra class allowed."""
    allow = getattr(torch.serialization, 'safe_globals', None)  # torch >= 2.5; older torch refuses the Namespace
    try:
        with allow(list(_TIMM_CHECKPOINT_GLOBALS)) if allow else nullcontext():
            return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        found = _UNSUPPORTED_GLOBAL.search(str(e))
        detail = _UNPICKLER_ERROR.search(str(e))
        what = (f'a {found.group(1)} object' if found
                else f'objects other than tensors ({detail.group(1).strip() if detail else _first_line(e)})')
        raise WeightsError(
            f'{path}: refused to unpickle: it holds {what}; only tensors, plain values and a timm train.py '
            "checkpoint's argparse.Namespace of plain values are loaded (weights_only=True); convert it to "
            'safetensors from a trusted environment') from None
    except (RuntimeError, EOFError) as e:
        raise WeightsError(f'{path}: unreadable torch checkpoint ({_first_line(e)})') from None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in re.sub(r'\x1b\[[0-9;]*m', '', str(e)).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def load_weights(
        path: PathLike,
        device: Union[str, torch.device] = 'cpu',
        use_ema: bool = False,
) -> Dict[str, torch.Tensor]:
    """Load a state dict from safetensors, or from a torch pickle with ``weights_only=True`` only.

    A pickle may be a bare state dict or a checkpoint dict holding one, as timm's ``train.py`` writes
    (``*.pth.tar``, ``model_best.pth.tar``: ``epoch``, ``arch``, ``state_dict``, maybe ``state_dict_ema``,
    ``optimizer``, ``amp_scaler``, ``metric``, ``version`` and ``args``, an ``argparse.Namespace``). The one
    class such a file holds beyond tensors and plain containers, ``argparse.Namespace``, is allowed for
    the load; anything else (another class, code to run) is refused before it is built, in one line
    naming the file and the class.

    Which weights, as timm's ``load_checkpoint``: ``state_dict`` (else ``model``) by default, the EMA
    weights (``state_dict_ema``, else ``model_ema``) with ``use_ema``. Unlike timm, ``use_ema`` on a file
    without EMA weights is an error rather than a silent fall back to the training weights. ``module.`` and
    ``_orig_mod.`` prefixes (DDP, torch.compile) are stripped.
    """
    path = check_weights_file(path)
    if path.suffix == '.safetensors':
        if use_ema:
            raise WeightsError(f'{path}: a safetensors file holds one state dict, no EMA weights to pick with '
                               'use_ema / --use-ema (pass the EMA weights file itself, e.g. model_ema.safetensors)')
        return load_file(str(path), device=str(device))
    obj = _torch_load(path, device)
    if isinstance(obj, dict):
        wanted = _EMA_KEYS if use_ema else _STATE_KEYS
        key = next((k for k in wanted if isinstance(obj.get(k), dict)), None)
        if key is not None:
            obj = obj[key]
        elif use_ema:
            raise WeightsError(f'{path}: no EMA weights ({" / ".join(_EMA_KEYS)}) to load with use_ema / --use-ema; '
                               'drop it to load the training weights')
        elif any(isinstance(obj.get(k), dict) for k in _EMA_KEYS):
            raise WeightsError(f'{path}: holds only EMA weights ({" / ".join(k for k in _EMA_KEYS if k in obj)}); '
                               'load them with use_ema=True / --use-ema')
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f'{path}: does not hold a state dict of tensors')
    return {_strip_wrappers(k): v for k, v in obj.items()}


def _strip_wrappers(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
    return key


@contextmanager
def atomic_write(path: PathLike, mode: str = 'wb') -> Iterator[Any]:
    """Write ``path`` through a temp file in the same folder, fsync it, then rename over the target,
    so readers see the old file or the complete new one, never a partial one."""
    path = check_output_path(path, overwrite=True, probe=False)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode) as f:  # by name, so f.name is the temp path for writers that need a path
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp (and writers that recreate the file by name) leave 0600: give it the umask's permissions
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_path(path: PathLike, overwrite: bool = False, probe: bool = True) -> Path:
    """Fail before the slow part, not after, if ``path`` cannot become an output file: it exists (unless
    ``overwrite``), it is a folder, its folder is missing or (``probe``) not writable. Every command that
    writes a file checks its target here first."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f'{path}: is a folder; name the output file')
    if path.exists() and not overwrite:
        raise WeightsError(f'{path}: output exists; pass --force (overwrite=True) to replace it')
    if not path.parent.is_dir():
        raise WeightsError(f'{path}: output folder {path.parent} does not exist')
    if probe:
        try:
            with tempfile.TemporaryFile(dir=path.parent):
                pass
        except OSError as e:
            raise WeightsError(f'{path}: cannot write to {path.parent} ({e.strerror or e})') from None
    return path


def current_umask() -> int:
    """The process's umask (files written through a temp file get the permissions a plain open would)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: PathLike, stop: Optional[threading.Event] = None) -> str:
    """Hex SHA-256 of a file (checkpoint manifests, provenance metadata). Read into one reused buffer:
    a fresh chunk per read is a fresh mapping to page-fault in (B8's 670 MB checkpoint: 0.59 s instead
    of 0.63..0.72 s). hashlib drops the GIL while hashing, so a thread can hash beside other work;
    ``stop`` set: give up early (for a result no longer wanted)."""
    h, buf = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, 'rb', buffering=0) as f:
        while (n := f.readinto(buf)) and not (stop is not None and stop.is_set()):
            h.update(view[:n])
    return h.hexdigest()


def save_weights(
        state_dict: Mapping[str, torch.Tensor],
        path: PathLike,
        metadata: Optional[Mapping[str, str]] = None,
) -> Path:
    """Save tensors as safetensors, atomically; shared storage and non-contiguous views are handled.
    safetensors streams the tensors' memory into the temp file, so no second copy of the weights is
    made (a B8 state dict is 350 MB)."""
    tensors = {}
    for key, value in state_dict.items():
        t = value.detach().to('cpu').contiguous()
        tensors[key] = t.clone() if _shares_storage(t) else t  # safetensors refuses shared storage
    with atomic_write(path) as f:
        save_file(tensors, f.name, metadata=dict(metadata) if metadata else None)
    return Path(path)


class SafetensorsWriter:
    """Write a safetensors file array by array, while the arrays are still being produced.

    For converters that read large weights piece by piece: each array goes to the file as soon as it
    exists, so the whole state dict is never held in memory, and the disk starts writing while later
    arrays are still being read (a helper thread asks the kernel to flush every ``flush_every`` bytes)
    instead of in one long fsync at the end. The layout (keys, numpy dtypes, shapes) is fixed up front
    because the header comes first; ``metadata`` may be set until the end (e.g. a source hash computed
    meanwhile) and must fit ``metadata_reserve`` bytes, which the header holds as trailing spaces, as
    the format allows.

    A context manager around ``write`` calls in layout order. On a clean exit the header is completed
    and the file fsynced and renamed over ``path`` (``atomic_write``); on an error, or if an array is
    missing, the temp file is removed and ``path`` is untouched. Once every array is written,
    ``temp_path`` is a complete safetensors file (metadata aside), for checks that must pass before it
    becomes ``path``.
    """
    _DTYPES = {'float32': 'F32', 'float16': 'F16', 'float64': 'F64', 'int64': 'I64', 'int32': 'I32'}

    def __init__(self, path: PathLike, layout: Iterable[Tuple[str, str, Tuple[int, ...]]],
                 metadata_reserve: int = 4096, flush_every: Optional[int] = None):
        self.path = Path(path)
        self.metadata: Dict[str, str] = {}
        self._layout, self._entries, offset = [], {}, 0
        for key, dtype, shape in layout:
            if dtype not in self._DTYPES:
                raise ValueError(f'{key}: dtype {dtype} is not one of {", ".join(self._DTYPES)}')
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            self._entries[key] = {'dtype': self._DTYPES[dtype], 'shape': list(shape),
                                  'data_offsets': [offset, offset + nbytes]}
            self._layout.append((key, dtype, tuple(shape)))
            offset += nbytes
        base = len(json.dumps(self._entries, separators=(',', ':'))) + len('"__metadata__":{},')
        self._header_len = -(-(base + metadata_reserve) // 8) * 8  # keeps the data 8-byte aligned
        # a flush per 1/16 of the data (4..64 MiB): the last fsync then waits for little, and a small
        # file is not left for the end in one piece (B0 conversion: 2.0x the read floor, was 2.7-3.3x)
        self._flush_every = flush_every or min(max(offset // 16, 4 << 20), 64 << 20)

    def __enter__(self) -> 'SafetensorsWriter':
        self._stack = ExitStack()
        self._file = self._stack.enter_context(atomic_write(self.path))
        self._temp = Path(self._file.name)
        self._file.write(struct.pack('<Q', self._header_len) + self._header())  # valid once the data is in
        self._next = self._unflushed = 0
        self._flush_wanted, self._closing = threading.Event(), False
        self._flusher = threading.Thread(target=self._flush_loop, daemon=True)
        self._flusher.start()
        return self

    def _flush_loop(self) -> None:
        while self._flush_wanted.wait() and not self._closing:
            self._flush_wanted.clear()
            os.fdatasync(self._file.fileno())  # releases the GIL: the disk writes while arrays are read

    def write(self, key: str, array: np.ndarray) -> None:
        """The next array of the layout, of its dtype and shape."""
        if self._next == len(self._layout):
            raise WeightsError(f'{self.path}: {key!r} written after the last array of the layout')
        want = self._layout[self._next]
        if (key, array.dtype.name, tuple(array.shape)) != want:
            raise WeightsError(f'{self.path}: expected {want[0]!r} {want[1]} {want[2]} next, '
                               f'got {key!r} {array.dtype.name} {tuple(array.shape)}')
        array = np.ascontiguousarray(array)
        self._file.write(memoryview(array.reshape(-1)).cast('B'))
        self._next += 1
        self._unflushed += array.nbytes
        if self._unflushed >= self._flush_every:
            self._file.flush()
            self._unflushed = 0
            self._flush_wanted.set()

    @property
    def temp_path(self) -> Path:
        """The temp file, complete and flushed, before it is renamed into place (for checks on it)."""
        self._check_complete()
        self._file.flush()
        return self._temp

    def _check_complete(self) -> None:
        if self._next != len(self._layout):
            raise WeightsError(f'{self.path}: only {self._next} of {len(self._layout)} arrays were written')

    def _header(self) -> bytes:
        header = dict(self._entries)
        if self.metadata:
            header['__metadata__'] = {str(k): str(v) for k, v in self.metadata.items()}
        text = json.dumps(header, separators=(',', ':')).encode()
        if len(text) > self._header_len:
            raise WeightsError(f'{self.path}: metadata {len(text) - self._header_len} bytes over its reserve')
        return text + b' ' * (self._header_len - len(text))

    def _finish(self) -> None:
        self._check_complete()
        self._file.seek(8)
        self._file.write(self._header())

    def __exit__(self, *exc) -> bool:
        self._closing = True
        self._flush_wanted.set()
        self._flusher.join()
        if exc[0] is None:
            try:
                self._finish()
            except BaseException:
                self._stack.__exit__(*sys.exc_info())  # removes the temp file
                raise
        return self._stack.__exit__(*exc)  # clean: fsync + rename; error: temp file removed


def _shares_storage(t: torch.Tensor) -> bool:
    return t.numel() * t.element_size() != t.untyped_storage().nbytes()


def check_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        model: torch.nn.Module,
        ignore: Iterable[str] = (),
        allow_unexpected: bool = False,
) -> None:
    """Raise WeightsError for the first key whose shape does not fit ``model``, then for missing and
    (unless allowed) unexpected keys, each named with a count of the rest."""
    ignore = set(ignore)
    target = model.state_dict()
    for key, tensor in state_dict.items():
        if key in target and key not in ignore and tuple(tensor.shape) != tuple(target[key].shape):
            n = sum(1 for k, t in state_dict.items() if k in target and k not in ignore
                    and tuple(t.shape) != tuple(target[k].shape))
            raise WeightsError(
                f'shape mismatch for {key!r}: weights have {tuple(tensor.shape)}, model '
                f'{type(model).__name__} expects {tuple(target[key].shape)}' + _more(n))
    for key, tensor in state_dict.items():  # load_state_dict would cast an int tensor into a float one silently
        if key in target and key not in ignore and target[key].is_floating_point() and not tensor.is_floating_point():
            raise WeightsError(f'{key!r} holds {str(tensor.dtype).replace("torch.", "")} values; the model\'s '
                               f'{str(target[key].dtype).replace("torch.", "")} tensor needs floating-point weights')
    missing = [k for k in target if k not in state_dict and k not in ignore]
    if missing:
        raise WeightsError(f'weights lack {missing[0]!r} that the model expects' + _more(len(missing)))
    unexpected = [k for k in state_dict if k not in target and k not in ignore]
    if unexpected and not allow_unexpected:
        raise WeightsError(f'weights hold {unexpected[0]!r} that the model does not have' + _more(len(unexpected)))


def classifier_size(state_dict: Mapping[str, torch.Tensor], model_name: str) -> Optional[int]:
    """The number of classes ``state_dict``'s classifier has, its name taken from ``model_name``'s own config
    (``pretrained_cfg['classifier']``); None where the weights hold no such head."""
    with torch.device('meta'):  # the config without allocating the model
        head = timm.create_model(model_name).pretrained_cfg.get('classifier')
    weight = state_dict.get(f'{head}.weight') if isinstance(head, str) else None
    return int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else None


def _more(n: int) -> str:
    return f' ({n - 1} more like it)' if n > 1 else ''


def cached_weights_path(hf_hub_id: str, filename: str = 'model.safetensors',
                        cache_dir: Optional[PathLike] = None) -> Optional[Path]:
    """Path of a Hub file in the local huggingface_hub cache, or None; never touches the network."""
    repo_id, _, revision = hf_hub_id.partition('@')
    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision or None)
    return Path(found) if isinstance(found, str) else None


def _check_local_weights(path: Path) -> None:
    check_weights_file(path)
    if path.suffix != '.safetensors':
        load_weights(path)  # a pickle: prove it unpickles with weights_only=True before timm touches it


def local_dir_weights(folder: Path) -> Optional[Path]:
    """The file timm's ``local-dir:`` loader will pick, in timm's own preference order."""
    for name in _PREFERRED_FILES:
        if (folder / name).is_file():
            return folder / name
    for ext in _EXT_PRIORITY:
        files = sorted(folder.glob(f'*{ext}'))
        if files:
            return files[0]
    return None


def _hub_filename(cfg: Mapping[str, Any]) -> str:
    return cfg.get('hf_hub_filename') or 'model.safetensors'


def check_pretrained_source(
        model_name: str,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        cache_dir: Optional[PathLike] = None,
) -> Tuple[str, Any]:
    """Resolve where timm will load ``model_name``'s pretrained weights from, and fail clearly now if
    they cannot be had: a missing or truncated local file, an empty ``local-dir:`` folder, or Hub
    weights that are not in the cache while ``HF_HUB_OFFLINE`` is set.
    Returns timm's ``(source, location)``."""

    cfg = resolve_pretrained_cfg(model_name, pretrained_cfg=pretrained_cfg,
                                 pretrained_cfg_overlay=pretrained_cfg_overlay).to_dict()
    source, loc = _resolve_pretrained_source(cfg)
    how = (f"supply a local file with timm.create_model({model_name!r}, pretrained=True, "
           f"pretrained_cfg_overlay=dict(file='/path/to/model.safetensors'))")
    if source == 'file':
        _check_local_weights(Path(loc))
    elif source == 'local-dir':
        folder = Path(loc)
        if not folder.is_dir():
            raise WeightsError(f'{folder}: local-dir weights folder does not exist')
        found = local_dir_weights(folder)
        if found is None:
            raise WeightsError(f'{folder}: no weights file (model.safetensors) in local-dir folder')
        _check_local_weights(found)
    elif source == 'hf-hub':
        repo = loc[0] if isinstance(loc, (tuple, list)) else loc
        filename = _hub_filename(cfg)
        cached = cached_weights_path(repo, filename, cache_dir=cache_dir or None)
        if cached is not None:
            check_weights_file(cached)
        elif hf_constants.HF_HUB_OFFLINE:
            where = cache_dir or hf_constants.HF_HUB_CACHE
            raise WeightsError(
                f'{model_name}: pretrained weights {repo}/{filename} are not in the Hugging Face cache ({where}) '
                f'and HF_HUB_OFFLINE is set; download them once online, or {how}')
    elif source == '':
        raise WeightsError(f'{model_name}: this pretrained config names no weights (no hf_hub_id, url or file); {how}')
    return source, loc
