"""Export: a folded, BN-fused model at a fixed input size, to ONNX or TorchScript, checked before it is kept.

The exported graph is the inference model: auxiliary BNs dropped (``fold_dual_bn``), every BN fused
into its conv and TF 'same' padding made static for the input size (``fuse_bn``), so a runtime gets
plain Conv / activation / pooling / Gemm nodes. The batch dimension stays dynamic. Every export is
run once against the PyTorch model it came from (ONNX with onnxruntime, TorchScript by loading the
saved file back) and only written, atomically, when the outputs agree within ``atol``.
"""
import io
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .fold import fold_state_dict
from .fuse import fuse_bn
from .weights import PathLike, WeightsError, atomic_write, load_weights

__all__ = ['FORMATS', 'ExportError', 'inference_model', 'export_model', 'check_inputs']

FORMATS = ('onnx', 'torchscript')


class ExportError(RuntimeError):
    """An export that failed or whose output disagrees with PyTorch; nothing was written."""


def inference_model(
        model_name: str,
        checkpoint: Optional[PathLike] = None,
        input_size: Optional[Sequence[int]] = None,
        **model_kwargs,
) -> Tuple[nn.Module, Tuple[int, int, int]]:
    """Build ``model_name`` for inference: weights from ``checkpoint`` (a plain or dual-BN state dict,
    checked to fit strictly) or, without one, timm's pretrained weights; auxiliary BNs folded, BNs
    fused, 'same' padding static for ``input_size`` (C, H, W; default: the model's own).
    Returns the model (eval mode) and the input size used."""
    import timm
    from .names import check_model_name

    model_name = check_model_name(model_name)
    if checkpoint is not None:
        state_dict = load_weights(checkpoint)
        model = timm.create_model(model_name, **model_kwargs)
        model.load_state_dict(fold_state_dict(state_dict, model))
    else:
        model = timm.create_model(model_name, pretrained=True, **model_kwargs)
    input_size = _input_size(input_size, model)
    return fuse_bn(model, input_size=input_size), input_size


def _input_size(input_size: Optional[Sequence[int]], model: nn.Module) -> Tuple[int, int, int]:
    default = tuple(getattr(model, 'pretrained_cfg', {}).get('input_size') or (3, 224, 224))
    if input_size is None:
        return default
    size = tuple(input_size)
    if len(size) in (1, 2):
        size = (default[0],) + (size * 2 if len(size) == 1 else size)
    if len(size) != 3 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f'input size must be H, H W or C H W (positive ints), got {" ".join(map(str, input_size))}')
    return size


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
    import onnxruntime as ort
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
    """Export ``model`` (already folded and fused, see ``inference_model``) for inputs of ``input_size``
    (C, H, W) with a dynamic batch dimension, to ``path`` as ONNX or TorchScript.

    The export is run on ``check_inputs`` and compared with the PyTorch model (ONNX through
    onnxruntime); the file is written atomically only if the max abs difference is within ``atol``.
    Returns that difference.
    """
    if format not in FORMATS:
        raise ValueError(f'unknown export format {format!r}; use one of {", ".join(FORMATS)}')
    path = Path(path)
    if path.exists() and not overwrite:
        raise WeightsError(f'{path}: output exists; pass --force (overwrite=True) to replace it')
    if not path.parent.is_dir():
        raise WeightsError(f'{path}: output folder {path.parent} does not exist')
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
