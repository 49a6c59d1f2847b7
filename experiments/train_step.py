"""The training CLI's update: the method's estimator, the base optimizer, the meshes and ONE jitted step.

Every method, SGD included, is an estimator (:mod:`flatjax.estimators`; SGD is ``flatjax.estimators.sgd``,
plain ``value_and_grad``), and what differs between methods is read from :data:`flatjax.registry.METHODS`:
whether it draws noise from a seed, the keyword of its second mini-batch, whether it has independent passes
for ``--probe-devices``, and whether it must see the base optimizer's state (LETS). One update::

    (loss, model_state'), d, est_state', _ = est.value_and_grad(params, est_state, batch, <second batch>,
                                                                 loss_kwargs={"model_state": ...})
    updates, opt_state' = chain(add_decayed_weights(wd), sgd(lr_t, momentum)).update(d, opt_state, params)

and a non-finite update is skipped with :func:`flatjax.guard.keep_finite`: parameters, BatchNorm
statistics, the base optimizer's state and the estimator's method state are kept (its step count
advances, so the next step draws fresh noise), and the skip counters grow.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import flatjax
from experiments.configs import METHODS, TrainConfig
from flatjax import registry
from flatjax.core.evaluate import invariant
from flatjax.core.tree import is_finite
from flatjax.guard import keep_finite


def method_spec(method: str) -> registry.Method | None:
    """The registry entry of ``method``; None for the base optimizer alone (``sgd``)."""
    return registry.METHODS.get(method)


def estimator_factory(method: str) -> Callable[..., Any]:
    """``flatjax.estimators.<method>`` (``sgd``: plain ``value_and_grad`` in the estimator contract)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return getattr(flatjax.estimators, method)


def per_device_methods() -> list[str]:
    """The methods offering a per-device perturbation (``per_device=True``: google-research/sam's mode)."""
    return [n for n, m in registry.METHODS.items() if "per_device" in inspect.signature(m.estimator).parameters]


def has_parallel_passes(cfg: TrainConfig) -> bool:
    """Whether the method has independent passes for ``--probe-devices`` groups (else they duplicate work):
    a registry method with ``parallel_passes`` and more than one pass at ``cfg.method_kwargs`` (e.g. not
    WP-SGD with k = 1), or m-sharpness groups (``m``)."""
    spec = method_spec(cfg.method)
    if spec is None:
        return False
    if cfg.method_kwargs.get("m") is not None:
        return True
    return spec.parallel_passes and spec.estimator(lambda p, b: 0.0, **cfg.method_kwargs).n_probes > 1


def second_batch_keyword(cfg: TrainConfig) -> str | None:
    """The keyword under which the step hands the method a second mini-batch, or None (one batch).

    ``cfg.two_batches``: the next batch of the same stream (m-(A)RWP's ``perturbed_batch``); a method whose
    second batch is ``val_batch`` (LETS) reads it from an independently shuffled stream of the training set.
    """
    spec = method_spec(cfg.method)
    keyword = spec.second_batch if spec is not None else None
    if cfg.two_batches and keyword is None:
        raise ValueError(f"{cfg.name}: two_batches is set, but {cfg.method} reads no second mini-batch")
    return keyword if cfg.two_batches or keyword == "val_batch" else None


