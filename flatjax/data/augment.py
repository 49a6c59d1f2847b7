"""Host-side (NumPy) image augmentations, deterministic given a ``numpy.random.Generator``.

All functions take NHWC batches. The CIFAR pipelines of the papers' code are, in
order: [RandAugment (ViT only)] -> horizontal flip -> random crop with 4-pixel zero
padding -> scale to [0, 1] and normalize per channel -> [Cutout (DeVries & Taylor,
2017): one 16x16 square set to 0 *after* normalization, with probability 0.5; its
centre is uniform over the image, so it may be clipped at the border].
:class:`ImageTransform` chains them; :func:`cifar_transforms` builds the standard sets.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from flatjax.data.randaugment import rand_augment

Batch = dict[str, np.ndarray]
Transform = Callable[[Mapping[str, np.ndarray], np.random.Generator], Batch]

# The statistics the RWP/m-ARWP and SAM code normalize with (for CIFAR-10 and CIFAR-100).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
# The exact CIFAR-100 training-set statistics, for users who want them.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_nhwc(images: np.ndarray, name: str = "images") -> None:
    if images.ndim != 4:
        raise ValueError(f"{name} must be an NHWC batch (4-D), got shape {images.shape}")


def flip_horizontal(images: np.ndarray) -> np.ndarray:
    """Mirrors every image left-right (applying it twice gives the input back)."""
    _check_nhwc(images)
    return images[:, :, ::-1, :]


def random_flip(images: np.ndarray, rng: np.random.Generator, *, p: float = 0.5) -> np.ndarray:
    """Mirrors each image left-right with probability ``p``.

    Args:
      images: NHWC batch.
      rng: source of randomness.
      p: flip probability in [0, 1].

    Returns:
      A new array of the same shape and dtype.
    """
    _check_nhwc(images)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    flip = rng.random(len(images)) < p
    return np.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def random_crop(images: np.ndarray, rng: np.random.Generator, *, padding: int = 4) -> np.ndarray:
    """Zero-pads each side by ``padding`` and crops back to the input size at a random offset.

    Args:
      images: NHWC batch.
      rng: source of randomness.
      padding: pixels of zero padding per side (4 for CIFAR).

    Returns:
      A new array with the input's shape and dtype.
    """
    _check_nhwc(images)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return images.copy()
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    dy = rng.integers(0, 2 * padding + 1, size=n)
    dx = rng.integers(0, 2 * padding + 1, size=n)
    rows = dy[:, None] + np.arange(h)[None, :]  # (n, h)
    cols = dx[:, None] + np.arange(w)[None, :]  # (n, w)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def normalize(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Per-channel ``(x - mean) / std`` after scaling ``uint8`` pixels to [0, 1].

    Args:
      images: NHWC batch, ``uint8`` (0-255) or float (already in [0, 1]).
      mean: per-channel mean, in [0, 1] units.
      std: per-channel standard deviation, in [0, 1] units.

    Returns:
      ``float32`` array of the same shape.
    """
    _check_nhwc(images)
    mean_a = np.asarray(mean, np.float32)
    std_a = np.asarray(std, np.float32)
    if mean_a.shape != (images.shape[-1],) or std_a.shape != mean_a.shape:
        raise ValueError(
            f"mean and std must have one value per channel ({images.shape[-1]}), "
            f"got {tuple(mean)} and {tuple(std)}"
        )
    if np.any(std_a <= 0):
        raise ValueError(f"std must be positive, got {tuple(std)}")
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
        x /= 255.0
    return (x - mean_a) / std_a


