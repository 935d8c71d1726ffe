"""Common corruptions in the manner of ImageNet-C (Hendrycks & Dietterich, ICLR 2019), on tensors.

The ``imagecorruptions`` / ``imagenet-c`` packages need ``pkg_resources`` and fixed 224 px inputs and
do not import on a current stack, so this module re-implements six of the fifteen ImageNet-C
corruptions with the same formulas and the same five severity constants: the noise family (gaussian,
shot, impulse), the photometric family (brightness in HSV value, contrast) and gaussian blur, whose
sigma is scaled by ``H / 224`` so a severity means the same relative blur on small images. They work on
batches of images in [0, 1], any size, deterministically for a given generator. Real ImageNet-C
evaluation reads the released JPEG folders instead (``advprop-zoo eval --dataset imagenet-c``).
"""
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

__all__ = ['TENSOR_CORRUPTIONS', 'corrupt']

Corruption = Callable[[torch.Tensor, int, Optional[torch.Generator]], torch.Tensor]


def _gaussian_noise(x: torch.Tensor, s: int, g: Optional[torch.Generator]) -> torch.Tensor:
    c = (0.08, 0.12, 0.18, 0.26, 0.38)[s - 1]
    return x + c * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def _shot_noise(x: torch.Tensor, s: int, g: Optional[torch.Generator]) -> torch.Tensor:
    c = (60, 25, 12, 5, 3)[s - 1]
    return torch.poisson(x.clamp(0, 1) * c, generator=g) / c


def _impulse_noise(x: torch.Tensor, s: int, g: Optional[torch.Generator]) -> torch.Tensor:
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[s - 1]
    u = torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype)
    salt = torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype) < 0.5
    hit = u < amount  # salt-and-pepper on each value independently, as skimage's random_noise('s&p')
    return torch.where(hit, salt.to(x.dtype), x)


def _brightness(x: torch.Tensor, s: int, g: Optional[torch.Generator]) -> torch.Tensor:
    c = (0.1, 0.2, 0.3, 0.4, 0.5)[s - 1]
    # HSV value + c with hue and saturation kept: scaling RGB by V'/V keeps both exactly
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(max=1)
    return torch.where(v > 0, x * v_new / v.clamp(min=1e-12), v_new.expand_as(x))


def _contrast(x: torch.Tensor, s: int, g: Optional[torch.Generator]) -> torch.Tensor:
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[s - 1]
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * c + means


def _gaussian_blur(x: torch.Tensor, s: int, g: Optional[torch.Generator]) -> torch.Tensor:
    sigma = (1, 2, 3, 4, 6)[s - 1] * x.shape[-2] / 224
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c, n = x.shape[1], k.numel()
    y = F.pad(x, (radius, radius, radius, radius), mode='replicate')
    y = F.conv2d(y, k.view(1, 1, 1, n).expand(c, 1, 1, n).contiguous(), groups=c)  # separable: rows
    return F.conv2d(y, k.view(1, 1, n, 1).expand(c, 1, n, 1).contiguous(), groups=c)  # then columns


TENSOR_CORRUPTIONS: Dict[str, Corruption] = {
    'gaussian_noise': _gaussian_noise,
    'shot_noise': _shot_noise,
    'impulse_noise': _impulse_noise,
    'gaussian_blur': _gaussian_blur,
    'brightness': _brightness,
    'contrast': _contrast,
}


def corrupt(x: torch.Tensor, name: str, severity: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` 1-5 to images ``x`` (N, C, H, W) in [0, 1]."""
    if name not in TENSOR_CORRUPTIONS:
        raise ValueError(f'unknown corruption {name!r}; choose one of {", ".join(TENSOR_CORRUPTIONS)}')
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f'corruption severity must be 1-5, got {severity}')
    return TENSOR_CORRUPTIONS[name](x, severity, generator).clamp(0, 1)
