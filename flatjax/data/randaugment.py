"""RandAugment (Cubuk et al., 2020, "RandAugment: Practical automated data augmentation
with a reduced search space", CVPR Workshops) in NumPy, on ``uint8`` NHWC batches.

Each image gets ``num_ops`` operations drawn uniformly (with replacement) from the 14
below, all at one shared ``magnitude`` M on a 0-30 scale (f = M / 30), with the
ranges of torchvision's ``RandAugment``; signed ops flip their sign with
probability 1/2:

  identity, autocontrast, equalize (no magnitude);
  rotate: +-30 f degrees;  shear_x / shear_y: +-0.3 f;
  translate_x / translate_y: +-f * 150/331 of the image side;
  brightness, color (saturation), contrast, sharpness: factor 1 +- 0.9 f;
  posterize: keep 8 - round(4 f) bits;  solarize: invert pixels >= 255 (1 - f).

Geometric ops rotate/shear about the image centre, sample nearest-neighbour and fill
uncovered pixels with gray (128). The colour ops follow PIL's ImageOps/ImageEnhance
definitions. Not included: the Invert, SolarizeAdd and Cutout ops of some variants.
"""

from __future__ import annotations

import numpy as np

OPS = (
    "identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize",
    "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
)
MAX_MAGNITUDE = 30
FILL = 128


def _blend(degenerate: np.ndarray, img: np.ndarray, factor: float) -> np.ndarray:
    out = degenerate.astype(np.float32) + factor * (img.astype(np.float32) - degenerate)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _gray(img: np.ndarray) -> np.ndarray:
    """PIL's ITU-R 601-2 luma, shape (H, W, 1)."""
    if img.shape[-1] == 1:
        return img.astype(np.float32)
    r, g, b = (img[..., i].astype(np.float32) for i in range(3))
    return (0.299 * r + 0.587 * g + 0.114 * b)[..., None]


def _autocontrast(img: np.ndarray) -> np.ndarray:
    # PIL's formula, truncation included: lut[i] = int(i * scale - lo * scale).
    lo = img.min(axis=(0, 1), keepdims=True).astype(np.float64)
    hi = img.max(axis=(0, 1), keepdims=True).astype(np.float64)
    scale = np.where(hi > lo, 255.0 / np.maximum(hi - lo, 1.0), 1.0)
    offset = np.where(hi > lo, -lo * scale, 0.0)
    return np.clip(img * scale + offset, 0, 255).astype(np.uint8)


