"""The offline default dataset: scikit-learn's 8x8 handwritten digits.

1,797 grayscale 8x8 images of the digits 0-9 (the UCI "optical recognition of
handwritten digits" test set), shipped inside scikit-learn, so it loads with no
download on any machine.
"""

from __future__ import annotations

import numpy as np

from flatjax.data.dataset import ArrayDataset


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits indices into train/test keeping each class's proportion.

    Args:
      labels: ``(N,)`` integer labels.
      test_fraction: share of each class sent to the test split, in (0, 1).
      seed: seed of the split; the same seed gives the same split.

    Returns:
      ``(train_indices, test_indices)``, each sorted.

    Raises:
      ValueError: if ``test_fraction`` is not in (0, 1).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    flat: bool = False,
    standardize: bool = True,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Loads the scikit-learn digits as a deterministic, stratified train/test split.

    Pixels (0-16) are scaled to [0, 1]; with ``standardize`` they are then shifted and
    scaled by the mean and standard deviation of the *training* pixels (one scalar
    each), so no test statistics leak into training.

    Args:
      seed: seed of the split.
      test_fraction: share of every class held out for testing.
      flat: return ``(N, 64)`` vectors instead of ``(N, 8, 8, 1)`` NHWC images.
      standardize: standardize as described above.

    Returns:
      ``(train, test)`` datasets with ``float32`` images and ``int32`` labels, class
      names ``"0"``..``"9"`` (1,438 / 359 examples with the default fraction).

    Raises:
      ImportError: if scikit-learn is not installed.
      ValueError: if ``test_fraction`` is not in (0, 1).
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            'The offline digits dataset needs scikit-learn: pip install "flatjax[experiments]"'
        ) from e
    raw = _sk_load_digits()
    images = (raw.images.astype(np.float32) / 16.0)[..., None]
    labels = raw.target.astype(np.int32)
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    x_train, x_test = images[train_idx], images[test_idx]
    if standardize:
        mean, std = x_train.mean(), x_train.std()
        x_train = (x_train - mean) / std
        x_test = (x_test - mean) / std
    if flat:
        x_train = x_train.reshape(len(x_train), -1)
        x_test = x_test.reshape(len(x_test), -1)
    names = tuple(str(i) for i in range(10))
    return (
        ArrayDataset(x_train.astype(np.float32), labels[train_idx], names),
        ArrayDataset(x_test.astype(np.float32), labels[test_idx], names),
    )
