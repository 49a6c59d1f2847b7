"""Shared helpers of :mod:`flatjax.sharpness`: argument checks, batch handling, progress bars.

Private module; nothing here is part of the public API.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

Batch = Any
"""A batch is any pytree of arrays handed unchanged to ``loss_fn(params, batch)``."""

_WEIGHTINGS = ("size", "equal")
_KEY_RANGE = "a jax.random key (jax.random.key(seed) or jax.random.PRNGKey(seed))"


def fail(name: str, accepted: str, value: Any) -> ValueError:
    """Build the ``ValueError`` used across the package: it names the parameter and its range."""
    return ValueError(f"{name} must be {accepted}; got {value!r}")


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` as an int if it is an integer >= ``minimum``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise fail(name, f"an integer >= {minimum}", value)
    return int(value)


def check_nonneg_float(name: str, value: Any, *, positive: bool = False) -> float:
    """Return ``value`` as a float if it is finite and >= 0 (> 0 when ``positive``)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise fail(name, "a finite real number " + ("> 0" if positive else ">= 0"), value) from None
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise fail(name, "a finite real number " + ("> 0" if positive else ">= 0"), value)
    return x


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError``."""
    if value not in choices:
        raise fail(name, "one of " + ", ".join(repr(c) for c in choices), value)
    return value


def check_key(key: Any) -> jax.Array:
    """Accept a new-style typed key (``jax.random.key``) or a raw uint32[2] key (``PRNGKey``)."""
    if key is None:
        raise fail("key", _KEY_RANGE, key)
    try:
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.shape != ():
                raise fail("key", "a single jax.random key (shape ())", key)
            return key
        if key.shape == (2,) and key.dtype == np.uint32:
            return key
    except AttributeError:
        pass
    raise fail("key", _KEY_RANGE, key)


def batch_size_of(batch: Batch) -> int:
    """Leading-axis length of the first array leaf of ``batch`` (used by ``weighting='size'``)."""
    leaves = jax.tree.leaves(batch)
    if not leaves or np.ndim(leaves[0]) == 0:
        raise fail(
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
        raise fail("batch/batches",
                   "exactly one of them (a single batch or an iterable of batches)",
                   (type(batch).__name__, type(batches).__name__))
    if batch is not None:
        items = [batch]
    else:
        if isinstance(batches, (str, bytes, dict)) or hasattr(batches, "shape") or not isinstance(
                batches, (Iterable, Iterator)):
            raise fail("batches", "an iterable of batches (list, tuple, generator, data loader); "
                       "pass a single batch (e.g. a dict or an array) as batch=",
                       type(batches).__name__)
        items = list(batches)
        if not items:
            raise fail("batches", "a non-empty iterable of batches", "an empty iterable")
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
            raise fail("weighting", f"'size', 'equal' or {len(items)} non-negative finite numbers "
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
