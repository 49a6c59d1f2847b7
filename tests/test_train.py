"""The training CLI (experiments/train.py): smoke runs of every method, exact resume, clear errors."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import serialization

from experiments import configs, run_files, train, train_step
from flatjax import registry
from flatjax.data import DatasetNotFoundError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

TINY = ["--hidden", "16", "--batch-size", "16", "--no-progress", "--devices", "1"]


def _params(result):
    return jax.tree.leaves(jax.tree.map(np.asarray, result["params"]))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two steps of the default sweep (every method of the registry, sgd and LETS-ASAM) through the CLI, one
    compile each: the slow part of this file. Results by config name."""
    out = tmp_path_factory.mktemp("sweep")
    results = train.main(["--steps", "2", "--out", str(out), *TINY])
    return out, {r["config"]: r for r in results}


def test_two_steps_of_every_method(sweep):
    out, results = sweep
    assert list(results) == [f"digits_mlp_{v}" for v in configs.DEFAULT_SWEEP]
    assert [r["method"] for r in results.values() if r["config"] != "digits_mlp_lets_asam"] == list(configs.METHODS)
    assert set(configs.METHODS) == {"sgd", *registry.METHODS}
    for r in results.values():
        assert r["steps"] == 2 and np.isfinite(r["train_loss"]) and r["skipped_steps"] == 0, r
        run = out / r["config"]
        assert (run / "metrics.csv").read_text().startswith("epoch,step,train_loss")
        doc = json.loads((run / "metrics.json").read_text())
        assert doc["summary"]["steps"] == 2 and doc["config"]["method"] == r["method"]
        restored = serialization.msgpack_restore((run / "params.msgpack").read_bytes())
        assert {"layers", "head"} <= set(restored)
    assert "norms" in serialization.msgpack_restore((out / "digits_mlp_samon" / "params.msgpack").read_bytes())
    table = (out / "results.md").read_text()
    assert "| config | method |" in table and "| digits_mlp_marwp | marwp | 2 |" in table
    assert "| digits_mlp_lets_asam | lets | 2 |" in table and "| digits_mlp_gsam | gsam | 2 |" in table


def test_gsam_runs_from_the_command_line(tmp_path):
    results = train.main(["--method", "gsam", "--steps", "5", "--no-progress", "--out", str(tmp_path)])
    assert results[0]["steps"] == 5 and np.isfinite(results[0]["train_loss"]) and results[0]["skipped_steps"] == 0


def test_model_state_is_stored_once_in_the_checkpoint(tmp_path):
    """BatchNorm statistics (ResNet-8) live in the checkpoint's model_state only, not again in a method state."""
    cfg = configs.get_config("digits_mlp_sam").replace(model="small_cnn", batch_size=16)
    train.train_one(cfg, tmp_path, max_steps=1, devices=1, progress=False, model_kwargs={"width": 4})
    ckpt = run_files.Checkpointer(tmp_path / "ckpt")
    try:
        paths = run_files.leaf_shapes(ckpt.manager.item_metadata(ckpt.latest_step()))
    finally:
        ckpt.close()
    assert {p.split("/")[0] for p in paths} == {"params", "model_state", "opt_state", "est_state", "skips", "step"}
    stats = [p for p in paths if p.rsplit("/", 1)[-1] in ("mean", "var")]
    assert stats and all(p.startswith("model_state/") for p in stats), stats
    assert not any(p.startswith("opt_state/") and "aux" in p for p in paths)


def test_dense_params_file_loads_in_sharpness_report(sweep):
    from experiments.sharpness_report import load_params

    tree = load_params(str(sweep[0] / "digits_mlp_sgd" / "params_dense.msgpack"))
    assert sorted(tree) == ["Dense_0", "Dense_1"]  # --hidden 16: one hidden layer + head


