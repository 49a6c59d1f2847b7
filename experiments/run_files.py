"""The training CLI's files: checkpoints, metrics, the results table, params exports, and the run's
errors and Ctrl-C handling.

Under ``<out>/<config name>/``: ``ckpt/`` (orbax checkpoints of the training state: ``params``,
``model_state`` (BatchNorm statistics, stored once), ``opt_state`` (the base optimizer's), ``est_state``
(the method's: step count, PRNG key, e.g. ARWP's history or LETS's radius), ``skips`` (consecutive and
total skipped non-finite updates) and ``step``), ``metrics.csv`` / ``metrics.json``, ``params.msgpack``
(and ``params_dense.msgpack`` for the MLP). Every file is replaced atomically (never half-written).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from experiments.configs import BASELINE


# ---- checkpoints -------------------------------------------------------------------------------------


class Checkpointer:
    """Orbax checkpoints of the training state (a dict; the CLI's: see the module docstring).

    Optax and estimator states are NamedTuples; orbax stores their leaves and ``restore`` rebuilds the exact tree
    from a freshly initialised template (``StandardRestore(abstract_state)``), so resuming gives the
    same arrays, dtypes and structure as an uninterrupted run. ``streams``: Grain iterators (the streaming
    pipeline's) whose positions are saved in the same checkpoint (items ``"state"`` and one per stream) and
    set back by ``restore``.
    """

    def __init__(self, directory: Path, max_to_keep: int = 2, streams: dict[str, Any] | None = None) -> None:
        import orbax.checkpoint as ocp

        self._ocp, self.streams = ocp, dict(streams or {})
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        if self.streams:
            import grain

            self._grain = grain
            handlers = {"state": ocp.StandardCheckpointHandler(),
                        **{name: grain.checkpoint.CheckpointHandler() for name in self.streams}}
        else:  # one unnamed item (the layout of every checkpoint written before streams existed)
            handlers = ocp.StandardCheckpointHandler()
        # the handlers named up front: item_metadata before any restore
        self.manager = ocp.CheckpointManager(directory.absolute(), options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict) -> None:
        args = self._ocp.args.StandardSave(state)
        if self.streams:
            args = self._ocp.args.Composite(state=args, **{n: self._grain.checkpoint.CheckpointSave(it)
                                                           for n, it in self.streams.items()})
        self.manager.save(step, args=args, force=True)

    def restore(self, template: dict, step: int | None = None) -> dict:
        """Raises ValueError naming the first array missing or shaped otherwise in the checkpoint: checked on
        its metadata first, since a read that fails inside orbax leaves asyncio tracebacks on stderr."""
        step = self.latest_step() if step is None else step
        metadata = self.manager.item_metadata(step)
        if self.streams:
            metadata = metadata["state"]
        stored, wanted = leaf_shapes(metadata), leaf_shapes(template)
        for path in sorted(stored.keys() | wanted.keys(), key=lambda p: (not p.startswith("params"), p)):
            if stored.get(path) != wanted.get(path):
                raise ValueError(f"{path}: {stored.get(path, 'absent')} in the checkpoint, "
                                 f"{wanted.get(path, 'absent')} here")
        abstract = jax.tree.map(  # read into the template's layout (in a multi-process run: its global shards)
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), template)
        if not self.streams:
            return self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
        restored = self.manager.restore(step, args=self._ocp.args.Composite(
            state=self._ocp.args.StandardRestore(abstract),
            **{n: self._grain.checkpoint.CheckpointRestore(it) for n, it in self.streams.items()}))
        return restored["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def leaf_shapes(tree: Any) -> dict[str, tuple]:
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


def write_results(path: Path, text: str) -> None:
    """Write a results file, keeping its hand-written ``## Reading`` section across re-runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    reading = old[old.index("## Reading"):] if "## Reading" in old else ""
    path.write_text(text + ("\n" + reading if reading else ""))


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


class MetricsWriter:
    """Appends one row per epoch to ``metrics.csv``, rewrites ``metrics.json``, and logs to TensorBoard
    when ``tensorboardX`` is installed."""

    FIELDS = ("epoch", "step", "train_loss", "test_loss", "test_acc", "epoch_seconds", "step_ms",
              "skipped_steps")

    def __init__(self, run_dir: Path, config: dict, history: list[dict], write: bool = True) -> None:
        self.run_dir, self.config, self.history, self.write = run_dir, config, history, write
        self.tb = None
        if write:
            try:
                from tensorboardX import SummaryWriter  # optional

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                pass

    def log(self, row: dict, summary: dict | None = None) -> None:
        """Appends ``row`` (if any) to the history; writes the files unless ``write`` is off (processes > 0)."""
        if row:
            self.history.append(row)
        if not self.write:
            return
        if row:
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


def read_metrics(run_dir: Path) -> dict | None:
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


def load_history(run_dir: Path, doc: dict | None, step: int) -> list[dict]:
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


# ---- results table -------------------------------------------------------------------------------


def _num(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "-"  # e.g. no step time after a 1-step run


def results_table(results: Sequence[dict], title: str = "") -> str:
    """The Markdown results table (step time relative to the SGD run when there is one)."""
    sgd = next((r["step_ms"] for r in results if r["method"] == BASELINE), None)
    lines = [f"### {title}", ""] if title else []
    lines += ["| config | method | steps | train loss | test loss | test acc | s / epoch | ms / step | "
              "step / SGD | skipped |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['step_ms'] / sgd:.2f}" if sgd and math.isfinite(r["step_ms"] / sgd) else "-"
        lines.append(f"| {r['config']} | {r['method']} | {r['steps']} | {r['train_loss']:.4f} | "
                     f"{r['test_loss']:.4f} | {r['test_acc']:.4f} | {_num(r['epoch_seconds'])} | "
                     f"{_num(r['step_ms'])} | {ratio} | {r.get('skipped_steps', 0)} |")
    return "\n".join(lines) + "\n"


# ---- run control ---------------------------------------------------------------------------------


class NonFiniteRunError(RuntimeError):
    """A run stopped because its updates kept being non-finite (every one skipped)."""


class ConfigError(ValueError):
    """A configuration that cannot run, or cannot continue the stored run; the CLI prints it as one line."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run after update ``step``, whose checkpoint was saved."""

    def __init__(self, step: int) -> None:
        super().__init__(f"interrupted at update {step}; checkpoint saved; continue with --resume")
        self.step = step


class StopOnSigint:
    """While active, Ctrl-C only sets ``requested``: the loop then stops after the current update and saves
    a checkpoint (a KeyboardInterrupt raised inside JAX can land in its GC callback and be swallowed; a flag
    cannot). A second Ctrl-C raises KeyboardInterrupt at once. Signals reach the main thread only."""

    def __enter__(self) -> "StopOnSigint":
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
NOT_TRAJECTORY = ("name", "source", "max_steps")


def check_same_config(run_dir: Path, stored: dict, current: dict) -> None:
    """Raises :class:`ConfigError` naming the fields where ``current`` differs from the ``stored`` config
    (fields the stored one lacks are not compared)."""
    current = json.loads(json.dumps(current, default=str))  # as stored: tuples -> lists
    diff = [f"{k} {stored[k]!r} -> {v!r}" for k, v in current.items()
            if k in stored and k not in NOT_TRAJECTORY and stored[k] != v]
    if diff:
        raise ConfigError(f"cannot resume {run_dir}: the configuration differs from the stored one: "
                          f"{', '.join(diff)}; use the same flags, or --force-resume to continue with the new ones")


def restore_run(ckpt: Checkpointer, run_dir: Path, template: dict, config: dict, force: bool
                ) -> tuple[dict, dict | None]:
    """``(state, metrics.json document or None)`` of the stored run: the stored configuration must equal
    ``config`` unless ``force``; the latest checkpoint must have ``template``'s arrays.

    Raises:
      ConfigError: either does not match (one line naming what differs).
    """
    doc = read_metrics(run_dir)
    if doc is not None and not force:
        check_same_config(run_dir, doc["config"], config)
    try:
        return ckpt.restore(template), doc
    except ValueError as err:  # other shapes or tree structure
        raise ConfigError(f"cannot resume {run_dir}: the checkpoint does not match this configuration "
                          f"({(str(err) or 'ValueError').splitlines()[0]})") from err


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds (part of) a run: metrics, exported params or checkpoints."""
    return (any((run_dir / n).exists() for n in ("metrics.json", "params.msgpack"))
            or any((run_dir / "ckpt").glob("*")))