def lr_schedule(cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """Cosine from ``cfg.lr`` to 0: per update, or per epoch (``cfg.lr_per_epoch``, torch's
    ``CosineAnnealingLR(T_max=epochs)`` stepped once an epoch, as the official m-ARWP code)."""
    if not cfg.lr_per_epoch:
        return optax.cosine_decay_schedule(cfg.lr, max(total_steps, 1))
    per_epoch = optax.cosine_decay_schedule(cfg.lr, max(total_steps // steps_per_epoch, 1))
    return lambda count: per_epoch(count // steps_per_epoch)


def base_optimizer(cfg: TrainConfig, total_steps: int, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """``chain(add_decayed_weights(wd), sgd(cosine lr, momentum))``: coupled weight decay, as torch's SGD."""
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(lr_schedule(cfg, total_steps, steps_per_epoch), momentum=cfg.momentum))


def make_estimator(cfg: TrainConfig, loss_fn: Callable, base: optax.GradientTransformation, total_steps: int,
                   seed: int, axis_name: str | None, per_device: bool = False, strategy: Any = "auto"):
    """The method's estimator (``has_aux=True``: BatchNorm statistics are its ``aux``)."""
    factory, spec = estimator_factory(cfg.method), method_spec(cfg.method)
    kw = dict(cfg.method_kwargs)
    if cfg.sigma_increase is not None:
        kw["sigma"] = flatjax.cosine_increasing(kw.get("sigma", 0.001), cfg.sigma_increase, total_steps)
    if spec is not None and spec.seeded:
        kw["seed"] = seed
    if per_device:
        if cfg.method not in per_device_methods():
            raise ValueError(f"--per-device applies to {', '.join(per_device_methods())}, not {cfg.method}")
        kw["per_device"] = True
    if strategy != "auto":
        kw["strategy"] = strategy
    args = (base,) if spec is not None and spec.wraps_optimizer else ()  # LETS looks one base step ahead
    return factory(loss_fn, *args, **kw, has_aux=True, axis_name=axis_name)


def init_state(est: Any, tx: optax.GradientTransformation, params: Any, model_state: Any) -> dict:
    """The training state the step carries (and a checkpoint stores, with the step number)."""
    zero = jnp.zeros((), jnp.int32)
    return {"params": params, "model_state": model_state, "opt_state": tx.init(params),
            "est_state": est.init(params), "skips": {"consecutive": zero, "total": zero}}


def make_probe_mesh(probe_devices: int, n_devices: int) -> jax.sharding.Mesh:
    """A ``(probe, data)`` mesh over the first ``n_devices`` devices: ``probe_devices`` groups."""
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((probe_devices, n_devices // probe_devices), ("probe", "data"), axis_types=(auto, auto),
                         devices=jax.devices()[:n_devices])


def make_train_step(cfg: TrainConfig, est: Any, tx: optax.GradientTransformation, mesh: Any,
                    replicate_on: Any = None) -> Callable:
    """A jitted ``step(state, batch, second_batch, key) -> (state, loss)`` (``state``: :func:`init_state`).

    With a mesh, the body runs per device inside ``shard_map`` (batches split over ``"data"``, the state
    replicated; the estimator was built with ``axis_name="data"``) and per-device values (loss, BatchNorm
    statistics) are averaged over devices. With ``replicate_on`` (the ``--probe-devices`` mesh), a plain jit
    whose outputs stay replicated on that mesh; the method's ``ShardMapProbes`` does the splitting.
    """
    axis = "data" if mesh is not None else None
    keyword, spec = second_batch_keyword(cfg), method_spec(cfg.method)
    wraps = spec is not None and spec.wraps_optimizer

    def local_step(state, batch, second, key):
        params, model_state, opt_state, est_state = (state[k] for k in ("params", "model_state", "opt_state",
                                                                         "est_state"))
        loss_kwargs = {"model_state": model_state}
        if cfg.model_kwargs.get("dropout_rate"):
            loss_kwargs["dropout_key"] = key
        extra = {keyword: second} if keyword is not None else {}
        if wraps:
            extra["base_state"] = opt_state
        (loss, aux), direction, new_est, _ = est.value_and_grad(params, est_state, batch, loss_kwargs=loss_kwargs,
                                                               **extra)
        updates, new_opt = tx.update(direction, opt_state, params)
        ok = is_finite(updates)
        new = (optax.apply_updates(params, updates), model_state if aux is None else aux, new_opt, new_est)
        params, model_state, opt_state, est_state = keep_finite(ok, new, (params, model_state, opt_state, est_state))
        bad = jnp.logical_not(ok).astype(jnp.int32)
        skips = {"consecutive": (state["skips"]["consecutive"] + bad) * bad, "total": state["skips"]["total"] + bad}
        out = {"params": params, "model_state": model_state, "opt_state": opt_state, "est_state": est_state,
               "skips": skips}, loss
        if axis is not None:  # per-device values (loss, BN statistics, per-device diagnostics) -> their mean
            out = jax.tree.map(lambda x: invariant(x, axis), out)
        return out

    if mesh is None:
        if replicate_on is None:
            return jax.jit(local_step)
        # keep the state replicated on the probe mesh: otherwise the compiler may pick other output
        # shardings, and step 2 (whose inputs are step 1's outputs) compiles again
        return jax.jit(local_step, out_shardings=jax.sharding.NamedSharding(replicate_on, P()))
    second_spec = P("data") if keyword is not None else P()
    return jax.jit(jax.shard_map(local_step, mesh=mesh, in_specs=(P(), P("data"), second_spec, P()),
                                 out_specs=P()))


def make_eval(apply: Callable, eval_tf: Callable | None, batch_size: int = 1000) -> Callable:
    """Returns ``evaluate(params, model_state, dataset) -> (loss, accuracy)`` in eval mode; ``dataset`` is an
    in-memory split (evaluated in slices of ``batch_size`` through ``eval_tf``) or a function returning an
    iterator of ready batches (the streaming pipeline's test split)."""

    @jax.jit
    def run(params, model_state, images, labels):
        logits, _ = apply(params, model_state, images, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
        return loss, jnp.sum(jnp.argmax(logits, -1) == labels)

    def in_memory(dataset):
        for i in range(0, len(dataset.label), batch_size):
            batch = {"image": dataset.image[i:i + batch_size], "label": dataset.label[i:i + batch_size]}
            yield batch if eval_tf is None else eval_tf(batch, np.random.default_rng(0))

    def evaluate(params, model_state, dataset) -> tuple[float, float]:
        total_loss, correct, n = 0.0, 0, 0
        for batch in (dataset() if callable(dataset) else in_memory(dataset)):
            loss, ok = run(params, model_state, np.asarray(batch["image"]), np.asarray(batch["label"]))
            total_loss, correct, n = total_loss + float(loss), correct + int(ok), n + len(batch["label"])
        return total_loss / n, correct / n

    return evaluate