def test_results_table_is_printed(tmp_path, capsys):
    results = [{"config": "c", "method": m, "steps": 2, "train_loss": 1.0, "test_loss": 1.0, "test_acc": 0.5,
                "epoch_seconds": 0.1, "step_ms": ms} for m, ms in (("sgd", 2.0), ("sam", 3.0))]
    table = run_files.results_table(results, "t")
    assert "| c | sam | 2 | 1.0000 | 1.0000 | 0.5000 | 0.10 | 3.00 | 1.50 |" in table


# m-ARWP: ARWP history + two-batch data position; LETS: learned radius + the validation-batch stream
@pytest.mark.parametrize("method", ["marwp", "lets"])
def test_kill_and_resume_gives_identical_parameters(tmp_path, method):
    base = ["--method", method, *TINY, "--epochs", "1"]
    straight = train.main([*base, "--steps", "4", "--out", str(tmp_path / "a")])
    train.main([*base, "--steps", "2", "--out", str(tmp_path / "b")])  # "killed" after step 2
    resumed = train.main([*base, "--steps", "4", "--out", str(tmp_path / "b"), "--resume"])
    assert resumed[0]["steps"] == 4
    for x, y in zip(_params(straight[0]), _params(resumed[0]), strict=True):
        np.testing.assert_array_equal(x, y)
    history = json.loads((tmp_path / "b" / f"digits_mlp_{method}" / "metrics.json").read_text())["history"]
    assert [r["step"] for r in history] == [2, 4]


