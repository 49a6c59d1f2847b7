"""Multi-process training for real: 2 local JAX processes x 2 virtual CPU devices, one mesh over gloo.

Each test launches ``python -m experiments.train`` twice on 127.0.0.1 (coordinator on a free port) and compares
with the same command run in this test process on 4 devices (conftest). Tolerance, stated: data-parallel SAM and
LETS-SAM within 1e-6 of the single-process parameters after 4 updates (the gloo all-reduce may sum in another
order; measured 7e-9); m-ARWP with its probe groups on different processes bit-identical (measured 0); a run
killed mid-way and resumed in 2 processes bit-identical to an uninterrupted one. Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import serialization

from experiments import train

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 300  # seconds for one 2-process run (start-up, compile, a few updates) on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, *flags: str, heartbeat: int = 20) -> list[subprocess.Popen]:
    """Starts the CLI in 2 processes of 2 virtual CPU devices each."""
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONUNBUFFERED": "1"}
    return [subprocess.Popen([sys.executable, "-m", "experiments.train", *flags, "--out", str(out), "--no-progress",
                              "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                              "--process-id", str(i), "--heartbeat-timeout", str(heartbeat), "--init-timeout", "120"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def finish(procs: list[subprocess.Popen], timeout: float = LAUNCH_TIMEOUT) -> list[tuple[int, str]]:
    """``(returncode, stdout + stderr)`` of each process; kills them all past ``timeout``."""
    deadline, results = time.monotonic() + timeout, []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a process of the 2-process run did not finish within {timeout} s")
        results.append((p.returncode, out + err))
    return results


def run_ok(out: Path, *flags: str) -> list[str]:
    results = finish(launch(out, *flags))
    for i, (rc, log) in enumerate(results):
        assert rc == 0, f"process {i} exited with {rc}:\n{log[-3000:]}"
    return [log for _, log in results]


def stored_params(run: Path) -> dict:
    return serialization.msgpack_restore((run / "params.msgpack").read_bytes())


def max_difference(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
                                            a, b)))


def single_process(out: Path, *flags: str) -> dict:
    assert jax.device_count() == 4 and jax.process_count() == 1
    return {r["config"]: r["params"] for r in train.main([*flags, "--out", str(out), "--no-progress"])}


def test_data_parallel_sam_and_lets_sam_match_one_process_of_four_devices(tmp_path):
    flags = ("--method", "sam", "lets", "--steps", "4")
    logs = run_ok(tmp_path / "two", *flags)
    assert "2 processes" in (tmp_path / "two" / "results.md").read_text()
    assert "data 0: processes [0]" in logs[0] and "data 3: processes [1]" in logs[0]
    reference = single_process(tmp_path / "one", *flags)
    for name in ("digits_mlp_sam", "digits_mlp_lets"):
        assert max_difference(stored_params(tmp_path / "two" / name), reference[name]) <= 1e-6, name


MARWP = ("--method", "marwp", "--probe-devices", "2", "--steps", "24", "--ckpt-every", "3")


@pytest.fixture(scope="module")
def marwp_two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("marwp")
    return out, run_ok(out, *MARWP)


def test_marwp_probe_groups_on_two_processes_match_one_process(marwp_two_processes, tmp_path):
    out, logs = marwp_two_processes
    # each probe group (clean and perturbed gradient) runs on its own process, data-parallel inside it
    assert "probe 0: processes [0]; probe 1: processes [1]" in logs[0]
    reference = single_process(tmp_path, *MARWP)["digits_mlp_marwp"]
    assert max_difference(stored_params(out / "digits_mlp_marwp"), reference) == 0.0


def test_two_processes_killed_mid_way_resume_bit_identical(marwp_two_processes, tmp_path):
    out, _ = marwp_two_processes
    run = tmp_path / "digits_mlp_marwp"
    procs = launch(tmp_path, *MARWP)
    deadline, killed_at = time.monotonic() + LAUNCH_TIMEOUT, None
    while time.monotonic() < deadline and killed_at is None:
        steps = [int(p.name) for p in (run / "ckpt").glob("*") if p.name.isdigit()] if run.exists() else []
        if steps and max(steps) >= 6:
            for p in procs:
                p.send_signal(signal.SIGKILL)
            killed_at = max(steps)
        elif any(p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    finish(procs, timeout=30)
    if killed_at is None or (run / "params.msgpack").exists():
        pytest.skip("the run ended before it could be killed mid-way (machine too fast for 24 updates)")
    assert killed_at < 24
    run_ok(tmp_path, *MARWP, "--resume")
    assert max_difference(stored_params(run), stored_params(out / "digits_mlp_marwp")) == 0.0


@pytest.mark.parametrize("victim", [1, 0])
def test_when_one_process_dies_the_other_exits_with_a_clear_error(tmp_path, victim):
    procs = launch(tmp_path, "--method", "sam", "--epochs", "1000", "--ckpt-every", "5", heartbeat=5)
    run, deadline = tmp_path / "digits_mlp_sam", time.monotonic() + LAUNCH_TIMEOUT
    while time.monotonic() < deadline and not (run / "ckpt" / "5").exists():
        assert all(p.poll() is None for p in procs), finish(procs, timeout=30)
        time.sleep(0.05)
    procs[victim].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    (rc, log), = finish([procs[1 - victim]], timeout=120)
    elapsed = time.monotonic() - t0
    finish([procs[victim]], timeout=30)
    print(f"victim {victim}: survivor exited {rc} after {elapsed:.1f} s")
    assert rc != 0 and elapsed < 120
    assert "another task died" in log or "unhealthy" in log or "UNAVAILABLE" in log, log[-3000:]


# ---- the pieces, in one process ----------------------------------------------------------------------------


def test_process_rows_and_shard_batch_with_global_size():
    from flatjax.data import BatchIterator, data_mesh, process_rows, shard_batch

    mesh = data_mesh(jax.devices())
    assert process_rows(mesh, 8) == (0, 8)  # one process holds every row
    with pytest.raises(ValueError, match="batch_size must be divisible by the 4 devices"):
        process_rows(mesh, 6)
    batch = {"image": np.arange(32.0).reshape(8, 4), "label": np.arange(8)}
    placed = shard_batch(batch, mesh, global_size=8)
    np.testing.assert_array_equal(np.asarray(placed["image"]), batch["image"])
    assert placed["label"].sharding == shard_batch(batch, mesh)["label"].sharding
    with pytest.raises(ValueError, match="this process's 8 rows"):
        shard_batch({"label": np.arange(4)}, mesh, global_size=8)
    # a process holding rows [2, 6) of each batch reads exactly those rows (no augmentation)
    data = {"image": np.arange(40.0).reshape(20, 2), "label": np.arange(20)}
    full, part = BatchIterator(data, 8, seed=3), BatchIterator(data, 8, seed=3, rows=(2, 6))
    for a, b in zip(full.epoch(1), part.epoch(1)):
        np.testing.assert_array_equal(a["label"][2:6], b["label"])
    with pytest.raises(ValueError, match="rows must be"):
        BatchIterator(data, 8, rows=(6, 2))


@pytest.mark.parametrize("argv, expected", [
    (["--coordinator-address", "127.0.0.1:1234"], "go together"),
    (["--coordinator-address", "localhost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator-address", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be in 0 .. 1"),
    (["--coordinator-address", "127.0.0.1:1234", "--num-processes", "0", "--process-id", "0"],
     "--num-processes must be an integer >= 1"),
])
def test_distributed_flags_are_checked_before_start_up(argv, expected, capsys):
    with pytest.raises(SystemExit):
        train.main(["--method", "sam", "--steps", "1", *argv])
    assert expected in capsys.readouterr().err
