"""flatjax.data.streaming: the Grain pipeline over an image folder (shapes, determinism across worker counts,
sharding, per-example augmentation, errors) and an exact resume of a training run killed mid-way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("grain")
from PIL import Image  # noqa: E402

from flatjax.data import DatasetNotFoundError  # noqa: E402
from flatjax.data import streaming as st  # noqa: E402

CLASSES = ("cat", "dog", "emu")
PER_CLASS = 8
N = len(CLASSES) * PER_CLASS
REPO = Path(__file__).resolve().parents[1]


def make_folder(root: Path) -> Path:
    """An ImageNet-style folder: 3 classes x 8 JPEGs of different sizes around 40x35, random pixels."""
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / "train" / c).mkdir(parents=True)
        for i in range(PER_CLASS):
            h, w = 35 + 2 * i - 7, 40 - i  # 28..42 x 33..40
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / c / f"{c}_{i:02d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("imagenet_like"))


def batches(root, n, **kw):
    kw = {"batch_size": 4, "image_size": 16, "seed": 3, "shard_index": 0, "shard_count": 1, **kw}
    it = st.streaming_batches(root, "train", **kw)
    try:
        return [{k: np.array(v) for k, v in next(it).items()} for _ in range(n)]
    finally:
        it.close()


def test_shapes_dtypes_and_labels(folder):
    out = batches(folder, 7, with_index=True)  # 6 batches per epoch: crosses into epoch 2
    for b in out:
        assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (4,) and b["label"].dtype == np.int32
        np.testing.assert_array_equal(b["label"], b["index"] // PER_CLASS)  # sorted classes, sorted files
    first_epoch = np.concatenate([b["index"] for b in out[:6]])
    assert sorted(first_epoch) == list(range(N))  # every file once per epoch, shuffled
    assert list(first_epoch) != list(range(N))
    assert abs(float(np.mean([b["image"].mean() for b in out]))) < 1.0  # ImageNet-normalized
    raw = batches(folder, 1, output_dtype="uint8")[0]["image"]
    assert raw.dtype == np.uint8 and raw.shape == (4, 16, 16, 3)
    from flatjax.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalize

    np.testing.assert_allclose(out[0]["image"], normalize(raw, IMAGENET_MEAN, IMAGENET_STD), atol=2e-6)


@pytest.mark.parametrize("augment", ["randaugment", "cifar", "cutout", "none"])
def test_other_augmentations(folder, augment):
    b = batches(folder, 1, augment=augment)[0]
    assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32


def test_eval_pipeline_in_file_order(folder):
    ds = st.streaming_dataset(folder, batch_size=5, train=False, image_size=16, shard_index=0, shard_count=1,
                              with_index=True)
    assert len(ds) == 5  # one epoch, partial last batch kept
    got = [ds[i] for i in range(len(ds))]
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in got]), np.arange(N))
    assert got[-1]["image"].shape == (4, 16, 16, 3)
    # the eval transform is the central 87.5 % of the shorter side, resized
    src = st.ImageFolderSource(folder)
    with Image.open(src.paths[7]) as im:
        im = im.convert("RGB")
        top, left, h, w = st.center_crop_box(im.height, im.width)
        want = np.asarray(im.resize((16, 16), Image.BILINEAR, box=(left, top, left + w, top + h)))
    t = st.ImageNetTransform(image_size=16, train=False, output_dtype="uint8")
    np.testing.assert_array_equal(t(src[7], np.random.default_rng(0))["image"], want)
    assert st.batches_per_epoch(N, 5, drop_remainder=False) == 5 and st.batches_per_epoch(N, 5) == 4


def test_same_batches_for_worker_counts(folder):
    """Each example's randomness is its own: threads and worker processes change nothing."""
    ref = batches(folder, 8, worker_count=0, read_threads=0)
    for kw in ({"worker_count": 0, "read_threads": 3}, {"worker_count": 2, "read_threads": 1}):
        got = batches(folder, 8, **kw)
        for a, b in zip(ref, got):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
    other_seed = batches(folder, 1, seed=4, read_threads=0)[0]
    assert not np.array_equal(other_seed["image"], ref[0]["image"])