def test_lets_learns_its_radius(sweep):
    results = sweep[1]
    for name, rho0 in (("digits_mlp_lets", 0.05), ("digits_mlp_lets_asam", 0.5)):
        r = results[name]
        assert r["method"] == "lets" and np.isfinite(r["train_loss"]) and r["skipped_steps"] == 0
        # the learned radius after two Adam steps (lr 1e-4 on log rho): moved, but only a little
        assert r["rho"] != rho0 and abs(np.log(r["rho"] / rho0)) < 1e-3, r["rho"]
    assert "rho" not in results["digits_mlp_sam"]


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices")
def test_data_parallel_sam_matches_one_device(tmp_path, sweep):
    two = train.main(["--method", "sam", "--steps", "2", "--out", str(tmp_path), *TINY[:-1], "2"])
    for x, y in zip(_params(sweep[1]["digits_mlp_sam"]), _params(two[0]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    # per-device perturbation (google-research/sam's default): runs, and differs from the global one
    local = train.main(["--method", "sam", "--per-device", "--steps", "2", "--out", str(tmp_path / "pd"),
                        *TINY[:-1], "2"])
    assert np.isfinite(local[0]["train_loss"])
    assert not all(np.array_equal(x, y) for x, y in zip(_params(two[0]), _params(local[0])))


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices")
def test_data_parallel_lets_matches_one_device(tmp_path, sweep):
    two = train.main(["--method", "lets", "--steps", "2", "--out", str(tmp_path), *TINY[:-1], "2"])
    for x, y in zip(_params(sweep[1]["digits_mlp_lets"]), _params(two[0]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(two[0]["rho"], sweep[1]["digits_mlp_lets"]["rho"], rtol=1e-5)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices")
def test_marwp_passes_on_separate_device_groups_match_one_device(tmp_path, sweep):
    """--probe-devices 2 on 4 devices: a (probe 2 x data 2) mesh; same parameters as one device."""
    groups = train.main(["--method", "marwp", "--steps", "2", "--out", str(tmp_path), *TINY[:-1], "4",
                         "--probe-devices", "2"])
    for x, y in zip(_params(sweep[1]["digits_mlp_marwp"]), _params(groups[0]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    doc = json.loads((tmp_path / "digits_mlp_marwp" / "metrics.json").read_text())
    assert doc["config"]["probe_devices"] == 2 and doc["config"]["devices"] == 4
    with pytest.raises(ValueError, match="probe_devices=3"):
        train.main(["--method", "marwp", "--steps", "1", "--out", str(tmp_path / "x"), *TINY[:-1], "4",
                    "--probe-devices", "3"])


def test_epoch_wise_cosine_learning_rate_of_the_marwp_configs():
    cfg = configs.CONFIGS["cifar10_resnet18_marwp"]
    assert cfg.lr_per_epoch and not configs.CONFIGS["cifar10_resnet18_sam"].lr_per_epoch
    spe, epochs = 7, 4
    lr = train_step.lr_schedule(cfg.replace(epochs=epochs), epochs * spe, spe)
    got = np.array([float(lr(t)) for t in range(epochs * spe)]).reshape(epochs, spe)
    expected = [cfg.lr * 0.5 * (1 + np.cos(np.pi * e / epochs)) for e in range(epochs)]  # torch CosineAnnealingLR
    np.testing.assert_allclose(got, np.repeat(np.array(expected)[:, None], spe, 1), rtol=1e-6)
    per_step = train_step.lr_schedule(configs.CONFIGS["cifar10_resnet18_sam"], 28, spe)
    assert float(per_step(1)) < float(per_step(0))  # the other configs change every update


def test_unknown_config_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown config 'cifar10_resnet18_nope'.*known configs"):
        train.main(["--config", "cifar10_resnet18_nope", "--out", str(tmp_path)])


def test_missing_cifar_folder_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("FLATJAX_CIFAR10_DIR", raising=False)
    with pytest.raises(DatasetNotFoundError, match="FLATJAX_CIFAR10_DIR"):
        train.main(["--config", "cifar10_resnet18_sam", "--dataset", "cifar10-folder", "--data-dir",
                    str(tmp_path / "nowhere"), "--steps", "1", "--out", str(tmp_path)])


def test_paper_configs_are_listed(capsys):
    train.main(["--list-configs"])
    out = capsys.readouterr().out
    for name in ("cifar10_resnet18_sam", "cifar100_resnet18_marwp", "cifar10_resnet18_crsam",
                 "cifar100_resnet18_nso", "digits_mlp_sgd", "digits_mlp_gsam", "digits_mlp_samon",
                 "cifar10_resnet18_lets_asam"):
        assert name in out
    assert configs.get_config("cifar100_resnet18_marwp").two_batches


def test_configs_follow_the_registry():
    assert configs.METHODS == ("sgd", *registry.METHODS)
    assert configs.TWO_BATCH_METHODS == ("mrwp", "marwp") and configs.LETS_METHODS == ("lets",)
    for m in configs.METHODS:  # every method has a digits config (the default sweep)
        assert configs.get_config(f"digits_mlp_{m}").method == m and m in configs.DEFAULT_SWEEP
    assert configs.get_config("digits_mlp_samon").model_kwargs == {"norm": True}
    for name in ("digits_mlp_lets_asam", "cifar10_resnet18_lets_asam", "cifar100_wrn28_10_lets_asam"):
        cfg = configs.get_config(name)
        assert cfg.method == "lets" and cfg.method_kwargs["inner"] == "asam"
    # --config C --method M: M's hyper-parameters (and its model options on the same model) replace C's
    swapped = configs.with_method(configs.get_config("digits_mlp_rwp"), "samon")
    assert swapped.sigma_increase is None and swapped.method_kwargs == {} and swapped.model_kwargs == {"norm": True}
    assert configs.with_method(configs.get_config("cifar10_resnet18_lets_asam"), "sam").method_kwargs == {"rho": 0.1}


def test_train_py_is_short_and_names_no_method():
    text = (EXPERIMENTS / "train.py").read_text()
    assert len(text.splitlines()) < 300
    for name in (*configs.METHODS, *configs.DEFAULT_SWEEP):
        assert not re.search(rf"(?i)\b{name}\b", text), name


def test_no_module_imports_a_private_name_of_another():
    for path in EXPERIMENTS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                assert not [a.name for a in node.names if a.name.startswith("_")], (path.name, node.module)


def test_d2_run_whose_updates_are_all_skipped_exits_nonzero(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        train.main(["--method", "sam", "--lr", "nan", "--steps", "20", "--hidden", "16", "--no-progress",
                    "--out", str(tmp_path)])
    assert "non-finite" in str(err.value.code) and "skipped" in str(err.value.code)