def channel_mean_std(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of a dataset, in [0, 1] units.

    Use it to normalize a custom image-folder dataset.
    """
    _check_nhwc(images)
    x = images.astype(np.float64)
    if images.dtype == np.uint8:
        x /= 255.0
    return tuple(x.mean(axis=(0, 1, 2)).tolist()), tuple(x.std(axis=(0, 1, 2)).tolist())


def cutout(
    images: np.ndarray, rng: np.random.Generator, *, size: int = 16, p: float = 0.5
) -> np.ndarray:
    """Cutout (DeVries & Taylor, 2017): zero one ``size x size`` square per image.

    Follows the RWP/m-ARWP code: with probability ``p`` the square's top-left corner is
    drawn uniformly from ``[-size//2, H - size//2)`` (and likewise for width), the part
    inside the image is set to 0 across all channels. Apply it after normalization so
    that 0 is the dataset mean.

    Args:
      images: NHWC batch (normally float, normalized).
      rng: source of randomness.
      size: side of the square.
      p: probability of applying it to each image.

    Returns:
      A new array of the same shape and dtype.
    """
    _check_nhwc(images)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    n, h, w, _ = images.shape
    half = size // 2
    apply = rng.random(n) < p
    top = rng.integers(-half, h - half, size=n)
    left = rng.integers(-half, w - half, size=n)
    ys = np.arange(h)[None, :]
    xs = np.arange(w)[None, :]
    in_rows = (ys >= top[:, None]) & (ys < top[:, None] + size)  # (n, h)
    in_cols = (xs >= left[:, None]) & (xs < left[:, None] + size)  # (n, w)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]
    out = images.copy()
    out[mask] = 0
    return out


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """A host-side augmentation pipeline for ``{"image": uint8 NHWC, "label": ...}`` batches.

    Steps, each optional, in this order: RandAugment (Cubuk et al., 2020) on the
    ``uint8`` pixels, random horizontal flip, random crop with zero padding,
    per-channel normalization to ``float32``, Cutout (DeVries & Taylor, 2017).
    Calling it with the same batch and an identically seeded generator gives the
    same output.

    Attributes:
      mean, std: per-channel normalization statistics in [0, 1] units.
      flip: random horizontal flip with probability 0.5.
      crop_padding: random-crop padding in pixels (0 disables the crop).
      cutout_size: Cutout square side (0 disables Cutout).
      cutout_p: probability of Cutout per image.
      randaugment: ``(num_ops, magnitude)`` for RandAugment, or ``None``.
    """

    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    flip: bool = False
    crop_padding: int = 0
    cutout_size: int = 0
    cutout_p: float = 0.5
    randaugment: tuple[int, int] | None = None

    def __call__(self, batch: Mapping[str, np.ndarray], rng: np.random.Generator) -> Batch:
        """Returns a copy of ``batch`` with its ``"image"`` augmented and normalized."""
        x = np.asarray(batch["image"])
        if self.randaugment is not None:
            num_ops, magnitude = self.randaugment
            x = rand_augment(x, rng, num_ops=num_ops, magnitude=magnitude)
        if self.flip:
            x = random_flip(x, rng)
        if self.crop_padding:
            x = random_crop(x, rng, padding=self.crop_padding)
        x = normalize(x, self.mean, self.std)
        if self.cutout_size:
            x = cutout(x, rng, size=self.cutout_size, p=self.cutout_p)
        out = dict(batch)
        out["image"] = x
        return out


_AUGMENTS = ("none", "basic", "cutout", "randaugment")
_STATS = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR10_MEAN, CIFAR10_STD),  # the papers' code reuses the CIFAR-10 constants
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}


def cifar_transforms(
    augment: str = "basic",
    *,
    stats: str = "cifar10",
    randaugment: tuple[int, int] = (2, 14),
) -> tuple[ImageTransform, ImageTransform]:
    """The papers' CIFAR train/eval pipelines.

    Args:
      augment: ``"none"`` (normalize only), ``"basic"`` (flip + crop, padding 4),
        ``"cutout"`` (basic + Cutout 16x16, p=0.5, as in the RWP/m-ARWP CNN runs) or
        ``"randaugment"`` (RandAugment + basic, as in the m-ARWP ViT runs).
      stats: normalization constants: ``"cifar10"`` (also used by the papers for
        CIFAR-100), ``"cifar100"`` (same constants) or ``"imagenet"``.
      randaugment: ``(num_ops, magnitude)``; the m-ARWP code uses N=2, M=14.

    Returns:
      ``(train_transform, eval_transform)``; the eval one only normalizes.

    Raises:
      ValueError: for an unknown ``augment`` or ``stats``.
    """
    if augment not in _AUGMENTS:
        raise ValueError(f"augment must be one of {_AUGMENTS}, got {augment!r}")
    if stats not in _STATS:
        raise ValueError(f"stats must be one of {tuple(_STATS)}, got {stats!r}")
    mean, std = _STATS[stats]
    eval_t = ImageTransform(mean=mean, std=std)
    if augment == "none":
        return eval_t, eval_t
    train_t = ImageTransform(
        mean=mean,
        std=std,
        flip=True,
        crop_padding=4,
        cutout_size=16 if augment == "cutout" else 0,
        randaugment=tuple(randaugment) if augment == "randaugment" else None,
    )
    return train_t, eval_t
