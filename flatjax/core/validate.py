"""Input checks for the whole package: a ``ValueError`` naming the parameter, its accepted range and, where it helps,
the fix. One style everywhere: ``"<name> must be <accepted>, got <value>"`` (built by :func:`invalid`).

Hyper-parameter values may be floats, concrete arrays, or schedules (callables of the step count). Traced values (as
handed in by ``optax.inject_hyperparams`` inside ``update``) cannot be checked and are let through: they
were checked concretely when the same factory ran inside ``init``.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

import chex
import jax
import numpy as np


def invalid(name: str, accepted: str, value: Any) -> ValueError:
    """The package's one error: it names the parameter, what it accepts and what it got."""
    return ValueError(f"{name} must be {accepted}, got {value!r}")


_SCHEDULE = "a real number or a schedule (a function of the step count)"


def _concrete(name: str, value: Any, accepted: str = _SCHEDULE) -> float | None:
    """The value as a Python float, or None when it is traced (not checkable)."""
    if isinstance(value, jax.core.Tracer):
        return None
    if value is None or isinstance(value, (str, bytes)):
        raise invalid(name, accepted, value)
    try:
        arr = np.asarray(value)
    except Exception as err:
        raise invalid(name, accepted, type(value).__name__) from err
    if arr.dtype.kind not in "biuf":
        raise invalid(name, accepted, value)
    if arr.size != 1:
        raise invalid(name, "a scalar", f"shape {arr.shape}")
    return float(arr.reshape(()))


def _interval(low, high, low_open, high_open) -> str:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    return f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"


def _in_range(x, low, high, low_open, high_open):
    """Works on floats and on arrays (then elementwise, jit-safe). Non-finite values are out of range."""
    ok = np.isfinite(x) if isinstance(x, float) else jax.numpy.isfinite(x)
    if low is not None:
        ok = ok & ((x > low) if low_open else (x >= low))
    if high is not None:
        ok = ok & ((x < high) if high_open else (x <= high))
    return ok


def check_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``value`` is finite and ``low (<|<=) value (<|<=) high``.

    Schedules are checked at step 0 here; :func:`guarded` checks them at every step.
    """
    if callable(value):
        try:
            value = value(0)
        except Exception as err:  # a schedule that cannot be evaluated at 0 is a user error
            raise ValueError(f"{name}: schedule failed at step 0 ({err})") from err
    x = _concrete(name, value)
    if x is not None and not bool(_in_range(x, low, high, low_open, high_open)):
        raise invalid(name, f"finite and in {_interval(low, high, low_open, high_open)}", x)


def guarded(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """Check a hyper-parameter now and at every step; returns what the step should evaluate.

    A concrete number is checked here (``ValueError``) and returned as is. A schedule, or a traced value
    (``optax.inject_hyperparams`` hands the factory traced values inside ``update``), is returned as a
    schedule that checks each value it produces: a concrete out-of-range value raises ``ValueError``
    naming the parameter (eager steps); under ``jax.jit`` it becomes NaN, so the step's update is NaN and
    :func:`flatjax.skip_nonfinite` skips it (the training CLI then stops with an error) instead of
    descending with a negative radius or extrapolating with λ > 1.
    """
    check_range(name, value, low=low, high=high, low_open=low_open, high_open=high_open)
    if not callable(value) and not isinstance(value, jax.core.Tracer):
        return value
    interval = _interval(low, high, low_open, high_open)

    def checked(count):
        v = value(count) if callable(value) else value
        if callable(value) and not isinstance(v, jax.core.Tracer):
            x = _concrete(f"{name} (schedule value at step {count})", v)
            if not _in_range(x, low, high, low_open, high_open):
                raise ValueError(f"{name} must be finite and in {interval}; its schedule gave {x!r} at step {count}")
        v = jax.numpy.asarray(v)
        if isinstance(v, jax.core.Tracer):
            return jax.numpy.where(_in_range(v, low, high, low_open, high_open), v, jax.numpy.nan)
        x = _concrete(name, v)
        if not _in_range(x, low, high, low_open, high_open):
            raise invalid(name, f"finite and in {interval}", x)
        return v

    return checked


def check_positive_int(name: str, value: Any, minimum: int = 1, *, allow_none: bool = False) -> int | None:
    """``value`` as an int if it is an integer >= ``minimum`` (or None when allowed), else ``ValueError``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise invalid(name, "a positive integer" if minimum == 1 else f"an integer >= {minimum}", value)
    return int(value)


def check_number(name: str, value: Any, **interval: Any) -> float:
    """``value`` as a float if it is a finite plain number (no schedule) in the interval of :func:`check_range`."""
    if callable(value):
        raise invalid(name, "a number, not a schedule", value)
    x = _concrete(name, value, "a real number")
    check_range(name, value, **interval)
    return value if x is None else x


def check_nonnegative(name: str, value: Any, *, positive: bool = False) -> float:
    """``value`` as a float if it is finite and >= 0 (> 0 when ``positive``)."""
    return check_number(name, value, low=0.0, low_open=positive)


def check_extra_args(name: str, extra: dict, known: tuple[str, ...]) -> None:
    """Raise for an unknown keyword that is a near-miss of a known one (``perturbed_batches``).

    Unknown keywords are otherwise ignored: ``optax.chain`` hands every member all of them.
    """
    for arg in extra:
        close = difflib.get_close_matches(arg, known, n=1, cutoff=0.8)
        if close:
            raise ValueError(f"{name}: unknown keyword argument {arg!r}; did you mean {close[0]!r}? "
                             f"(it takes {', '.join(known)})")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> Any:
    """``value`` if it is one of ``choices``, else ``ValueError``."""
    if value not in choices:
        raise invalid(name, f"one of {tuple(choices)}", value)
    return value


