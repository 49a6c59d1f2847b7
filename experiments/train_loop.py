"""One training run of the CLI (:func:`train_one`): data, model, the step of ``experiments/train_step.py``,
the loop with its checkpoints, metrics, skip checks and Ctrl-C handling, and the run's summary."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import flatjax
from experiments import distributed
from experiments import run_files as rf
from experiments.configs import TrainConfig
from experiments.run_files import ConfigError, NonFiniteRunError, TrainingInterrupted
from experiments.train_data import PIPELINES, StreamingSplit, batches, load_data
from experiments.train_step import (base_optimizer, has_parallel_passes, init_state, make_estimator, make_eval,
                                    make_probe_mesh, make_train_step, second_batch_keyword)
from flatjax import data as fdata
from flatjax import models as fmodels

#: Consecutive skipped (non-finite) updates after which a run stops with :class:`NonFiniteRunError`.
MAX_CONSECUTIVE_SKIPS = 10
#: A finished run with more skipped updates than this fraction makes the CLI exit non-zero.
MAX_SKIPPED_FRACTION = 0.05


def mesh_layout(mesh: jax.sharding.Mesh) -> str:
    """Which processes hold each row of the mesh's first axis, e.g. ``probe 0: processes [0]; probe 1: ...``."""
    axis = mesh.axis_names[0]
    groups = [sorted({d.process_index for d in np.asarray(row).flat}) for row in mesh.devices]
    return (f"mesh {dict(mesh.shape)} over {jax.process_count()} processes; "
            + "; ".join(f"{axis} {i}: processes {g}" for i, g in enumerate(groups)))