def test_shards_split_without_overlap(folder):
    def indices(shard_index, shard_count):
        ds = st.streaming_dataset(folder, batch_size=1, train=True, num_epochs=1, image_size=8, with_index=True,
                                  shard_index=shard_index, shard_count=shard_count)
        return [int(ds[i]["index"][0]) for i in range(len(ds))]

    two = [indices(i, 2) for i in range(2)]
    assert len(two[0]) == len(two[1]) == N // 2 and not set(two[0]) & set(two[1])
    assert sorted(two[0] + two[1]) == list(range(N))
    five = [indices(i, 5) for i in range(5)]  # 24 files: 4 each, the 4 left over are dropped
    assert all(len(s) == 4 for s in five) and len(set().union(*map(set, five))) == 20
    assert sorted(indices(None, None)) == list(range(N))  # jax.process_index() of jax.process_count() = 0 of 1


def test_augmentation_deterministic_per_seed_epoch_index(folder):
    src = st.ImageFolderSource(folder)
    t = st.ImageNetTransform(image_size=16)
    out = batches(folder, 12, with_index=True, read_threads=0)  # two epochs
    for step, b in enumerate(out):
        epoch = step // (N // 4)
        for image, index in zip(b["image"], b["index"]):
            want = t(src[int(index)], st.example_rng(3, epoch, int(index)))["image"]
            np.testing.assert_array_equal(image, want)
    a = t(src[5], st.example_rng(3, 0, 5))["image"]
    np.testing.assert_array_equal(a, t(src[5], st.example_rng(3, 0, 5))["image"])
    assert not np.array_equal(a, t(src[5], st.example_rng(3, 1, 5))["image"])


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(st, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.attempted > 0 and result.failed == 0, result


def test_random_resized_crop_box():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = st.random_resized_crop_box(35, 40, rng)
        assert 0 <= top and top + h <= 35 and 0 <= left and left + w <= 40
        assert 0.08 * 1400 * 0.9 <= h * w <= 1400
        assert 3 / 4 * 0.85 <= w / h <= 4 / 3 * 1.15
    # nothing fits a 1000x10 strip: the centred fallback clamps the aspect ratio
    assert st.random_resized_crop_box(1000, 10, rng) == ((1000 - 13) // 2, 0, 13, 10)
    assert st.center_crop_box(256, 300) == (16, 38, 224, 224)


def test_iterator_state_restores_exactly(folder):
    kw = {"batch_size": 4, "image_size": 16, "seed": 3, "shard_index": 0, "shard_count": 1, "read_threads": 2}
    it = st.streaming_batches(folder, **kw)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it)["image"].copy() for _ in range(3)]
    it.close()
    again = st.streaming_batches(folder, **kw)
    again.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(again)["image"], w)
    again.close()


def test_record_sources_and_array_record(folder, tmp_path):
    """Any random-access source: records with encoded bytes or decoded arrays, or ArrayRecord + parse_record."""
    grain = pytest.importorskip("grain")
    src = st.ImageFolderSource(folder)
    encoded = [{"image": Path(p).read_bytes(), "label": int(lab)} for p, lab in zip(src.paths, src.labels)]
    decoded = [{"image": np.asarray(Image.open(p).convert("RGB")), "label": int(lab)}
               for p, lab in zip(src.paths, src.labels)]
    ref = batches(folder, 3)
    for records in (encoded, decoded):
        for a, b in zip(ref, batches(records, 3)):
            np.testing.assert_array_equal(a["image"], b["image"])
    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp_path / "train.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for r in encoded:
        writer.write(r["label"].to_bytes(4, "little") + r["image"])
    writer.close()
    ar = grain.sources.ArrayRecordDataSource([path])
    for a, b in zip(ref, batches(ar, 3, parse_record=_parse)):
        np.testing.assert_array_equal(a["image"], b["image"])


