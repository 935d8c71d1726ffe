"""Export: a folded, BN-fused model at a fixed input size, to ONNX or TorchScript, checked before it is kept.

The exported graph is the inference model (``load_model(..., fuse=True)``): auxiliary BNs dropped, every BN
fused into its conv and TF 'same' padding made static for the input size (``fuse_bn``), so a runtime gets
plain Conv / activation / pooling / Gemm nodes. The batch dimension stays dynamic. Every export is
run once against the PyTorch model it came from (ONNX with onnxruntime, TorchScript by loading the
saved file back) and only written, atomically, when the outputs agree within ``atol``.
"""
import io
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from .errors import AdvPropZooError
from .weights import PathLike, atomic_write, check_output_path

__all__ = ['FORMATS', 'ExportError', 'export_model', 'check_inputs']

FORMATS = ('onnx', 'torchscript')


class ExportError(AdvPropZooError, RuntimeError):
    """An export that failed or whose output disagrees with PyTorch; nothing was written."""


def check_inputs(input_size: Sequence[int], batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    """Inputs an export is checked on: random normal, and structured ones that random data misses
    (constant, the [-1, 1] extremes, a ramp, a checkerboard), ``batch_size`` of each kind."""
    c, h, w = input_size
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1, 1, w).expand(c, h, w)
    checker = ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 * 2 - 1).float().expand(c, h, w)
    kinds = [torch.randn(batch_size, c, h, w, generator=g), torch.zeros(batch_size, c, h, w),
             torch.ones(batch_size, c, h, w), -torch.ones(batch_size, c, h, w),
             ramp.expand(batch_size, c, h, w), checker.expand(batch_size, c, h, w)]
    return torch.cat(kinds).contiguous()


def _onnx_bytes(model: nn.Module, example: torch.Tensor, opset: Optional[int]) -> bytes:
    batch = torch.export.Dim('batch', min=1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # exporter chatter; failures still raise
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=opset, input_names=['input'], output_names=['logits'],
            dynamic_shapes=({0: batch},), verbose=False)
    return program.model_proto.SerializeToString()


def _onnx_run(blob: bytes, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort  # the optional export extra
    session = ort.InferenceSession(blob, providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _torchscript_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # TorchScript is in maintenance mode and says so
        traced = torch.jit.trace(model, example, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _torchscript_run(blob: bytes, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        loaded = torch.jit.load(io.BytesIO(blob))
    with torch.no_grad():
        return loaded(x)


def export_model(
        model: nn.Module,
        path: PathLike,
        input_size: Sequence[int],
        format: str = 'onnx',
        overwrite: bool = False,
        atol: float = 1e-4,
        opset: Optional[int] = None,
) -> float:
    """Export ``model`` (already folded and fused: ``load_model(..., fuse=True)``) for inputs of ``input_size``
    (C, H, W) with a dynamic batch dimension, to ``path`` as ONNX or TorchScript.

    The export is run on ``check_inputs`` and compared with the PyTorch model (ONNX through
    onnxruntime); the file is written atomically only if the max abs difference is within ``atol``.
    Returns that difference.
    """
    if format not in FORMATS:
        raise ValueError(f'unknown export format {format!r}; use one of {", ".join(FORMATS)}')
    path = check_output_path(path, overwrite=overwrite)
    ref = next(model.parameters())
    model.eval()
    x = check_inputs(tuple(input_size)).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        expected = model(x).cpu()
    try:
        if format == 'onnx':
            blob = _onnx_bytes(model, x[:2], opset)
            got = _onnx_run(blob, x.cpu())
        else:
            blob = _torchscript_bytes(model, x[:2])
            got = _torchscript_run(blob, x).cpu()
    except ImportError as e:
        raise ExportError(f'{format} export needs the export extra (pip install "advprop-zoo[export]"): {e}') from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise ExportError(f'{format} export of {type(model).__name__} failed: {type(e).__name__}: {first}') from e
    diff = (got.float() - expected.float()).abs().max().item()
    if not diff <= atol:  # also catches nan
        raise ExportError(f'{format} export disagrees with PyTorch: max abs diff {diff:.3g} > {atol:g}; not written')
    with atomic_write(path) as f:
        f.write(blob)
    return diff
