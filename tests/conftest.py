"""Test setup: never touch the network, never touch the user's Hugging Face cache."""
import os
import tempfile

# before huggingface_hub is imported anywhere: it reads these once, at import
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['HF_HOME'] = tempfile.mkdtemp(prefix='advprop-zoo-hf-home-')
os.environ.pop('HF_HUB_CACHE', None)
os.environ.pop('HF_TOKEN', None)
# One intra-op thread, also for the subprocesses tests start (torchrun, kill -9): on a small machine
# OpenMP threads spinning against other processes make small forwards 10-30x slower, and no result
# depends on the thread count.
os.environ.setdefault('OMP_NUM_THREADS', '1')

import hashlib  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import advprop_zoo  # noqa: E402,F401  registers the models

torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))

REFERENCE = Path(__file__).resolve().parents[1].parent / 'shared' / 'reference'


@pytest.fixture(scope='session')
def reference():
    """../shared/reference/efficientnet_advprop.json: the facts the configs are checked against."""
    with open(REFERENCE / 'efficientnet_advprop.json') as f:
        return json.load(f)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache in a temp dir; returns a function that adds a repo file to it the
    way huggingface_hub lays them out (blobs/, snapshots/<commit>/, refs/main)."""
    from huggingface_hub import constants
    cache = tmp_path / 'hub'
    cache.mkdir()
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)

    def add(repo_id: str, filename: str, data: bytes) -> Path:
        repo = cache / ('models--' + repo_id.replace('/', '--'))
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        blob = repo / 'blobs' / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        snap = repo / 'snapshots' / commit / filename
        snap.parent.mkdir(parents=True, exist_ok=True)
        snap.symlink_to(os.path.relpath(blob, snap.parent))
        (repo / 'refs').mkdir(exist_ok=True)
        (repo / 'refs' / 'main').write_text(commit)
        return snap

    add.path = cache
    return add


def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict:
    """Random weights with BN statistics that are not the init values, so loading is observable."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            t = torch.randn(v.shape, generator=g) * 0.1
            if k.endswith('running_var'):
                t = t.abs() + 0.5
            out[k] = t
        else:
            out[k] = v.clone()
    return out


def cli_fails(capsys, argv, *expected) -> str:
    """Run ``advprop-zoo argv``: it must exit 1 with exactly one stderr line holding each ``expected`` text
    and print nothing on stdout; returns that line."""
    from advprop_zoo.cli import main
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == '', captured.err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]