def _parse(raw: bytes) -> dict:
    return {"label": int.from_bytes(raw[:4], "little"), "image": raw[4:]}


def test_clear_errors(folder, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="root=.*no_such"):
        st.streaming_batches(tmp_path / "no_such", batch_size=2)
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="No images"):
        st.streaming_dataset(tmp_path / "empty", batch_size=2)
    kw = {"batch_size": 4, "shard_index": 0, "shard_count": 1}
    for bad, match in (({"worker_count": -1}, "worker_count"), ({"worker_count": 1.5}, "worker_count"),
                       ({"read_threads": -2}, "read_threads"), ({"augment": "mixup"}, "augment"),
                       ({"batch_size": 30}, "batch_size=30 exceeds"), ({"shard_index": 2, "shard_count": 2},
                                                                        "shard_index"),
                       ({"seed": -1}, "seed"), ({"image_size": 0}, "image_size"),
                       ({"output_dtype": "uint8", "augment": "cutout"}, "cutout"),
                       ({"num_epochs": 0}, "num_epochs")):
        with pytest.raises(ValueError, match=match):
            st.streaming_batches(folder, **{**kw, **bad})
    with pytest.raises(ValueError, match="source must be"):
        st.streaming_dataset(42, batch_size=2)
    broken = tmp_path / "broken"
    (broken / "train" / "a").mkdir(parents=True)
    (broken / "train" / "a" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match="x.jpg"):
        st.streaming_dataset(broken, batch_size=1, **{k: v for k, v in kw.items() if k != "batch_size"})[0]


# ---- exact resume after SIGKILL ----------------------------------------------------------------------------

TRAIN_SCRIPT = textwrap.dedent('''
    """SAM + SGD on a tiny MLP, fed by the streaming pipeline (2 workers); a checkpoint every step."""
    import sys, time
    import numpy as np


    def main(root, ckpt, steps, out, stall_after):
        import jax, optax, flatjax
        from flatjax.models import create, split_model, make_loss_fn
        from flatjax.data import streaming as st

        graphdef, params, model_state = split_model(create("mlp", 3, seed=0, in_features=16 * 16 * 3, hidden=(16,)))
        est = flatjax.estimators.sam(make_loss_fn(graphdef), rho=0.05, has_aux=True)
        tx = optax.sgd(0.1, momentum=0.9)
        state = {"params": params, "opt_state": tx.init(params), "est_state": est.init(params),
                 "step": np.int32(0)}

        @jax.jit
        def train_step(state, batch):
            (_, _), grads, est_state, _ = est.value_and_grad(
                state["params"], state["est_state"], batch, loss_kwargs={"model_state": model_state})
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                    "est_state": est_state, "step": state["step"] + 1}

        it = st.streaming_batches(root, "train", batch_size=4, image_size=16, seed=7, worker_count=2,
                                  shard_index=0, shard_count=1)
        mngr = st.checkpoint_manager(ckpt, max_to_keep=None)
        if mngr.latest_step() is not None:
            state = st.restore_state(mngr, state, it)
            print("resumed at", int(state["step"]), flush=True)
        while int(state["step"]) < steps:
            state = train_step(state, next(it))
            st.save_state(mngr, int(state["step"]), state, it)
            mngr.wait_until_finished()
            print("saved", int(state["step"]), flush=True)
            if int(state["step"]) == stall_after:
                time.sleep(60)  # the test kills us here
        leaves = jax.tree_util.tree_flatten_with_path(state)[0]
        np.savez(out, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
        mngr.close()
        it.close()


    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
''')


