"""advprop-zoo train against bad input and faults: one line and exit 1, nothing left behind, --resume auto
past damaged checkpoints, non-finite stops that name a checkpoint which really resumes, flags that win on resume."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advprop_zoo_train import TrainingError, train
from advprop_zoo_train.checkpoint import latest_checkpoint, load_checkpoint
from advprop_zoo_train.main import main
from test_resume import RUN, _args, _identity, build_model_for
from test_train import _make_folder


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return _make_folder(tmp_path_factory.mktemp('data'), classes=3, train=8, val=4)


@pytest.fixture(scope='module')
def run_dir(folder, tmp_path_factory):
    """A run stopped after 4 steps, a checkpoint after each: step-00000002 ... step-00000004 kept."""
    out = tmp_path_factory.mktemp('run')
    train(_args(folder, out, '--checkpoint-every', '1', '--max-steps', '4'))
    return out


def _fails(capsys, argv, *expected):
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in captured.err, captured.err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_resume_from_a_missing_path_writes_nothing(capsys, folder, tmp_path):
    out = tmp_path / 'new-run'
    _fails(capsys, [*RUN, '--data-dir', str(folder), '--output', str(out), '--resume', str(tmp_path / 'nope')],
           'nope', 'no such checkpoint folder')
    assert not out.exists()


def test_resume_from_another_models_checkpoint(capsys, folder, run_dir, tmp_path):
    ckpt = latest_checkpoint(run_dir / 'checkpoints')
    argv = [*RUN, '--data-dir', str(folder), '--output', str(tmp_path / 'o'), '--resume', str(ckpt)]
    argv[argv.index('--mode') + 1] = 'vanilla'
    _fails(capsys, argv, str(ckpt), "mode='advprop'", "mode='vanilla'")


def _flip_byte(ckpt: Path):
    f = ckpt / 'model.safetensors'
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _truncate(ckpt: Path):
    f = ckpt / 'model.safetensors'
    f.write_bytes(f.read_bytes()[:1000])


def _cut_manifest(ckpt: Path):
    f = ckpt / 'manifest.json'
    f.write_text(f.read_text()[:40])


def _edit_size(ckpt: Path):
    f = ckpt / 'manifest.json'
    m = json.loads(f.read_text())
    m['files']['state.pt']['bytes'] += 1
    f.write_text(json.dumps(m))


def _bad_entry(ckpt: Path):
    f = ckpt / 'manifest.json'
    m = json.loads(f.read_text())
    m['files']['model.safetensors'] = 'not an entry'
    f.write_text(json.dumps(m))


DAMAGE = {'flipped byte': (_flip_byte, 'checksum mismatch'), 'truncated weights': (_truncate, 'truncated'),
          'manifest cut short': (_cut_manifest, 'corrupt'), 'size edited': (_edit_size, 'manifest says'),
          'entry not an object': (_bad_entry, 'corrupt entry')}


@pytest.mark.parametrize('damage', DAMAGE)
def test_damaged_checkpoint_named_on_resume_is_one_line(capsys, folder, run_dir, tmp_path, damage):
    run = _copy_run(run_dir, tmp_path / 'run')
    newest = latest_checkpoint(run / 'checkpoints')
    hurt, expected = DAMAGE[damage]
    hurt(newest)
    _fails(capsys, [*RUN, '--data-dir', str(folder), '--output', str(run), '--resume', str(newest)],
           newest.name, expected)


@pytest.mark.parametrize('damage', ['flipped byte', 'manifest cut short'])
def test_resume_auto_falls_back_to_the_newest_that_verifies(capsys, folder, run_dir, tmp_path, damage):
    run = _copy_run(run_dir, tmp_path / 'run')
    newest = latest_checkpoint(run / 'checkpoints')
    DAMAGE[damage][0](newest)
    result = train(_args(folder, run, '--resume', 'auto', '--max-steps', '5'))
    out = capsys.readouterr().out
    assert f'skipped {newest.name}' in out and 'resumed from' in out and 'step-00000003' in out
    assert result.summary['steps'] == 5


def test_resume_auto_with_no_checkpoint_that_verifies_is_an_error(capsys, folder, run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / 'run')
    for ckpt in (run / 'checkpoints').iterdir():
        _flip_byte(ckpt)
    _fails(capsys, [*RUN, '--data-dir', str(folder), '--output', str(run), '--resume', 'auto'],
           'none of its 3 checkpoints verifies')


def test_output_that_is_a_file(capsys, folder, tmp_path):
    target = tmp_path / 'run'
    target.write_text('precious')
    _fails(capsys, [*RUN, '--data-dir', str(folder), '--output', str(target)], str(target), 'is a file')
    assert target.read_text() == 'precious'


@pytest.mark.parametrize('lr', ['1e30', '1e38'])
def test_exploding_lr_never_checkpoints_bad_weights_and_names_one_that_resumes(folder, tmp_path, lr):
    with pytest.raises(TrainingError, match='non-finite') as e:
        train(_args(folder, tmp_path, '--checkpoint-every', '1', '--lr', lr, '--warmup-epochs', '0'))
    message = str(e.value)
    for ckpt in (tmp_path / 'checkpoints').glob('step-*'):
        weights = load_file(str(ckpt / 'model.safetensors'))
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), ckpt
    if 'last good checkpoint: ' not in message:  # diverged at the first step: nothing was ever good
        assert 'no good checkpoint yet' in message and not list((tmp_path / 'checkpoints').glob('step-*'))
        return
    good = Path(message.split('last good checkpoint: ')[1].split(';')[0])
    load_checkpoint(good, _identity(), build_model_for(folder))
    resumed = train(_args(folder, tmp_path, '--resume', str(good), '--lr', '1e-3', '--max-steps',
                          str(int(good.name[-8:]) + 2)))
    assert resumed.summary['steps'] == int(good.name[-8:]) + 2


def test_flags_given_on_resume_override_the_saved_state(capsys, folder, run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / 'run')
    ckpt = latest_checkpoint(run / 'checkpoints')
    train(_args(folder, run, '--resume', str(ckpt), '--lr', '5e-4', '--clip-grad', '1', '--max-steps', '5'))
    out = capsys.readouterr().out
    assert '--lr 0.0005 (was 0.001)' in out and '--clip-grad 1.0 (was None)' in out and 'override' in out
    state = torch.load(latest_checkpoint(run / 'checkpoints') / 'state.pt', weights_only=True)
    assert [g['initial_lr'] for g in state['optimizer']['param_groups']] == [5e-4] * len(
        state['optimizer']['param_groups'])


def test_same_flags_on_resume_say_nothing(capsys, folder, run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / 'run')
    train(_args(folder, run, '--resume', 'auto', '--max-steps', '5'))
    assert 'override' not in capsys.readouterr().out


def test_resume_from_the_epochs_last_batch_stopped_in_validation(folder, tmp_path, monkeypatch):
    """Killed in validation after the checkpoint of the epoch's last batch: the resumed run trains no batch of
    that epoch, validates it and goes on (its epoch row has no train loss, instead of dividing by zero)."""
    import advprop_zoo_train.loop as loop
    out = tmp_path / 'run'
    real = loop.validate

    def killed(*a, **kw):
        raise KeyboardInterrupt  # the job stopped here

    monkeypatch.setattr(loop, 'validate', killed)
    with pytest.raises(KeyboardInterrupt):
        train(_args(folder, out, '--checkpoint-every', '1'))
    monkeypatch.setattr(loop, 'validate', real)
    steps = int(latest_checkpoint(out / 'checkpoints').name.split('-')[1])  # the epoch's last batch
    summary = train(_args(folder, out, '--checkpoint-every', '1', '--resume', 'auto')).summary
    assert summary['finished'] and summary['steps'] == 2 * steps
    rows = [line.split(',') for line in (out / 'log.csv').read_text().splitlines()]
    assert [r[0] for r in rows[1:]] == ['1', '2'] and rows[1][3] == '' and rows[2][3] != ''  # train_loss
