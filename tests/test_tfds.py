"""TensorFlow Datasets without mocks: datasets built offline from an image folder this test writes, read
through flatjax's TFDS loaders and into the training CLI (``--dataset cifar10``, ``--pipeline tfds``)."""

from __future__ import annotations

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
from PIL import Image  # noqa: E402

import flatjax.data as D  # noqa: E402
from flatjax.data.augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from flatjax.data.image_folder import CIFAR10_CLASSES  # noqa: E402

PER_CLASS = {"train": 3, "test": 2}


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    """A CIFAR-10-style JPEG folder: ``split/<class>/<i>.jpg``, 32x32 random pixels."""
    root = tmp_path_factory.mktemp("cifar_jpg")
    rng = np.random.default_rng(0)
    for split, n in PER_CLASS.items():
        for c in CIFAR10_CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    return root


def store(name, features, splits, data_dir, ordered=True):
    """Writes a prepared TFDS dataset ``name`` (the version its registered builder expects); ``ordered``: read
    back in the order written (else TFDS shuffles the examples, as its own builders do)."""
    version = tfds.builder(name, data_dir=str(data_dir)).version
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version=str(version), features=features, data_dir=str(data_dir), disable_shuffling=ordered,
        split_datasets={split: [(f"{split}_{i:05d}", ex) for i, ex in enumerate(examples)]
                        for split, examples in splits.items()})


@pytest.fixture(scope="module")
def cifar_tfds(cifar_folder, tmp_path_factory):
    """The folder as a prepared ``cifar10`` TFDS dataset (CIFAR-10's features), built offline."""
    data_dir = tmp_path_factory.mktemp("tfds")
    features = tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(names=CIFAR10_CLASSES),
    })
    splits = {}
    for split in PER_CLASS:
        ds = D.load_cifar10_folder(cifar_folder, split)
        splits[split] = [{"id": f"{split}_{i}", "image": x, "label": int(y)} for i, (x, y) in
                         enumerate(zip(ds.image, ds.label))]
    store("cifar10", features, splits, data_dir)
    return data_dir


def test_prepared_tfds_dataset_loads_offline_and_missing_ones_say_how(cifar_folder, cifar_tfds):
    for split in PER_CLASS:
        folder, got = D.load_cifar10_folder(cifar_folder, split), D.load_tfds("cifar10", split, data_dir=str(cifar_tfds))
        assert got.class_names == CIFAR10_CLASSES and got.image.dtype == np.uint8 and got.label.dtype == np.int32
        np.testing.assert_array_equal(got.image, folder.image)  # stored losslessly, in order
        np.testing.assert_array_equal(got.label, folder.label)
    sub = D.load_tfds("cifar10", "train[:5]", data_dir=str(cifar_tfds))
    np.testing.assert_array_equal(sub.image, D.load_cifar10_folder(cifar_folder, "train").image[:5])
    with pytest.raises(D.DatasetNotFoundError, match="tfds build cifar100"):
        D.load_tfds("cifar100", data_dir=str(cifar_tfds))
    with pytest.raises(D.DatasetNotFoundError, match="manual"):
        next(D.tfds_imagenet_batches("train", 4, train=True, data_dir=str(cifar_tfds)))


def test_tfds_image_folder_reads_the_folder_like_flatjax(cifar_folder):
    for split in PER_CLASS:
        ours, theirs = D.load_cifar10_folder(cifar_folder, split), D.load_tfds_folder(str(cifar_folder), split)
        assert theirs.class_names == ours.class_names == CIFAR10_CLASSES
        np.testing.assert_array_equal(theirs.label, ours.label)  # same order
        # TensorFlow's JPEG decoder is not Pillow's: a few grey levels apart, never more
        diff = np.abs(theirs.image.astype(int) - ours.image.astype(int))
        assert theirs.image.shape == ours.image.shape and diff.max() <= 8 and diff.mean() < 2
    with pytest.raises(D.DatasetNotFoundError, match="val"):
        D.load_tfds_folder(str(cifar_folder), "val")


