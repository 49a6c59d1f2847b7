"""Shared helpers of :mod:`flatjax.sharpness`: batch handling and progress bars.

Argument checks live in :mod:`flatjax.core.validate` (one validation module and one error style for the package).
Not part of the public API.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from ..core.validate import check_choice, invalid

Batch = Any
"""A batch is any pytree of arrays handed unchanged to ``loss_fn(params, batch)``."""

_WEIGHTINGS = ("size", "equal")


def batch_size_of(batch: Batch) -> int:
    """Leading-axis length of the first array leaf of ``batch`` (used by ``weighting='size'``)."""
    leaves = jax.tree.leaves(batch)
    if not leaves or np.ndim(leaves[0]) == 0:
        raise invalid(
            "weighting",
            "'equal' or a sequence of weights when batches have no leading batch axis "
            "('size' needs the first leaf of each batch to have ndim >= 1)",
            "size",
        )
    return int(np.shape(leaves[0])[0])


def prepare_batches(
    batch: Batch | None,
    batches: Iterable[Batch] | None,
    weighting: str | Sequence[float] = "size",
) -> tuple[list[Batch], np.ndarray]:
    """Resolve the ``batch`` / ``batches`` / ``weighting`` arguments shared by every estimator.

    Exactly one of ``batch`` (one pytree) and ``batches`` (an iterable of pytrees) must be given.
    An iterator or generator is consumed once and kept as a list (the estimators pass over the
    data many times). Each batch is put on the default device once.

    ``weighting``: ``"size"`` (default) weights batch ``i`` by its leading-axis length ``n_i``, so
    that for a ``loss_fn`` that returns the *mean* loss over its batch, the result is the mean over
    all examples even when the last batch is smaller; ``"equal"`` weights every batch by ``1/B``;
    a sequence of non-negative numbers gives explicit weights (normalised to sum to one).
    Returns the list of batches and the normalised weights.
    """
    if (batch is None) == (batches is None):
        raise invalid("batch/batches",
                   "exactly one of them (a single batch or an iterable of batches)",
                   (type(batch).__name__, type(batches).__name__))
    if batch is not None:
        items = [batch]
    else:
        if isinstance(batches, (str, bytes, dict)) or hasattr(batches, "shape") or not isinstance(
                batches, (Iterable, Iterator)):
            raise invalid("batches", "an iterable of batches (list, tuple, generator, data loader); "
                       "pass a single batch (e.g. a dict or an array) as batch=",
                       type(batches).__name__)
        items = list(batches)
        if not items:
            raise invalid("batches", "a non-empty iterable of batches", "an empty iterable")
    items = [jax.device_put(b) for b in items]
    if isinstance(weighting, str):
        check_choice("weighting", weighting, _WEIGHTINGS)
        if weighting == "equal" or len(items) == 1:
            w = np.ones(len(items))
        else:
            w = np.array([batch_size_of(b) for b in items], dtype=np.float64)
    else:
        w = np.asarray(weighting, dtype=np.float64)
        if w.shape != (len(items),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise invalid("weighting", f"'size', 'equal' or {len(items)} non-negative finite numbers "
                       "with a positive sum", weighting)
    return items, w / w.sum()


def progress(iterable: Iterable, enabled: bool, desc: str, total: int | None = None) -> Iterable:
    """Wrap ``iterable`` in a tqdm bar when ``enabled`` (tqdm is imported lazily, optional)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional dependency: fall back to no bar
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)