def _equalize(img: np.ndarray) -> np.ndarray:
    out = np.empty_like(img)
    for c in range(img.shape[-1]):
        ch = img[..., c]
        hist = np.bincount(ch.ravel(), minlength=256)
        nonzero = hist[hist > 0]
        step = (nonzero.sum() - nonzero[-1]) // 255
        if step == 0:
            out[..., c] = ch
            continue
        lut = (step // 2 + np.concatenate([[0], np.cumsum(hist)[:-1]])) // step
        out[..., c] = np.clip(lut, 0, 255).astype(np.uint8)[ch]
    return out


def _sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    h, w, _ = img.shape
    if h < 3 or w < 3:
        return img
    x = img.astype(np.float32)
    # PIL's SMOOTH filter: 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, border unchanged.
    acc = 4.0 * x[1:-1, 1:-1]
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            acc = acc + x[dy:h - 2 + dy, dx:w - 2 + dx]
    degenerate = x.copy()
    degenerate[1:-1, 1:-1] = np.rint(acc / 13.0)
    return _blend(degenerate, img, factor)


def _affine(img: np.ndarray, matrix: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    """Output pixel p (centred coords) takes input pixel matrix^-1 (p - shift)."""
    h, w, _ = img.shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    pts = np.stack([xs - cx - shift[0], ys - cy - shift[1]])  # (2, h, w) in (x, y)
    src = np.tensordot(np.linalg.inv(matrix), pts, axes=1)
    sx = np.rint(src[0] + cx).astype(np.int64)
    sy = np.rint(src[1] + cy).astype(np.int64)
    valid = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    out = np.full_like(img, FILL)
    out[valid] = img[sy[valid], sx[valid]]
    return out


def apply_op(img: np.ndarray, op: str, magnitude: float, sign: float = 1.0) -> np.ndarray:
    """Applies one RandAugment operation to a single ``uint8`` ``(H, W, C)`` image.

    Args:
      img: the image.
      op: one of :data:`OPS`.
      magnitude: strength on the 0-30 scale.
      sign: +1 or -1, the direction of signed operations.

    Returns:
      The transformed ``uint8`` image (same shape).

    Raises:
      ValueError: for an unknown ``op``.
    """
    f = magnitude / MAX_MAGNITUDE
    h, w, _ = img.shape
    if op == "identity":
        return img
    if op == "autocontrast":
        return _autocontrast(img)
    if op == "equalize":
        return _equalize(img)
    if op == "rotate":
        t = np.deg2rad(30.0 * f * sign)
        # Counter-clockwise on screen (y points down), as PIL/torchvision rotate.
        return _affine(img, np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]]), (0.0, 0.0))
    if op == "shear_x":
        return _affine(img, np.array([[1.0, 0.3 * f * sign], [0.0, 1.0]]), (0.0, 0.0))
    if op == "shear_y":
        return _affine(img, np.array([[1.0, 0.0], [0.3 * f * sign, 1.0]]), (0.0, 0.0))
    if op == "translate_x":
        return _affine(img, np.eye(2), (round(150.0 / 331.0 * f * w) * sign, 0.0))
    if op == "translate_y":
        return _affine(img, np.eye(2), (0.0, round(150.0 / 331.0 * f * h) * sign))
    if op == "solarize":
        threshold = 255.0 * (1.0 - f)
        return np.where(img >= threshold, 255 - img, img).astype(np.uint8)
    if op == "posterize":
        shift = int(round(4 * f))
        return (img & np.uint8((0xFF << shift) & 0xFF)).astype(np.uint8)
    factor = 1.0 + 0.9 * f * sign
    if op == "brightness":
        return _blend(np.zeros_like(img), img, factor)
    if op == "color":
        return _blend(np.broadcast_to(np.rint(_gray(img)), img.shape), img, factor)
    if op == "contrast":
        mean = np.rint(_gray(img).mean())
        return _blend(np.full(img.shape, mean, np.float32), img, factor)
    if op == "sharpness":
        return _sharpness(img, factor)
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def rand_augment(
    images: np.ndarray,
    rng: np.random.Generator,
    *,
    num_ops: int = 2,
    magnitude: float = 9,
    ops: tuple[str, ...] = OPS,
) -> np.ndarray:
    """RandAugment on a ``uint8`` NHWC batch; each image draws its own ops and signs.

    Args:
      images: ``uint8`` ``(N, H, W, C)`` batch.
      rng: source of randomness (same seed, same output).
      num_ops: operations per image (N in the paper).
      magnitude: shared strength M in [0, 30].
      ops: the operations to draw from (default: all of :data:`OPS`).

    Returns:
      The augmented ``uint8`` batch.

    Raises:
      ValueError: for a non-``uint8`` batch, ``num_ops < 0``, a magnitude outside
        [0, 30] or an unknown op.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 NHWC batch, got {images.dtype} {images.shape}")
    if num_ops < 0:
        raise ValueError(f"num_ops must be >= 0, got {num_ops}")
    if not 0 <= magnitude <= MAX_MAGNITUDE:
        raise ValueError(f"magnitude must be in [0, {MAX_MAGNITUDE}], got {magnitude}")
    unknown = set(ops) - set(OPS)
    if unknown or not ops:
        raise ValueError(f"ops must be a non-empty subset of {OPS}, got {ops}")
    choice = rng.integers(0, len(ops), size=(len(images), num_ops))
    signs = np.where(rng.random((len(images), num_ops)) < 0.5, -1.0, 1.0)
    out = images.copy()
    for i in range(len(images)):
        img = out[i]
        for j in range(num_ops):
            img = apply_op(img, ops[choice[i, j]], magnitude, signs[i, j])
        out[i] = img
    return out
