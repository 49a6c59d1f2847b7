"""``optax.inject_hyperparams`` for flatjax factories, with their non-numeric arguments kept static."""

from __future__ import annotations

import inspect
from typing import Callable, Iterable

import optax

from flatjax.registry import METHODS


def inject_hyperparams(
    factory: Callable[..., optax.GradientTransformation], static_args: Iterable[str] = ()
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """``optax.inject_hyperparams(factory)`` with everything but the method's hyper-parameters static.

    Plain ``optax.inject_hyperparams`` treats every callable argument as a schedule (it would call
    ``loss_fn(step)``) and every int as a traced hyper-parameter (breaking shape arguments such as ``m``).
    Here only the method's schedulable hyper-parameters (ρ, σ, λ, η, β, α — ``Method.hyperparameters``
    in :mod:`flatjax.registry`) are injected; they are stored in the state's ``hyperparams`` dict, where
    they can be read and overwritten between steps (and are range-checked at every step).

    Args:
      factory: the Optax form of a flatjax method (e.g. ``flatjax.sam``).
      static_args: further arguments to keep static.

    Example::

        tx = optax.chain(flatjax.inject_hyperparams(flatjax.sam)(loss_fn, rho=0.05), optax.sgd(0.1))
        state = tx.init(params)
        state[0].hyperparams["rho"] = 0.1   # takes effect at the next update
    """
    name = getattr(factory, "__name__", None)
    if name not in METHODS:
        raise ValueError(f"inject_hyperparams takes the Optax form of a flatjax method ({', '.join(METHODS)}), "
                         f"got {factory!r}; for other factories use optax.inject_hyperparams")
    injected = set(METHODS[name].hyperparameters) - set(static_args)
    static = set(inspect.signature(factory).parameters) - injected
    return optax.inject_hyperparams(factory, static_args=tuple(sorted(static)))
