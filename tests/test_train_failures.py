"""Failure modes of the training CLI (experiments/train.py), each test named after its defect: output folders
are protected (D5), Ctrl-C stops with a checkpoint and exit code 130 (D7), a resume that cannot work fails with
one line and a damaged metrics.json does not stop it (D10), bad flag values are refused up front (D15)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import train, train_loop

ROOT = Path(__file__).resolve().parents[1]  # the CLI subprocesses run from the repository root
TINY = ["--method", "sam", "--hidden", "16", "--batch-size", "16", "--no-progress", "--devices", "1"]
N_DEV = jax.device_count()  # 4 virtual CPU devices (conftest.py)


def _params(result):
    return jax.tree.leaves(jax.tree.map(np.asarray, result["params"]))


def _cli_error(argv, capsys) -> str:
    """The one-line error of a CLI call that must fail: SystemExit's message, or argparse's last stderr line."""
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    code = exc.value.code
    assert code not in (0, None)
    return code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "experiments.train", *args]


def _ckpt_steps(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "ckpt").iterdir() if p.name.isdigit())


# ------------------------------------------------------------ D5: output folders are protected
def test_d5_second_run_into_the_same_out_is_refused(tmp_path, capsys):
    run = tmp_path / "digits_mlp_sam"
    train.main([*TINY, "--steps", "4", "--ckpt-every", "2", "--out", str(tmp_path)])
    metrics = (run / "metrics.json").read_text()
    msg = _cli_error([*TINY, "--steps", "1", "--out", str(tmp_path)], capsys)
    assert str(run) in msg and "--resume" in msg and "another --out" in msg and "--overwrite" in msg
    assert _ckpt_steps(run) == [2, 4] and (run / "metrics.json").read_text() == metrics  # untouched
    again = train.main([*TINY, "--steps", "1", "--out", str(tmp_path), "--overwrite"])
    assert again[0]["steps"] == 1 and _ckpt_steps(run) == [1]


def test_d5_resume_refuses_a_changed_configuration(tmp_path, capsys):
    train.main([*TINY, "--steps", "2", "--out", str(tmp_path)])
    msg = _cli_error([*TINY, "--steps", "4", "--out", str(tmp_path), "--resume", "--seed", "5", "--batch-size",
                      "32"], capsys)
    assert "cannot resume" in msg and "seed 0 -> 5" in msg and "batch_size 16 -> 32" in msg
    assert "--force-resume" in msg and "max_steps" not in msg  # --steps may grow
    msg = _cli_error([*TINY, "--out", str(tmp_path), "--resume", "--hidden", "8"], capsys)
    assert "model_kwargs" in msg and "'hidden': [16]" in msg and "'hidden': [8]" in msg
    forced = train.main([*TINY, "--steps", "4", "--out", str(tmp_path), "--force-resume", "--seed", "5"])
    assert forced[0]["steps"] == 4


# ------------------------------------------------------------ D7: Ctrl-C
def _history(run: Path) -> list:
    try:
        return json.loads((run / "metrics.json").read_text())["history"]
    except (OSError, ValueError, KeyError):
        return []


def test_d7_ctrl_c_stops_with_a_checkpoint_and_exit_code_130(tmp_path):
    # enough epochs that the run is still going when the signal comes (50 digits epochs take ~3 s)
    flags = ["--method", "sam", "--hidden", "16", "--epochs", "1000", "--ckpt-every", "1000", "--no-progress",
             "--devices", "1"]
    run = tmp_path / "digits_mlp_sam"
    proc = subprocess.Popen(_cli(*flags, "--out", str(tmp_path)), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not _history(run):  # one epoch done: training is under way
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no epoch finished within 240 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    stopped = re.fullmatch(r"interrupted at update (\d+); checkpoint saved; continue with --resume",
                           err.strip().splitlines()[-1])
    assert stopped, err
    step = int(stopped[1])
    assert step in _ckpt_steps(run) and not (run / "params.msgpack").exists()
    # --resume runs on from that checkpoint, exactly as a run that was never stopped
    resumed = train.main([*flags, "--out", str(tmp_path), "--resume", "--steps", str(step + 3)])
    straight = train.main([*flags, "--out", str(tmp_path / "straight"), "--steps", str(step + 3)])
    assert resumed[0]["steps"] == step + 3
    for x, y in zip(_params(straight[0]), _params(resumed[0]), strict=True):
        np.testing.assert_array_equal(x, y)


def test_d7_sigint_handler_is_restored_after_training(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    train.main([*TINY, "--steps", "1", "--out", str(tmp_path)])
    assert signal.getsignal(signal.SIGINT) is before


# ------------------------------------------------------------ D10: resume failures, atomic metrics
def test_d10_resume_with_another_width_fails_with_one_line(tmp_path):
    flags = ["--method", "sam", "--no-progress", "--devices", "1", "--out", str(tmp_path)]
    train.main([*flags, "--hidden", "16", "--steps", "2"])
    # the config check catches it; with --force-resume the checkpoint restore does: one line either way
    procs = [subprocess.Popen(_cli(*flags, "--hidden", "32", "--steps", "4", resume), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for resume in ("--resume", "--force-resume")]
    try:
        errs = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    run = tmp_path / "digits_mlp_sam"
    for p, err, expected in zip(procs, errs, (
            f"error: cannot resume {run}: the configuration differs from the stored one: model_kwargs",
            f"error: cannot resume {run}: the checkpoint does not match this configuration (")):
        assert p.returncode == 1 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith(expected), err
    assert "(16, 10)" in errs[1]  # orbax's shape message, its first sentence


def test_d10_truncated_metrics_json_is_rebuilt_on_resume(tmp_path, capsys):
    run = tmp_path / "digits_mlp_sam"
    base = [*TINY, "--epochs", "1", "--out", str(tmp_path)]
    train.main([*base, "--steps", "4"])
    text = (run / "metrics.json").read_text()
    (run / "metrics.json").write_text(text[: len(text) // 2])  # a crash mid-write with the old plain write
    capsys.readouterr()
    resumed = train.main([*base, "--steps", "6", "--resume"])
    assert resumed[0]["steps"] == 6
    assert "metrics.json is unreadable" in capsys.readouterr().err
    doc = json.loads((run / "metrics.json").read_text())  # whole again, the history rebuilt from metrics.csv
    assert [r["step"] for r in doc["history"]] == [4, 6] and doc["summary"]["steps"] == 6
    assert not list(run.glob(".*.tmp")) and not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp


# ------------------------------------------------------------ D15: flag values checked up front
S = ["--method", "sam", "--hidden", "16"]
two = pytest.mark.skipif(N_DEV < 2, reason="needs 2 devices")


@pytest.mark.parametrize("argv, expected", [
    ([*S, "--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    ([*S, "--epochs", "-1"], "--epochs must be an integer >= 1, got -1"),
    ([*S, "--steps", "-3"], "--steps must be an integer >= 1, got -3"),
    ([*S, "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    ([*S, "--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    ([*S, "--lr", "-1"], "--lr must be a number > 0, got -1.0"),
    ([*S, "--ckpt-every", "-1"], "--ckpt-every must be an integer >= 0, got -1"),
    ([*S, "--eval-every", "0"], "--eval-every must be an integer >= 1, got 0"),
    ([*S, "--devices", str(N_DEV + 1)],
     f"--devices must be between 0 (all) and the {N_DEV} available devices, got {N_DEV + 1}"),
    ([*S, "--devices", "-1"], "--devices must be an integer >= 0, got -1"),
    ([*S, "--probe-devices", "0"], "--probe-devices must be an integer >= 1, got 0"),
    ([*S, "--devices", "1", "--probe-devices", "2"], "--probe-devices must be between 1 and the 1 devices used"),
    ([*S, "--devices", "1", "--per-device"],
     "--per-device needs sam, asam, samon on 2 or more data-parallel devices"),
    (["--method", "rwp", "--per-device"], "--per-device needs sam, asam, samon on 2 or more"),
    *[pytest.param(["--method", m, "--probe-devices", "2"], f"--probe-devices 2: {m} has no independent passes",
                   marks=two) for m in ("sam", "asam", "rwp", "arwp", "wpsgd", "sgd", "lets", "gsam", "samon")],
    (["--model", "resnet18", "--hidden", "16"], "--hidden sets the widths of the mlp model only"),
    ([*S[:2], "--hidden", "0"], "--hidden widths must be integers >= 1"),
    ([*S, "--resume", "--overwrite"], "--overwrite replaces the stored runs; --resume continues them"),
    (["--method", "mrwp", "--batch-size", "1000", "--steps", "2", "--devices", "1"],
     "--batch-size 1000 is too large: mrwp takes 2 batch(es) per update from"),
    pytest.param([*S, "--devices", "2", "--batch-size", "63"],
                 "--batch-size 63 is not divisible by the 2 data-parallel devices", marks=two),
])
def test_d15_bad_arguments_are_refused_before_training(tmp_path, capsys, monkeypatch, argv, expected):
    def must_not_run(*args, **kwargs):
        raise AssertionError("training started before the flags were checked")

    monkeypatch.setattr(train_loop, "make_train_step", must_not_run)
    msg = _cli_error([*argv, "--no-progress", "--out", str(tmp_path / "out")], capsys)
    assert expected in msg
    assert not list(tmp_path.rglob("metrics.json"))
