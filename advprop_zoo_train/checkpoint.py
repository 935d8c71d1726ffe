"""Training checkpoints that survive crashes: a folder per step, committed by one rename.

A checkpoint is ``checkpoints/step-00001234/`` holding ``model.safetensors`` (the training model,
auxiliary BNs included), ``ema.safetensors`` when an EMA is kept, ``state.pt`` (optimizer, scheduler,
AMP scaler, sampler position, every RNG state, the log so far: tensors and plain Python only, so it
loads with ``torch.load(..., weights_only=True)``) and ``manifest.json`` (what the run was, and the size
and SHA-256 of every file). Everything is written and fsynced in a hidden temp folder first, and the
folder is renamed into place last: a run killed at any instant leaves either a complete checkpoint
or none, and the checksums catch one damaged afterwards. Old checkpoints beyond ``keep`` are removed
only after the new one is in place.
"""
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from advprop_zoo.errors import AdvPropZooError
from advprop_zoo.weights import check_state_dict, load_weights, save_weights, sha256_file

__all__ = ['CheckpointError', 'save_checkpoint', 'verify_checkpoint', 'load_checkpoint', 'latest_checkpoint',
           'find_resumable', 'mark_diverged', 'rng_state', 'set_rng_state']

FORMAT = 1
_PREFIX = 'step-'
_DIVERGED = 'diverged-'  # a checkpoint whose weights made the next step's loss non-finite: never resumed by auto
_REQUIRED = ('model.safetensors', 'state.pt')


class CheckpointError(AdvPropZooError, RuntimeError):
    """A checkpoint that cannot be resumed from, with the reason in one line."""


def rng_state() -> Dict[str, Any]:
    """Every RNG the run draws from, as tensors and plain Python (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        'python': list(_to_list(random.getstate())),
        'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype('int64')), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'gauss': float(gauss)},
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``rng_state`` recorded (CUDA's only where this process has CUDA)."""
    random.setstate(_to_tuple(state['python']))
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype('uint32'), n['pos'], n['has_gauss'], n['gauss']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _to_list(x):
    return [_to_list(v) for v in x] if isinstance(x, tuple) else x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
        folder: Path,
        step: int,
        model_state: Mapping[str, torch.Tensor],
        state: Dict[str, Any],
        identity: Dict[str, Any],
        ema_state: Optional[Mapping[str, torch.Tensor]] = None,
        keep: int = 3,
) -> Path:
    """Write checkpoint ``step`` under ``folder`` atomically and prune to the newest ``keep``.

    ``identity`` (model, mode, number of classes ...) is stored in the manifest and checked on resume.
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f'{_PREFIX}{step:08d}'
    tmp = Path(tempfile.mkdtemp(prefix=f'.{final.name}.', suffix='.tmp', dir=folder))
    try:
        save_weights(model_state, tmp / 'model.safetensors')
        if ema_state is not None:
            save_weights(ema_state, tmp / 'ema.safetensors')
        with open(tmp / 'state.pt', 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        files = {p.name: {'bytes': p.stat().st_size, 'sha256': sha256_file(p)} for p in sorted(tmp.iterdir())}
        manifest = {'format': FORMAT, 'step': step, 'identity': identity, 'files': files}
        with open(tmp / 'manifest.json', 'w') as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again (e.g. end of run right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoints(folder: Path) -> List[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The newest complete checkpoint in ``folder`` (leftover temp folders of a killed run are removed)."""
    if folder.is_dir():
        for tmp in folder.glob(f'.{_PREFIX}*.tmp'):
            shutil.rmtree(tmp, ignore_errors=True)
    done = [p for p in _checkpoints(folder) if (p / 'manifest.json').is_file()]
    return done[-1] if done else None


