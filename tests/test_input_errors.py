"""Regression tests for clear errors on bad inputs.

D14: ``load_image_folder`` names the damaged file (and its split/class) and says what to do;
the mixed-size message says how to resize, also for the training CLI.
D19: ``python -m experiments.sharpness_report`` rejects bad arguments and bad ``--params`` files
with a one-line error naming the flag or file, before any training or measurement.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import flatjax.data as D


# ------------------------------------------------------------------ D14: image-folder errors
def _jpeg_folder(root: Path, size: tuple[int, int] = (8, 8)) -> list[Path]:
    """root/train/{a,b}/{0,1,2}.jpg, 8x8 random pixels; returns the paths in loading order."""
    rng = np.random.default_rng(0)
    paths = []
    for cls in ("a", "b"):
        d = root / "train" / cls
        d.mkdir(parents=True)
        for i in range(3):
            p = d / f"{i}.jpg"
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p, quality=95)
            paths.append(p)
    return paths


def _truncate(path: Path, fraction: float = 0.9) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(fraction * len(data))])


@pytest.mark.parametrize("num_workers", [1, 2])
def test_d14_truncated_jpeg_error_names_path_split_and_class(tmp_path, num_workers):
    paths = _jpeg_folder(tmp_path / "data")
    bad = paths[4]  # b/1.jpg
    _truncate(bad)
    cache = tmp_path / "cache"
    with pytest.raises(OSError) as err:
        D.load_image_folder(tmp_path / "data", "train", cache_dir=cache, num_workers=num_workers)
    msg = str(err.value)
    assert str(bad) in msg and "split 'train'" in msg and "class 'b'" in msg
    assert "1 of 6" in msg and "truncated" in msg.lower()  # PIL's own reason is kept
    assert "re-download" in msg and "delete" in msg
    assert isinstance(err.value.__cause__, OSError)  # the original error stays chained
    # nothing is cached from a failed load, not even a temporary file
    assert not cache.exists() or not any(cache.iterdir())


def test_d14_every_damaged_file_is_listed(tmp_path):
    paths = _jpeg_folder(tmp_path)
    _truncate(paths[0], 0.5)
    paths[5].write_bytes(b"not a jpeg at all")
    with pytest.raises(OSError) as err:
        D.load_image_folder(tmp_path, "train")
    msg = str(err.value)
    assert "2 of 6" in msg and str(paths[0]) in msg and str(paths[5]) in msg
    assert "class 'a'" in msg and "class 'b'" in msg


def test_d14_cache_does_not_hide_a_file_damaged_later(tmp_path):
    paths = _jpeg_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    D.load_image_folder(tmp_path / "data", "train", cache_dir=cache)
    before = sorted(cache.iterdir())
    assert len(before) == 1
    _truncate(paths[2])  # a different size: the cache key changes, so the folder is decoded again
    with pytest.raises(OSError, match="re-download") as err:
        D.load_image_folder(tmp_path / "data", "train", cache_dir=cache)
    assert str(paths[2]) in str(err.value)
    assert sorted(cache.iterdir()) == before  # no new (or half-written) cache


def test_d14_damaged_cache_is_rebuilt_with_a_warning(tmp_path):
    _jpeg_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    first = D.load_image_folder(tmp_path / "data", "train", cache_dir=cache)
    (cache_file,) = cache.iterdir()
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # e.g. a copy cut short
    with pytest.warns(RuntimeWarning, match="unreadable image-folder cache"):
        again = D.load_image_folder(tmp_path / "data", "train", cache_dir=cache)
    np.testing.assert_array_equal(first.image, again.image)
    with np.load(cache_file) as z:  # rewritten in full
        np.testing.assert_array_equal(z["image"], first.image)


def test_d14_mixed_sizes_message_names_sizes_files_and_cli_advice(tmp_path):
    paths = _jpeg_folder(tmp_path)
    odd = paths[3]
    Image.new("RGB", (10, 6)).save(odd)  # width 10, height 6
    with pytest.raises(ValueError) as err:
        D.load_image_folder(tmp_path, "train")
    msg = str(err.value)
    assert "8x8 (5 files" in msg and f"6x10 (1 file, e.g. {odd})" in msg
    assert "image_size=(height, width)" in msg
    assert "python -m experiments.train" in msg and "resize the image files" in msg
    assert D.load_image_folder(tmp_path, "train", image_size=8).image.shape == (6, 8, 8, 3)


# ------------------------------------------------------------ D19: sharpness CLI bad inputs
@pytest.fixture
def cli(monkeypatch):
    pytest.importorskip("flax")
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from experiments import sharpness_report

    def must_not_run(*args, **kwargs):
        raise AssertionError("work started before the inputs were checked")

    # the errors must come before the data is loaded or the model trained
    monkeypatch.setattr(sharpness_report, "load_digits_split", must_not_run)
    monkeypatch.setattr(sharpness_report, "train_mlp", must_not_run)
    return sharpness_report


def _error_line(cli, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"{cli.PROG}: error: ")
    return line


@pytest.mark.parametrize("argv, expected", [
    (["--hidden", "0"], "--hidden: expected an integer >= 1, got '0'"),
    (["--hidden", "-4"], "--hidden: expected an integer >= 1, got '-4'"),
    (["--hidden", "8", "x"], "--hidden: expected an integer >= 1, got 'x'"),
    (["--seed", "-1"], "--seed: expected an integer 0 <= seed < 2**63, got '-1'"),
    (["--seed", str(2**63)], "--seed: expected an integer 0 <= seed < 2**63"),
    (["--rho", "nan"], "--rho: expected comma-separated finite numbers >= 0, got 'nan'"),
    (["--rho", "0.1,inf"], "--rho: expected comma-separated finite numbers >= 0"),
    (["--rho", "-0.1"], "--rho: expected comma-separated finite numbers >= 0"),
    (["--rel-radii", "0,NaN"], "--rel-radii: expected comma-separated finite numbers >= 0"),
    (["--rel-radii", ","], "--rel-radii: expected comma-separated finite numbers >= 0"),
    (["--trace-rtol", "nan"], "--trace-rtol: expected a finite number >= 0, got 'nan'"),
    (["--trace-rtol", "-0.1"], "--trace-rtol: expected a finite number >= 0"),
    (["--top-k", "0"], "--top-k must be an integer >= 1, got 0"),
    (["--top-k", "6", "--lanczos-iters", "5"], "--top-k must be <= --lanczos-iters (5), got 6"),
    (["--grid", "2"], "--grid must be an integer >= 3, got 2"),
    (["--train-steps", "-1"], "--train-steps must be an integer >= 0, got -1"),
    (["--params", "no/such/file.msgpack"], "--params: no such file: no/such/file.msgpack"),
])
def test_d19_bad_arguments_exit_with_one_line_error(cli, capsys, tmp_path, argv, expected):
    line = _error_line(cli, [*argv, "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    assert expected in line
    assert not (tmp_path / "out").exists()


def test_d19_out_and_save_params_paths(cli, capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    line = _error_line(cli, ["--out", str(a_file)], capsys)
    assert f"--out {a_file} exists and is not a directory" in line
    line = _error_line(cli, ["--out", str(tmp_path / "o"), "--save-params", str(tmp_path)], capsys)
    assert f"--save-params {tmp_path} is a directory" in line


def _mlp(hidden=(4,), dtype=np.float32) -> dict:
    widths = [64, *hidden, 10]
    return {f"Dense_{i}": {"kernel": np.full((m, n), 0.1, dtype), "bias": np.zeros(n, dtype)}
            for i, (m, n) in enumerate(zip(widths[:-1], widths[1:]))}


def _nan_bias():
    tree = _mlp()
    tree["Dense_1"]["bias"][3] = math.nan
    return tree


def _int_kernel():
    tree = _mlp()
    tree["Dense_0"]["kernel"] = tree["Dense_0"]["kernel"].astype(np.int32)
    return tree


def _one_d_kernel():
    tree = _mlp()
    tree["Dense_0"]["kernel"] = np.zeros(64, np.float32)
    return tree


def _zero_width():
    tree = _mlp()
    tree["Dense_0"] = {"kernel": np.zeros((64, 0), np.float32), "bias": np.zeros(0, np.float32)}
    return tree


def _broken_chain():
    tree = _mlp((4, 5))
    tree["Dense_1"]["kernel"] = np.zeros((3, 5), np.float32)
    return tree


def _gap_in_layers():
    tree = _mlp((4, 5))
    tree["Dense_3"] = tree.pop("Dense_2")
    return tree


@pytest.mark.parametrize("make, expected", [
    (lambda: b"\x00not msgpack at all", "is not a flax msgpack file"),
    (lambda: b"", "is not a flax msgpack file"),
    (_nan_bias, "Dense_1/bias has 1 non-finite values (NaN/inf) of 10"),
    (_int_kernel, "Dense_0/kernel has dtype int32, not a floating-point dtype"),
    (_one_d_kernel, "Dense_0/kernel has shape (64,), not 2-D"),
    (lambda: [np.zeros((64, 10), np.float32)], "holds a list, not a dict of layers"),
    (lambda: {"Dense_0": [np.zeros((64, 10))]}, "Dense_0 must hold exactly 'kernel' and 'bias'"),
    (lambda: {"Dense_0": {"kernel": 1.0, "bias": np.zeros(10)}}, "Dense_0/kernel is a float"),
    (_zero_width, "the kernel must be (64, n) with n >= 1"),
    (_broken_chain, "Dense_1 has kernel (3, 5)"),
    (_gap_in_layers, "numbered Dense_0 .. Dense_2"),
    (lambda: _mlp()["Dense_0"], "unexpected key 'bias'"),
    (lambda: {"params": _broken_chain()}, "Dense_1 has kernel (3, 5)"),  # wrapped is checked too
    (lambda: {"Dense_0": _mlp((7,))["Dense_0"]}, "the last layer Dense_0 has 7 outputs, not 10"),
])
def test_d19_bad_params_file_exits_with_one_line_error(cli, capsys, tmp_path, make, expected):
    from flax import serialization

    content = make()
    path = tmp_path / "bad.msgpack"
    if not isinstance(content, bytes):
        content = serialization.msgpack_serialize(content)
    path.write_bytes(content)
    line = _error_line(cli, ["--params", str(path), "--out", str(tmp_path / "out")], capsys)
    assert f"--params {path}" in line and expected in line
    if "msgpack" not in expected and "non-finite" not in expected:
        assert "expected a Flax params dict {'Dense_0': {'kernel': (64, H1)" in line
    with pytest.raises(ValueError, match="--params"):  # the same check from Python
        cli.load_params(str(path))


def test_d19_good_params_file_is_accepted_wrapped_or_not(cli, tmp_path):
    from flax import serialization

    for tree in (_mlp((4, 5)), {"params": _mlp((4, 5), np.float64)}):
        path = tmp_path / "good.msgpack"
        path.write_bytes(serialization.msgpack_serialize(tree))
        loaded = cli.load_params(str(path))
        assert sorted(loaded) == ["Dense_0", "Dense_1", "Dense_2"]
        assert loaded["Dense_1"]["kernel"].shape == (4, 5)


def test_d19_diverged_training_stops_before_the_measurements(cli, monkeypatch, capsys, tmp_path):
    from experiments import sharpness_report

    monkeypatch.setattr(sharpness_report, "load_digits_split", lambda seed: (
        {"x": np.zeros((4, 64), np.float32), "y": np.zeros(4, np.int32)},) * 2)
    monkeypatch.setattr(sharpness_report, "train_mlp", lambda *a, **k: _nan_bias())

    def must_not_run(*args, **kwargs):
        raise AssertionError("measured non-finite weights")

    monkeypatch.setattr(sharpness_report.S, "HessianOperator", must_not_run)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--hidden", "4", "--out", str(tmp_path / "out"), "--no-progress"])
    assert "training diverged" in str(exc.value.code) and "Dense_1/bias" in str(exc.value.code)
