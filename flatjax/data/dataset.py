"""An in-memory labelled image dataset, and the error raised when a dataset is missing."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where the caller said (or not downloaded); the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """Images and integer labels held as NumPy arrays.

    Attributes:
      image: ``(N, H, W, C)`` array (``uint8`` for decoded photos, ``float32`` once
        normalized) or ``(N, D)`` for flat features.
      label: ``(N,)`` ``int32`` class indices.
      class_names: name of each class; ``label == i`` means ``class_names[i]``.
    """

    image: np.ndarray
    label: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.image) != len(self.label):
            raise ValueError(
                f"image and label must have the same length, got {len(self.image)} and {len(self.label)}"
            )

    def __len__(self) -> int:
        return len(self.label)

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)

    def as_dict(self) -> dict[str, np.ndarray]:
        """Returns ``{"image": ..., "label": ...}``, the batch format used throughout."""
        return {"image": self.image, "label": self.label}

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ArrayDataset":
        """Returns the examples at ``indices`` (same class names)."""
        idx = np.asarray(indices)
        return ArrayDataset(self.image[idx], self.label[idx], self.class_names)