def test_tfds_imagenet_batches_offline(tmp_path):
    """The ImageNet route on a tiny prepared ``imagenet2012`` (real features, JPEG-encoded images): shapes,
    the normalization (checked on flat grey images, which any crop and resize keep flat), determinism."""
    features = tfds.builder("imagenet2012", data_dir=str(tmp_path)).info.features
    grey = [60, 128, 200, 90, 160, 30]
    examples = [{"image": np.full((40 + 3 * i, 50 - 2 * i, 3), g, np.uint8), "label": i, "file_name": f"{i}.JPEG"}
                for i, g in enumerate(grey)]
    store("imagenet2012", features, {"train": examples, "validation": examples}, tmp_path, ordered=False)

    def expected(g):
        return (g / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)

    ev = list(D.tfds_imagenet_batches("validation", 4, train=False, image_size=16, data_dir=str(tmp_path)))
    assert [b["image"].shape for b in ev] == [(4, 16, 16, 3), (2, 16, 16, 3)]
    labels = np.concatenate([b["label"] for b in ev])
    np.testing.assert_array_equal(np.sort(labels), np.arange(6))  # one pass over the split
    images = np.concatenate([b["image"] for b in ev])
    for img, g in zip(images, np.asarray(grey)[labels]):  # JPEG keeps a flat grey image within a level or two
        np.testing.assert_allclose(img, np.broadcast_to(expected(g), img.shape), atol=2 / 255 / min(IMAGENET_STD))
    train = D.tfds_imagenet_batches("train", 4, train=True, image_size=16, seed=3, data_dir=str(tmp_path))
    first = [next(train) for _ in range(3)]  # 12 examples: the 6 repeat (an infinite stream)
    again = D.tfds_imagenet_batches("train", 4, train=True, image_size=16, seed=3, data_dir=str(tmp_path))
    for a in first:
        b = next(again)
        assert a["image"].shape == (4, 16, 16, 3) and a["image"].dtype == np.float32
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
        for img, label in zip(a["image"], a["label"]):
            np.testing.assert_allclose(img, np.broadcast_to(expected(grey[label]), img.shape),
                                       atol=2 / 255 / min(IMAGENET_STD))


def test_training_cli_reads_tfds(cifar_folder, cifar_tfds, tmp_path):
    """The CLI through TFDS: ``--dataset cifar10`` from the prepared dataset trains bit-identically to the
    same images read from the folder; ``--pipeline tfds`` reads the folder through TFDS's ImageFolder."""
    import jax

    from experiments import train

    flags = ["--method", "sam", "--model", "mlp", "--batch-size", "6", "--epochs", "2", "--no-progress",
             "--devices", "1"]
    [folder] = train.main([*flags, "--dataset", "cifar10-folder", "--data-dir", str(cifar_folder),
                           "--out", str(tmp_path / "folder")])
    [prepared] = train.main([*flags, "--dataset", "cifar10", "--data-dir", str(cifar_tfds),
                             "--out", str(tmp_path / "tfds")])
    [image_folder] = train.main([*flags, "--dataset", "cifar10-folder", "--data-dir", str(cifar_folder),
                                 "--pipeline", "tfds", "--out", str(tmp_path / "image_folder")])
    assert folder["steps"] == prepared["steps"] == image_folder["steps"] == 2 * 30 // 6
    jax.tree.map(np.testing.assert_array_equal, folder["params"], prepared["params"])
    # other pixels (TensorFlow's JPEG decoder), same data and labels: close, not equal
    gaps = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), folder["params"],
                                        image_folder["params"]))
    assert 0 < max(gaps) < 0.05
    with pytest.raises(SystemExit):
        train.main([*flags, "--dataset", "digits", "--pipeline", "tfds", "--out", str(tmp_path / "x")])
