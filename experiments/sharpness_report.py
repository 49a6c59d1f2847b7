"""Sharpness report for a small trained model: JSON numbers and PNG plots.

Usage::

    python -m experiments.sharpness_report --out runs/sharpness            # trains first (seconds)
    python -m experiments.sharpness_report --params mlp.msgpack --out DIR  # measures given weights

``--params`` is a file written with ``flax.serialization.msgpack_serialize(params)`` where
``params`` is the Flax ``"params"`` collection of the model (a top-level ``{"params": ...}``
wrapper is accepted too). For ``--model mlp`` (the only model for now) the structure is
``{"Dense_0": {"kernel": (64, H), "bias": (H,)}, ..., "Dense_L": {"kernel": (H, 10), "bias": (10,)}}``
— a ReLU MLP on scikit-learn's 8×8 digits (``sklearn.datasets.load_digits``, shipped offline,
pixels scaled to [0, 1]); the hidden sizes are read from the file. Without ``--params`` the MLP is
trained with SGD + momentum for ``--train-steps`` steps; ``--save-params`` writes the weights in the
same format.

All measurements use the training split (80%, fixed permutation) in batches of ``--batch-size``,
averaged with size weights, in evaluation mode (the MLP has no BatchNorm or dropout). Writes
``report.json`` and ``landscape_1d.png``, ``landscape_2d.png``, ``landscape_surface.png``,
``spectrum.png``, ``gaps.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flatjax import sharpness as S
from flatjax.sharpness import plots

MODELS = ("mlp",)
PROG = "python -m experiments.sharpness_report"
#: the accepted ``--params`` layout, quoted in every error about the file's contents
PARAMS_LAYOUT = ("a Flax params dict {'Dense_0': {'kernel': (64, H1), 'bias': (H1,)}, ..., "
                 "'Dense_L': {'kernel': (H_L, 10), 'bias': (10,)}} of finite floating-point arrays "
                 "(optionally wrapped in {'params': ...})")


def load_digits_split(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """scikit-learn digits, pixels / 16, a fixed 80/20 split (permutation from ``seed``)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_train = int(0.8 * len(y))
    tr, te = perm[:n_train], perm[n_train:]
    return {"x": x[tr], "y": y[tr]}, {"x": x[te], "y": y[te]}


