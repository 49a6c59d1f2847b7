"""Training CLI: the seed papers' CIFAR configs and an offline digits sweep, for every flatjax method.

    python -m experiments.train                         # offline default: digits MLP, every method
    python -m experiments.train --list-configs          # config names: <dataset>_<model>_<method>
    python -m experiments.train --config NAME --data-dir ~/CIFAR-10-images-jpg
    python -m experiments.train --method METHOD --steps 2 --out runs/smoke
    python -m experiments.train --config NAME --steps 100 --out runs/a    # then, later:
    python -m experiments.train --config NAME --out runs/a --resume       # continues exactly
    python -m experiments.train --config NAME --dataset cifar10 --probe-devices 2

Every run writes under ``--out`` (default ``runs/<timestamp>``), in ``<out>/<config name>/``:
``metrics.csv`` / ``metrics.json`` (one row per epoch, plus the final summary), ``params.msgpack``
(``flax.serialization.msgpack_serialize`` of the final ``params``), ``ckpt/`` (orbax checkpoints of
params, model state, base optimizer state, the method's estimator state, the skip counters and the step;
the data position follows from the step because the :class:`flatjax.data.BatchIterator` order is a
function of ``(seed, epoch, step)``), and TensorBoard events when ``tensorboardX`` is installed.
``<out>/results.md`` holds the Markdown results table. These files are replaced atomically. A run folder
that already holds a run is refused unless ``--resume`` continues it (the configuration stored in
``metrics.json`` must match, ``--steps`` aside; ``--force-resume`` accepts a changed one) or
``--overwrite`` replaces it. Ctrl-C stops after the current update, saves a checkpoint and exits with
code 130 (a second Ctrl-C stops at once); ``--resume`` continues. Flag values that cannot run
(``--epochs 0``, ``--lr -1``, more ``--devices`` than there are ...) are rejected before any work.

Every method, the plain base optimizer included, runs the same jitted step (``experiments/train_step.py``):
the method's estimator gives the direction, the base optimizer (momentum, coupled weight decay as in the
papers' torch code, cosine learning rate) applies it, and a non-finite update is skipped; a run
stops after 10 consecutive skips and exits non-zero above 5 % skipped. With more than one device
(``--devices``, default all), the step runs inside ``jax.shard_map`` over a ``"data"`` mesh axis and the
estimators get ``axis_name="data"`` (their global, data-parallel mode). ``--probe-devices P`` instead
builds a ``(probe P, data n/P)`` mesh: the method's independent passes run on P device groups at once via
``flatjax.ShardMapProbes(mesh, "probe", data_axis="data")``, each group data-parallel; the update is the
same. What differs between methods comes from ``flatjax.registry``.

Several hosts: one process per host runs the same command with ``--distributed`` (Cloud TPU, SLURM, Open
MPI) or ``--coordinator-address HOST:PORT --num-processes N --process-id I``; the mesh spans every process's
devices, each process reads its own rows of every batch, and process 0 writes the files
(``experiments/distributed.py``; README "Scaling out").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import jax

from experiments import distributed
from experiments import run_files as rf
from experiments.configs import CONFIGS, METHODS, TrainConfig, default_config, default_sweep, get_config, with_method
from experiments.run_files import ConfigError, NonFiniteRunError, TrainingInterrupted
from experiments.train_data import PIPELINES
from experiments.train_loop import MAX_SKIPPED_FRACTION, train_one
from experiments.train_step import has_parallel_passes, make_probe_mesh, per_device_methods
from flatjax import data as fdata
from flatjax import registry

__all__ = ["build_parser", "check_args", "main", "make_probe_mesh", "resolve_configs", "train_one"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", help="config name (repeatable); see --list-configs")
    p.add_argument("--list-configs", action="store_true", help="print the configs and exit")
    p.add_argument("--method", nargs="+", choices=METHODS, help="method(s); with --config: overrides it")
    p.add_argument("--model", help="model name (flatjax.models.available())")
    p.add_argument("--dataset", choices=("digits", "cifar10-folder", "cifar10", "cifar100"))
    p.add_argument("--data-dir", help=f"CIFAR-10 image folder (or ${fdata.CIFAR10_ENV_VAR}) / TFDS data dir")
    p.add_argument("--pipeline", choices=PIPELINES, default="memory",
                   help="memory: decode the split into memory (fast for CIFAR); tfds: read the image folder into "
                        "memory with TFDS (tfds.folder_dataset.ImageFolder); streaming: read the image folder "
                        "lazily with Grain worker processes, its position saved in the checkpoints (large data)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes of --pipeline streaming")
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
                        "data-parallel (e.g. 2 for the clean and perturbed gradients of a two-batch method); "
                        "1: data parallel")
    p.add_argument("--per-device", action="store_true",
                   help=f"{', '.join(per_device_methods())} with several devices: a per-device perturbation "
                        "(m-sharpness with m = the local batch) instead of the global one")
    p.add_argument("--hidden", type=int, nargs="*", help="MLP hidden widths (model option)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_flags(p)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, cfgs: Sequence[TrainConfig]) -> None:
    """``p.error`` for flag values that would crash later or quietly train something else, before any work."""
    for name, low in (("epochs", 1), ("batch_size", 1), ("steps", 1), ("seed", 0), ("eval_every", 1),
                      ("ckpt_every", 0), ("devices", 0), ("probe_devices", 1), ("workers", 0)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be an integer >= {low}, got {getattr(args, name)}")
    if args.lr is not None and args.lr <= 0:  # NaN passes: the non-finite guard stops it (test_d2)
        p.error(f"--lr must be a number > 0, got {args.lr}")
    if args.devices > jax.device_count():
        p.error(f"--devices must be between 0 (all) and the {jax.device_count()} available devices, got "
                f"{args.devices}")
    if jax.process_count() > 1 and args.devices not in (0, jax.device_count()):
        p.error(f"--devices: a run of {jax.process_count()} processes uses all {jax.device_count()} devices "
                f"(0), got {args.devices}")
    n_dev, methods = args.devices or jax.device_count(), sorted({c.method for c in cfgs})
    if args.probe_devices > n_dev:
        p.error(f"--probe-devices must be between 1 and the {n_dev} devices used, got {args.probe_devices}")
    serial = sorted({c.method for c in cfgs if not has_parallel_passes(c)})
    if args.probe_devices > 1 and serial:
        parallel = ", ".join(n for n, m in registry.METHODS.items() if m.parallel_passes)
        p.error(f"--probe-devices {args.probe_devices}: {', '.join(serial)} has no independent passes to spread "
                f"over device groups ({parallel} have, with more than one pass; any method with m-sharpness "
                "groups m too); use 1")
    if args.per_device and (n_dev < 2 or args.probe_devices > 1 or set(methods) - set(per_device_methods())):
        p.error(f"--per-device needs {', '.join(per_device_methods())} on 2 or more data-parallel devices "
                f"(--probe-devices 1); got {', '.join(methods)} on {n_dev} device(s), --probe-devices "
                f"{args.probe_devices}")
    if args.hidden is not None:
        if any(h < 1 for h in args.hidden):
            p.error(f"--hidden widths must be integers >= 1, got {args.hidden}")
        if {c.model for c in cfgs} - {"mlp"}:
            p.error(f"--hidden sets the widths of the mlp model only; the model is "
                    f"{', '.join(sorted({c.model for c in cfgs}))} (drop --hidden or use --model mlp)")
    if args.pipeline != "memory" and {c.dataset for c in cfgs} != {"cifar10-folder"}:
        p.error(f"--pipeline {args.pipeline} reads an image folder: it needs --dataset cifar10-folder, got "
                f"{', '.join(sorted({c.dataset for c in cfgs}))}")
    if args.overwrite and (args.resume or args.force_resume):
        p.error("--overwrite replaces the stored runs; --resume continues them: give one")


def resolve_configs(args: argparse.Namespace) -> list[TrainConfig]:
    """The configs to run: named ones, or one per ``--method`` (default: the digits sweep of every method)."""
    if args.config:
        cfgs = [get_config(n) for n in args.config]
        if args.method:
            if len(args.method) != 1:
                raise SystemExit("with --config give at most one --method")
            cfgs = [with_method(c, args.method[0]) for c in cfgs]
    elif args.method:
        cfgs = [default_config(m, args.dataset or "digits") for m in args.method]
    else:
        cfgs = default_sweep(args.dataset or "digits")
    # another model: the config's model options (e.g. the MLP's LayerNorms) do not apply to it
    cfgs = [c.replace(model_kwargs={}) if args.model and args.model != c.model else c for c in cfgs]
    return [c.replace(model=args.model, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr) for c in cfgs]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Runs the CLI; returns the summaries of the runs (each with its final ``params`` and ``model_state``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_configs:
        for name, c in sorted(CONFIGS.items()):
            model = f" model_kwargs={c.model_kwargs}" if c.model_kwargs else ""
            print(f"{name:28s} {c.dataset:9s} {c.model:9s} {c.method:6s} {c.method_kwargs}{model} "
                  f"epochs={c.epochs} bs={c.batch_size} lr={c.lr} wd={c.weight_decay}  # {c.source}")
        return []
    try:
        cfgs = resolve_configs(args)
    except KeyError as e:
        raise SystemExit(f"error: {e.args[0]}") from None
    distributed.initialize(parser, args)
    check_args(parser, args, cfgs)
    if jax.process_count() > 1 and not args.out:
        parser.error("--out: a multi-process run needs the same output folder in every process (on a shared "
                     "file system); give --out")
    out = Path(args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    resume = args.resume or args.force_resume
    for cfg in cfgs:  # before any training: a second run would delete the first one's newest checkpoints
        if not resume and rf.holds_run(out / cfg.name) and not args.overwrite:
            raise SystemExit(f"error: {out / cfg.name} already holds a run: continue it with --resume, "
                             "write to another --out, or replace it with --overwrite")
    distributed.barrier("checked the run folders")  # every process looked before process 0 deletes
    if distributed.is_main():
        for cfg in cfgs:
            if not resume and rf.holds_run(out / cfg.name):
                shutil.rmtree(out / cfg.name)
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier("prepared the run folders")
    mkw = {"hidden": tuple(args.hidden)} if args.hidden is not None else None
    results = []
    for cfg in cfgs:
        try:
            results.append(train_one(cfg, out / cfg.name, seed=args.seed, max_steps=args.steps,
                                     resume=resume, ckpt_every=args.ckpt_every, devices=args.devices,
                                     data_dir=args.data_dir, progress=not args.no_progress, model_kwargs=mkw,
                                     per_device=args.per_device, eval_every=args.eval_every,
                                     probe_devices=args.probe_devices, force_resume=args.force_resume,
                                     pipeline=args.pipeline, workers=args.workers))
        except (NonFiniteRunError, ConfigError) as err:
            raise SystemExit(f"error: {err}") from None
        except TrainingInterrupted as err:
            print(err, file=sys.stderr)
            raise SystemExit(130) from None  # 128 + SIGINT, as a shell reports Ctrl-C
    procs = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    title = (f"{', '.join(sorted({c.dataset for c in cfgs}))} / {', '.join(sorted({c.model for c in cfgs}))}, "
             f"jax {jax.__version__} on {jax.default_backend()} x{args.devices or jax.device_count()}{procs}")
    if distributed.is_main():
        table = rf.results_table(results, title)
        rf.write_atomic(out / "results.md", table)
        rows = [{k: v for k, v in r.items() if k not in ("params", "model_state")} for r in results]
        rf.write_atomic(out / "results.json", json.dumps(rows, indent=1))
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
