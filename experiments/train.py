"""Training CLI: the seed papers' CIFAR configs and an offline digits sweep, for every flatjax method.

    python -m experiments.train                         # offline default: digits MLP, every method
    python -m experiments.train --list-configs
    python -m experiments.train --config cifar100_resnet18_marwp --data-dir ~/CIFAR-10-images-jpg
    python -m experiments.train --method sam --steps 2 --out runs/smoke
    python -m experiments.train --config digits_mlp_sam --steps 100 --out runs/a    # then, later:
    python -m experiments.train --config digits_mlp_sam --out runs/a --resume       # continues exactly
    python -m experiments.train --config cifar10_resnet18_marwp --dataset cifar10 --probe-devices 2

Every run writes under ``--out`` (default ``runs/<timestamp>``), in ``<out>/<config name>/``:
``metrics.csv`` / ``metrics.json`` (one row per epoch, plus the final summary), ``params.msgpack``
(``flax.serialization.msgpack_serialize`` of the final ``params``), ``ckpt/`` (orbax checkpoints of
params, model state, optimizer state and the step; the data position follows from the step because the
:class:`flatjax.data.BatchIterator` order is a function of ``(seed, epoch, step)``), and TensorBoard
events when ``tensorboardX`` is installed. ``<out>/results.md`` holds the Markdown results table. These files
are replaced atomically (never half-written). A run folder that already holds a run is refused unless
``--resume`` continues it (the configuration stored in ``metrics.json`` must match, ``--steps`` aside;
``--force-resume`` accepts a changed one) or ``--overwrite`` replaces it. Ctrl-C stops after the current
update, saves a checkpoint and exits with code 130 (a second Ctrl-C stops at once); ``--resume`` continues.
Flag values that cannot run (``--epochs 0``, ``--lr -1``, more ``--devices`` than there are ...) are
rejected before any work.

The update is one jitted step ``skip_nonfinite(chain(method, add_decayed_weights(wd), sgd(lr_t, momentum)))``
(coupled weight decay, as the papers' torch SGD); BatchNorm statistics travel as the method's ``aux``
(``has_aux=True``, ``aux_init=model_state``). With more than one device (``--devices``, default all), the
step runs inside ``jax.shard_map`` over a ``"data"`` mesh axis and the methods get ``axis_name="data"``
(their global, data-parallel mode: one perturbation from the global gradient). ``--probe-devices P``
instead builds a ``(probe P, data n/P)`` mesh: the method's independent passes (m-ARWP's two gradients)
run on P device groups at once via ``flatjax.ShardMapProbes(mesh, "probe", data_axis="data")``, each
group data-parallel; the update is the same.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import flatjax
from experiments.configs import CONFIGS, LETS_METHODS, METHODS, TrainConfig, default_config, get_config
from flatjax import data as fdata
from flatjax.core.evaluate import invariant
from flatjax import models as fmodels

#: The no-argument sweep (all methods; each ~10 s on 2 CPU cores).
DEFAULT_SWEEP = METHODS
_SEEDED = ("rwp", "arwp", "mrwp", "marwp", "wpsgd", "nso")  # methods drawing noise from a seed


# ---- data --------------------------------------------------------------------------------------------


def load_data(cfg: TrainConfig, data_dir: str | None, seed: int
              ) -> tuple[fdata.ArrayDataset, fdata.ArrayDataset, Callable | None, Callable | None]:
    """Loads ``(train, test, train_transform, eval_transform)`` for ``cfg.dataset``.

    Raises:
      DatasetNotFoundError: when a CIFAR folder / TFDS dataset is missing (with instructions).
      ValueError: for an unknown dataset name.
    """
    if cfg.dataset == "digits":
        train, test = fdata.load_digits(seed=0)
        return train, test, None, None
    if cfg.dataset == "cifar10-folder":
        train = fdata.load_cifar10_folder(data_dir, "train")
        test = fdata.load_cifar10_folder(data_dir, "test")
    elif cfg.dataset in ("cifar10", "cifar100"):
        train = fdata.load_tfds(cfg.dataset, "train", data_dir=data_dir)
        test = fdata.load_tfds(cfg.dataset, "test", data_dir=data_dir)
    else:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; choose digits, cifar10-folder, cifar10, cifar100")
    stats = "cifar100" if cfg.dataset == "cifar100" else "cifar10"
    train_tf, eval_tf = fdata.cifar_transforms(cfg.augment, stats=stats)
    return train, test, train_tf, eval_tf


# ---- optimizer ---------------------------------------------------------------------------------------


def make_method(cfg: TrainConfig, loss_fn: Callable, model_state: Any, total_steps: int, seed: int,
                axis_name: str | None, per_device: bool = False, strategy: Any = "auto"
                ) -> optax.GradientTransformationExtraArgs | None:
    """The flatjax method chained before the base optimizer (None for SGD and for LETS, which wraps the
    base optimizer: :func:`make_optimizer`), with BN statistics as its aux."""
    if cfg.method == "sgd" or cfg.method in LETS_METHODS:
        return None
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose from {METHODS}")
    kw = dict(cfg.method_kwargs)
    if cfg.sigma_increase is not None:
        kw["sigma"] = flatjax.cosine_increasing(kw.get("sigma", 0.001), cfg.sigma_increase, total_steps)
    if cfg.method in _SEEDED:
        kw["seed"] = seed
    if per_device:
        if cfg.method not in ("sam", "asam"):
            raise ValueError(f"--per-device applies to sam and asam, not {cfg.method}")
        kw["per_device"] = True
    if strategy != "auto":
        kw["strategy"] = strategy
    factory = getattr(flatjax, cfg.method)
    return factory(loss_fn, **kw, has_aux=True, aux_init=model_state, axis_name=axis_name)


def lr_schedule(cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """Cosine from ``cfg.lr`` to 0: per update, or per epoch (``cfg.lr_per_epoch``, torch's
    ``CosineAnnealingLR(T_max=epochs)`` stepped once an epoch, as the official m-ARWP code)."""
    if not cfg.lr_per_epoch:
        return optax.cosine_decay_schedule(cfg.lr, max(total_steps, 1))
    per_epoch = optax.cosine_decay_schedule(cfg.lr, max(total_steps // steps_per_epoch, 1))
    return lambda count: per_epoch(count // steps_per_epoch)


def make_optimizer(cfg: TrainConfig, method: Any, total_steps: int, steps_per_epoch: int = 1, *,
                   loss_fn: Callable | None = None, model_state: Any = None, axis_name: str | None = None
                   ) -> optax.GradientTransformationExtraArgs:
    """``skip_nonfinite(chain([method,] add_decayed_weights(wd), sgd(cosine lr, momentum)))``; for LETS
    ``skip_nonfinite(lets(loss_fn, chain(add_decayed_weights(wd), sgd(...)), inner=...))``."""
    lr = lr_schedule(cfg, total_steps, steps_per_epoch)
    base = [optax.add_decayed_weights(cfg.weight_decay), optax.sgd(lr, momentum=cfg.momentum)]
    if cfg.method in LETS_METHODS:
        return flatjax.skip_nonfinite(flatjax.lets(
            loss_fn, optax.chain(*base), inner=LETS_METHODS[cfg.method], **cfg.method_kwargs, has_aux=True,
            aux_init=model_state, axis_name=axis_name))
    return flatjax.skip_nonfinite(optax.chain(*([method] if method is not None else []), *base))


def has_parallel_passes(cfg: TrainConfig) -> bool:
    """Whether the method has independent passes for ``--probe-devices`` groups (else they duplicate work)."""
    k = cfg.method_kwargs
    return (cfg.method in ("mrwp", "marwp", "nso", "crsam") or (cfg.method == "wpsgd" and k.get("k", 1) > 1)
            or (cfg.method in ("sam", "asam") and k.get("m") is not None))  # m-sharpness groups


def make_probe_mesh(probe_devices: int, n_devices: int) -> jax.sharding.Mesh:
    """A ``(probe, data)`` mesh over the first ``n_devices`` devices: ``probe_devices`` groups."""
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((probe_devices, n_devices // probe_devices), ("probe", "data"), axis_types=(auto, auto),
                         devices=jax.devices()[:n_devices])


def make_train_step(cfg: TrainConfig, loss_fn: Callable, tx: Any, mesh: Any, replicate_on: Any = None
                    ) -> Callable:
    """A jitted ``step(params, model_state, opt_state, batch, perturbed_batch, key)``.

    Returns ``(params, model_state, opt_state, loss)``. With a mesh, the body runs per device inside
    ``shard_map`` (batch split over ``"data"``, everything else replicated) and the loss and BN
    statistics are averaged over devices. With ``replicate_on`` (the ``--probe-devices`` mesh), a plain
    jit whose outputs stay replicated on that mesh; the method's ``ShardMapProbes`` does the splitting.
    """
    axis = "data" if mesh is not None else None

    def local_step(params, model_state, opt_state, batch, perturbed_batch, key):
        loss_kwargs = {"model_state": model_state}
        if cfg.model_kwargs.get("dropout_rate"):
            loss_kwargs["dropout_key"] = key
        if cfg.method == "sgd":
            def objective(p):
                loss, aux = loss_fn(p, batch, **loss_kwargs)
                if axis is not None:  # the gradient of the global mean (pmean transposes to a psum / n)
                    loss = jax.lax.pmean(loss, axis)
                return loss, aux
            (loss, new_ms), grads = jax.value_and_grad(objective, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
        else:
            # the second batch: m-(A)RWP's perturbed batch, or LETS's validation batch
            second = {"val_batch" if cfg.method in LETS_METHODS else "perturbed_batch": perturbed_batch}
            updates, opt_state = tx.update(None, opt_state, params, batch=batch, loss_kwargs=loss_kwargs,
                                           **second)
            info = flatjax.step_info(opt_state)
            loss, new_ms = info.loss, info.aux
        # a skipped (non-finite) step keeps the model state too: its statistics may be NaN
        new_ms = jax.tree.map(lambda n, o: jnp.where(opt_state.last_finite, n, o), new_ms, model_state)
        out = optax.apply_updates(params, updates), new_ms, opt_state, loss
        if axis is not None:
            # per-device values (loss, BN statistics, per-device diagnostics) -> their mean over devices
            out = jax.tree.map(lambda x: invariant(x, axis), out)
        return out

    if mesh is None:
        if replicate_on is None:
            return jax.jit(local_step)
        # keep the state replicated on the probe mesh: otherwise the compiler may pick other output
        # shardings, and step 2 (whose inputs are step 1's outputs) compiles again
        return jax.jit(local_step, out_shardings=jax.sharding.NamedSharding(replicate_on, P()))
    pb = P("data") if cfg.two_batches or cfg.method in LETS_METHODS else P()
    fn = jax.shard_map(local_step, mesh=mesh, in_specs=(P(), P(), P(), P("data"), pb, P()),
                       out_specs=P())
    return jax.jit(fn)


def make_eval(apply: Callable, eval_tf: Callable | None, batch_size: int = 1000) -> Callable:
    """Returns ``evaluate(params, model_state, dataset) -> (loss, accuracy)`` in eval mode."""

    @jax.jit
    def run(params, model_state, images, labels):
        logits, _ = apply(params, model_state, images, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
        return loss, jnp.sum(jnp.argmax(logits, -1) == labels)

    def evaluate(params, model_state, dataset: fdata.ArrayDataset) -> tuple[float, float]:
        total_loss, correct, n = 0.0, 0, len(dataset.label)
        for i in range(0, n, batch_size):
            batch = {"image": dataset.image[i:i + batch_size], "label": dataset.label[i:i + batch_size]}
            if eval_tf is not None:
                batch = eval_tf(batch, np.random.default_rng(0))
            loss, ok = run(params, model_state, batch["image"], batch["label"])
            total_loss += float(loss)
            correct += int(ok)
        return total_loss / n, correct / n

    return evaluate


# ---- checkpoints -------------------------------------------------------------------------------------


class Checkpointer:
    """Orbax checkpoints of the training state ``{params, model_state, opt_state, step}``.

    Optax states are NamedTuples; orbax stores their leaves and ``restore`` rebuilds the exact tree
    from a freshly initialised template (``StandardRestore(abstract_state)``), so resuming gives the
    same arrays, dtypes and structure as an uninterrupted run.
    """

    def __init__(self, directory: Path, max_to_keep: int = 2) -> None:
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(  # the handler named up front: item_metadata before any restore
            directory.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_handlers=ocp.StandardCheckpointHandler())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict) -> None:
        self.manager.save(step, args=self._ocp.args.StandardSave(state), force=True)

    def restore(self, template: dict, step: int | None = None) -> dict:
        """Raises ValueError naming the first array missing or shaped otherwise in the checkpoint: checked on
        its metadata first, since a read that fails inside orbax leaves asyncio tracebacks on stderr."""
        step = self.latest_step() if step is None else step
        stored, wanted = _leaf_shapes(self.manager.item_metadata(step)), _leaf_shapes(template)
        for path in sorted(stored.keys() | wanted.keys(), key=lambda p: (not p.startswith("params"), p)):
            if stored.get(path) != wanted.get(path):
                raise ValueError(f"{path}: {stored.get(path, 'absent')} in the checkpoint, "
                                 f"{wanted.get(path, 'absent')} here")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), template)
        return self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
    """``{"opt_state/inner_state/0/count": shape}``; NamedTuple fields and dict keys alike (orbax stores
    NamedTuples as dicts)."""
    name = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))  # noqa: E731
    return {"/".join(map(name, path)): tuple(getattr(x, "shape", np.shape(x)))
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def write_atomic(path: Path, data: str | bytes) -> None:
    """Writes a temporary file in the same folder, then ``os.replace``: a crash or Ctrl-C mid-write leaves
    the old file, never half of one (``--resume`` reads ``metrics.json``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def save_params_msgpack(params: Any, path: Path) -> None:
    """Writes ``params`` with ``flax.serialization.msgpack_serialize`` (NumPy leaves)."""
    from flax import serialization

    write_atomic(path, serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))


