"""SAM and ASAM (estimator form), with m-sharpness and data-parallel (global or per-device) perturbations.

* SAM: Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
  Generalization", ICLR 2021.
* ASAM: Kwon, Kim, Park, Choi, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
  Learning of Deep Neural Networks", ICML 2021.

:func:`sam_family` and :func:`as_mask_fn` are public building blocks for new methods of the two-pass
SAM family. Update rules, defaults and costs of every method: ``docs/algorithms.md``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from flatjax.core import perturb
from flatjax.core.estimator import NAN, Direction, Estimator, StepContext, rule_estimator
from flatjax.core.evaluate import Strategy
from flatjax.core.schedule import ScalarOrSchedule
from flatjax.core.tree import PyTree, add_scaled, global_norm, index, weighted_sum
from flatjax.core.validate import check_bool, check_positive_int, guarded, invalid

# ascent(grad, params, hyper) -> perturbation e
Ascent = Callable[[PyTree, PyTree, dict], PyTree]


def _split_groups(batch: PyTree, m: int) -> list[PyTree]:
    """Split every leaf's leading (example) axis into groups of ``m`` consecutive examples."""
    for path, x in jax.tree_util.tree_leaves_with_path(batch):
        if jnp.ndim(x) == 0:
            raise ValueError(f"m-sharpness splits every batch leaf along its first (example) axis, but batch"
                             f"{jax.tree_util.keystr(path)} is a scalar; pass per-example values, or constants "
                             "through loss_kwargs")
    sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"m-sharpness needs every batch leaf to share its leading size, got {sorted(sizes)}")
    (size,) = sizes
    if size % m:
        raise ValueError(f"m must divide the batch size: batch of {size}, m={m}")
    n = size // m
    return [jax.tree.map(lambda x, i=i: x[i * m : (i + 1) * m], batch) for i in range(n)]


def _mean_aux(aux: PyTree) -> PyTree:
    """Mean over the group axis for floating leaves (e.g. BatchNorm statistics); first group otherwise."""
    return jax.tree.map(
        lambda x: jnp.mean(x, axis=0).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x[0],
        aux,
    )


def _sam_direction(ascent: Ascent, hyper_of: Callable[[StepContext], dict], m: int | None, per_device: bool):
    """The two-pass SAM-family rule ``d = ∇L(w + e(∇L(w)))``, per group of ``m`` examples if ``m``."""

    def direction(ctx: StepContext, method_state: PyTree) -> Direction:
        hyper = hyper_of(ctx)
        reduce = not per_device  # per-device perturbation: ascent from the local gradient
        if m is None:
            if ctx.clean_grad is not None:
                loss0, aux0, g = jnp.asarray(NAN, ctx.dtype), None, ctx.clean_grad
            else:
                loss0, aux0, g = ctx.value_and_grad(ctx.params, ctx.batch, reduce=reduce)
                if per_device:  # report the mean clean loss; the ascent used the local gradient
                    loss0 = jax.lax.pmean(loss0, ctx.evaluator.axis_name)
            e = ascent(g, ctx.params, hyper)
            loss1, _, d = ctx.value_and_grad(add_scaled(ctx.params, e), ctx.batch)
            grad_norm = global_norm(g)
        else:
            groups = _split_groups(ctx.batch, m)
            clean = ctx.probes(params=ctx.params, batches=groups, reduce=False)
            es = jax.vmap(lambda g: ascent(g, ctx.params, hyper))(clean.grads)
            points = [add_scaled(ctx.params, index(es, i)) for i in range(len(groups))]
            pert = ctx.probes(points=points, batches=groups, reduce=False)
            d = weighted_sum(pert.grads, jnp.full((len(groups),), 1.0 / len(groups)))
            loss0, loss1, aux0 = jnp.mean(clean.losses), jnp.mean(pert.losses), _mean_aux(clean.aux)
            grad_norm = jnp.mean(jax.vmap(global_norm)(clean.grads))
            if ctx.evaluator.axis_name is not None:  # m-sharpness inside a data-parallel shard_map
                name = ctx.evaluator.axis_name
                d, loss0, loss1 = jax.lax.pmean((d, loss0, loss1), name)
        diagnostics = {"rho": hyper["rho"], "grad_norm": grad_norm}
        return Direction(d, method_state, loss0, aux0, jnp.stack([loss0, loss1]), diagnostics)

    return direction


