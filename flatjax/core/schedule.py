"""Hyper-parameter values that may be constants or schedules of the step count."""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

Schedule = Callable[[jax.Array], jax.Array]
ScalarOrSchedule = Union[float, jax.Array, Schedule]


def value_at(value: ScalarOrSchedule, count: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """The hyper-parameter at step ``count`` (number of completed updates) as a ``dtype`` scalar."""
    if callable(value):
        value = value(count)
    # a shape-(1,) value (accepted as a scalar) must not change the state's shapes after step 1
    return jnp.reshape(jnp.asarray(value, dtype), ())


def cosine_increasing(init_value: float, increase: float, total_steps: int) -> Schedule:
    """RWP/ARWP's cosine-increasing σ schedule (Li et al., TMLR 2024; official code ``CosineInc``).

    ``σ_t = σ₀ (1 + inc · (1 − cos(π t / T)) / 2)``: σ₀ at t = 0, σ₀(1 + inc) at t = T, constant after T.

    Args:
      init_value: σ₀ (≥ 0).
      increase: ``inc`` (≥ 0); the ARWP script uses 10 (0.001 → 0.011).
      total_steps: T, the total number of updates (> 0).
    """
    from flatjax.core.validate import check_positive_int, check_range

    check_range("init_value", init_value, low=0.0)
    check_range("increase", increase, low=0.0)
    check_positive_int("total_steps", total_steps)

    def schedule(count: Any) -> jax.Array:
        t = jnp.minimum(jnp.asarray(count, jnp.float32), total_steps)
        return init_value * (1.0 + increase * (1.0 - jnp.cos(jnp.pi * t / total_steps)) / 2.0)

    return schedule
