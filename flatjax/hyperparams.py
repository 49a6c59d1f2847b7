"""``optax.inject_hyperparams`` for flatjax factories, with their non-numeric arguments kept static."""

from __future__ import annotations

import inspect
from typing import Callable, Iterable

import optax

#: Arguments that are functions, structure or shapes, never schedulable hyper-parameters.
STRUCTURAL_ARGS = ("loss_fn", "m", "k", "mask", "seed", "aux_init", "strategy", "axis_name", "inner",
                   "noise", "form", "hypergradient", "base_optimizer", "radius_optimizer")


def inject_hyperparams(
    factory: Callable[..., optax.GradientTransformation], static_args: Iterable[str] = ()
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """``optax.inject_hyperparams(factory)`` with flatjax's structural arguments declared static.

    Plain ``optax.inject_hyperparams`` treats every callable argument as a schedule (it would call
    ``loss_fn(step)``) and every int as a traced hyper-parameter (breaking shape arguments such as ``m``);
    this wrapper passes them through unchanged. The numeric hyper-parameters (ρ, σ, λ, η, β, ...) are
    then stored in the state's ``hyperparams`` dict, where they can be read and overwritten between steps.

    Example::

        tx = optax.chain(flatjax.inject_hyperparams(flatjax.sam)(loss_fn, rho=0.05), optax.sgd(0.1))
        state = tx.init(params)
        state[0].hyperparams["rho"] = 0.1   # takes effect at the next update
    """
    names = set(inspect.signature(factory).parameters)
    static = (set(STRUCTURAL_ARGS) & names) | set(static_args) | set(getattr(factory, "static_args", ()))
    return optax.inject_hyperparams(factory, static_args=tuple(sorted(static)))