def sam_family(name: str, loss_fn: Callable[..., Any], ascent: Ascent, hyper_of: Callable[[StepContext], dict],
               *, m: int | None, axis_name: str | None, per_device: bool, has_aux: bool,
               strategy: Strategy, trainable: PyTree | Callable[[PyTree], PyTree] | None = None) -> Estimator:
    """An estimator of the two-pass SAM family from its ascent rule ``e = ascent(g, w, hyper)``.

    The public building block of :func:`sam`, :func:`asam` and :func:`flatjax.methods.samon.samon`: the
    rule is ``g = ∇L_B(w)``, ``e = ascent(g, w, hyper)``, ``d = ∇L_B(w + e)``, with m-sharpness,
    per-device perturbations, ``clean_grad`` reuse and ``trainable`` handled here.

    Args:
      name: the public factory name (error messages, ``Estimator.name``).
      loss_fn: ``loss_fn(params, batch, **loss_kwargs) -> loss`` or ``(loss, aux)``.
      ascent: ``ascent(g, w, hyper) -> e``, a pytree like ``w`` (see :mod:`flatjax.core.perturb` for
        :func:`~flatjax.core.perturb.normalized_ascent` and :func:`~flatjax.core.perturb.adaptive_ascent`).
      hyper_of: ``hyper_of(ctx) -> dict`` of the step's hyper-parameters (read them with ``ctx.value``);
        it must contain ``"rho"``, which is reported as a diagnostic.
      m, axis_name, per_device, has_aux, strategy, trainable: as in :func:`sam`.

    Reports as :func:`sam`: ``loss``/``aux`` from the clean pass, ``probe_losses`` = [L(w), L(w + e)],
    diagnostics ``rho`` and ``grad_norm``. Writing a new method on this block: ``docs/algorithms.md``,
    "Writing a method".
    """
    check_positive_int("m", m, allow_none=True)
    check_bool("per_device", per_device)
    if per_device and axis_name is None:
        raise ValueError(f"{name}: per_device=True needs axis_name (the data-parallel mesh axis)")
    rejects = None
    if m is not None:
        rejects = "with m-sharpness (m set) the ascent needs each group's own gradient"
    elif per_device:
        rejects = "per_device=True perturbs with each device's own gradient, computed here"
    return rule_estimator(
        name=name,
        loss_fn=loss_fn,
        direction=_sam_direction(ascent, hyper_of, m, per_device),
        init_method_state=lambda params: (),
        n_probes=2,
        diagnostics=("rho", "grad_norm"),
        has_aux=has_aux,
        seed=0,
        strategy=strategy,
        axis_name=axis_name,
        reuse_gradient=m is None and not per_device,
        rejects_clean_grad=rejects,
        trainable=trainable,
    )