def verify_checkpoint(path: Path) -> Dict[str, Any]:
    """The manifest of checkpoint ``path`` once every file it lists is there with its size and checksum;
    CheckpointError naming the folder or file and the problem otherwise (a damaged manifest included)."""
    path = Path(path)
    manifest_path = path / 'manifest.json'
    if not path.is_dir():
        raise CheckpointError(f'{path}: no such checkpoint folder')
    if not manifest_path.is_file():
        raise CheckpointError(f'{path}: not a complete checkpoint (no manifest.json)')
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f'{manifest_path}: corrupt ({e})') from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f'{manifest_path}: corrupt (not a JSON object)')
    if manifest.get('format') != FORMAT:
        raise CheckpointError(f'{path}: checkpoint format {manifest.get("format")!r}, this version reads {FORMAT}')
    files, identity, step = manifest.get('files'), manifest.get('identity'), manifest.get('step')
    if not (isinstance(files, dict) and isinstance(identity, dict) and isinstance(step, int)):
        raise CheckpointError(f'{manifest_path}: corrupt (files, identity or step missing or of the wrong type)')
    for name in _REQUIRED:
        if name not in files:
            raise CheckpointError(f'{manifest_path}: lists no {name}')
    for name, info in files.items():
        if not (isinstance(name, str) and name == Path(name).name and not name.startswith('.')
                and isinstance(info, dict) and isinstance(info.get('bytes'), int)
                and isinstance(info.get('sha256'), str)):
            raise CheckpointError(f'{manifest_path}: corrupt entry for {name!r}')
        f = path / name
        if not f.is_file():
            raise CheckpointError(f'{path}: {name} is missing')
        if f.stat().st_size != info['bytes']:
            raise CheckpointError(f'{f}: {f.stat().st_size} bytes, manifest says {info["bytes"]} (truncated?)')
        if sha256_file(f) != info['sha256']:
            raise CheckpointError(f'{f}: checksum mismatch, the file is damaged')
    return manifest


def find_resumable(folder: Path) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """``--resume auto``: the newest checkpoint in ``folder`` that verifies, and the newer ones skipped
    with the reason each failed. ``(None, [])`` when the folder holds no checkpoint yet."""
    latest_checkpoint(folder)  # removes leftover temp folders of a killed run
    skipped = []
    for path in reversed(_checkpoints(folder)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            skipped.append((path, str(e)))
            continue
        return path, skipped
    return None, skipped


def mark_diverged(path: Path) -> Path:
    """Rename checkpoint ``path`` so that ``--resume auto`` never picks it again; nothing is deleted."""
    target = path.with_name(_DIVERGED + path.name)
    os.replace(path, target)
    return target


def load_checkpoint(path: Path, identity: Dict[str, Any], model: torch.nn.Module) -> Dict[str, Any]:
    """Verify and load checkpoint ``path`` for a run described by ``identity`` and ``model``.

    Returns ``{'model': state dict, 'ema': state dict or None, 'state': ..., 'step': int}``. Raises
    CheckpointError before anything is changed if the folder is incomplete, a file is missing, has the
    wrong size or checksum, or the checkpoint belongs to another model / mode / class count."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    files = manifest['files']
    mismatch = {k: (manifest['identity'].get(k), v) for k, v in identity.items() if manifest['identity'].get(k) != v}
    if mismatch:
        key, (had, want) = next(iter(mismatch.items()))
        raise CheckpointError(f'{path}: checkpoint has {key}={had!r}, this run has {key}={want!r}')
    try:
        model_state = load_weights(path / 'model.safetensors')
        check_state_dict(model_state, model)
    except AdvPropZooError as e:
        raise CheckpointError(f'{path}: {e}') from None
    try:
        state = torch.load(path / 'state.pt', map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(f'{path}: state.pt does not load with weights_only=True ({e})') from None
    if not isinstance(state, dict) or not {'step', 'epoch', 'batch', 'optimizer', 'scheduler', 'rng'} <= set(state):
        raise CheckpointError(f'{path}: state.pt does not hold a training state')
    ema = load_weights(path / 'ema.safetensors') if 'ema.safetensors' in files else None
    return {'model': model_state, 'ema': ema, 'state': state, 'step': manifest['step']}
