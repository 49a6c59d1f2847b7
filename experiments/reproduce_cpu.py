"""CPU reproduction protocol: every flatjax method on real CIFAR-10, sized for 2 CPU cores.

    python -m experiments.reproduce_cpu --data-dir ~/data/CIFAR-10-images-jpg
    FLATJAX_CIFAR10_DIR=~/data/CIFAR-10-images-jpg python -m experiments.reproduce_cpu \\
        --results experiments/results/reproduce_cpu.md          # the committed table

The protocol is the same for every method; only the method changes:

* data: a real CIFAR-10 image folder (``--data-dir`` or ``$FLATJAX_CIFAR10_DIR``; any PNG/JPEG export
  laid out as ``train/<class>/*``, ``test/<class>/*``). Training uses the first ``--train-per-class``
  images of each class, evaluation the whole test split; random crop (padding 4) + horizontal flip,
  CIFAR normalisation.
* model: ResNet-8 (``flatjax.models`` ``small_cnn``: He et al.'s CIFAR ResNet with one block per stage,
  widths 16/32/64, BatchNorm, 78k parameters).
* base optimizer: SGD, momentum 0.9, coupled weight decay, cosine learning rate to 0 over all updates,
  as in the training CLI. m-RWP / m-ARWP take two batches per update and run twice the epochs, so every
  method makes the same number of updates (the official m-ARWP code doubles the epochs the same way).
* method hyper-parameters: those of the paper configs ``cifar10_resnet18_<method>``
  (``python -m experiments.train --list-configs``), unchanged. The protocol runs the methods that have
  such a config (by default all of them but LETS); asking for one without it is an error naming the
  missing config.
* after training, on a fixed set of ``--sharpness-images`` training images (no augmentation, BatchNorm in
  evaluation mode): the Hessian trace of the loss by Hutchinson's estimator and the top Hessian
  eigenvalue by power iteration (:mod:`flatjax.sharpness`).
* seeds: ``--seeds N`` trains the ``--seeded`` methods (default SGD, SAM, m-ARWP) with seeds
  ``seed .. seed+N-1`` (initialisation, data order, augmentation and the methods' own noise); the table
  gives each method's mean ± standard error over its seeds and the binomial standard error of one run's
  test accuracy, ``sqrt(p (1-p) / n_test)``.
* ``<method>_equal_data`` (m-RWP / m-ARWP): one batch of ``--batch-size`` split in two halves, one per
  gradient, and the plain number of epochs: the same images per update and the same updates as SGD, so
  "more data per update" is not the only explanation of a gain.
* ``--image-size 16`` (or 8) averages 2x2 (4x4) pixel blocks: 4x (16x) cheaper convolutions on XLA:CPU,
  so a schedule long enough to interpolate the training set fits on 2 cores.

Writes ``<out>/results.md`` / ``results.json`` (and ``--results`` if given), with the command line,
the machine and the total wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.configs import BASELINE, CONFIGS, DEFAULT_SWEEP, LETS_METHODS, TrainConfig
from experiments.run_files import write_results
from experiments.train_loop import train_one
from flatjax import data as fdata
from flatjax import models as fmodels
from flatjax import sharpness

MODEL = "small_cnn"
MODEL_LABEL = "ResNet-8"
#: The configs the protocol takes each method's hyper-parameters from: ``cifar10_resnet18_<name>``.
PAPER_CONFIG = "cifar10_resnet18_{}"
#: What the protocol can run: every method (and variant, e.g. ``lets_asam``) with such a config.
AVAILABLE = tuple(v for v in DEFAULT_SWEEP if PAPER_CONFIG.format(v) in CONFIGS)
#: The default sweep: all of them but LETS, whose step costs ~3 SAM steps (bench_lets.md) and would push
#: the sweep past an hour on 2 cores; add it with --methods ... lets lets_asam.
DEFAULT_METHODS = tuple(v for v in AVAILABLE if CONFIGS[PAPER_CONFIG.format(v)].method not in LETS_METHODS)
#: ``<method>_equal_data``: a two-batch method fed one batch split in two (same data per update as SGD).
EQUAL_DATA = "_equal_data"
#: The methods trained with every seed of ``--seeds`` by default.
SEEDED_METHODS = ("sgd", "sam", "marwp")


def protocol_config(method: str, *, epochs: int, batch_size: int, lr: float, weight_decay: float,
                    augment: str = "basic") -> TrainConfig:
    """The CPU-protocol config of ``method`` (a method or variant such as ``lets_asam``): the paper CIFAR-10
    hyper-parameters of ``cifar10_resnet18_<method>`` on ResNet-8.

    ``<method>_equal_data`` (a two-batch method): two halves of one batch of ``batch_size`` per update and
    ``epochs`` epochs, i.e. the same images and updates as SGD.

    Raises:
      ValueError: naming the missing config, when there is no ``cifar10_resnet18_<method>``, or for
        ``_equal_data`` on a method that takes one batch per update.
    """
    equal_data = method.endswith(EQUAL_DATA)
    base = method[:-len(EQUAL_DATA)] if equal_data else method
    paper = CONFIGS.get(PAPER_CONFIG.format(base))
    if paper is not None and equal_data and not paper.two_batches:
        raise ValueError(f"{method}: {EQUAL_DATA} splits the two batches of a two-batch method (m-RWP, m-ARWP); "
                         f"{base} takes one batch per update")
    if paper is None:
        raise ValueError(
            f"no config {PAPER_CONFIG.format(base)} for method {method!r}: the protocol takes each method's "
            f"hyper-parameters from its CIFAR-10 ResNet-18 paper config; add one to experiments/configs.py, or "
            f"choose from {', '.join(AVAILABLE)}")
    return TrainConfig(
        name=f"cpu_cifar10_resnet8_{method}", dataset="cifar10-folder", model=MODEL, method=paper.method,
        method_kwargs=dict(paper.method_kwargs), sigma_increase=paper.sigma_increase,
        two_batches=paper.two_batches, epochs=epochs * (2 if paper.two_batches and not equal_data else 1),
        batch_size=batch_size // 2 if equal_data else batch_size, lr=lr, momentum=0.9,
        weight_decay=weight_decay, augment=augment,
        source=f"CPU protocol; method hyper-parameters from {paper.name} ({paper.source})")


IMAGE_SIZES = (32, 16, 8)


def downsample(ds: fdata.ArrayDataset, size: int) -> fdata.ArrayDataset:
    """``ds`` with its 32x32 images averaged over blocks of ``32 // size`` pixels (a box filter)."""
    n, h, w, c = ds.image.shape
    f = h // size
    pooled = ds.image.reshape(n, size, f, w // f, f, c).astype(np.float32).mean(axis=(2, 4))
    return fdata.ArrayDataset(np.round(pooled).astype(np.uint8), ds.label, ds.class_names)


def load_protocol_data(data_dir: str | None, train_per_class: int, cache_dir: str | None = None, *,
                       image_size: int = 32, augment: str = "basic"
                       ) -> tuple[fdata.ArrayDataset, fdata.ArrayDataset, Callable, Callable]:
    """``(train subset, full test split, train transform, eval transform)`` of a CIFAR-10 folder."""
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size}")
    kw: dict[str, Any] = {"num_workers": 2, "cache_dir": cache_dir}
    train = fdata.load_cifar10_folder(data_dir, "train", limit_per_class=train_per_class, **kw)
    test = fdata.load_cifar10_folder(data_dir, "test", **kw)
    if image_size != 32:
        train, test = downsample(train, image_size), downsample(test, image_size)
    train_tf, eval_tf = fdata.cifar_transforms(augment, stats="cifar10")
    return train, test, train_tf, eval_tf


