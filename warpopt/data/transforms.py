"""Batched image transforms in plain torch / PIL (no torchvision dependency).

* :func:`random_affine` - per-sample random affine augmentation of a batch, the
  Omniglot multi-shot augmentation of Flennerhag et al. (2019) and WarpGrad
  Appendix E: rotation in [0, 360) degrees, translation of up to 20% of the
  image size per dimension, isotropic scale in [0.8, 1.2]. Implemented with
  :func:`torch.nn.functional.affine_grid` / :func:`grid_sample`, so it runs on
  whatever device the batch lives on.
* :func:`affine_matrices` - the sampled parameters as ``(B, 2, 3)`` matrices.
* :func:`resize` - batched tensor resize (``F.interpolate`` with antialiasing).
* :func:`pil_resize` - resize one ``uint8`` array with a PIL filter (LANCZOS by
  default, as the original Omniglot pre-processing).

Conventions: images are float tensors ``(B, C, H, W)``; pixels that the affine
map brings in from outside the image are filled with ``fill`` (``0``; for
Omniglot images with ink = 1 that is the background).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["affine_matrices", "random_affine", "resize", "pil_resize", "PIL_FILTERS"]

#: Names accepted by :func:`pil_resize`.
PIL_FILTERS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` float64 samples from U[low, high) drawn on the CPU with ``generator``."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return low + (high - low) * u


def affine_matrices(
    batch_size: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    degrees: tuple[float, float] = (0.0, 360.0),
    translate: tuple[float, float] = (0.2, 0.2),
    scale: tuple[float, float] = (0.8, 1.2),
) -> torch.Tensor:
    """Sample random affine maps and return them as ``affine_grid`` matrices.

    Per sample: angle ``a ~ U[degrees)`` (counter-clockwise on screen), shifts
    ``tx ~ U[-translate[0], translate[0]] * width`` and
    ``ty ~ U[-translate[1], translate[1]] * height`` pixels (the meaning of
    torchvision's ``RandomAffine(translate=...)``), and scale ``s ~ U[scale)``.
    The forward map (input pixel -> output pixel, about the image centre) is
    ``T(p) = s R(a) p + t``; ``affine_grid`` needs the inverse, output ->
    input, expressed in normalised coordinates, which is what is returned.

    Random numbers are always drawn on the CPU (float64) so that a seeded CPU
    generator gives the same augmentation whatever device the images are on.

    Args:
        batch_size: number of matrices ``B``.
        height, width: image size in pixels (used to keep rotations rigid on
            non-square images and to convert pixel shifts).
        generator: CPU ``torch.Generator`` (``None``: global RNG).
        degrees: rotation range in degrees, ``[low, high)``.
        translate: maximal absolute shift as a fraction of (width, height).
        scale: isotropic scale range ``[low, high)``; must be positive.

    Returns:
        float64 tensor of shape ``(B, 2, 3)`` on the CPU.
    """
    if scale[0] <= 0 or scale[1] < scale[0]:
        raise ValueError(f"scale range must satisfy 0 < low <= high, got {scale}")
    if translate[0] < 0 or translate[1] < 0:
        raise ValueError(f"translate fractions must be non-negative, got {translate}")
    angle = _uniform(batch_size, degrees[0], degrees[1], generator) * (math.pi / 180.0)
    tx = _uniform(batch_size, -translate[0], translate[0], generator) * width
    ty = _uniform(batch_size, -translate[1], translate[1], generator) * height
    s = _uniform(batch_size, scale[0], scale[1], generator)

    # Pixel coordinates with y pointing down: a counter-clockwise rotation on
    # screen by `a` is [[cos, sin], [-sin, cos]] acting on (x, y).
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Inverse linear part: R(a)^-1 / s = R(-a) / s.
    inv = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2) / s[:, None, None]
    shift = torch.stack([tx, ty], -1)
    inv_offset = -(inv @ shift[:, :, None])[:, :, 0]

    # Pixel (centred) -> normalised coordinates: x_n = x_p * 2 / W, y_n = y_p * 2 / H.
    to_norm = torch.tensor([2.0 / width, 2.0 / height], dtype=torch.float64)
    theta = torch.empty(batch_size, 2, 3, dtype=torch.float64)
    theta[:, :, :2] = to_norm[None, :, None] * inv / to_norm[None, None, :]
    theta[:, :, 2] = to_norm[None, :] * inv_offset
    return theta


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    degrees: tuple[float, float] = (0.0, 360.0),
    translate: tuple[float, float] = (0.2, 0.2),
    scale: tuple[float, float] = (0.8, 1.2),
    mode: Literal["bilinear", "nearest"] = "bilinear",
    fill: float = 0.0,
) -> torch.Tensor:
    """Apply an independent random affine transform to every image of a batch.

    Defaults are the Omniglot multi-shot protocol (WarpGrad Appendix E /
    Flennerhag et al. 2019): rotation ``[0, 360)``, translate ``(0.2, 0.2)``,
    scale ``(0.8, 1.2)``. The original implementation used torchvision's
    ``RandomAffine`` on PIL images, whose default interpolation is nearest;
    pass ``mode="nearest"`` for that, bilinear is the default here.

    Args:
        images: ``(B, C, H, W)`` floating tensor on any device.
        generator: CPU generator for the parameters (see :func:`affine_matrices`).
        degrees, translate, scale: parameter ranges.
        mode: ``grid_sample`` interpolation.
        fill: value for pixels mapped from outside the input.

    Returns:
        ``(B, C, H, W)`` tensor, same dtype and device as ``images``.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"random_affine needs floating images, got {images.dtype}")
    b, c, h, w = images.shape
    if b == 0:
        return images.clone()
    theta = affine_matrices(b, h, w, generator, degrees, translate, scale)
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    if fill == 0.0:
        return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)
    # Sample (x - fill) with zero padding, then add fill back: outside -> fill.
    out = F.grid_sample(images - fill, grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out + fill


def resize(images: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize a batch ``(B, C, H, W)`` (or one image ``(C, H, W)``) to ``size``.

    Uses ``F.interpolate`` with ``antialias=True`` for bilinear/bicubic so that
    down-sampling does not alias. Returns the input unchanged if it already has
    the requested size.
    """
    single = images.dim() == 3
    x = images[None] if single else images
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) or (C, H, W), got {tuple(images.shape)}")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return images
    kwargs: dict = {"mode": mode}
    if mode in ("bilinear", "bicubic"):
        kwargs.update(align_corners=False, antialias=True)
    y = F.interpolate(x.float() if not x.is_floating_point() else x, size=hw, **kwargs)
    return y[0] if single else y


def pil_resize(array: np.ndarray, size: int | tuple[int, int], resample: str = "lanczos") -> np.ndarray:
    """Resize one ``uint8`` image ``(H, W)`` or ``(H, W, 3)`` with a PIL filter.

    ``size`` is ``S`` (square) or ``(height, width)``. Returns ``uint8`` of the
    new size. PIL silently uses nearest for mode ``"1"`` images, so callers
    must pass grey-scale ``uint8`` data (0..255) to get a real LANCZOS filter.
    """
    if resample not in PIL_FILTERS:
        raise ValueError(f"unknown resample filter {resample!r}; choose from {sorted(PIL_FILTERS)}")
    h, w = (size, size) if isinstance(size, int) else size
    if array.shape[:2] == (h, w):
        return np.asarray(array, dtype=np.uint8)
    img = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    return np.asarray(img.resize((w, h), resample=PIL_FILTERS[resample]))
