"""Pure-function view of an NNX model, for optimizers that want ``loss_fn(params, batch)``.

flatjax's transformations evaluate the loss at perturbed parameters, so the model
must be a function of an explicit parameter pytree. ``split_model`` separates an
``nnx.Module`` into a static graph definition, its trainable parameters and the rest
of its state (BatchNorm statistics, dropout RNG counters), all as plain nested dicts
of arrays; ``make_apply`` returns a pure ``apply`` that rebuilds the module, runs it
in train or eval mode and returns the updated state::

    model = flatjax.models.create("resnet18", 10, seed=0)
    graphdef, params, model_state = split_model(model)
    apply = make_apply(graphdef)

    def loss_fn(params, batch):          # close over model_state / key in the step
        logits, new_state = apply(params, batch["model_state"], batch["image"],
                                  train=True, dropout_key=batch["key"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, new_state           # aux: the new BatchNorm statistics

    logits, _ = apply(params, model_state, images, train=False)   # evaluation

Train mode (``train=True``) uses batch statistics and updates the running ones and
applies dropout; eval mode (``train=False``) uses the running statistics, no dropout,
and returns ``model_state`` unchanged. The mode is set on a view of the module
(``nnx.view``), so the same ``graphdef`` serves both. ``merge_model`` goes back to a
stateful module (e.g. for checkpoints or ``model.eval()`` use).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

Params = dict[str, Any]
ModelState = dict[str, Any]
ApplyFn = Callable[..., tuple[jax.Array, ModelState]]


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Params, ModelState]:
    """Splits a module into ``(graphdef, params, model_state)``.

    Args:
      model: any ``nnx.Module`` (concrete, or abstract from ``nnx.eval_shape``).

    Returns:
      ``graphdef``: the static structure (hashable; close over it or mark it static);
      ``params``: nested dict of the ``nnx.Param`` arrays (the trainable pytree, with
      the module attribute names as keys, e.g. ``params["blocks"][0]["conv1"]["kernel"]``);
      ``model_state``: nested dict of every other variable (BatchNorm ``mean``/``var``,
      RNG keys and counters of dropout layers); empty for models without any.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def merge_model(graphdef: nnx.GraphDef, params: Params, model_state: ModelState) -> nnx.Module:
    """Rebuilds a stateful module from the output of :func:`split_model`.

    Args:
      graphdef: the graph definition from :func:`split_model`.
      params: the parameter dict (possibly updated by an optimizer).
      model_state: the non-parameter state dict.

    Returns:
      A new ``nnx.Module`` holding these arrays.
    """
    return nnx.merge(graphdef, params, model_state)


def make_apply(graphdef: nnx.GraphDef) -> ApplyFn:
    """Returns a pure ``apply(params, model_state, x, *, train, dropout_key=None)``.

    Args:
      graphdef: the graph definition from :func:`split_model`.

    Returns:
      ``apply`` with arguments

      * ``params``, ``model_state``: dicts as returned by :func:`split_model`;
      * ``x``: a batch of inputs (NHWC images for the conv nets and ViTs);
      * ``train``: Python bool (static under ``jax.jit``); see the module docstring;
      * ``dropout_key``: optional PRNG key that reseeds every dropout stream for this
        call (streams named ``"dropout"``, or ``"default"`` when the model was built
        from a single-stream ``nnx.Rngs``); without it the streams continue from the
        keys and counters stored in ``model_state``;

      and result ``(logits, new_model_state)``, the latter with the same structure as
      ``model_state``. ``apply`` is pure and can be jitted, differentiated and vmapped.
    """

    def apply(
        params: Params,
        model_state: ModelState,
        x: jax.Array,
        *,
        train: bool,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, ModelState]:
        if not isinstance(train, bool):
            raise ValueError(f"train must be a Python bool (True or False), got {train!r}")
        model = nnx.merge(graphdef, params, model_state)
        # A view, not set_attributes: the graphdef stays mode-agnostic and reusable.
        model = nnx.view(
            model, deterministic=not train, use_running_average=not train, raise_if_not_found=False
        )
        if dropout_key is not None:
            nnx.reseed(model, dropout=dropout_key, default=dropout_key)
        logits = model(x)
        new_state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
        return logits, new_state

    return apply


def count_params(tree_or_model: Any) -> int:
    """Counts scalar parameters.

    Args:
      tree_or_model: an ``nnx.Module`` (its ``nnx.Param`` variables are counted, so
        BatchNorm running statistics are excluded) or a pytree of arrays /
        ``jax.ShapeDtypeStruct`` (every leaf is counted).

    Returns:
      The total number of scalars.
    """
    tree = nnx.state(tree_or_model, nnx.Param) if isinstance(tree_or_model, nnx.Module) else tree_or_model
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree)))