def sharpness_batches(train: fdata.ArrayDataset, eval_tf: Callable, size: int, seed: int,
                      chunk: int = 32) -> list[dict]:
    """A fixed, class-mixed set of ``size`` training images, normalised, without augmentation, in
    chunks of ``chunk`` (an HVP over 8 x 32 images is 5x faster than over 256 at once on XLA:CPU)."""
    idx = np.sort(np.random.default_rng(seed).permutation(len(train))[:size])
    full = eval_tf(train.subset(idx).as_dict(), np.random.default_rng(0))
    return [{k: jnp.asarray(v[i:i + chunk]) for k, v in full.items()} for i in range(0, size, chunk)]


def measure_sharpness(graphdef: Any, params: Any, model_state: Any, batches: list[dict], *, seed: int,
                      max_probes: int, eig_iters: int) -> dict:
    """Hessian trace (Hutchinson) and top eigenvalue (power iteration) of the eval-mode training loss."""
    apply = fmodels.make_apply(graphdef)

    def loss_fn(p, b):
        logits, _ = apply(p, model_state, b["image"], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean()

    op = sharpness.HessianOperator(loss_fn, params, batches=batches)
    key = jax.random.key(seed)
    trace = sharpness.hutchinson_trace(op, key=jax.random.fold_in(key, 0), max_samples=max_probes,
                                       min_samples=min(10, max_probes), rtol=0.03)
    eig = sharpness.power_iteration(op, key=jax.random.fold_in(key, 1), max_iters=eig_iters, tol=1e-3)
    return {"trace": float(trace.trace), "trace_stderr": float(trace.stderr),
            "trace_probes": int(trace.num_samples), "lambda_max": float(np.asarray(eig.eigenvalues)[0])}


def machine() -> str:
    """One line describing where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.default_backend()} "
            f"x{jax.device_count()}, Python {platform.python_version()}")


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None for a single value)."""
    x = np.asarray(values, np.float64)
    return float(x.mean()), (float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else None)


def aggregate(runs: Sequence[dict], n_test: int) -> list[dict]:
    """One row per method (in run order): its seeds' mean ± standard error of every measurement, and the
    binomial standard error of one run's test accuracy ``sqrt(p (1-p) / n_test)`` at the mean accuracy."""
    rows = []
    for name in dict.fromkeys(r["name"] for r in runs):
        mine = [r for r in runs if r["name"] == name]
        row = {"name": name, "seeds": [r["seed"] for r in mine], "method_kwargs": mine[0]["method_kwargs"],
               "sigma_increase": mine[0]["sigma_increase"], "steps": mine[0]["steps"],
               "step_ms": float(np.median([r["step_ms"] for r in mine])),
               "minutes": float(sum(r["minutes"] for r in mine))}
        for key in ("train_loss", "test_acc", "test_loss", "trace", "lambda_max"):
            row[key], row[key + "_se"] = mean_and_stderr([r[key] for r in mine])
        if len(mine) == 1:  # one run: the trace's own (Hutchinson) standard error
            row["trace_se"] = mine[0]["trace_stderr"]
        p = row["test_acc"]
        row["test_acc_binomial_se"] = float(np.sqrt(p * (1 - p) / n_test))
        rows.append(row)
    return rows


def _pm(mean: float, se: float | None, digits: int) -> str:
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def results_markdown(rows: Sequence[dict], *, command: str, settings: dict, wall_minutes: float) -> str:
    """The results table (one row per method, mean ± standard error over its seeds) with the protocol, the
    command and the machine."""
    sgd = next((r for r in rows if r["name"] == BASELINE), None)
    size = settings["image_size"]
    lines = [
        "# CPU reproduction on real CIFAR-10 (`experiments/reproduce_cpu.py`)", "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Total wall time: {wall_minutes:.1f} min (training, evaluation, sharpness, compilation).", "",
        f"Protocol: {MODEL_LABEL} ({settings['params']:,} parameters), {settings['train_images']:,} training "
        f"images ({settings['train_per_class']} per class), full {settings['test_images']:,}-image test "
        f"split, {size}x{size} pixels" + (" (2x2 blocks of the 32x32 images averaged)" if size == 16 else
                                          " (blocks averaged)" if size < 32 else "") +
        f", batch {settings['batch_size']}, {settings['updates']} updates ({settings['epochs']} epochs; "
        f"m-RWP/m-ARWP: two batches per update, `_equal_data`: one batch split in two), SGD momentum 0.9, "
        f"lr {settings['lr']} cosine, weight decay {settings['weight_decay']}, augmentation "
        f"{settings['augment']}; seeds {settings['seed']}..{settings['seed'] + settings['seeds'] - 1} for "
        f"{', '.join(m for m in settings['methods'] if m in settings['seeded'])}"
        + (f", seed {settings['seed']} for the others" if set(settings['methods']) - set(settings['seeded']) else "")
        + ". Method hyper-parameters "
        f"from the `cifar10_resnet18_<method>` paper configs. Sharpness on {settings['sharpness_images']} "
        "fixed training images, eval-mode BatchNorm: Tr(H) by Hutchinson, λ_max by power iteration.", "",
        "Each cell: mean ± standard error over the method's seeds (one seed: no ±, except Tr(H), whose ± is "
        "then Hutchinson's own standard error). Binomial s.e.: `sqrt(p(1-p)/n_test)`, the sampling error of "
        "one run's test accuracy.", "",
        "| method | hyper-parameters | seeds | train loss | test acc | binomial s.e. | test loss | Tr(H) "
        "| λ_max | ms / step | step / SGD | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['step_ms'] / sgd['step_ms']:.2f}" if sgd else "-"
        hp = ", ".join(f"{k}={v}" for k, v in r["method_kwargs"].items())
        if r["sigma_increase"]:
            hp += f" (σ cosine-increasing ×{r['sigma_increase']:g})"
        lines.append(
            f"| {r['name']} | {hp or '-'} | {len(r['seeds'])} | {_pm(r['train_loss'], r['train_loss_se'], 4)} | "
            f"{_pm(r['test_acc'], r['test_acc_se'], 4)} | {r['test_acc_binomial_se']:.4f} | "
            f"{_pm(r['test_loss'], r['test_loss_se'], 4)} | {_pm(r['trace'], r['trace_se'], 1)} | "
            f"{_pm(r['lambda_max'], r['lambda_max_se'], 2)} | {r['step_ms']:.1f} | {ratio} | {r['minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.reproduce_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help=f"CIFAR-10 image folder (default ${fdata.CIFAR10_ENV_VAR})")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                   help=f"methods with a cifar10_resnet18_<method> config: {', '.join(AVAILABLE)}, and "
                        f"mrwp{EQUAL_DATA} / marwp{EQUAL_DATA} (default: {' '.join(DEFAULT_METHODS)})")
    p.add_argument("--train-per-class", type=int, default=500, help="training images per class")
    p.add_argument("--epochs", type=int, default=8, help="epochs (m-RWP/m-ARWP: twice this)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--eval-every", type=int, default=4, help="test evaluation every N epochs")
    p.add_argument("--sharpness-images", type=int, default=256)
    p.add_argument("--trace-probes", type=int, default=24, help="Hutchinson probes at most")
    p.add_argument("--eig-iters", type=int, default=15, help="power-iteration steps at most")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=1, help="seeds of the --seeded methods")
    p.add_argument("--seeded", nargs="+", default=list(SEEDED_METHODS), metavar="METHOD",
                   help=f"methods trained with every seed (default: {' '.join(SEEDED_METHODS)})")
    p.add_argument("--image-size", type=int, choices=IMAGE_SIZES, default=32,
                   help="train and test at this side (blocks of the 32x32 images averaged)")
    p.add_argument("--augment", choices=("basic", "none"), default="basic",
                   help="basic: random crop (padding 4) + flip; none: normalisation only")
    p.add_argument("--cache-dir", help="cache the decoded images here (.npz)")
    p.add_argument("--out", default="runs/reproduce_cpu", help="run folder")
    p.add_argument("--results", help="also write the Markdown table here")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Runs the protocol; returns one row per method (its seeds aggregated; every run in results.json)."""
    args = build_parser().parse_args(argv)
    for name in ("train_per_class", "epochs", "batch_size", "eval_every", "sharpness_images",
                 "trace_probes", "eig_iters", "seeds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for method in [*args.methods, *args.seeded]:  # before any work
        try:
            protocol_config(method, epochs=1, batch_size=1, lr=1.0, weight_decay=0.0)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    start = time.perf_counter()
    try:
        data = load_protocol_data(args.data_dir, args.train_per_class, args.cache_dir,
                                  image_size=args.image_size, augment=args.augment)
    except fdata.DatasetNotFoundError as e:
        raise SystemExit(f"error: {e}\n(a CIFAR-10 image folder: train/<class>/*.jpg and test/<class>/*.jpg; "
                         "pass it with --data-dir or $FLATJAX_CIFAR10_DIR)") from None
    train, test, _, eval_tf = data
    sharp_data = sharpness_batches(train, eval_tf, min(args.sharpness_images, len(train)), args.seed)
    graphdef, params0, _ = fmodels.split_model(fmodels.create(MODEL, len(train.class_names), seed=args.seed))
    out = Path(args.out)
    runs = []
    for method in args.methods:
        cfg = protocol_config(method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              weight_decay=args.weight_decay, augment=args.augment)
        seeds = range(args.seed, args.seed + (args.seeds if method in args.seeded else 1))
        for seed in seeds:
            t0 = time.perf_counter()
            summary = train_one(cfg, out / f"{cfg.name}_seed{seed}", seed=seed, devices=1, data=data,
                                progress=not args.no_progress, eval_every=args.eval_every)
            sharp = measure_sharpness(graphdef, summary["params"], summary["model_state"], sharp_data,
                                      seed=seed, max_probes=args.trace_probes, eig_iters=args.eig_iters)
            run = {k: v for k, v in summary.items() if k not in ("params", "model_state")}
            run.update(sharp, name=method, seed=seed, method_kwargs=cfg.method_kwargs,
                       sigma_increase=cfg.sigma_increase, minutes=(time.perf_counter() - t0) / 60)
            runs.append(run)
            print(f"{method} seed {seed}: test acc {run['test_acc']:.4f}, train loss {run['train_loss']:.4f}, "
                  f"Tr(H) {run['trace']:.1f}, lambda_max {run['lambda_max']:.2f}, {run['minutes']:.1f} min",
                  file=sys.stderr)
    rows = aggregate(runs, len(test))
    settings = {**vars(args), "train_images": len(train), "test_images": len(test),
                "params": fmodels.count_params(params0),
                "updates": rows[0]["steps"] if rows else 0}
    args_given = list(argv if argv is not None else sys.argv[1:])
    for i, arg in enumerate(args_given[:-1]):  # the results file must not carry a path of this machine
        if arg in ("--data-dir", "--cache-dir"):
            args_given[i + 1] = "DIR"
        elif arg in ("--out", "--results") and os.path.isabs(args_given[i + 1]):
            args_given[i + 1] = "OUT"
    command = "python -m experiments.reproduce_cpu " + shlex.join(args_given)
    table = results_markdown(rows, command=command.strip(), settings=settings,
                             wall_minutes=(time.perf_counter() - start) / 60)
    write_results(out / "results.md", table)
    (out / "results.json").write_text(json.dumps({"methods": rows, "runs": runs}, indent=1, default=str))
    if args.results:  # the hand-written "## Reading" of a committed results file survives a re-run
        write_results(Path(args.results), table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
