"""Tests for flatjax.data on small generated data: digits, a temporary image folder,
augmentations, batch iteration, prefetch and device sharding."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import flatjax.data as D
from flatjax.data import randaugment as RA

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- digits
def test_digits_shapes_split_and_determinism():
    train, test = D.load_digits(seed=0)
    assert train.image.shape == (1438, 8, 8, 1) and test.image.shape == (359, 8, 8, 1)
    assert train.image.dtype == np.float32 and train.label.dtype == np.int32
    assert train.class_names == tuple("0123456789")
    # Standardized with training statistics.
    assert abs(train.image.mean()) < 1e-4 and abs(train.image.std() - 1) < 1e-4
    # Stratified: every class keeps ~20% of its examples in test.
    all_counts = np.bincount(np.concatenate([train.label, test.label]))
    assert np.all(np.abs(np.bincount(test.label) - 0.2 * all_counts) <= 1)
    again, _ = D.load_digits(seed=0)
    other, _ = D.load_digits(seed=1)
    np.testing.assert_array_equal(train.image, again.image)
    assert not np.array_equal(train.label, other.label)
    flat, _ = D.load_digits(flat=True, standardize=False)
    assert flat.image.shape == (1438, 64) and 0.0 <= flat.image.min() and flat.image.max() <= 1.0
    with pytest.raises(ValueError, match="test_fraction"):
        D.load_digits(test_fraction=1.5)


# ----------------------------------------------------------------------- image folder
def _write_folder(root: Path) -> dict[str, np.ndarray]:
    """Writes root/{train,test}/{dog,ant,cat}/ with PNG and JPEG files; returns PNG pixels."""
    rng = np.random.default_rng(0)
    pngs = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("dog", "ant", "cat"):  # written unsorted on purpose
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
                if i % 2 == 0:
                    Image.fromarray(pixels).save(d / f"{i:03d}.png")
                    pngs[f"{split}/{cls}/{i:03d}"] = pixels
                else:
                    Image.fromarray(pixels).save(d / f"{i:03d}.jpg", quality=95)
            (d / "notes.txt").write_text("not an image")
    return pngs


def test_image_folder_labels_shapes_and_pixels(tmp_path):
    pngs = _write_folder(tmp_path)
    train = D.load_image_folder(tmp_path, "train")
    assert train.class_names == ("ant", "cat", "dog")  # alphabetical -> label index
    assert train.image.shape == (9, 6, 5, 3) and train.image.dtype == np.uint8
    np.testing.assert_array_equal(train.label, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    # Files are read in sorted order: index 0 of "cat" is cat/000.png, lossless.
    np.testing.assert_array_equal(train.image[3], pngs["train/cat/000"])
    test = D.load_image_folder(tmp_path, "test", class_names=train.class_names)
    assert len(test) == 6 and test.num_classes == 3
    sub = D.load_image_folder(tmp_path, "train", limit_per_class=1)
    np.testing.assert_array_equal(sub.label, [0, 1, 2])
    resized = D.load_image_folder(tmp_path, "train", image_size=4)
    assert resized.image.shape == (9, 4, 4, 3)
    with pytest.raises(ValueError, match="limit_per_class"):
        D.load_image_folder(tmp_path, "train", limit_per_class=0)


def test_image_folder_cache_is_reused(tmp_path, monkeypatch):
    _write_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    first = D.load_image_folder(tmp_path / "data", "train", cache_dir=cache, num_workers=2)
    assert len(list(cache.glob("*.npz"))) == 1

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although a cache exists")

    monkeypatch.setattr("flatjax.data.image_folder._decode", no_decode)
    second = D.load_image_folder(tmp_path / "data", "train", cache_dir=cache)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.label, second.label)
    assert second.class_names == first.class_names


def test_image_folder_mixed_sizes_need_image_size(tmp_path):
    d = tmp_path / "train" / "a"
    d.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(d / "x.png")
    Image.new("L", (5, 3)).save(d / "y.png")  # grayscale is converted to RGB
    with pytest.raises(ValueError, match="image_size"):
        D.load_image_folder(tmp_path, "train")
    assert D.load_image_folder(tmp_path, "train", image_size=(3, 4)).image.shape == (2, 3, 4, 3)


def test_missing_datasets_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(D.DatasetNotFoundError, match="Expected the layout"):
        D.load_image_folder(tmp_path, "train")
    monkeypatch.delenv(D.CIFAR10_ENV_VAR, raising=False)
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.load_cifar10_folder()
    msg = str(err.value)
    assert D.CIFAR10_ENV_VAR in msg and 'pip install "flatjax[tfds]"' in msg and "train/<class>" in msg
    archive = tmp_path / "CIFAR-10-images-jpg.tar.gz"
    archive.write_bytes(b"")
    with pytest.raises(D.DatasetNotFoundError, match="unpack"):
        D.resolve_cifar10_dir(archive)
    # The variable is honoured, also when it points at the archive's parent folder.
    for sub in ("train", "test"):
        (tmp_path / "x" / "CIFAR-10-images-jpg" / sub).mkdir(parents=True)
    monkeypatch.setenv(D.CIFAR10_ENV_VAR, str(tmp_path / "x"))
    assert D.resolve_cifar10_dir() == tmp_path / "x" / "CIFAR-10-images-jpg"
    with pytest.raises(ValueError, match="split"):
        D.load_cifar10_folder(split="val")


def test_tfds_loader_without_tfds(monkeypatch):
    with pytest.raises(ValueError, match="name must be"):
        D.load_tfds("mnist")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError, match=r'pip install "flatjax\[tfds\]"'):
        D.load_tfds("cifar10")
    with pytest.raises(ImportError, match=r'pip install "flatjax\[tfds\]"'):
        next(D.tfds_imagenet_batches("validation", 8, train=False))


# ----------------------------------------------------------------------- augmentations
def _images(n=16, h=32, w=32, c=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def test_flip_and_crop_properties():
    x = _images()
    np.testing.assert_array_equal(D.flip_horizontal(D.flip_horizontal(x)), x)
    rng = np.random.default_rng
    np.testing.assert_array_equal(D.random_flip(x, rng(0), p=0.0), x)
    np.testing.assert_array_equal(D.random_flip(x, rng(0), p=1.0), x[:, :, ::-1])
    flipped = D.random_flip(x, rng(0))
    assert {bool(np.array_equal(a, b)) for a, b in zip(flipped, x)} == {True, False}
    np.testing.assert_array_equal(D.random_flip(x, rng(5)), D.random_flip(x, rng(5)))

    sevens = np.full((200, 8, 8, 1), 7, np.uint8)
    crop = D.random_crop(sevens, rng(1), padding=4)
    assert crop.shape == sevens.shape and crop.dtype == np.uint8
    assert set(np.unique(crop)) <= {0, 7}
    top_shifts = set()
    for img in crop[..., 0]:
        rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
        # The kept content is one contiguous window, shifted by at most 4 pixels.
        assert len(rows) >= 4 and len(cols) >= 4
        assert np.all(img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] == 7)
        assert img.sum() == 7 * len(rows) * len(cols)
        top_shifts.add(int(rows[0]) if rows[0] > 0 else -(7 - int(rows[-1])))
    assert top_shifts == set(range(-4, 5))  # every vertical offset of the 9 occurs
    np.testing.assert_array_equal(D.random_crop(x, rng(3)), D.random_crop(x, rng(3)))
    np.testing.assert_array_equal(D.random_crop(x, rng(3), padding=0), x)


def test_cutout_zeroes_one_square():
    x = np.ones((200, 32, 32, 3), np.float32)
    out = D.cutout(x, np.random.default_rng(0), size=16, p=1.0)
    full_squares = 0
    for img in out:
        zero = img == 0
        assert np.all(zero.all(-1) == zero.any(-1))  # all channels together
        mask = zero[..., 0]
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert 1 <= len(rows) <= 16 and 1 <= len(cols) <= 16
        assert mask.sum() == len(rows) * len(cols)  # a rectangle (clipped square)
        assert np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1)
        full_squares += mask.sum() == 256
    assert full_squares > 50  # most centres keep the whole 16x16 square inside
    np.testing.assert_array_equal(D.cutout(x, np.random.default_rng(0), p=0.0), x)
    half = D.cutout(x, np.random.default_rng(1), p=0.5)
    hit = (half == 0).any(axis=(1, 2, 3)).mean()
    assert 0.35 < hit < 0.65


def test_normalization_stats():
    mean, std = D.CIFAR10_MEAN, D.CIFAR10_STD
    x = _images(n=64)
    y = D.normalize(x, mean, std)
    assert y.dtype == np.float32 and y.shape == x.shape
    expected = (x.astype(np.float64) / 255 - mean) / std
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    m, s = D.channel_mean_std(x)
    z = D.normalize(x, m, s)
    np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="mean and std"):
        D.normalize(x, (0.5,), (0.2,))
    with pytest.raises(ValueError, match="NHWC"):
        D.normalize(x[0], mean, std)


def test_image_transform_pipeline_is_deterministic():
    train_t, eval_t = D.cifar_transforms("cutout")
    assert (train_t.flip, train_t.crop_padding, train_t.cutout_size, train_t.cutout_p) == (True, 4, 16, 0.5)
    batch = {"image": _images(n=8), "label": np.arange(8)}
    a = train_t(batch, np.random.default_rng(0))
    b = train_t(batch, np.random.default_rng(0))
    c = train_t(batch, np.random.default_rng(1))
    assert a["image"].dtype == np.float32 and a["image"].shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])
    np.testing.assert_array_equal(a["label"], batch["label"])
    np.testing.assert_array_equal(
        eval_t(batch, np.random.default_rng(0))["image"],
        D.normalize(batch["image"], D.CIFAR10_MEAN, D.CIFAR10_STD),
    )
    ra, _ = D.cifar_transforms("randaugment")
    assert ra.randaugment == (2, 14)
    assert ra(batch, np.random.default_rng(0))["image"].shape == (8, 32, 32, 3)
    with pytest.raises(ValueError, match="augment must be one of"):
        D.cifar_transforms("autoaugment")


def test_randaugment_ops():
    x = _images(n=6, h=12, w=10)
    for op in RA.OPS:
        y = RA.apply_op(x[0], op, 15.0, sign=-1.0)
        assert y.shape == x[0].shape and y.dtype == np.uint8, op
        if op not in ("autocontrast", "equalize", "solarize"):
            # Magnitude 0 is the identity for every op with a magnitude.
            np.testing.assert_array_equal(RA.apply_op(x[0], op, 0.0), x[0], err_msg=op)
    pil = Image.fromarray(x[1])
    np.testing.assert_array_equal(RA.apply_op(x[1], "equalize", 0), np.asarray(ImageOps.equalize(pil)))
    np.testing.assert_array_equal(RA.apply_op(x[1], "autocontrast", 0), np.asarray(ImageOps.autocontrast(pil)))
    np.testing.assert_array_equal(
        RA.apply_op(x[1], "rotate", 15.0), np.asarray(pil.rotate(15.0, fillcolor=(128, 128, 128)))
    )
    out = D.rand_augment(x, np.random.default_rng(0), num_ops=2, magnitude=14)
    np.testing.assert_array_equal(out, D.rand_augment(x, np.random.default_rng(0), num_ops=2, magnitude=14))
    assert out.shape == x.shape and out.dtype == np.uint8
    with pytest.raises(ValueError, match="magnitude"):
        D.rand_augment(x, np.random.default_rng(0), magnitude=31)
    with pytest.raises(ValueError, match="uint8"):
        D.rand_augment(x.astype(np.float32), np.random.default_rng(0))


# --------------------------------------------------------------------------- iteration
def _indexed(n: int) -> dict[str, np.ndarray]:
    return {"image": np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1), "label": np.arange(n)}


def test_iterator_covers_every_example_once():
    it = D.BatchIterator(_indexed(10), 4, drop_last=False, seed=3)
    assert len(it) == 3
    batches = list(it.epoch(0))
    assert [len(b["label"]) for b in batches] == [4, 4, 2]
    seen = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(10))
    for b in batches:  # image and label rows stay paired
        np.testing.assert_array_equal(b["image"].ravel(), b["label"])
    dropped = D.BatchIterator(_indexed(10), 4, drop_last=True, seed=3)
    assert len(dropped) == 2 and all(len(b["label"]) == 4 for b in dropped.epoch(0))


def test_iterator_determinism_and_resume():
    make = lambda **kw: D.BatchIterator(_indexed(50), 8, seed=7, **kw)  # noqa: E731
    e0 = [b["label"] for b in make().epoch(0)]
    again = [b["label"] for b in make().epoch(0)]
    e1 = [b["label"] for b in make().epoch(1)]
    other = [b["label"] for b in D.BatchIterator(_indexed(50), 8, seed=8).epoch(0)]
    assert all(np.array_equal(a, b) for a, b in zip(e0, again))
    assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))
    assert not np.array_equal(np.concatenate(e0), np.concatenate(other))
    resumed = [b["label"] for b in make().epoch(0, start_step=3)]
    assert all(np.array_equal(a, b) for a, b in zip(e0[3:], resumed)) and len(resumed) == len(e0) - 3
    ordered = [b["label"] for b in make(shuffle=False).epoch(4)]
    np.testing.assert_array_equal(np.concatenate(ordered), np.arange(48))


def test_prefetch_and_transform_match_the_plain_iterator():
    def transform(batch, rng):
        return {**batch, "noise": rng.normal(size=len(batch["label"]))}

    plain = list(D.BatchIterator(_indexed(40), 8, seed=1, transform=transform).epoch(2))
    fetched = list(D.BatchIterator(_indexed(40), 8, seed=1, transform=transform, prefetch=3).epoch(2))
    assert len(plain) == len(fetched) == 5
    for a, b in zip(plain, fetched):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])

    def failing():
        yield 1
        raise RuntimeError("producer failed")

    it = D.prefetch(failing(), 2)
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="producer failed"):
        next(it)
    early = D.prefetch(iter(range(1000)), 2)
    assert next(early) == 0
    early.close()  # stops the producer thread


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 20}, "drop_last"),
        ({"batch_size": 4, "seed": -1}, "seed"),
        ({"batch_size": 4, "prefetch": -2}, "prefetch"),
    ],
)
def test_iterator_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        D.BatchIterator(_indexed(10), **kw)


# ---------------------------------------------------------------------------- sharding
def test_shard_batch_on_four_virtual_devices():
    # XLA_FLAGS only takes effect before JAX starts, so the check runs in a fresh process.
    code = textwrap.dedent(
        """
        import sys
        import numpy as np, jax
        import flatjax.data as D
        assert "tensorflow" not in sys.modules and "tensorflow_datasets" not in sys.modules
        assert jax.device_count() == 4, jax.devices()
        batch = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "label": np.arange(8)}
        out = D.shard_batch(batch)
        for k, v in out.items():
            assert v.sharding.spec == jax.sharding.PartitionSpec("data"), v.sharding
            shards = sorted(v.addressable_shards, key=lambda s: s.index[0].start)
            assert [s.data.shape[0] for s in shards] == [2, 2, 2, 2]
            assert len({s.device for s in shards}) == 4
            np.testing.assert_array_equal(np.asarray(v), batch[k])
        mesh = D.data_mesh(jax.devices()[:2], axis_name="batch")
        assert D.shard_batch(batch, mesh, axis_name="batch")["label"].sharding.mesh.shape["batch"] == 2
        try:
            D.shard_batch({"label": np.arange(6)})
        except ValueError as e:
            assert "divisible" in str(e)
        else:
            raise AssertionError("no error for an indivisible batch")
        print("OK")
        """
    )
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