def mlp_params_as_dense(params: dict) -> dict | None:
    """The NNX ``mlp`` params renamed to Linen's ``{"Dense_i": {kernel, bias}}`` layout (what
    ``experiments/sharpness_report.py --params`` reads); None for other models."""
    if set(params) != {"layers", "head"}:
        return None
    layers = [params["layers"][k] for k in sorted(params["layers"], key=int)] + [params["head"]]
    return {f"Dense_{i}": {"kernel": np.asarray(p["kernel"]), "bias": np.asarray(p["bias"])}
            for i, p in enumerate(layers)}


# ---- metrics -----------------------------------------------------------------------------------------


class MetricsWriter:
    """Appends one row per epoch to ``metrics.csv``, rewrites ``metrics.json``, and logs to TensorBoard
    when ``tensorboardX`` is installed."""

    FIELDS = ("epoch", "step", "train_loss", "test_loss", "test_acc", "epoch_seconds", "step_ms",
              "skipped_steps")

    def __init__(self, run_dir: Path, config: dict, history: list[dict]) -> None:
        self.run_dir, self.config, self.history = run_dir, config, history
        try:
            from tensorboardX import SummaryWriter  # optional

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:
            self.tb = None

    def log(self, row: dict, summary: dict | None = None) -> None:
        if row:
            self.history.append(row)
            if self.tb is not None:
                for k, v in row.items():
                    if k not in ("epoch", "step") and v is not None:
                        self.tb.add_scalar(k, v, row["step"])
        buf = io.StringIO()
        w = csv.DictWriter(buf, self.FIELDS)
        w.writeheader()
        w.writerows(self.history)
        write_atomic(self.run_dir / "metrics.csv", buf.getvalue())
        doc = {"config": self.config, "history": self.history, "summary": summary}
        write_atomic(self.run_dir / "metrics.json", json.dumps(doc, indent=1, default=str))