def check_callable(name: str, value: Any) -> Callable:
    """Raise ``ValueError`` unless ``value`` is callable."""
    if not callable(value):
        raise invalid(name, "callable", type(value).__name__)
    return value


def check_bool(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a Python bool."""
    if not isinstance(value, bool):
        raise invalid(name, "True or False", value)


def check_axis_name(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is None or a mesh/pmap axis name (a string)."""
    if value is not None and not isinstance(value, str):
        raise invalid(name, "None or the name of a mapped axis (a string)", value)


def raw_key(seed: Any) -> jax.Array:
    """A raw ``uint32[2]`` PRNG key from an int seed, a typed key or a raw key."""
    if isinstance(seed, jax.Array) and jax.numpy.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(seed)
    if isinstance(seed, (jax.Array, np.ndarray)) and np.shape(seed) == (2,):
        return jax.numpy.asarray(seed).astype(jax.numpy.uint32)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer, jax.Array)):
        raise invalid("seed", "an int or a jax.random key", seed)
    return jax.random.key_data(jax.random.key(seed))


_KEY = "a jax.random key (jax.random.key(seed) or jax.random.PRNGKey(seed))"


def check_key(key: Any, name: str = "key") -> jax.Array:
    """``key`` if it is one new-style typed key (``jax.random.key``) or a raw uint32[2] key (``PRNGKey``)."""
    if key is None:
        raise invalid(name, _KEY, key)
    try:
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.shape != ():
                raise invalid(name, "a single jax.random key (shape ())", key)
            return key
        if key.shape == (2,) and key.dtype == np.uint32:
            return key
    except AttributeError:
        pass
    raise invalid(name, _KEY, key)


def check_params(name: str, params: Any) -> None:
    """Raise ``ValueError`` unless ``params`` is a non-empty pytree of floating arrays."""
    if params is None:
        raise ValueError(f"{name}: params is None; pass the parameter pytree")
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError(f"{name}: params has no array leaves")
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.floating):
            raise ValueError(
                f"{name}: every parameter must be a floating-point array; {jax.tree_util.keystr(path)} is "
                f"{type(leaf).__name__} of dtype {dtype} (keep integer state out of params, e.g. in loss_kwargs)"
            )


def check_state(name: str, state: Any, state_type: type, how: str) -> None:
    """Raise ``ValueError`` unless ``state`` is a ``state_type`` (made by ``how``)."""
    if not isinstance(state, state_type):
        raise ValueError(f"{name}: state must be the {state_type.__name__} made by {how}, got {type(state).__name__}")


def check_like_params(name: str, what: str, tree: Any, params: Any) -> None:
    """Raise ``ValueError`` unless ``tree`` has the structure and leaf shapes of ``params``."""
    try:
        chex.assert_trees_all_equal_shapes(tree, params)
    except (AssertionError, ValueError) as err:
        raise ValueError(f"{name}: {what} must have the structure and shapes of params ({err})") from None


def _bound_axis_names() -> frozenset:
    """Names of the mapped axes (pmap, shard_map, named vmap) the current trace runs under."""
    try:
        from jax._src import core as jax_core  # no public accessor for the axis environment

        return frozenset(jax_core.get_axis_env().axis_sizes)
    except Exception:  # a JAX without it: skip this check rather than break the step
        return frozenset()


def check_data_parallel(name: str, params: Any, batch: Any, axis_name: str | None) -> None:
    """Raise ``ValueError`` for a data-parallel step that forgot ``axis_name``.

    Inside ``jax.shard_map`` a batch split over a mesh axis that the parameters are replicated over makes
    the gradient of every parameter come back SUMMED over that axis (a step n_devices times too long);
    under ``jax.pmap`` each replica would step on its own shard and the replicas would diverge.
    """
    if axis_name is not None:
        return
    from flatjax.core.evaluate import varying_axes

    batch_axes = frozenset().union(*(varying_axes(x) for x in jax.tree.leaves(batch)))
    param_axes = [varying_axes(x) for x in jax.tree.leaves(params)]
    typed = batch_axes or any(param_axes)
    if typed:
        shared = frozenset.intersection(*param_axes) if param_axes else frozenset()
        split = sorted(batch_axes - shared)
        if split:
            raise ValueError(
                f"{name}: the batch is split over the mesh axis {split[0]!r} of an enclosing shard_map but "
                f"axis_name is None, so the gradient of the replicated parameters would come back summed over "
                f"the devices (a step as many times too long as there are devices). Pass axis_name={split[0]!r}."
            )
        return
    bound = sorted(_bound_axis_names())
    if bound:
        raise ValueError(
            f"{name}: the step runs under the mapped axis {bound[0]!r} (jax.pmap, or shard_map without "
            f"check_vma) but axis_name is None: each replica would step on its own shard of the batch and the "
            f"replicas would diverge. Pass axis_name={bound[0]!r} (the gradients are then averaged; "
            "sam/asam(..., per_device=True) perturbs with each replica's own gradient)."
        )


def resolve_trainable(name: str, trainable: Any, params: Any) -> Any:
    """The ``trainable`` argument (a pytree of bools like params, or ``params -> tree``) as a checked tree."""
    mask = trainable(params) if callable(trainable) else trainable
    try:
        leaves = jax.tree.structure(params).flatten_up_to(mask)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{name}: trainable must be a pytree of Python bools with the structure of params "
                         f"(or a function params -> such a tree): {err}") from None
    if not all(isinstance(m, (bool, np.bool_)) for m in leaves):
        raise ValueError(f"{name}: trainable leaves must be Python bools (static), got "
                         f"{sorted({type(m).__name__ for m in leaves})}")
    if not any(leaves):
        raise ValueError(f"{name}: trainable marks no parameter as trainable")
    return mask
