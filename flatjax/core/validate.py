"""Hyper-parameter checks at construction: a clear ``ValueError`` naming the parameter and its range.

Values may be floats, concrete arrays, or schedules (callables of the step count). Traced values (as
handed in by ``optax.inject_hyperparams`` inside ``update``) cannot be checked and are let through: they
were checked concretely when the same factory ran inside ``init``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np


def _concrete(value: Any) -> float | None:
    """The value as a Python float, or None when it is traced (not checkable)."""
    if isinstance(value, jax.core.Tracer):
        return None
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"expected a scalar hyper-parameter, got shape {arr.shape}")
    return float(arr.reshape(()))


def check_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``low (<|<=) value (<|<=) high``; schedules are checked at step 0."""
    if callable(value):
        try:
            value = value(0)
        except Exception as err:  # a schedule that cannot be evaluated at 0 is a user error
            raise ValueError(f"{name}: schedule failed at step 0 ({err})") from err
    x = _concrete(value)
    if x is None:
        return
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    bad = math.isnan(x)
    if low is not None:
        bad |= x <= low if low_open else x < low
    if high is not None:
        bad |= x >= high if high_open else x > high
    if bad:
        raise ValueError(f"{name} must be in {interval}, got {x!r}")


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive Python int (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_callable(name: str, value: Any) -> Callable:
    """Raise ``ValueError`` unless ``value`` is callable."""
    if not callable(value):
        raise ValueError(f"{name} must be callable, got {type(value).__name__}")
    return value
