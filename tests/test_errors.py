"""The one error boundary of every console entry point: one line, exit 1, tracebacks only on request."""
import errno

import pytest

from advprop_zoo import WeightsError
from advprop_zoo.errors import DEBUG_ENV, AdvPropZooError, describe_error, run_command
from conftest import cli_fails


def _fail(exc):
    def body():
        raise exc
    return body


@pytest.mark.parametrize('exc, line', [
    (WeightsError('w.safetensors: truncated'), 'prog: error: w.safetensors: truncated'),
    (ValueError('--batch-size must be >= 1'), 'prog: error: --batch-size must be >= 1'),
    (PermissionError(errno.EACCES, 'Permission denied', '/runs/x'), 'prog: error: /runs/x: Permission denied'),
    (OSError(errno.EROFS, 'Read-only file system', '/ro/out.safetensors'),
     'prog: error: /ro/out.safetensors: read-only file system'),
    (OSError(errno.ENOSPC, 'No space left on device', '/full/ckpt'), 'prog: error: /full/ckpt: no space left on device'),
    (IsADirectoryError(errno.EISDIR, 'Is a directory', 'out'), 'prog: error: out: Is a directory'),
    (OSError(errno.EXDEV, 'Invalid cross-device link', 'a', None, 'b'), 'prog: error: a -> b: Invalid cross-device link'),
])
def test_one_line_and_exit_1(capsys, exc, line):
    assert run_command('prog', _fail(exc)) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == line and captured.out == ''


def test_bugs_keep_their_traceback():
    with pytest.raises(KeyError):
        run_command('prog', _fail(KeyError('a bug')))


def test_debug_switch_shows_the_traceback(monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, '1')
    with pytest.raises(WeightsError):
        run_command('prog', _fail(WeightsError('x')))


def test_every_project_error_is_one(tmp_path):
    from advprop_zoo import ExportError, UnknownModelError
    from advprop_zoo.eval.datasets import EvalDataError
    assert all(issubclass(c, AdvPropZooError) for c in (WeightsError, ExportError, UnknownModelError, EvalDataError))
    assert describe_error(WeightsError('first\nsecond')) == 'first'


def test_cli_output_that_is_a_folder(capsys, tmp_path):
    (tmp_path / 'out.safetensors').mkdir()
    cli_fails(capsys, ['fold', str(tmp_path / 'missing.safetensors'), str(tmp_path / 'out.safetensors'),
                       '--model', 'efficientnet_b0_advprop'], 'is a folder')


def _dual_file(tmp_path):
    import timm
    from advprop_zoo import save_weights, to_dual_bn
    return save_weights(to_dual_bn(timm.create_model('efficientnet_b0_advprop', num_classes=10)).state_dict(),
                        tmp_path / 'dual.safetensors')


def test_read_only_output_folder_is_found_before_any_work(capsys, tmp_path, monkeypatch):
    """As root a chmod'ed folder stays writable, so the OS's answer is simulated where the probe asks it."""
    import tempfile

    import advprop_zoo.weights as weights
    src = _dual_file(tmp_path)
    (tmp_path / 'ro').mkdir()

    def read_only(*a, **k):
        raise OSError(errno.EROFS, 'Read-only file system', str(tmp_path / 'ro'))
    monkeypatch.setattr(weights.tempfile, 'TemporaryFile', read_only)
    line = cli_fails(capsys, ['fold', str(src), str(tmp_path / 'ro' / 'out.safetensors'), '--model',
                              'efficientnet_b0_advprop'], 'cannot write to', 'ro')
    assert 'Traceback' not in line and not list((tmp_path / 'ro').iterdir())
    monkeypatch.setattr(weights.tempfile, 'TemporaryFile', tempfile.TemporaryFile)


def test_disk_full_mid_write_leaves_nothing(capsys, tmp_path, monkeypatch):
    import advprop_zoo.weights as weights
    src = _dual_file(tmp_path)

    def full(tensors, filename, metadata=None):
        with open(filename, 'wb') as f:
            f.write(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device', filename)
    monkeypatch.setattr(weights, 'save_file', full)
    out = tmp_path / 'out.safetensors'
    line = cli_fails(capsys, ['fold', str(src), str(out), '--model', 'efficientnet_b0_advprop'],
                     'no space left on device')
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ['dual.safetensors'], line