def _read_metrics(run_dir: Path) -> dict | None:
    """The stored ``metrics.json``; None when missing or unreadable (a warning: the checkpoints are intact)."""
    path = run_dir / "metrics.json"
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        if isinstance(doc["config"], dict) and isinstance(doc["history"], list):
            return doc
    except (ValueError, KeyError, TypeError):
        pass
    print(f"warning: {path} is unreadable (truncated?): the configuration is not checked and the history is "
          "rebuilt from metrics.csv", file=sys.stderr)
    return None


def _load_history(run_dir: Path, doc: dict | None, step: int) -> list[dict]:
    """The rows up to ``step``: from ``metrics.json`` (``doc``), else rebuilt from ``metrics.csv`` (else none)."""
    if doc is not None:
        rows = doc["history"]
    else:
        def num(k, v):
            return None if v in ("", None) else int(v) if k in ("step", "skipped_steps") else float(v)
        try:
            with open(run_dir / "metrics.csv", newline="") as f:
                rows = [{k: num(k, v) for k, v in r.items()} for r in csv.DictReader(f)]
        except (OSError, ValueError, TypeError):
            rows = []
    return [r for r in rows if r.get("step") is not None and r["step"] <= step]


# ---- one run -----------------------------------------------------------------------------------------


def _batches(it: fdata.BatchIterator, epoch: int, start: int, per_update: int,
             second: fdata.BatchIterator | None = None) -> Iterator[tuple]:
    """Yields ``(batch, second batch)`` for the updates of ``epoch`` from update index ``start``: the
    second batch is the next one of ``it`` (two batches per update), of the ``second`` stream, or None."""
    gen = it.epoch(epoch, start_step=start * per_update)
    gen2 = second.epoch(epoch, start_step=start) if second is not None else None
    while True:
        try:
            b0 = next(gen)
            b1 = next(gen) if per_update == 2 else (next(gen2) if gen2 is not None else None)
        except StopIteration:
            return
        yield b0, b1


