"""Probe evaluation: loss, aux and gradient at several points, sequentially, vectorized or on devices.

The strategy changes speed and memory, never the result (tests check equality within float tolerance).
For n independent passes of a model whose one gradient pass costs F FLOPs and holds A of activations
(``experiments/results/bench_cost.md`` measures these from XLA's compiled cost):

| strategy | FLOPs per device | temporary memory | critical path |
|---|---|---|---|
| ``"sequential"`` | n F | about A (one pass at a time) | n passes |
| ``"vmap"`` | n F | about n A | n passes, batched (fast for matmul-heavy models) |
| ``ShardMapProbes`` over g groups | n F / g | about (n / g) A | n / g passes |

* ``"auto"`` (the default) — :func:`resolve_auto`: device groups under a mesh with a ``"probe"`` axis,
  else ``"sequential"``.
* ``"sequential"`` — one gradient pass after another; each pass waits for the previous one's gradient
  (:func:`after`), so the peak memory is one pass's, like SAM's two dependent passes. Computed probe
  points (:class:`Shifted`, and the noise methods' points) are stored once (:func:`materialized`), not
  recomputed inside every consumer.
* ``"vmap"``       — ``jax.vmap`` over a stacked probe axis: the memory-for-speed choice. On CPU a conv
  net's vmapped gradient becomes a grouped convolution that can cost several single passes (measured in
  ``experiments/results/bench_step.md``).
* :class:`ShardMapProbes` — ``jax.shard_map`` over one mesh axis: each device group evaluates its share of
  the probes (m-ARWP's clean and perturbed passes on different devices: SGD-like critical path). With
  ``data_axis``, each group also splits the batch over that second mesh axis (data parallel within
  the group), so a (probe x data) mesh uses every device.

Inside a user's own ``shard_map`` for data parallelism, pass ``axis_name``: parameters are made
device-varying before differentiation (otherwise the gradient of a replicated parameter comes back
already SUMMED over devices) and losses/gradients are then averaged with ``pmean`` explicitly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from flatjax.core.tree import PyTree, add_scaled, stack, up

STRATEGIES = ("sequential", "vmap")


@dataclasses.dataclass(frozen=True)
class ShardMapProbes:
    """Evaluate probes in parallel over the mesh axis ``axis`` with ``jax.shard_map``.

    The number of probes must be a multiple of ``mesh.shape[axis]``; each device group evaluates
    ``n_probes / axis_size`` of them (vectorized with vmap when more than one).

    Attributes:
      mesh: the device mesh.
      axis: mesh axis the probes are split over.
      data_axis: optional second mesh axis: inside each group the batch is split along its leading
        dimension over it, and losses, gradients and aux are averaged over it (floating aux by mean,
        integer aux by max) — the same result as the whole batch on one device. The batch size must be
        divisible by ``mesh.shape[data_axis]``. Do not combine with the method's own ``axis_name``.
    """

    mesh: Mesh | AbstractMesh
    axis: str = "probe"
    data_axis: str | None = None

    def __post_init__(self):
        if not isinstance(self.mesh, (Mesh, AbstractMesh)):
            raise ValueError(f"strategy.mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}")
        if self.axis not in self.mesh.axis_names:
            raise ValueError(
                f"strategy.axis must be one of the mesh axes {self.mesh.axis_names}, got {self.axis!r}"
            )
        if self.data_axis is not None and (self.data_axis not in self.mesh.axis_names
                                           or self.data_axis == self.axis):
            raise ValueError(
                f"strategy.data_axis must be None or a mesh axis other than {self.axis!r} "
                f"(mesh axes {self.mesh.axis_names}), got {self.data_axis!r}"
            )

    @property
    def size(self) -> int:
        return int(self.mesh.shape[self.axis])


Strategy = Union[str, ShardMapProbes]


def check_strategy(strategy: Strategy) -> Strategy:
    """Validate a strategy argument (``"auto"`` is resolved per step: :func:`resolve_auto`)."""
    if isinstance(strategy, ShardMapProbes) or strategy == "auto":
        return strategy
    if strategy not in STRATEGIES:
        raise ValueError(
            f"strategy must be 'auto', 'sequential', 'vmap' or flatjax.ShardMapProbes(mesh, axis), "
            f"got {strategy!r}"
        )
    return strategy


#: The mesh axis names ``"auto"`` looks for: probe groups, and data parallelism inside each group.
PROBE_AXIS, DATA_AXIS = "probe", "data"


def resolve_auto(n_probes: int, batch: PyTree) -> Strategy:
    """What ``strategy="auto"`` means for ``n_probes`` independent passes on ``batch``.

    ``ShardMapProbes(mesh, "probe", data_axis="data")`` when the step is traced under a mesh
    (``jax.set_mesh``) that has a ``"probe"`` axis of size > 1 dividing the probe count (``"data"`` is
    used when the mesh has it and it divides the batch); otherwise ``"sequential"``: the memory-lean
    choice, and on CPU also the fastest (``experiments/results/bench_step.md``: vmap over conv weight
    copies costs several passes). ``"vmap"`` is never chosen automatically (it holds n passes' memory).
    """
    try:  # the abstract mesh: inside jax.jit only that one is known (shard_map accepts it)
        mesh = jax.sharding.get_abstract_mesh()
    except Exception:  # a JAX without the mesh context API
        return "sequential"
    names = () if getattr(mesh, "empty", True) else mesh.axis_names
    if PROBE_AXIS not in names or mesh.shape[PROBE_AXIS] < 2 or n_probes % mesh.shape[PROBE_AXIS]:
        return "sequential"
    data = DATA_AXIS if DATA_AXIS in names else None
    sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(batch) if jnp.ndim(x) > 0}
    if data is not None and any(size % mesh.shape[data] for size in sizes):
        data = None
    return ShardMapProbes(mesh, PROBE_AXIS, data_axis=data)


class Probes(NamedTuple):
    """Results at ``n`` probe points, stacked along a leading axis of size ``n``."""

    losses: jax.Array  # (n,), in the promoted loss dtype
    aux: PyTree  # leaves (n, ...)
    grads: PyTree  # leaves (n, ...)


def varying_axes(x: jax.Array) -> frozenset:
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def to_varying(tree: PyTree, axis_name: str) -> PyTree:
    """Mark every leaf as varying over ``axis_name`` (no-op where it already is, or without checks)."""

    def cast(x):
        if axis_name in varying_axes(x):
            return x
        return jax.lax.pcast(x, axis_name, to="varying")

    return jax.tree.map(cast, tree)


def invariant(x: jax.Array, axis: str) -> jax.Array:
    """``x`` made identical across ``axis``: the mean (floats) or max (ints) where it varies."""
    if axis not in varying_axes(x):
        return x
    return jax.lax.pmean(x, axis) if jnp.issubdtype(x.dtype, jnp.inexact) else jax.lax.pmax(x, axis)


class Shifted(NamedTuple):
    """The probe point ``base + scale * delta`` (e.g. ``w - U``), built where the strategy needs it.

    Under "sequential" it is built only once the previous pass's gradient exists (``delta`` is tied to it
    inside the same elementwise op), so at most one shifted copy of the weights is alive at a time; a point
    handed in ready-made would be computed as early as XLA likes and held through the earlier passes.
    """

    base: PyTree
    delta: PyTree
    scale: Any = 1.0

    def value(self) -> PyTree:
        return add_scaled(self.base, self.delta, self.scale)


def _zero_after(grads: PyTree) -> jax.Array:
    """A float32 0 that XLA can compute only once every leaf of ``grads`` is (0 times one element of each)."""
    # the LAST element: of stacked probe gradients that is the last probe's (slicing the first would let
    # XLA's simplifier reduce the dependency to the first probe)
    return 0.0 * sum(jnp.ravel(g)[-1].astype(jnp.float32) for g in jax.tree.leaves(grads))


def _tie(tree: PyTree, zero: jax.Array) -> PyTree:
    """``tree`` unchanged in value, its floating leaves made to depend on ``zero``."""
    return jax.tree.map(lambda x: x + zero.astype(x.dtype) if _floating(x) else x, tree)


def _floating(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def point_value(point: PyTree) -> PyTree:
    """A probe point as a pytree (:class:`Shifted` built now, stored: :func:`materialized`)."""
    if not isinstance(point, Shifted):
        return point
    # the loop starts from delta where it can (a computed buffer, made late), not from the parameters:
    # XLA would copy those for the loop early in the step and hold the copy through the earlier passes
    like = jax.tree.map(lambda d, b: d if (jnp.shape(d), jnp.result_type(d)) == (jnp.shape(b), jnp.result_type(b))
                        else b, point.delta, point.base)
    return materialized(Shifted.value, point, like=like)


def materialized(fn: Callable[..., Any], *operands: Any, like: Any) -> Any:
    """``fn(*operands)``, computed once as stored arrays that later ops read instead of recomputing.

    ``like``: a pytree of arrays with the shapes and dtypes of ``fn``'s result; the loop below starts
    from it (XLA copies it into the loop's buffer; its values are not used). Best is a buffer computed
    just before, such as a :class:`Shifted` point's delta: zeros are merged by XLA into one buffer held
    across every such loop, and a copy of the parameters may be scheduled early in the step.

    Why: XLA fuses cheap elementwise producers into every consumer, so a probe point ``w + e`` built
    from a parameter-sized noise is recomputed inside each of its ~200 consumers (the convolutions'
    weight copies and transposes, BatchNorm, forward and backward). That keeps the noise alive to the
    end of the pass beside copies of the perturbed kernels, and makes every consumer a distinct kernel
    to compile. Computed in the body of a ``lax.while_loop`` that runs once, the point is built once
    per leaf and read like parameters: on ResNet-18 RWP's step then needs SGD's temporary memory
    (``experiments/results/bench_cost.md``). ``lax.optimization_barrier`` does not do this on XLA:CPU
    (the barrier is gone before fusion). The cost: the noise and the point exist together while the
    point is built, so where the parameters dwarf the activations (a wide MLP at batch 4: the peak is
    there) the step holds 2.1 parameter buffers instead of 1.3. The loop's start is ``min(0, isnan(x))``
    for an element ``x`` of the operands: always 0 (one trip), but not a constant XLA could fold to
    inline the loop.
    """
    leaves = [x for x in jax.tree.leaves(operands) if hasattr(x, "dtype")]
    start = jnp.int32(0)
    if leaves:
        first = jnp.ravel(leaves[0])[:1]
        start = jnp.minimum(jnp.sum(jnp.isnan(first.astype(jnp.float32)).astype(jnp.int32)), 0)

    def body(carry):
        return carry[0] + 1, jax.tree.map(lambda x, y: jnp.asarray(x).astype(y.dtype), fn(*operands), like)

    return jax.lax.while_loop(lambda carry: carry[0] < 1, body, (start, like))[1]


def after(params: PyTree, batch: PyTree, grads: PyTree) -> tuple[PyTree, PyTree]:
    """``(params, batch)`` unchanged in value, but computed only once every leaf of ``grads`` is.

    "sequential" means one pass after another: XLA otherwise schedules independent gradient passes
    together and holds the activations of all of them at once (measured: 1.8x the temporary memory of
    SAM's two dependent passes; ``lax.optimization_barrier`` did not prevent it on XLA:CPU). Adding 0 times
    one element of every gradient leaf to the batch's floating leaves (the inputs every activation depends
    on; the parameters when the batch has none, e.g. token ids) makes the next pass depend on the whole
    previous backward pass. A non-finite gradient makes the next pass non-finite too: the step is
    non-finite either way.
    """
    zero = _zero_after(grads)
    if isinstance(params, Shifted):  # built after the previous pass: one shifted copy at a time
        return point_value(Shifted(params.base, _tie(params.delta, zero), params.scale)), _tie(batch, zero)
    if any(_floating(x) for x in jax.tree.leaves(batch)):
        return params, _tie(batch, zero)  # measured on ResNet-18: tying the parameters holds one more copy of them
    return _tie(params, zero), batch


def _is_explicit(mesh: Mesh) -> bool:
    return any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def _place(tree: PyTree, mesh: Mesh, spec: PartitionSpec) -> PyTree:
    """Shard a traced pytree along ``spec`` on ``mesh`` (Explicit meshes: reshard; Auto: a constraint)."""
    sharding = NamedSharding(mesh, spec)
    if _is_explicit(mesh):
        return jax.tree.map(lambda x: jax.reshard(x, sharding), tree)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """Evaluates ``loss_fn(params, batch, **loss_kwargs)`` and its gradient at probe points.

    Attributes:
      loss_fn: returns a scalar loss, or ``(loss, aux)`` when ``has_aux``.
      has_aux: whether ``loss_fn`` returns aux.
      loss_kwargs: extra keyword arguments for ``loss_fn`` (not differentiated, not split).
      axis_name: data-parallel axis of an enclosing ``shard_map``/``pmap``, or None.
      strategy: how independent probes are evaluated.
    """

    loss_fn: Callable[..., Any]
    has_aux: bool
    loss_kwargs: dict
    axis_name: str | None
    strategy: Strategy

    def _loss_and_aux(self, params, batch):
        out = self.loss_fn(params, batch, **self.loss_kwargs)
        if self.has_aux and not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ValueError(
                f"has_aux=True, so loss_fn must return a pair (loss, aux); it returned {type(out).__name__}"
                + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
                + ". Return (loss, aux), or drop has_aux=True")
        if not self.has_aux and isinstance(out, (tuple, list)):
            raise ValueError(
                f"loss_fn returned a {type(out).__name__} of length {len(out)}; if it returns (loss, aux), "
                "pass has_aux=True")
        loss, aux = out if self.has_aux else (out, None)
        if jnp.ndim(loss) != 0:
            raise ValueError(
                f"loss_fn must return a scalar loss{' as the first element of (loss, aux)' if self.has_aux else ''}, "
                f"got shape {jnp.shape(loss)}; pass has_aux=True if it returns (loss, aux)"
            )
        return up(loss), aux

    def loss_and_aux(self, params: PyTree, batch: PyTree, *, reduce: bool = True):
        """``(loss, aux)`` at ``params``, a forward pass only; the loss averaged over ``axis_name`` when ``reduce``."""
        loss, aux = self._loss_and_aux(params, batch)
        if self.axis_name is not None and reduce:
            loss = jax.lax.pmean(loss, self.axis_name)
        return loss, aux

    def value_and_grad(self, params: PyTree, batch: PyTree, *, reduce: bool = True):
        """``(loss, aux, grad)`` at ``params``; averaged over ``axis_name`` when ``reduce``."""
        if self.axis_name is not None:
            params = to_varying(params, self.axis_name)
        (loss, aux), grad = jax.value_and_grad(self._loss_and_aux, has_aux=True)(params, batch)
        if self.axis_name is not None and reduce:
            loss = jax.lax.pmean(loss, self.axis_name)
            grad = jax.lax.pmean(grad, self.axis_name)
        return loss, aux, grad

    def resolved_strategy(self, n_probes: int, batch: PyTree) -> Strategy:
        """The strategy that runs ``n_probes`` probes on ``batch``: ``"auto"`` resolved (:func:`resolve_auto`;
        always ``"sequential"`` inside the user's own ``shard_map``, i.e. with ``axis_name``)."""
        if self.strategy != "auto":
            return self.strategy
        return "sequential" if self.axis_name is not None else resolve_auto(n_probes, batch)

    def probes(
        self,
        *,
        points: Sequence[PyTree] | None = None,
        batches: Sequence[PyTree] | None = None,
        params: PyTree = None,
        batch: PyTree = None,
        reduce: bool = True,
    ) -> Probes:
        """Evaluate ``n`` probes: at ``points[i]`` (or the one shared ``params``) on ``batches[i]`` (or
        the one shared ``batch``). A shared argument is broadcast to every probe, never copied."""
        if (points is None) == (params is None):
            raise ValueError("probes: give either points (one per probe) or one shared params")
        if (batches is None) == (batch is None):
            raise ValueError("probes: give either batches (one per probe) or one shared batch")
        sizes = {len(x) for x in (points, batches) if x is not None}
        if not sizes:
            raise ValueError("probes: give points or batches (one per probe); a shared pair is one pass")
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"probes: points and batches must be non-empty lists of one length, got {sorted(sizes)}")
        (n,) = sizes
        point_at = (lambda i: points[i]) if points is not None else (lambda i: params)
        batch_at = (lambda i: batches[i]) if batches is not None else (lambda i: batch)
        strategy = self.resolved_strategy(n, batch_at(0))
        if strategy == "sequential" or n == 1:
            results = []
            for i in range(n):
                p, b = point_at(i), batch_at(i)
                if results:
                    p, b = after(p, b, results[-1][2])
                results.append(self.value_and_grad(point_value(p), b, reduce=reduce))
            losses, aux, grads = zip(*results)
            return Probes(jnp.stack(losses), stack(aux), stack(grads))

        shared_params, shared_batch = points is None, batches is None
        p_in = params if shared_params else stack([point_value(p) for p in points])
        b_in = batch if shared_batch else stack(batches)
        axes = (None if shared_params else 0, None if shared_batch else 0)

        def run_local(p, b):
            return jax.vmap(lambda pp, bb: self.value_and_grad(pp, bb, reduce=reduce), in_axes=axes)(p, b)

        if strategy == "vmap":
            return Probes(*run_local(p_in, b_in))
        return self._shard_map(strategy, run_local, p_in, b_in, n, shared_params, shared_batch)

    def probes_stacked(self, points: PyTree, batch: PyTree, *, reduce: bool = True) -> Probes:
        """Evaluate at every slice ``points[i]`` of a stacked pytree (leading probe axis) on one batch.

        The gradient is traced ONCE whatever the probe count ('sequential' runs it in ``lax.map``), so
        compile time does not grow with the number of probes.
        """
        n = {jnp.shape(x)[0] for x in jax.tree.leaves(points)}
        if len(n) != 1:
            raise ValueError(f"probes_stacked: every leaf needs the same leading probe axis, got sizes {sorted(n)}")
        (n,) = n

        def run_local(p, b):
            return jax.vmap(lambda pp: self.value_and_grad(pp, b, reduce=reduce))(p)

        strategy = self.resolved_strategy(n, batch)
        if strategy == "sequential":
            return Probes(*jax.lax.map(lambda p: self.value_and_grad(p, batch, reduce=reduce), points))
        if strategy == "vmap":
            return Probes(*run_local(points, batch))
        return self._shard_map(strategy, run_local, points, batch, n, shared_params=False, shared_batch=True)

    def _shard_map(self, strategy: ShardMapProbes, run_local, p_in, b_in, n, shared_params, shared_batch) -> Probes:
        if n % strategy.size:
            raise ValueError(
                f"ShardMapProbes: {n} probes cannot be split evenly over mesh axis "
                f"{strategy.axis!r} of size {strategy.size}"
            )
        axis, data_axis = strategy.axis, strategy.data_axis
        replicated = PartitionSpec()
        p_spec = replicated if shared_params else PartitionSpec(axis)
        b_spec = PartitionSpec(data_axis) if shared_batch else PartitionSpec(axis, data_axis)
        if not shared_params:
            p_in = _place(p_in, strategy.mesh, p_spec)
        if not shared_batch or data_axis is not None:
            b_in = _place(b_in, strategy.mesh, b_spec)

        def body(p, b):
            if shared_params:
                # Replicated parameters must be made device-varying, or their gradient comes back summed.
                p = to_varying(p, axis)
            if data_axis is None:
                return run_local(p, b)
            out = run_local(to_varying(p, data_axis), b)
            return jax.tree.map(lambda x: invariant(x, data_axis), out)  # the whole batch's mean

        fn = jax.shard_map(body, mesh=strategy.mesh, in_specs=(p_spec, b_spec), out_specs=PartitionSpec(axis))
        out = Probes(*fn(p_in, b_in))
        if _is_explicit(strategy.mesh):  # combine rules index the probe axis: gather it back
            out = _place(out, strategy.mesh, replicated)
        return out
