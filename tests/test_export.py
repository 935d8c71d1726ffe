"""`advprop-zoo export`: the folded, fused model as ONNX / TorchScript, checked against the plain timm model."""
import contextlib
import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch

import advprop_zoo.export
from advprop_zoo import fold_state_dict, save_weights, to_dual_bn
from advprop_zoo.cli import main
from conftest import cli_fails
from advprop_zoo.export import check_inputs

ARCH = 'efficientnet_b0_advprop'
SIZE = (3, 64, 80)  # non-square: catches H / W mix-ups in the static padding


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A dual-BN B0 checkpoint (10 classes) with non-trivial BN statistics in both branches."""
    torch.manual_seed(0)
    dual = to_dual_bn(timm.create_model(ARCH, num_classes=10))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in dual.state_dict().items():
            n = t.shape[0] if t.dim() else 0
            if name.endswith('running_mean'):
                t.copy_(torch.randn(n, generator=g) * 0.1)
            elif name.endswith('running_var'):
                t.copy_(torch.rand(n, generator=g) + 0.5)
            elif ('bn' in name or 'aux_bn' in name) and name.endswith('weight'):
                t.copy_(torch.rand(n, generator=g) + 0.5)
    path = tmp_path_factory.mktemp('export') / 'dual.safetensors'
    save_weights(dual.state_dict(), path)
    return path


@pytest.fixture(scope='module')
def reference(checkpoint):
    """The plain, unfused timm model with the checkpoint's main branch: the independent reference."""
    model = timm.create_model(ARCH, num_classes=10).eval()
    model.load_state_dict(fold_state_dict(advprop_zoo.load_weights(checkpoint)))
    return model


def _export(checkpoint, fmt):
    """Run the export command; returns the file and the max abs diff it reported."""
    out = checkpoint.parent / f'b0.{fmt}'
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):  # not capsys: also used from a module-scoped fixture
        assert main(['export', '--model', ARCH, '--checkpoint', str(checkpoint), '--num-classes', '10',
                     '--input-size', *map(str, SIZE), '--format', fmt, '--output', str(out)]) == 0
    line = buffer.getvalue()
    checker = 'onnxruntime' if fmt == 'onnx' else 'TorchScript'
    assert 'folded and BN-fused, static padding for 3x64x80' in line and f'{checker}' in line, line
    return out, float(line.rsplit(' ', 1)[-1])


@pytest.fixture(scope='module')
def onnx_file(checkpoint):
    return _export(checkpoint, 'onnx')


def test_onnx_matches_the_plain_timm_model(onnx_file, reference):
    path, reported = onnx_file
    assert reported <= 1e-4
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    x = check_inputs(SIZE, batch_size=3, seed=1)  # another batch size than the export's: dynamic batch
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = reference(x).numpy()
    assert np.abs(expected).max() > 0.1  # non-trivial logits
    assert np.abs(got - expected).max() <= 1e-4


def test_onnx_graph_is_fused_with_static_spatial_size(onnx_file):
    model = onnx.load(str(onnx_file[0]))
    ops = {node.op_type for node in model.graph.node}
    assert 'BatchNormalization' not in ops and 'Conv' in ops
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == list(SIZE)


@pytest.mark.filterwarnings('ignore:.*torch.jit.load. is deprecated:FutureWarning')
def test_torchscript_loads_and_matches(checkpoint, reference):
    path, reported = _export(checkpoint, 'torchscript')
    assert reported <= 1e-4
    loaded = torch.jit.load(str(path))
    x = check_inputs(SIZE, batch_size=1, seed=2)
    with torch.no_grad():
        assert (loaded(x) - reference(x)).abs().max() <= 1e-4


def test_export_errors_leave_no_file(checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'm.pt'
    base = ['export', '--checkpoint', str(checkpoint), '--num-classes', '10', '--format', 'torchscript',
            '--input-size', '64', '--output', str(out)]
    cli_fails(capsys, base + ['--model', 'tf-efficientnet-b0'], "did you mean 'efficientnet_b0_advprop'")
    cli_fails(capsys, base + ['--model', 'efficientnet_b2_advprop'], 'shape mismatch for')
    cli_fails(capsys, ['export', '--model', ARCH, '--checkpoint', str(tmp_path / 'none.safetensors'),
                    '--output', str(out)], 'no such weights file')
    cli_fails(capsys, base[:-4] + ['--input-size', '3', '0', '64', '--output', str(out), '--model', ARCH],
           'input size must be')
    cli_fails(capsys, base[:-1] + [str(tmp_path / 'missing' / 'm.pt'), '--model', ARCH], 'does not exist')
    real_run = advprop_zoo.export._torchscript_run
    monkeypatch.setattr(advprop_zoo.export, '_torchscript_run', lambda blob, x: real_run(blob, x) + 1e-3)
    cli_fails(capsys, base + ['--model', ARCH], 'disagrees with PyTorch: max abs diff 0.001', 'not written')
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp files left
    out.write_bytes(b'keep')
    cli_fails(capsys, base + ['--model', ARCH], 'output exists', '--force')
    assert out.read_bytes() == b'keep'