class NonFiniteRunError(RuntimeError):
    """A run stopped because its updates kept being non-finite (every one skipped)."""


class ConfigError(ValueError):
    """A configuration that cannot run, or cannot continue the stored run; the CLI prints it as one line."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run after update ``step``, whose checkpoint was saved."""

    def __init__(self, step: int) -> None:
        super().__init__(f"interrupted at update {step}; checkpoint saved; continue with --resume")
        self.step = step


class _StopOnSigint:
    """While active, Ctrl-C only sets ``requested``: the loop then stops after the current update and saves
    a checkpoint (a KeyboardInterrupt raised inside JAX can land in its GC callback and be swallowed; a flag
    cannot). A second Ctrl-C raises KeyboardInterrupt at once. Signals reach the main thread only."""

    def __enter__(self) -> "_StopOnSigint":
        self.requested, self._prev = False, False
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._prev is not False:  # None: a handler not set from Python; Python's default then
            signal.signal(signal.SIGINT, signal.default_int_handler if self._prev is None else self._prev)


#: Stored config fields that do not change the trajectory (--steps legitimately grows when continuing).
_NOT_TRAJECTORY = ("name", "source", "max_steps")


def _check_same_config(run_dir: Path, stored: dict, current: dict) -> None:
    """Raises :class:`ConfigError` naming the fields where ``current`` differs from the ``stored`` config
    (fields the stored one lacks are not compared)."""
    current = json.loads(json.dumps(current, default=str))  # as stored: tuples -> lists
    diff = [f"{k} {stored[k]!r} -> {v!r}" for k, v in current.items()
            if k in stored and k not in _NOT_TRAJECTORY and stored[k] != v]
    if diff:
        raise ConfigError(f"cannot resume {run_dir}: the configuration differs from the stored one: "
                          f"{', '.join(diff)}; use the same flags, or --force-resume to continue with the new ones")


#: Consecutive skipped (non-finite) updates after which a run stops with :class:`NonFiniteRunError`.
MAX_CONSECUTIVE_SKIPS = 10
#: A finished run with more skipped updates than this fraction makes the CLI exit non-zero.
MAX_SKIPPED_FRACTION = 0.05