def sam(
    loss_fn: Callable[..., Any],
    rho: ScalarOrSchedule = 0.05,
    *,
    m: int | None = None,
    axis_name: str | None = None,
    per_device: bool = False,
    has_aux: bool = False,
    strategy: Strategy = "auto",
    trainable: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> Estimator:
    """Sharpness-Aware Minimization (Foret et al., ICLR 2021).

    ``g = ∇L_B(w)``, ``e = ρ g / (‖g‖ + 1e-12)``, direction ``d = ∇L_B(w + e)``. A zero gradient gives
    ``e = 0`` (no NaN).

    Args:
      loss_fn: ``loss_fn(params, batch, **loss_kwargs) -> loss`` or ``(loss, aux)``.
      rho: radius ρ ≥ 0 (float or schedule of the step count). Papers: 0.05 CIFAR-10, 0.1–0.2 CIFAR-100.
      m: m-sharpness group size: each group of ``m`` consecutive examples gets its own ascent step, and
        ``d`` is the mean of the group directions (the batch size must be a multiple of ``m``).
      axis_name: data-parallel axis when the step runs inside ``shard_map``/``pmap`` with the batch
        sharded; the gradients are averaged over it (parameters are made device-varying first, so the
        scale is right).
      per_device: with ``axis_name``: each device perturbs with its own local gradient (m-sharpness with
        m = per-device batch, the google-research/sam default); otherwise the global gradient is used.
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      strategy: how m-sharpness groups are evaluated: 'auto', 'sequential', 'vmap', ShardMapProbes.
      trainable: None (all), or a pytree of bools like params (or ``params -> tree``): False leaves are frozen —
        neither perturbed nor counted in norms/noise — and get a zero direction.

    Reports: ``loss``/``aux`` from the unperturbed pass (mean over groups with ``m``); ``probe_losses``
    = [L(w), L(w + e)]; diagnostics ``rho``, ``grad_norm`` (‖g‖). A given ``clean_grad`` (the device
    average under ``axis_name``) replaces the clean pass; with ``m`` or ``per_device`` it raises.

    See ``docs/algorithms.md`` (SAM) for the defaults used in the papers and the cost.

    Example::

        >>> import jax.numpy as jnp, optax, flatjax
        >>> loss_fn = lambda w, batch: jnp.sum((w["x"] - batch) ** 2)
        >>> params, batch = {"x": jnp.array([1.0, 2.0])}, jnp.zeros(2)
        >>> est = flatjax.estimators.sam(loss_fn, rho=0.05)                # estimator form: your loop
        >>> loss, grads, est_state, info = est.value_and_grad(params, est.init(params), batch)
        >>> round(float(loss), 4), [round(float(x), 4) for x in info.probe_losses]   # L(w), L(w + e)
        (5.0, [5.0, 5.2261])
        >>> sorted(info.diagnostics)
        ['grad_norm', 'rho']
        >>> tx = optax.chain(flatjax.sam(loss_fn, rho=0.05), optax.sgd(0.1, momentum=0.9))   # Optax form
    """
    rho = guarded("rho", rho, low=0.0)
    ascent = lambda g, w, h: perturb.normalized_ascent(g, h["rho"])  # noqa: E731
    hyper_of = lambda ctx: {"rho": ctx.value(rho)}  # noqa: E731
    return sam_family("sam", loss_fn, ascent, hyper_of, m=m, axis_name=axis_name, per_device=per_device,
                      has_aux=has_aux, strategy=strategy, trainable=trainable)


def asam(
    loss_fn: Callable[..., Any],
    rho: ScalarOrSchedule = 0.5,
    eta: ScalarOrSchedule = 0.01,
    *,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    m: int | None = None,
    axis_name: str | None = None,
    per_device: bool = False,
    has_aux: bool = False,
    strategy: Strategy = "auto",
    trainable: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> Estimator:
    """Adaptive SAM (Kwon et al., ICML 2021): ``e = ρ T² g / (‖T g‖ + 1e-12)``, ``T = |w| + η``.

    ``T`` is applied to the leaves selected by ``mask`` (default: kernels, norm scales and embeddings —
    by leaf name — and any leaf with ndim > 1); other leaves (biases, norm offsets) use ``T = 1``.

    Args:
      loss_fn: ``loss_fn(params, batch, **loss_kwargs) -> loss`` or ``(loss, aux)``.
      rho: radius ρ ≥ 0 (about 10× SAM's: 0.5 CIFAR-10, 1.0 CIFAR-100).
      eta: η ≥ 0, the offset in ``T = |w| + η`` (0.01).
      mask: pytree of bools like params, or a callable ``params -> mask``; None for the default.
      m, axis_name, per_device, has_aux, strategy, trainable: as in :func:`sam`.

    Reports as :func:`sam`: ``probe_losses`` = [L(w), L(w + e)]; diagnostics ``rho``, ``grad_norm``.

    Example (the leaf named ``w`` is adaptive, so ``T = |w| + η`` scales the ascent)::

        >>> import jax.numpy as jnp, optax, flatjax
        >>> loss_fn = lambda p, batch: jnp.sum((p["w"] - batch) ** 2)
        >>> params, batch = {"w": jnp.array([1.0, 2.0])}, jnp.zeros(2)
        >>> est = flatjax.estimators.asam(loss_fn, rho=0.5, eta=0.01)
        >>> loss, grads, est_state, info = est.value_and_grad(params, est.init(params), batch)
        >>> round(float(loss), 4), [round(float(x), 4) for x in info.probe_losses]
        (5.0, [5.0, 10.1101])
        >>> tx = optax.chain(flatjax.asam(loss_fn, rho=0.5), optax.sgd(0.1, momentum=0.9))   # Optax form
    """
    rho = guarded("rho", rho, low=0.0)
    eta = guarded("eta", eta, low=0.0)
    mask_of = as_mask_fn(mask)

    def ascent(g, w, h):
        return perturb.adaptive_ascent(g, w, h["rho"], h["eta"], mask_of(w))

    hyper_of = lambda ctx: {"rho": ctx.value(rho), "eta": ctx.value(eta)}  # noqa: E731
    return sam_family("asam", loss_fn, ascent, hyper_of, m=m, axis_name=axis_name, per_device=per_device,
                      has_aux=has_aux, strategy=strategy, trainable=trainable)


def as_mask_fn(mask: PyTree | Callable[[PyTree], PyTree] | None) -> Callable[[PyTree], PyTree]:
    """A mask argument (pytree of bools like params, or ``params -> tree``) as a checked function of the
    parameters; None: ASAM's default adaptive leaves."""
    if mask is None:
        return perturb.default_adaptive_mask

    def mask_of(params):
        m = mask(params) if callable(mask) else mask
        if jax.tree.structure(m) != jax.tree.structure(params):
            raise invalid("mask", "a pytree of bools with the structure of params (or a function params -> such "
                          f"a tree); params have {jax.tree.structure(params)}", jax.tree.structure(m))
        return m

    return mask_of
