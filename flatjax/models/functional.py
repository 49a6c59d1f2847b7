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

    # loss_fn(params, batch, model_state, dropout_key=None) -> (loss, new_model_state)
    loss_fn = make_loss_fn(graphdef)
    tx = optax.chain(flatjax.sam(loss_fn, 0.05, has_aux=True, aux_init=model_state),
                     optax.sgd(0.1, momentum=0.9))
    ...  # in the jitted step:
    updates, opt_state = tx.update(None, opt_state, params, batch=batch,
                                   loss_kwargs={"model_state": model_state, "dropout_key": key})
    model_state = flatjax.step_info(opt_state).aux   # statistics of the clean pass

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
import optax
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


def make_loss_fn(
    graphdef: nnx.GraphDef, *, label_smoothing: float = 0.0
) -> Callable[..., tuple[jax.Array, ModelState]]:
    """Returns a train-mode classification loss in the flatjax ``loss_fn`` contract.

    Args:
      graphdef: the graph definition from :func:`split_model`.
      label_smoothing: label-smoothing factor in [0, 1).

    Returns:
      ``loss_fn(params, batch, model_state, dropout_key=None) -> (loss, new_model_state)``:
      mean softmax cross-entropy of ``batch["image"]`` against the integer
      ``batch["label"]``, with the model in train mode; the new BatchNorm statistics
      (and dropout RNG counters) are the auxiliary output. Pass ``model_state`` and
      ``dropout_key`` through the method's ``loss_kwargs``.

    Raises:
      ValueError: if ``label_smoothing`` is outside [0, 1).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    apply = make_apply(graphdef)

    def loss_fn(
        params: Params,
        batch: dict[str, jax.Array],
        model_state: ModelState,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, ModelState]:
        logits, new_state = apply(params, model_state, batch["image"], train=True, dropout_key=dropout_key)
        labels = batch["label"]
        if label_smoothing:
            targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
        else:
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, new_state

    return loss_fn


def pure_loss(loss: Callable[[nnx.Module, Any], jax.Array], model: nnx.Module, *, train: bool = True
              ) -> Callable[..., tuple[jax.Array, Any]]:
    """A flatjax ``loss_fn`` from an NNX loss written against the module (no hand-written split/merge).

    Args:
      loss: ``loss(model, batch) -> scalar`` as in any NNX training loop.
      model: the module (only its graph structure is kept).
      train: run the module in train mode (batch statistics, dropout on); False for eval mode.

    Returns:
      ``loss_fn(params, batch, model_state, dropout_key=None) -> (loss, new_model_state)`` over the
      ``nnx.Param`` state and the rest of the module's state (BatchNorm statistics, RNG counters): use it
      with ``has_aux=True``, and with :func:`value_and_grad`, which does the splitting in your step::

          est = flatjax.estimators.sam(flatjax.models.pure_loss(loss, model), rho=0.05, has_aux=True)
    """
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model must be an nnx.Module, got {type(model).__name__}")
    if not callable(loss):
        raise ValueError(f"loss must be callable as loss(model, batch), got {type(loss).__name__}")
    graphdef = nnx.graphdef(model)

    def loss_fn(params, batch, model_state, dropout_key: jax.Array | None = None):
        module = nnx.merge(graphdef, params, model_state)
        module = nnx.view(module, deterministic=not train, use_running_average=not train,
                          raise_if_not_found=False)
        if dropout_key is not None:
            nnx.reseed(module, dropout=dropout_key, default=dropout_key)
        value = loss(module, batch)
        return value, nnx.as_pure(nnx.state(module, nnx.Not(nnx.Param)))

    return loss_fn


def params_of(model: nnx.Module) -> Any:
    """The module's ``nnx.Param`` arrays as the pure ``nnx.State`` the estimators work on."""
    return nnx.as_pure(nnx.state(model, nnx.Param))


def value_and_grad(estimator: Any, model: nnx.Module, est_state: Any, batch: Any, *,
                   optimizer: nnx.Optimizer | None = None, dropout_key: jax.Array | None = None, **kwargs: Any):
    """Run a flatjax estimator on an NNX module inside your (``nnx.jit``) step.

    Splits the module, evaluates the method's passes with the loss from :func:`pure_loss`, writes the
    clean pass's non-parameter state (BatchNorm statistics) back into ``model``, and returns gradients
    that ``nnx.Optimizer.update(model, grads)`` accepts::

        est = flatjax.estimators.sam(flatjax.models.pure_loss(loss, model), rho=0.05, has_aux=True)
        est_state = est.init(flatjax.models.params_of(model))

        @nnx.jit
        def train_step(model, optimizer, est_state, batch):
            loss, grads, est_state, info = flatjax.models.value_and_grad(est, model, est_state, batch)
            optimizer.update(model, grads)
            return loss, est_state

    Args:
      estimator: a flatjax estimator over :func:`pure_loss` (``has_aux=True``).
      model: the module; its non-parameter state is updated in place.
      est_state: the estimator's state.
      batch: the mini-batch.
      optimizer: your ``nnx.Optimizer``; LETS needs it (its lookahead uses the optimizer's state).
      dropout_key: reseeds the dropout streams for this step (otherwise they continue from the module's).
      **kwargs: further estimator arguments (``perturbed_batch``, ``val_batch``, ``key`` ...).

    Returns:
      ``(loss, grads, est_state, info)``; ``grads`` is an ``nnx.State`` of ``nnx.Param`` like the module's.
    """
    if not getattr(estimator, "has_aux", False):
        raise ValueError("value_and_grad: build the estimator with has_aux=True over flatjax.models.pure_loss(...)")
    variables = nnx.state(model, nnx.Param)
    params = nnx.as_pure(variables)
    model_state = nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))
    if hasattr(estimator, "base_optimizer") and "base_state" not in kwargs:
        if optimizer is None:
            raise ValueError("value_and_grad: LETS needs optimizer=, your nnx.Optimizer (its state is the lookahead's)")
        kwargs["base_state"] = nnx.as_pure(optimizer.opt_state)
    loss_kwargs = {**kwargs.pop("loss_kwargs", {}), "model_state": model_state, "dropout_key": dropout_key}
    (loss, new_state), grads, est_state, info = estimator.value_and_grad(
        params, est_state, batch, loss_kwargs=loss_kwargs, **kwargs)
    if new_state is not None:  # None when a given clean gradient replaced the clean pass
        nnx.update(model, new_state)
    grads = jax.tree.unflatten(jax.tree.structure(variables), jax.tree.leaves(grads))
    return loss, grads, est_state, info


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