def train_one(cfg: TrainConfig, run_dir: Path, *, seed: int = 0, max_steps: int | None = None,
              resume: bool = False, ckpt_every: int = 0, devices: int = 0, data_dir: str | None = None,
              progress: bool = True, model_kwargs: dict | None = None, per_device: bool = False,
              data: tuple | None = None, eval_every: int = 1, probe_devices: int = 1,
              force_resume: bool = False) -> dict:
    """Trains ``cfg`` and returns its summary (final train loss, test accuracy, timings).

    Args:
      cfg: the configuration.
      run_dir: output folder of this run (created).
      seed: model initialisation, data order and the methods' noise streams.
      max_steps: stop after this many updates in total (schedules still span the full config).
      resume: continue from the latest checkpoint in ``run_dir/ckpt`` if there is one; the config stored in
        ``metrics.json`` must match (:class:`ConfigError` names the differing fields).
      ckpt_every: also checkpoint every this many updates (0: at the end of every epoch only).
      devices: number of devices to use data-parallel (0: all visible ones).
      data_dir: CIFAR folder or TFDS data dir.
      progress: show a tqdm progress bar.
      model_kwargs: extra model options (merged over ``cfg.model_kwargs``).
      per_device: SAM/ASAM over several devices perturb per device (m-sharpness with m = local batch).
      data: ``(train, test, train_transform, eval_transform)`` already loaded (e.g. a subset); default
        :func:`load_data` of ``cfg``.
      eval_every: evaluate on the test set every this many epochs (and always after the last update).
      probe_devices: split the devices into this many groups that evaluate the method's independent
        passes in parallel (m-(A)RWP's two gradients, NSO's ±U pairs, CR-SAM's three points), each group
        data-parallel inside: a ``(probe, data)`` mesh and ``flatjax.ShardMapProbes(mesh, "probe",
        data_axis="data")``. 1 (default): plain data parallelism over all devices.
      force_resume: resume even though the configuration differs from the stored one.

    Raises:
      ConfigError: a configuration that cannot run, or cannot continue the stored run.
      NonFiniteRunError: too many consecutive non-finite updates.
      TrainingInterrupted: Ctrl-C (after saving a checkpoint of the last update).
    """
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1 epoch, got {eval_every}")
    if progress:
        from tqdm.auto import tqdm  # widgets in notebooks
    else:
        from tqdm import tqdm  # no import-time warning in kernels without ipywidgets

    run_dir.mkdir(parents=True, exist_ok=True)
    train, test, train_tf, eval_tf = data if data is not None else load_data(cfg, data_dir, seed)
    num_classes = len(train.class_names)
    mkw = {**cfg.model_kwargs, **(model_kwargs or {})}
    if cfg.model == "mlp":
        mkw.setdefault("in_features", int(np.prod(train.image.shape[1:])))
    elif cfg.dataset == "digits":
        mkw.setdefault("in_channels", 1)
    model = fmodels.create(cfg.model, num_classes, seed=seed, **mkw)
    graphdef, params, model_state = fmodels.split_model(model)
    loss_fn = fmodels.make_loss_fn(graphdef, label_smoothing=cfg.label_smoothing)

    n_dev = devices or jax.device_count()
    mesh, probe_mesh, strategy = None, None, "auto"
    if probe_devices > 1:
        if not has_parallel_passes(cfg):
            raise ValueError(f"probe_devices={probe_devices}: {cfg.method} {cfg.method_kwargs} has no independent "
                             "passes to spread over device groups")
        if n_dev % probe_devices:
            raise ValueError(f"probe_devices={probe_devices} must divide the {n_dev} devices")
        probe_mesh = make_probe_mesh(probe_devices, n_dev)
        strategy = flatjax.ShardMapProbes(probe_mesh, "probe", data_axis="data")
    elif n_dev > 1:
        mesh = fdata.data_mesh(jax.devices()[:n_dev])
    data_parallel = n_dev // max(probe_devices, 1)
    if cfg.batch_size % data_parallel:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by the {data_parallel} data-parallel "
                          "devices")
    per_update = 2 if cfg.two_batches else 1
    n_train = len(train.label)
    if cfg.batch_size * per_update > n_train:  # no full update per epoch
        raise ConfigError(f"--batch-size {cfg.batch_size} is too large: {cfg.method} takes {per_update} batch(es) "
                          f"per update from {n_train} training examples; accepted range 1..{n_train // per_update}")
    it = fdata.BatchIterator(train, cfg.batch_size, seed=seed, transform=train_tf, prefetch=2)
    # LETS's validation batches: the training set in an independent order (a function of seed, epoch, step)
    val_it = (fdata.BatchIterator(train, cfg.batch_size, seed=seed + 1, transform=train_tf, prefetch=2)
              if cfg.method in LETS_METHODS else None)
    steps_per_epoch = len(it) // per_update
    total_steps = cfg.epochs * steps_per_epoch
    per_device = per_device and mesh is not None
    method = make_method(cfg, loss_fn, model_state, total_steps, seed, "data" if mesh else None,
                         per_device=per_device, strategy=strategy)
    tx = make_optimizer(cfg, method, total_steps, steps_per_epoch, loss_fn=loss_fn, model_state=model_state,
                        axis_name="data" if mesh else None)
    step_fn = make_train_step(cfg, loss_fn, tx, mesh, replicate_on=probe_mesh)
    # eval batches of the training size: memory-safe everywhere, and on CPU small batches are faster
    evaluate = make_eval(fmodels.make_apply(graphdef), eval_tf, batch_size=cfg.batch_size)

    state = {"params": params, "model_state": model_state, "opt_state": tx.init(params),
             "step": np.int64(0)}
    cfg_dict = {**vars(cfg), "model_kwargs": mkw, "seed": seed, "devices": n_dev, "probe_devices": probe_devices,
                "per_device": per_device, "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps, "max_steps": max_steps}
    ckpt = Checkpointer(run_dir / "ckpt")
    try:  # closed on every exit: an open manager buries the error under asyncio tracebacks at shutdown
        doc = None
        if resume and ckpt.latest_step() is not None:
            doc = _read_metrics(run_dir)
            if doc is not None and not force_resume:
                _check_same_config(run_dir, doc["config"], cfg_dict)
            try:
                state = ckpt.restore(state)
            except ValueError as err:  # other shapes or tree structure
                raise ConfigError(f"cannot resume {run_dir}: the checkpoint does not match this configuration "
                                  f"({(str(err) or 'ValueError').splitlines()[0]})") from err
        start = int(state["step"])
        history = _load_history(run_dir, doc, start) if start else []
        writer = MetricsWriter(run_dir, cfg_dict, history)
        writer.log({})  # the config is on disk from the start: --resume compares against it
        end = total_steps if max_steps is None else min(max_steps, total_steps)
        dropout_base = jax.random.key(seed + 1)

        placed = mesh if mesh is not None else probe_mesh

        def put(b):
            return None if b is None else (fdata.shard_batch(b, placed) if placed is not None else b)

        def save():
            ckpt.save(step, {"params": params, "model_state": model_state, "opt_state": opt_state,
                             "step": np.int64(step)})

        if placed is not None:  # replicate the state up front, so the first step's outputs match its inputs
            state = jax.device_put(state, jax.sharding.NamedSharding(placed, P()))
        params, model_state, opt_state = state["params"], state["model_state"], state["opt_state"]
        step, compile_s, step_times, last_loss = start, 0.0, [], float("nan")
        epoch = start // steps_per_epoch
        with (tqdm(total=end, initial=start, desc=cfg.name, disable=not progress, leave=False,
                   dynamic_ncols=True) as bar, _StopOnSigint() as stop):
            while step < end and not stop.requested:
                t_epoch, losses = time.perf_counter(), []
                for b0, b1 in _batches(it, epoch, step - epoch * steps_per_epoch, per_update, val_it):
                    if step >= end or stop.requested:
                        break
                    key = jax.random.fold_in(dropout_base, step)
                    t0 = time.perf_counter()
                    params, model_state, opt_state, loss = step_fn(params, model_state, opt_state, put(b0),
                                                                   put(b1), key)
                    last_loss = float(loss)  # waits for the step
                    consecutive = int(opt_state.notfinite_count)
                    if consecutive >= MAX_CONSECUTIVE_SKIPS:
                        raise NonFiniteRunError(
                            f"{cfg.name}: stopped at update {step + 1}: the last {consecutive} updates were "
                            f"non-finite (NaN/Inf in the loss or gradients) and were skipped; "
                            f"{int(opt_state.total_notfinite)} skipped in all. Check the learning rate and the "
                            "method's hyper-parameters (e.g. --lr nan or a radius/noise scale far too large) "
                            "and the data.")
                    dt = time.perf_counter() - t0
                    if compile_s == 0.0:
                        compile_s = dt  # the first call of this process compiles
                    else:
                        step_times.append(dt)
                    losses.append(last_loss)
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", epoch=epoch, refresh=False)
                    if ckpt_every and step % ckpt_every == 0:
                        save()
                epoch_done = step % steps_per_epoch == 0 or step >= end
                if epoch_done:
                    epoch_seconds = time.perf_counter() - t_epoch  # training only, before the evaluation
                    test_loss, test_acc = (evaluate(params, model_state, test)
                                           if (epoch + 1) % eval_every == 0 or step >= end else (None, None))
                    skipped = int(opt_state.total_notfinite)
                    writer.log({"epoch": round(step / steps_per_epoch, 4), "step": step,
                                "train_loss": float(np.mean(losses)) if losses else None,
                                "test_loss": test_loss, "test_acc": test_acc,
                                "epoch_seconds": epoch_seconds,
                                "step_ms": 1e3 * float(np.mean(step_times)) if step_times else None,
                                "skipped_steps": skipped})
                    if ckpt.latest_step() != step:
                        save()
                epoch += 1
            if stop.requested and step < end:  # Ctrl-C: keep the updates done so far
                if ckpt.latest_step() != step:
                    save()
                raise TrainingInterrupted(step)
    finally:
        ckpt.close()
    save_params_msgpack(params, run_dir / "params.msgpack")
    dense = mlp_params_as_dense(params)
    if dense is not None:
        save_params_msgpack(dense, run_dir / "params_dense.msgpack")
    hist = writer.history
    if hist and hist[-1]["step"] == step:
        test_loss, test_acc = hist[-1]["test_loss"], hist[-1]["test_acc"]
    else:
        test_loss, test_acc = evaluate(params, model_state, test)
    step_ms = 1e3 * float(np.mean(step_times)) if step_times else float("nan")
    # wall time of a full epoch (data + steps, no evaluation); the median skips the compiling epoch
    full = [r["epoch_seconds"] for r in hist if r["step"] % steps_per_epoch == 0]
    epoch_seconds = float(np.median(full)) if full else step_ms * steps_per_epoch / 1e3
    summary = {"config": cfg.name, "method": cfg.method, "model": cfg.model, "dataset": cfg.dataset,
               "steps": step, "epochs": step / steps_per_epoch,
               "train_loss": next((r["train_loss"] for r in reversed(hist) if r["train_loss"] is not None),
                                  last_loss),
               "test_loss": test_loss, "test_acc": test_acc, "step_ms": step_ms,
               "epoch_seconds": epoch_seconds, "compile_seconds": compile_s,
               "skipped_steps": int(opt_state.total_notfinite)}
    if cfg.method in LETS_METHODS:  # the learned radius (the one the last step used)
        summary["rho"] = float(flatjax.step_info(opt_state).diagnostics["rho"])
    writer.log({}, summary)
    summary["params"], summary["model_state"] = params, model_state
    return summary


def _num(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "-"  # e.g. no step time after a 1-step run


def results_table(results: Sequence[dict], title: str = "") -> str:
    """The Markdown results table (step time relative to the SGD run when there is one)."""
    sgd = next((r["step_ms"] for r in results if r["method"] == "sgd"), None)
    lines = [f"### {title}", ""] if title else []
    lines += ["| config | method | steps | train loss | test loss | test acc | s / epoch | ms / step | "
              "step / SGD | skipped |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['step_ms'] / sgd:.2f}" if sgd and math.isfinite(r["step_ms"] / sgd) else "-"
        lines.append(f"| {r['config']} | {r['method']} | {r['steps']} | {r['train_loss']:.4f} | "
                     f"{r['test_loss']:.4f} | {r['test_acc']:.4f} | {_num(r['epoch_seconds'])} | "
                     f"{_num(r['step_ms'])} | {ratio} | {r.get('skipped_steps', 0)} |")
    return "\n".join(lines) + "\n"


# ---- CLI ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", help="config name (repeatable); see --list-configs")
    p.add_argument("--list-configs", action="store_true", help="print the configs and exit")
    p.add_argument("--method", nargs="+", choices=METHODS, help="method(s); with --config: overrides it")
    p.add_argument("--model", help="model name (flatjax.models.available())")
    p.add_argument("--dataset", choices=("digits", "cifar10-folder", "cifar10", "cifar100"))
    p.add_argument("--data-dir", help=f"CIFAR-10 image folder (or ${fdata.CIFAR10_ENV_VAR}) / TFDS data dir")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--steps", type=int, help="stop after this many updates (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default runs/<timestamp>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints under --out (the configuration must be the same)")
    p.add_argument("--force-resume", action="store_true", help="--resume even with a changed configuration")
    p.add_argument("--overwrite", action="store_true", help="replace the runs already under --out")
    p.add_argument("--eval-every", type=int, default=1, help="test-set evaluation every N epochs (and at the end)")
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N updates (0: every epoch)")
    p.add_argument("--devices", type=int, default=0, help="devices for data parallelism (0: all)")
    p.add_argument("--probe-devices", type=int, default=1,
                   help="device groups evaluating the method's independent passes in parallel, each group "
                        "data-parallel (e.g. 2 for m-ARWP's clean and perturbed gradients); 1: data parallel")
    p.add_argument("--per-device", action="store_true",
                   help="SAM/ASAM with several devices: per-device perturbation (google-research/sam) "
                        "instead of the global one")
    p.add_argument("--hidden", type=int, nargs="*", help="MLP hidden widths (model option)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, cfgs: Sequence[TrainConfig]) -> None:
    """``p.error`` for flag values that would crash later or quietly train something else, before any work."""
    for name, low in (("epochs", 1), ("batch_size", 1), ("steps", 1), ("seed", 0), ("eval_every", 1),
                      ("ckpt_every", 0), ("devices", 0), ("probe_devices", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be an integer >= {low}, got {getattr(args, name)}")
    if args.lr is not None and args.lr <= 0:  # NaN passes: the non-finite guard stops it (test_d2)
        p.error(f"--lr must be a number > 0, got {args.lr}")
    if args.devices > jax.device_count():
        p.error(f"--devices must be between 0 (all) and the {jax.device_count()} available devices, got "
                f"{args.devices}")
    n_dev, methods = args.devices or jax.device_count(), sorted({c.method for c in cfgs})
    if args.probe_devices > n_dev:
        p.error(f"--probe-devices must be between 1 and the {n_dev} devices used, got {args.probe_devices}")
    serial = sorted({c.method for c in cfgs if not has_parallel_passes(c)})
    if args.probe_devices > 1 and serial:
        p.error(f"--probe-devices {args.probe_devices}: {', '.join(serial)} has no independent passes to spread "
                "over device groups (mrwp, marwp, nso, crsam, wpsgd with k > 1, sam/asam with m have); use 1")
    if args.per_device and (n_dev < 2 or args.probe_devices > 1 or set(methods) - {"sam", "asam"}):
        p.error(f"--per-device needs sam or asam on 2 or more data-parallel devices (--probe-devices 1); got "
                f"{', '.join(methods)} on {n_dev} device(s), --probe-devices {args.probe_devices}")
    if args.hidden is not None:
        if any(h < 1 for h in args.hidden):
            p.error(f"--hidden widths must be integers >= 1, got {args.hidden}")
        if {c.model for c in cfgs} - {"mlp"}:
            p.error(f"--hidden sets the widths of the mlp model only; the model is "
                    f"{', '.join(sorted({c.model for c in cfgs}))} (drop --hidden or use --model mlp)")
    if args.overwrite and (args.resume or args.force_resume):
        p.error("--overwrite replaces the stored runs; --resume continues them: give one")


def _holds_run(run_dir: Path) -> bool:
    return (any((run_dir / n).exists() for n in ("metrics.json", "params.msgpack"))
            or any((run_dir / "ckpt").glob("*")))


def _method_fields(cfg: TrainConfig) -> dict:
    return {"method_kwargs": cfg.method_kwargs, "sigma_increase": cfg.sigma_increase,
            "two_batches": cfg.two_batches, "lr_per_epoch": cfg.lr_per_epoch}


def resolve_configs(args: argparse.Namespace) -> list[TrainConfig]:
    """The configs to run: named ones, or one per ``--method`` (default: the digits sweep)."""
    if args.config:
        cfgs = [get_config(n) for n in args.config]
        if args.method:
            if len(args.method) != 1:
                raise SystemExit("with --config give at most one --method")
            # the method's own hyper-parameters: its paper config for this dataset/model when there is
            # one, else its digits defaults (a sam config's rho must not reach rwp)
            m = args.method[0]
            cfgs = [c.replace(method=m, name=f"{c.name}+{m}", **_method_fields(
                CONFIGS.get(c.name.rsplit("_", 1)[0] + f"_{m}", CONFIGS[f"digits_mlp_{m}"]))) for c in cfgs]
    else:
        cfgs = [default_config(m, args.dataset or "digits") for m in (args.method or DEFAULT_SWEEP)]
    return [c.replace(model=args.model, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr) for c in cfgs]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Runs the CLI; returns the summaries of the runs (each with its final ``params`` and ``model_state``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_configs:
        for name, c in sorted(CONFIGS.items()):
            print(f"{name:28s} {c.dataset:9s} {c.model:9s} {c.method:6s} {c.method_kwargs} "
                  f"epochs={c.epochs} bs={c.batch_size} lr={c.lr} wd={c.weight_decay}  # {c.source}")
        return []
    try:
        cfgs = resolve_configs(args)
    except KeyError as e:
        raise SystemExit(f"error: {e.args[0]}") from None
    check_args(parser, args, cfgs)
    out = Path(args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    resume = args.resume or args.force_resume
    for cfg in cfgs:  # before any training: a second run would delete the first one's newest checkpoints
        if not resume and _holds_run(out / cfg.name):
            if not args.overwrite:
                raise SystemExit(f"error: {out / cfg.name} already holds a run: continue it with --resume, "
                                 "write to another --out, or replace it with --overwrite")
            shutil.rmtree(out / cfg.name)
    out.mkdir(parents=True, exist_ok=True)
    mkw = {"hidden": tuple(args.hidden)} if args.hidden is not None else None
    results = []
    for cfg in cfgs:
        try:
            results.append(train_one(cfg, out / cfg.name, seed=args.seed, max_steps=args.steps,
                                     resume=resume, ckpt_every=args.ckpt_every, devices=args.devices,
                                     data_dir=args.data_dir, progress=not args.no_progress, model_kwargs=mkw,
                                     per_device=args.per_device, eval_every=args.eval_every,
                                     probe_devices=args.probe_devices, force_resume=args.force_resume))
        except (NonFiniteRunError, ConfigError) as err:
            raise SystemExit(f"error: {err}") from None
        except TrainingInterrupted as err:
            print(err, file=sys.stderr)
            raise SystemExit(130) from None  # 128 + SIGINT, as a shell reports Ctrl-C
    title = (f"{', '.join(sorted({c.dataset for c in cfgs}))} / {', '.join(sorted({c.model for c in cfgs}))}, "
             f"jax {jax.__version__} on {jax.default_backend()} x{args.devices or jax.device_count()}")
    table = results_table(results, title)
    write_atomic(out / "results.md", table)
    rows = [{k: v for k, v in r.items() if k not in ("params", "model_state")} for r in results]
    write_atomic(out / "results.json", json.dumps(rows, indent=1))
    print(table)
    print(f"wrote {out}/", file=sys.stderr)
    bad = [r for r in results if r["skipped_steps"] > MAX_SKIPPED_FRACTION * max(r["steps"], 1)]
    if bad:
        raise SystemExit("error: too many skipped (non-finite) updates: " + ", ".join(
            f"{r['config']} {r['skipped_steps']} of {r['steps']}" for r in bad)
            + f" (more than {MAX_SKIPPED_FRACTION:.0%}); the results above are not trustworthy")
    return results


if __name__ == "__main__":
    main()