def make_mlp(hidden: Sequence[int], num_classes: int = 10) -> Any:
    """A Flax ReLU MLP; parameters ``Dense_0 .. Dense_{len(hidden)}``."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for h in hidden:
                x = nn.relu(nn.Dense(h)(x))
            return nn.Dense(num_classes)(x)

    return MLP()


def make_loss(model: Any):
    """Mean softmax cross-entropy of ``model`` on a ``{"x", "y"}`` batch."""
    import optax

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    return loss_fn


def evaluate(model: Any, loss_fn: Any, params: Any, data: dict[str, np.ndarray]
             ) -> tuple[float, float]:
    """Mean loss and accuracy on ``data`` (one compiled call)."""

    @jax.jit
    def run(params, data):
        logits = model.apply({"params": params}, data["x"])
        return loss_fn(params, data), jnp.mean(jnp.argmax(logits, -1) == data["y"])

    loss, acc = run(params, data)
    return float(loss), float(acc)


def train_mlp(model: Any, loss_fn: Any, train: dict[str, np.ndarray], steps: int, seed: int,
              lr: float = 0.1, batch_size: int = 64) -> Any:
    """SGD with momentum 0.9 on random mini-batches (seconds on a CPU)."""
    import optax

    params = jax.jit(model.init)(jax.random.key(seed), train["x"][:1])["params"]
    opt = optax.sgd(lr, momentum=0.9)
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(seed)
    n = len(train["y"])
    for _ in range(steps):
        idx = rng.choice(n, batch_size, replace=False)
        params, state = step(params, state, {"x": train["x"][idx], "y": train["y"][idx]})
    return params


def load_params(path: str) -> dict[str, Any]:
    """Read a msgpack params file (``flax.serialization.msgpack_serialize``) for ``--model mlp``.

    Raises:
      ValueError: naming ``--params`` and the file, if it is not a flax msgpack file or does not
        hold :data:`PARAMS_LAYOUT` (the message names the offending key or leaf).
    """
    from flax import serialization

    with open(path, "rb") as f:
        raw = f.read()
    try:
        tree = serialization.msgpack_restore(raw)
    except Exception as err:  # msgpack raises ExtraData, ValueError, TypeError, ... on foreign bytes
        raise ValueError(f"--params {path} is not a flax msgpack file (write it with "
                         f"flax.serialization.msgpack_serialize(params)); reading it failed with "
                         f"{type(err).__name__}: {err}") from None
    return jax.tree.map(jnp.asarray, check_mlp_params(tree, f"--params {path}"))


def check_mlp_params(tree: Any, where: str = "params") -> dict[str, Any]:
    """Check that ``tree`` is the digits MLP's params (:data:`PARAMS_LAYOUT`); returns it unwrapped.

    Everything is checked here, right after loading, so that a bad file fails in milliseconds
    with the leaf's name instead of deep inside the measurements (IndexError, LinAlgError, ...).

    Raises:
      ValueError: starting with ``where``, naming the offending key or leaf.
    """
    def bad(problem: str) -> ValueError:
        return ValueError(f"{where}: {problem}; expected {PARAMS_LAYOUT}")

    if isinstance(tree, dict) and set(tree) == {"params"}:
        tree = tree["params"]
    if not isinstance(tree, dict):
        raise bad(f"holds a {type(tree).__name__}, not a dict of layers")
    if not tree:
        raise bad("holds an empty dict")
    keys = sorted(tree, key=str)
    for k in keys:
        if not (isinstance(k, str) and re.fullmatch(r"Dense_\d+", k)):
            raise bad(f"unexpected key {k!r} (keys {keys})")
    layers = [f"Dense_{i}" for i in range(len(tree))]
    if set(layers) != set(tree):
        raise bad(f"the layers must be numbered Dense_0 .. Dense_{len(tree) - 1}; got keys {keys}")
    width = 64  # inputs: the 8x8 digits, flattened
    for name in layers:
        layer = tree[name]
        if not isinstance(layer, dict) or set(layer) != {"kernel", "bias"}:
            got = (f"keys {sorted(layer, key=str)}" if isinstance(layer, dict)
                   else f"a {type(layer).__name__}")
            raise bad(f"{name} must hold exactly 'kernel' and 'bias'; got {got}")
        for leaf, ndim in (("kernel", 2), ("bias", 1)):
            x = layer[leaf]
            if not isinstance(x, np.ndarray):
                raise bad(f"{name}/{leaf} is a {type(x).__name__}, not an array")
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise bad(f"{name}/{leaf} has dtype {x.dtype}, not a floating-point dtype")
            if x.ndim != ndim:
                raise bad(f"{name}/{leaf} has shape {x.shape}, not {ndim}-D")
        kernel, bias = layer["kernel"], layer["bias"]
        if kernel.shape[0] != width or kernel.shape[1] < 1 or bias.shape != (kernel.shape[1],):
            raise bad(f"{name} has kernel {kernel.shape} and bias {bias.shape}; the kernel must be "
                      f"({width}, n) with n >= 1 (the previous layer has {width} outputs) and the "
                      "bias (n,)")
        width = kernel.shape[1]
    if width != 10:
        raise bad(f"the last layer {layers[-1]} has {width} outputs, not 10 (the digit classes)")
    check_finite(tree, where)
    return tree


def check_finite(tree: Any, where: str = "params") -> None:
    """Raise ``ValueError`` naming the first leaf of ``tree`` that holds NaN or inf.

    Checked before any measurement: non-finite weights only surface later, after the trace
    estimate, as ``LinAlgError: Eigenvalues did not converge``.
    """
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        x = np.asarray(x)
        n_bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        if n_bad:
            leaf = "/".join(str(getattr(k, "key", k)) for k in path)
            raise ValueError(f"{where}: {leaf} has {n_bad} non-finite values (NaN/inf) of "
                             f"{x.size}; the report needs finite weights")


def save_params(params: Any, path: str) -> None:
    """Write ``params`` with ``flax.serialization.msgpack_serialize``."""
    from flax import serialization

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))


def _versions() -> dict[str, str]:
    import flax
    import jaxlib

    return {"python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "flax": flax.__version__, "numpy": np.__version__}


def _floats(text: str) -> list[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated finite numbers >= 0, got {text!r}") from None
    # float() accepts "nan" and "inf", and nan < 0 is False: check finiteness explicitly
    if not vals or any(not math.isfinite(v) or v < 0 for v in vals):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated finite numbers >= 0, got {text!r}")
    return vals


def _nonneg_float(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        val = math.nan
    if not math.isfinite(val) or val < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return val


def _positive_int(text: str) -> int:
    try:
        val = int(text)
    except ValueError:
        val = 0
    if val < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return val


def _seed(text: str) -> int:
    # numpy rejects negative seeds and jax.random.key overflows at 2**63
    try:
        val = int(text)
    except ValueError:
        val = -1
    if not 0 <= val < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer 0 <= seed < 2**63, got {text!r}")
    return val


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--params", help="msgpack params file (flax.serialization.msgpack_serialize); "
                   "if omitted, the model is trained first")
    p.add_argument("--model", default="mlp", choices=MODELS)
    p.add_argument("--out", default="sharpness_report", help="output directory")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--hidden", type=_positive_int, nargs="+", default=[32],
                   help="MLP hidden sizes (training)")
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--save-params", help="write the (trained) params here (msgpack)")
    p.add_argument("--batch-size", type=int, default=256, help="measurement batch size")
    p.add_argument("--trace-samples", type=int, default=500, help="max Hutchinson probes")
    p.add_argument("--trace-rtol", type=_nonneg_float, default=0.02,
                   help="stop at stderr <= rtol*|trace|")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--lanczos-iters", type=int, default=60)
    p.add_argument("--slq-runs", type=int, default=4)
    p.add_argument("--rho", type=_floats, default=[0.05, 0.1, 0.2],
                   help="SAM radii for the approximation ratio (comma-separated)")
    p.add_argument("--ascent-steps", type=int, default=20)
    p.add_argument("--rel-radii", type=_floats, default=[0.0, 0.01, 0.02, 0.05, 0.1, 0.2],
                   help="perturbation norms as fractions of ||w|| (comma-separated)")
    p.add_argument("--gap-samples", type=int, default=16)
    p.add_argument("--grid", type=int, default=51, help="landscape points per axis")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    # Every argument is checked here, before the (seconds-long) training and measurements.
    p = _parser()
    args = p.parse_args(argv)
    if args.params and not os.path.isfile(args.params):
        p.error(f"--params: no such file: {args.params}")
    for name in ("train_steps", "batch_size", "trace_samples", "top_k", "lanczos_iters",
                 "slq_runs", "ascent_steps", "gap_samples", "grid"):
        minimum = 0 if name == "train_steps" else (3 if name == "grid" else 1)
        if getattr(args, name) < minimum:
            p.error(f"--{name.replace('_', '-')} must be an integer >= {minimum}, "
                    f"got {getattr(args, name)}")
    if args.top_k > args.lanczos_iters:  # lanczos_eigenvalues would reject it after the trace
        p.error(f"--top-k must be <= --lanczos-iters ({args.lanczos_iters}), got {args.top_k}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} exists and is not a directory")
    if args.save_params and os.path.isdir(args.save_params):
        p.error(f"--save-params {args.save_params} is a directory; give a file name")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the report; returns the report dict (also written to ``OUT/report.json``)."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    bar = not args.no_progress
    if args.params:  # checked before anything else runs: a bad file is an argument error
        try:
            params = load_params(args.params)
        except ValueError as err:
            _parser().error(str(err))
    os.makedirs(args.out, exist_ok=True)
    train, test = load_digits_split(args.seed)

    if args.params:
        hidden = [int(params[f"Dense_{i}"]["kernel"].shape[1]) for i in range(len(params) - 1)]
        source = {"params_file": os.path.abspath(args.params)}
    else:
        hidden = list(args.hidden)
        source = {"trained_steps": args.train_steps, "optimizer": "sgd(lr=0.1, momentum=0.9)",
                  "train_batch_size": 64}
    model = make_mlp(hidden)
    loss_fn = make_loss(model)
    if not args.params:
        params = train_mlp(model, loss_fn, train, args.train_steps, args.seed)
        try:  # lr is fixed, so divergence is rare, but it must not surface as a LinAlgError
            check_finite(params, "the trained params")
        except ValueError as err:
            raise SystemExit(f"error: training diverged: {err}; try fewer --train-steps or "
                             "measure given weights with --params") from None
    if args.save_params:
        save_params(params, args.save_params)

    n = len(train["y"])
    batches = [{"x": train["x"][i:i + args.batch_size], "y": train["y"][i:i + args.batch_size]}
               for i in range(0, n, args.batch_size)]
    op = S.HessianOperator(loss_fn, params, batches=batches, weighting="size")
    key = jax.random.key(args.seed)
    k_tr, k_lz, k_slq, k_gap, k_fil, k_l1, k_l2, k_cal = jax.random.split(key, 8)
    w_norm = float(jnp.linalg.norm(op.flat_params))
    report: dict[str, Any] = {
        "model": {"name": args.model, "hidden": hidden, "num_params": op.dim, "weight_norm": w_norm,
                  **source},
        "data": {"dataset": "sklearn load_digits (8x8), train split", "num_examples": n,
                 "num_batches": len(batches), "batch_size": args.batch_size, "weighting": "size",
                 "mode": "evaluation (no BatchNorm/dropout in this model)"},
    }
    report["train_loss"], report["train_accuracy"] = evaluate(model, loss_fn, params, train)
    report["test_loss"], report["test_accuracy"] = evaluate(model, loss_fn, params, test)

    tr = S.hutchinson_trace(op, key=k_tr, max_samples=args.trace_samples, rtol=args.trace_rtol,
                            progress_bar=bar)
    report["hessian_trace"] = {"estimate": tr.trace, "stderr": tr.stderr,
                               "num_samples": tr.num_samples, "converged": tr.converged,
                               "probe": "rademacher", "rtol": args.trace_rtol}
    eig = S.lanczos_eigenvalues(op, key=k_lz, k=args.top_k, num_iters=args.lanczos_iters,
                                progress_bar=bar)
    report["top_eigenvalues"] = {"method": "lanczos (full reorthogonalisation)",
                                 "values": eig.eigenvalues.tolist(),
                                 "residual_bounds": eig.residuals.tolist(),
                                 "num_iters": eig.num_hvps, "converged": eig.converged}
    dens = S.slq_density(op, key=k_slq, num_runs=args.slq_runs, num_iters=args.lanczos_iters,
                         progress_bar=bar)
    report["spectral_density"] = {"num_runs": args.slq_runs, "num_iters": int(dens.nodes.shape[1]),
                                  "mean_eigenvalue": dens.mean(), "trace_estimate": dens.trace(),
                                  "min_node": float(dens.nodes.min()),
                                  "max_node": float(dens.nodes.max())}
    nt = S.normalized_hessian_trace(op, trace=tr)
    report["normalized_trace"] = {"value": nt.value, "stderr": nt.stderr,
                                  "grad_norm": nt.grad_norm,
                                  "definition": "Tr(H) / ||grad L|| (CR-SAM)"}
    report["sam_approximation_ratio"] = []
    for rho in args.rho:
        if rho <= 0:
            continue
        sa = S.sam_approximation_ratio(op, rho=rho, num_steps=args.ascent_steps)
        report["sam_approximation_ratio"].append(
            {"rho": rho, "ratio": sa.ratio, "sam_gap": sa.sam_gap, "best_gap": sa.best_gap,
             "best_step": int(np.argmax(sa.gaps)) + 1, "num_steps": args.ascent_steps})

    radii = np.asarray(args.rel_radii) * w_norm
    unit_filter = float(jnp.linalg.norm(op.ravel(S.filter_wise_noise(k_cal, params, 1.0))))
    curves = [
        S.random_perturbation_gaps(op, key=k_gap, scales=radii, kind="sphere",
                                   num_samples=args.gap_samples, trace=tr, progress_bar=bar),
        S.random_perturbation_gaps(op, key=k_gap, scales=radii / np.sqrt(op.dim), kind="gaussian",
                                   num_samples=args.gap_samples, trace=tr, progress_bar=bar),
        S.random_perturbation_gaps(op, key=k_fil, scales=radii / unit_filter, kind="filter",
                                   num_samples=args.gap_samples, progress_bar=bar),
        S.adversarial_perturbation_gaps(op, radii=radii, num_steps=args.ascent_steps,
                                        progress_bar=bar),
    ]
    report["perturbation_gaps"] = {
        "relative_radii": list(args.rel_radii),
        "note": ("sphere: ||eps|| = r; gaussian: N(0, sigma^2 I) with sigma = r / sqrt(d), "
                 "predicted = (sigma^2/2) Tr(H) (NSO); filter: RWP filter-wise noise with sigma "
                 "set so that E||eps|| ~ r; adversarial: best of multi-step ascent in ||eps|| <= r"),
        **{c.kind: c.to_dict() for c in curves},
    }

    coords = np.linspace(-1.0, 1.0, args.grid)
    l1 = S.loss_landscape_1d(op, key=k_l1, alphas=coords, progress_bar=bar)
    l2 = S.loss_landscape_2d(op, key=k_l2, alphas=coords, betas=coords, progress_bar=bar)
    report["landscape_1d"] = {"alphas": [-1.0, 1.0, args.grid], **l1.summary()}
    report["landscape_2d"] = {"grid": [args.grid, args.grid], "range": [-1.0, 1.0],
                              "directions": "filter-normalised Gaussian, 1-D leaves zero",
                              **l2.summary()}

    out = args.out
    report["plots"] = {
        "landscape_1d": plots.plot_landscape_1d(l1, os.path.join(out, "landscape_1d.png")),
        "landscape_2d": plots.plot_landscape_2d(
            l2, os.path.join(out, "landscape_2d.png"),
            title=f"digits MLP ({op.dim} params): 2-D loss landscape"),
        "landscape_surface": plots.plot_landscape_2d(l2, os.path.join(out, "landscape_surface.png"),
                                                     kind="surface"),
        "spectrum": plots.plot_spectral_density(dens, os.path.join(out, "spectrum.png"),
                                                eigenvalues=eig.eigenvalues),
        "gaps": plots.plot_gap_curves(curves, os.path.join(out, "gaps.png")),
    }
    report["seed"] = args.seed
    report["versions"] = _versions()
    report["elapsed_s"] = time.perf_counter() - t_start
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    print(f"wrote {os.path.join(out, 'report.json')}: trace {tr.trace:.4g} ± {tr.stderr:.2g}, "
          f"top eigenvalues {np.round(eig.eigenvalues, 4).tolist()}, "
          f"normalized trace {nt.value:.4g}, {report['elapsed_s']:.1f} s", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
