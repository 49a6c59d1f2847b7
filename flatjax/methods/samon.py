"""SAM-ON: SAM whose ascent step perturbs only the normalization layers' affine parameters.

Mueller, Vlaar, Rolnick, Hein, "Normalization Layers Are All That Sharpness-Aware Minimization Needs",
NeurIPS 2023. The ascent uses the clean gradient restricted to the normalization parameters N (the
scales and offsets of BatchNorm/LayerNorm, about 0.1 % of a ResNet's parameters); the descent uses the
gradient of EVERY parameter at that point::

    g_N = ∇_N L_B(w) (zero elsewhere),   e = ρ g_N/(‖g_N‖ + ξ),   d = ∇L_B(w + e)

Built from the SAM family's public building block :func:`flatjax.methods.sam.sam_family`.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

from flatjax.core import perturb
from flatjax.core.estimator import Estimator
from flatjax.core.evaluate import Strategy
from flatjax.core.schedule import ScalarOrSchedule
from flatjax.core.tree import PyTree
from flatjax.core.validate import guarded
from flatjax.methods.sam import as_mask_fn, sam_family

#: A path component naming a normalization layer (Flax: ``BatchNorm_0``, ``LayerNorm_1``, ``bn1``,
#: ``norm``, ``ln_f``, ``encoder_norm`` ...).
NORM_LAYER = re.compile(r"(norm|^bn\d*$|^ln(_\w+)?\d*$)", re.IGNORECASE)


def default_norm_mask(params: PyTree) -> PyTree:
    """True for the ``scale``/``bias`` leaves under a normalization layer (see ``NORM_LAYER``)."""

    def is_norm(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        return bool(names and names[-1] in ("scale", "bias") and any(NORM_LAYER.search(n) for n in names[:-1]))

    return jax.tree_util.tree_map_with_path(is_norm, params)


def samon(
    loss_fn: Callable[..., Any],
    rho: ScalarOrSchedule = 0.05,
    *,
    norm_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    m: int | None = None,
    axis_name: str | None = None,
    per_device: bool = False,
    has_aux: bool = False,
    strategy: Strategy = "auto",
    trainable: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> Estimator:
    """SAM-ON (Mueller et al., NeurIPS 2023): SAM with the ascent on normalization parameters only.

    Perturbing far fewer parameters, SAM-ON typically needs its own ρ: tune it as for SAM.

    Args:
      loss_fn: ``loss_fn(params, batch, **loss_kwargs) -> loss`` or ``(loss, aux)``.
      rho: radius ρ ≥ 0 (float or schedule).
      norm_mask: which leaves are normalization parameters: a pytree of bools like params or a callable
        ``params -> mask``; None: :func:`default_norm_mask` (``scale``/``bias`` under a layer whose name
        contains "norm", or is ``bn``/``ln``). A mask selecting nothing raises.
      m, axis_name, per_device, has_aux, strategy, trainable: as in :func:`sam`.

    Reports as :func:`sam` (``grad_norm`` is the clean gradient's norm over every parameter).

    Example::

        >>> import jax.numpy as jnp, flatjax
        >>> params = {"dense": {"kernel": jnp.ones((2, 2))}, "LayerNorm_0": {"scale": jnp.ones(2)}}
        >>> loss_fn = lambda p, x: jnp.sum((x @ p["dense"]["kernel"] * p["LayerNorm_0"]["scale"]) ** 2)
        >>> est = flatjax.estimators.samon(loss_fn, rho=0.1)
        >>> loss, grads, state, info = est.value_and_grad(params, est.init(params), jnp.ones((1, 2)))
        >>> float(loss)
        8.0
        >>> import optax
        >>> tx = optax.chain(flatjax.samon(loss_fn, rho=0.1), optax.sgd(0.1, momentum=0.9))
    """
    rho = guarded("rho", rho, low=0.0)
    mask_of = as_mask_fn(default_norm_mask if norm_mask is None else norm_mask)

    def ascent(g, w, h):
        mask = mask_of(w)
        if not any(jax.tree.leaves(mask)):
            raise ValueError("samon: norm_mask selects no parameter (no normalization layer found by name); "
                             "pass norm_mask=<pytree of bools> marking the normalization scales and offsets")
        g_norm = jax.tree.map(lambda x, on: x if on else jnp.zeros_like(x), g, mask)
        return perturb.normalized_ascent(g_norm, h["rho"])

    def hyper_of(ctx):
        return {"rho": ctx.value(rho)}

    return sam_family("samon", loss_fn, ascent, hyper_of, m=m, axis_name=axis_name, per_device=per_device,
                      has_aux=has_aux, strategy=strategy, trainable=trainable)
