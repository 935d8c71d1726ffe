"""Checkpoints, bit-exact resume (also after kill -9), NaN stops, bad checkpoints on --resume."""
import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advprop_zoo_train import TrainingError, build_parser, train
from advprop_zoo_train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from test_train import _make_folder

ROOT = Path(__file__).resolve().parents[1]
# 24 train images, batch 8: 3 steps per epoch, 6 in all; dropout, random starts and random targets
# all draw from the RNGs, so a resume that restored anything wrongly would show
RUN = ['--model', 'test_efficientnet', '--input-size', '3', '32', '32', '--epochs', '2', '--batch-size', '8',
       '--opt', 'adamw', '--lr', '1e-3', '--sched', 'cosine', '--warmup-epochs', '0', '--workers', '0',
       '--scale', '0.5', '1.0', '--drop', '0.2', '--mode', 'advprop', '--attack-eps', '2',
       '--model-ema', '--model-ema-decay', '0.9', '--no-progress']


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return _make_folder(tmp_path_factory.mktemp('data'), classes=3, train=8, val=4)


def _args(folder, out, *extra):
    return build_parser().parse_args([*RUN, '--data-dir', str(folder), '--output', str(out), *extra])


@pytest.fixture(scope='module')
def reference(folder, tmp_path_factory):
    """One uninterrupted run."""
    out = tmp_path_factory.mktemp('ref')
    train(_args(folder, out))
    return out


def _same_run(a: Path, b: Path):
    for name in ('model.safetensors', 'model_ema.safetensors'):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f'{name}:{k}'
    ca, cb = latest_checkpoint(a / 'checkpoints'), latest_checkpoint(b / 'checkpoints')
    assert ca.name == cb.name == 'step-00000006'
    sa = torch.load(ca / 'state.pt', weights_only=True)
    sb = torch.load(cb / 'state.pt', weights_only=True)
    for pa, pb in zip(sa['optimizer']['state'].values(), sb['optimizer']['state'].values()):
        for k in pa:
            assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k]))
    assert torch.equal(sa['rng']['torch'], sb['rng']['torch'])
    assert [r['val_top1'] for r in sa['log']] == [r['val_top1'] for r in sb['log']]


def test_stop_and_resume_is_bit_exact(folder, reference, tmp_path):
    first = train(_args(folder, tmp_path, '--max-steps', '4'))  # stops mid epoch 2
    assert not first.summary['finished'] and first.summary['steps'] == 4
    assert not (tmp_path / 'model.safetensors').exists()  # no final weights for an unfinished run
    assert latest_checkpoint(tmp_path / 'checkpoints').name == 'step-00000004'
    done = train(_args(folder, tmp_path, '--resume', 'auto'))
    assert done.summary['finished'] and done.summary['steps'] == 6
    _same_run(reference, tmp_path)


def test_kill_9_mid_run_then_resume_is_bit_exact(folder, reference, tmp_path):
    cmd = [sys.executable, '-m', 'advprop_zoo_train', *RUN, '--data-dir', str(folder), '--output', str(tmp_path),
           '--checkpoint-every', '1']
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            ckpts = list((tmp_path / 'checkpoints').glob('step-*')) if (tmp_path / 'checkpoints').exists() else []
            if len(ckpts) >= 2:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
    assert not (tmp_path / 'model.safetensors').exists()
    killed_at = latest_checkpoint(tmp_path / 'checkpoints')
    assert killed_at is not None and killed_at.name < 'step-00000006'
    done = train(_args(folder, tmp_path, '--resume', 'auto', '--checkpoint-every', '1'))
    assert done.summary['finished']
    assert not list((tmp_path / 'checkpoints').glob('.*.tmp'))  # a half-written folder was cleaned up
    _same_run(reference, tmp_path)


def test_nan_stops_and_names_the_last_good_checkpoint(folder, tmp_path, monkeypatch):
    import advprop_zoo.modes as modes
    real, calls = modes.forward_loss, []

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) == 4:
            out.loss = out.loss + float('nan')
        return out
    monkeypatch.setattr(modes, 'forward_loss', poisoned)
    # step 3's checkpoint holds the weights the non-finite loss came from: not provably good, set aside
    with pytest.raises(TrainingError, match=r'step 4; .*last good checkpoint: .*step-00000002') as e:
        train(_args(folder, tmp_path, '--checkpoint-every', '1'))
    assert (tmp_path / 'checkpoints' / 'diverged-step-00000003').is_dir()
    good = Path(str(e.value).split('last good checkpoint: ')[1].split(';')[0])
    model = build_model_for(folder)
    ckpt = load_checkpoint(good, _identity(), model)
    assert all(torch.isfinite(t).all() for t in ckpt['model'].values() if t.is_floating_point())
    assert latest_checkpoint(tmp_path / 'checkpoints') == good  # nothing written after the NaN


def test_nan_gradient_is_caught(folder, tmp_path, monkeypatch):
    import advprop_zoo.modes as modes
    real = modes.forward_loss

    def poisoned(model, *a, **k):
        out = real(model, *a, **k)
        first = next(p for p in model.parameters())
        first.register_hook(lambda g: g * float('inf'))
        return out
    monkeypatch.setattr(modes, 'forward_loss', poisoned)
    with pytest.raises(TrainingError, match='non-finite gradient norm .* step 1'):
        train(_args(folder, tmp_path))


def build_model_for(folder):
    import timm
    from advprop_zoo.dual_bn import to_dual_bn
    return to_dual_bn(timm.create_model('test_efficientnet', num_classes=3))


def _identity():
    return {'model': 'test_efficientnet', 'mode': 'advprop', 'num_classes': 3, 'batch_size': 8, 'world_size': 1,
            'seed': 0}


def _tree_hash(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob('*')) if p.is_file()}


@pytest.mark.parametrize('damage, match', [
    ('truncate', r'bytes, manifest says \d+ \(truncated'),
    ('flip', 'checksum mismatch'),
    ('manifest', 'not a complete checkpoint'),
    ('model', "checkpoint has model='test_efficientnet'"),
    ('missing', 'no such checkpoint folder'),
])
def test_bad_checkpoint_on_resume(folder, reference, tmp_path, damage, match):
    import shutil
    run = tmp_path / 'run'
    shutil.copytree(reference, run)
    ckpt = latest_checkpoint(run / 'checkpoints')
    extra = ['--resume', str(ckpt)]
    if damage == 'truncate':
        data = (ckpt / 'model.safetensors').read_bytes()
        (ckpt / 'model.safetensors').write_bytes(data[:len(data) // 2])
    elif damage == 'flip':
        data = bytearray((ckpt / 'state.pt').read_bytes())
        data[len(data) // 2] ^= 0xFF
        (ckpt / 'state.pt').write_bytes(bytes(data))
    elif damage == 'manifest':
        (ckpt / 'manifest.json').unlink()
    elif damage == 'model':
        extra += ['--model', 'efficientnet_b0_advprop']
    elif damage == 'missing':
        extra = ['--resume', str(run / 'checkpoints' / 'step-99999999')]
    before = _tree_hash(run)
    with pytest.raises(CheckpointError, match=match):
        train(_args(folder, run, *extra))
    assert _tree_hash(run) == before  # nothing overwritten, nothing added