def _start(script, tmp_path, name, *args):
    log = open(tmp_path / f"{name}.log", "w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path, env=env, start_new_session=True)  # own group: kill workers too
    return proc, log


def _group(pgid):
    """(pid, is multiprocessing's resource tracker) of every live process in group ``pgid`` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            if entry.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                members.append((int(entry.name), b"resource_tracker" in (entry / "cmdline").read_bytes()))
        except (OSError, ValueError, IndexError):
            continue
    return members


def _kill(proc):
    """SIGKILL the run and its worker processes (the whole group: the run was started as its own session).

    Multiprocessing's resource tracker is spared a few seconds: when the processes it serves are gone, it unlinks
    the shared memory and semaphores they left in /dev/shm, then exits by itself."""
    if proc.poll() is None:
        for pid, tracker in _group(proc.pid):
            if not tracker:
                os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything left (a tracker that did not finish in time)
    except ProcessLookupError:
        pass


def _wait(proc, name, tmp_path, timeout=90):
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        _kill(proc)
    assert rc == 0, f"{name} failed:\n" + (tmp_path / f"{name}.log").read_text()[-3000:]


def test_kill_and_resume_is_bit_identical(folder, tmp_path):
    script = tmp_path / "train_stream.py"
    script.write_text(TRAIN_SCRIPT)
    steps, kill_at = 8, 3  # 6 batches per epoch: the resumed part crosses an epoch boundary
    ref_proc, _ = _start(script, tmp_path, "full", folder, tmp_path / "ckpt_full", steps, tmp_path / "full.npz", -1)
    proc, _ = _start(script, tmp_path, "killed", folder, tmp_path / "ckpt", steps, tmp_path / "x.npz", kill_at)
    try:
        deadline = time.monotonic() + 90
        while f"saved {kill_at}" not in (tmp_path / "killed.log").read_text():
            assert proc.poll() is None, "the run ended early:\n" + (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time:\n" + (tmp_path / "killed.log").read_text()
            time.sleep(0.2)
    finally:
        _kill(proc)  # SIGKILL: no cleanup, worker processes mid-prefetch
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())[-1] == str(kill_at)
    assert not (tmp_path / "x.npz").exists()
    proc, _ = _start(script, tmp_path, "resumed", folder, tmp_path / "ckpt", steps, tmp_path / "resumed.npz", -1)
    _wait(proc, "resumed", tmp_path)
    _wait(ref_proc, "full", tmp_path)
    assert f"resumed at {kill_at}" in (tmp_path / "resumed.log").read_text()
    full, resumed = np.load(tmp_path / "full.npz"), np.load(tmp_path / "resumed.npz")
    assert sorted(full.files) == sorted(resumed.files) and any("params" in k for k in full.files)
    for k in full.files:
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)
    assert int(full["['step']"]) == steps


def test_training_cli_streaming_pipeline_resumes_exactly(tmp_path):
    """``--pipeline streaming``: m-ARWP (two batches per update) and LETS-SAM (a second, validation stream) stop
    mid-epoch, resume from the checkpoint (parameters and both streams' positions) and end bit-identical."""
    import jax
    from flax import serialization

    from experiments import train

    rng = np.random.default_rng(1)
    for split, n in (("train", 8), ("test", 3)):
        for c in CLASSES:
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / c / f"{i}.jpg")
    flags = ["--dataset", "cifar10-folder", "--data-dir", str(tmp_path / "data"), "--pipeline", "streaming",
             "--workers", "0", "--method", "marwp", "lets", "--model", "mlp", "--batch-size", "4", "--epochs", "3",
             "--no-progress", "--devices", "1"]
    whole = {r["config"]: r for r in train.main([*flags, "--out", str(tmp_path / "a")])}
    train.main([*flags, "--out", str(tmp_path / "b"), "--steps", "4"])
    resumed = {r["config"]: r for r in train.main([*flags, "--out", str(tmp_path / "b"), "--resume"])}
    for name, r in whole.items():
        assert r["steps"] == resumed[name]["steps"] > 4 and 0.0 <= r["test_acc"] <= 1.0
        jax.tree.map(np.testing.assert_array_equal, r["params"], resumed[name]["params"])
        stored = serialization.msgpack_restore((tmp_path / "b" / name / "params.msgpack").read_bytes())
        jax.tree.map(np.testing.assert_array_equal, stored, jax.tree.map(np.asarray, r["params"]))