def train_one(cfg: TrainConfig, run_dir: Path, *, seed: int = 0, max_steps: int | None = None,
              resume: bool = False, ckpt_every: int = 0, devices: int = 0, data_dir: str | None = None,
              progress: bool = True, model_kwargs: dict | None = None, per_device: bool = False,
              data: tuple | None = None, eval_every: int = 1, probe_devices: int = 1,
              force_resume: bool = False, pipeline: str = "memory", workers: int = 2) -> dict:
    """Trains ``cfg`` and returns its summary (final train loss, test accuracy, timings, skipped updates; with
    the final ``params`` and ``model_state``).

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
      per_device: methods with a per-device perturbation use it over several devices (m-sharpness with
        m = local batch).
      data: ``(train, test, train_transform, eval_transform)`` already loaded (e.g. a subset); default
        :func:`load_data` of ``cfg``.
      eval_every: evaluate on the test set every this many epochs (and always after the last update).
      probe_devices: split the devices into this many groups that evaluate the method's independent
        passes in parallel, each group data-parallel inside: a ``(probe, data)`` mesh and
        ``flatjax.ShardMapProbes(mesh, "probe", data_axis="data")``. 1 (default): plain data parallelism.
      force_resume: resume even though the configuration differs from the stored one.
      pipeline: ``"memory"`` (the split decoded in memory), ``"tfds"`` (an image folder read into memory by
        TFDS) or ``"streaming"`` (an image folder read lazily by Grain, its position saved in the
        checkpoints; ``experiments/train_data.py``).
      workers: decoding worker processes of the streaming pipeline.

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

    progress = progress and distributed.is_main()
    run_dir.mkdir(parents=True, exist_ok=True)
    if pipeline not in PIPELINES:
        raise ConfigError(f"--pipeline must be one of {PIPELINES}, got {pipeline!r}")
    if pipeline != "memory" and (data is not None or cfg.dataset != "cifar10-folder"):
        raise ConfigError(f"--pipeline {pipeline} reads an image folder (--dataset cifar10-folder), not "
                          f"{cfg.dataset}; use --pipeline memory")
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
    if cfg.batch_size % (n_dev // probe_devices):
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by the {n_dev // probe_devices} "
                          "data-parallel devices")
    placed = mesh if mesh is not None else probe_mesh
    if placed is not None and jax.process_count() > 1 and distributed.is_main():
        print(f"{cfg.name}: {mesh_layout(placed)}", file=sys.stderr)
    # each process reads only the rows of every global batch that its devices hold
    rows = fdata.process_rows(placed, cfg.batch_size) if placed is not None else None
    keyword = second_batch_keyword(cfg)
    per_update, validation_stream = 2 if cfg.two_batches else 1, keyword is not None and not cfg.two_batches
    if pipeline == "streaming":
        folder, rows = str(fdata.resolve_cifar10_dir(data_dir)), rows or (0, cfg.batch_size)
        it = StreamingSplit(cfg, folder, rows=rows, seed=seed, worker_count=workers)
        # a second stream (validation batches): the training set in an independent order and augmentation
        second_it = StreamingSplit(cfg, folder, rows=rows, seed=seed + 1, worker_count=workers) \
            if validation_stream else None
        num_classes, image_shape = len(it.class_names), (32, 32, 3)
        test, eval_tf = (lambda: it.test_batches(cfg.batch_size)), None
    else:
        train, test, train_tf, eval_tf = data if data is not None else load_data(cfg, data_dir, pipeline)
        num_classes, image_shape, n_train = len(train.class_names), train.image.shape[1:], len(train.label)
        if cfg.batch_size * per_update > n_train:  # no full update per epoch
            raise ConfigError(f"--batch-size {cfg.batch_size} is too large: {cfg.method} takes {per_update} "
                              f"batch(es) per update from {n_train} training examples; accepted range "
                              f"1..{n_train // per_update}")
        it = fdata.BatchIterator(train, cfg.batch_size, seed=seed, transform=train_tf, prefetch=2, rows=rows)
        # a second stream (validation batches): the training set in an independent order (seed, epoch, step)
        second_it = (fdata.BatchIterator(train, cfg.batch_size, seed=seed + 1, transform=train_tf, prefetch=2,
                                         rows=rows) if validation_stream else None)
    mkw = {**cfg.model_kwargs, **(model_kwargs or {})}
    if cfg.model == "mlp":
        mkw.setdefault("in_features", int(np.prod(image_shape)))
    elif cfg.dataset == "digits":
        mkw.setdefault("in_channels", 1)
    graphdef, params, model_state = fmodels.split_model(fmodels.create(cfg.model, num_classes, seed=seed, **mkw))
    loss_fn = fmodels.make_loss_fn(graphdef, label_smoothing=cfg.label_smoothing)
    steps_per_epoch = len(it) // per_update
    total_steps = cfg.epochs * steps_per_epoch
    per_device = per_device and mesh is not None
    tx = base_optimizer(cfg, total_steps, steps_per_epoch)
    est = make_estimator(cfg, loss_fn, tx, total_steps, seed, "data" if mesh else None, per_device, strategy)
    step_fn = make_train_step(cfg, est, tx, mesh, replicate_on=probe_mesh)
    # eval batches of the training size: memory-safe everywhere, and on CPU small batches are faster
    evaluate = make_eval(fmodels.make_apply(graphdef), eval_tf, batch_size=cfg.batch_size)

    state = init_state(est, tx, params, model_state)
    if placed is not None:  # replicated up front: the first step's outputs match its inputs (one compile), and
        state = jax.device_put(state, jax.sharding.NamedSharding(placed, P()))  # a restore reads into this layout
    state["step"] = np.int64(0)
    cfg_dict = {**vars(cfg), "model_kwargs": mkw, "seed": seed, "devices": n_dev, "probe_devices": probe_devices,
                "per_device": per_device, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                "max_steps": max_steps, "pipeline": pipeline}
    streams = {}  # a streaming pipeline's position is part of the run's state
    if pipeline == "streaming":
        streams = {"data": it.iterator, **({"validation_data": second_it.iterator} if second_it else {})}
    ckpt, doc = rf.Checkpointer(run_dir / "ckpt", streams=streams), None
    try:  # closed on every exit: an open manager buries the error under asyncio tracebacks at shutdown
        if resume and ckpt.latest_step() is not None:
            state, doc = rf.restore_run(ckpt, run_dir, state, cfg_dict, force_resume)
        step = start = int(state.pop("step"))
        writer = rf.MetricsWriter(run_dir, cfg_dict, rf.load_history(run_dir, doc, start) if start else [],
                                  write=distributed.is_main())
        writer.log({})  # the config is on disk from the start: --resume compares against it
        end = total_steps if max_steps is None else min(max_steps, total_steps)
        dropout_base = jax.random.key(seed + 1)

        def put(b):
            return b if b is None or placed is None else fdata.shard_batch(b, placed, global_size=cfg.batch_size)

        def save():
            ckpt.save(step, {**state, "step": np.int64(step)})

        compile_s, step_times, last_loss, epoch = 0.0, [], float("nan"), start // steps_per_epoch
        with (tqdm(total=end, initial=start, desc=cfg.name, disable=not progress, leave=False,
                   dynamic_ncols=True) as bar, rf.StopOnSigint() as stop):
            while step < end and not stop.requested:
                t_epoch, losses = time.perf_counter(), []
                epoch_batches = batches(it, epoch, step - epoch * steps_per_epoch, per_update, second_it)
                # decide to stop BEFORE taking the next batch: a streaming pipeline's saved position is exact
                while step < end and not stop.requested:
                    if distributed.any_process(stop.requested):
                        stop.requested = True  # Ctrl-C on any process: all stop after the same update
                        break
                    if (b0_b1 := next(epoch_batches, None)) is None:
                        break
                    b0, b1 = b0_b1
                    t0 = time.perf_counter()
                    state, loss = step_fn(state, put(b0), put(b1), jax.random.fold_in(dropout_base, step))
                    last_loss = float(loss)  # waits for the step
                    if int(state["skips"]["consecutive"]) >= MAX_CONSECUTIVE_SKIPS:
                        raise NonFiniteRunError(
                            f"{cfg.name}: stopped at update {step + 1}: the last {int(state['skips']['consecutive'])} "
                            f"updates were non-finite (NaN/Inf in the loss or gradients) and were skipped; "
                            f"{int(state['skips']['total'])} skipped in all. Check the learning rate and the "
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
                if step % steps_per_epoch == 0 or step >= end:  # the epoch is done
                    epoch_seconds = time.perf_counter() - t_epoch  # training only, before the evaluation
                    test_loss, test_acc = (evaluate(state["params"], state["model_state"], test)
                                           if (epoch + 1) % eval_every == 0 or step >= end else (None, None))
                    writer.log({"epoch": round(step / steps_per_epoch, 4), "step": step,
                                "train_loss": float(np.mean(losses)) if losses else None, "test_loss": test_loss,
                                "test_acc": test_acc, "epoch_seconds": epoch_seconds,
                                "step_ms": 1e3 * float(np.mean(step_times)) if step_times else None,
                                "skipped_steps": int(state["skips"]["total"])})
                    if ckpt.latest_step() != step:
                        save()
                epoch += 1
            if stop.requested and step < end:  # Ctrl-C: keep the updates done so far
                if ckpt.latest_step() != step:
                    save()
                raise TrainingInterrupted(step)
    finally:
        ckpt.close()
        for stream in streams.values():  # stop the streaming pipeline's worker processes
            getattr(stream, "close", lambda: None)()
    params, model_state = state["params"], state["model_state"]
    if distributed.is_main():
        rf.save_params_msgpack(params, run_dir / "params.msgpack")
        if (dense := rf.mlp_params_as_dense(params)) is not None:
            rf.save_params_msgpack(dense, run_dir / "params_dense.msgpack")
    hist = writer.history
    test_loss, test_acc = ((hist[-1]["test_loss"], hist[-1]["test_acc"]) if hist and hist[-1]["step"] == step
                           else evaluate(params, model_state, test))
    step_ms = 1e3 * float(np.mean(step_times)) if step_times else float("nan")
    # wall time of a full epoch (data + steps, no evaluation); the median skips the compiling epoch
    full = [r["epoch_seconds"] for r in hist if r["step"] % steps_per_epoch == 0]
    summary = {"config": cfg.name, "method": cfg.method, "model": cfg.model, "dataset": cfg.dataset,
               "steps": step, "epochs": step / steps_per_epoch,
               "train_loss": next((r["train_loss"] for r in reversed(hist) if r["train_loss"] is not None),
                                  last_loss),
               "test_loss": test_loss, "test_acc": test_acc, "step_ms": step_ms,
               "epoch_seconds": float(np.median(full)) if full else step_ms * steps_per_epoch / 1e3,
               "compile_seconds": compile_s, "skipped_steps": int(state["skips"]["total"])}
    if hasattr(state["est_state"], "log_rho"):  # a learned radius: the one the next step would use
        summary["rho"] = float(jnp.exp(state["est_state"].log_rho))
    writer.log({}, summary)
    return {**summary, "params": params, "model_state": model_state}
