"""CIFAR-10/100 and ImageNet from TensorFlow Datasets (optional: ``pip install "flatjax[tfds]"``).

TensorFlow and TFDS are imported only inside these functions, so ``flatjax.data``
works without them. CIFAR splits are loaded whole into NumPy (then use
:class:`~flatjax.data.BatchIterator` and the NumPy augmentations); ImageNet is
streamed through ``tf.data`` with the usual Inception-style preprocessing.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from flatjax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from flatjax.data.dataset import ArrayDataset, DatasetNotFoundError

TFDS_NAMES = ("cifar10", "cifar100", "imagenet2012")
_INSTALL = 'TensorFlow Datasets is not installed: pip install "flatjax[tfds]"'


def _import_tfds() -> tuple[Any, Any]:
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"{_INSTALL} (needed for the TFDS loaders; import failed: {e})") from e
    return tf, tfds


def _builder(tf: Any, tfds: Any, name: str, data_dir: str | None, download: bool) -> Any:
    builder = tfds.builder(name, data_dir=data_dir)
    if download:
        builder.download_and_prepare()
    # A prepared dataset has its dataset_info.json in the versioned data folder.
    if not tf.io.gfile.exists(f"{builder.data_dir}/dataset_info.json"):
        if name == "imagenet2012":
            how = (
                "ImageNet must be downloaded by hand: put ILSVRC2012_img_train.tar and "
                "ILSVRC2012_img_val.tar in <data_dir>/downloads/manual/ and run "
                "`tfds build imagenet2012` (or tfds.builder('imagenet2012').download_and_prepare())."
            )
        else:
            how = f'Call flatjax.data.load_tfds("{name}", download=True) once, or run `tfds build {name}`.'
        raise DatasetNotFoundError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. {how}")
    return builder


def load_tfds(
    name: str, split: str = "train", *, data_dir: str | None = None, download: bool = False
) -> ArrayDataset:
    """Loads a whole CIFAR split from TFDS into memory.

    Args:
      name: ``"cifar10"`` or ``"cifar100"`` (use :func:`tfds_imagenet_batches` for
        ImageNet).
      split: a TFDS split, e.g. ``"train"``, ``"test"`` or ``"train[:10%]"``.
      data_dir: TFDS data folder (default ``~/tensorflow_datasets``).
      download: download and prepare the dataset if missing.

    Returns:
      ``uint8`` ``(N, 32, 32, 3)`` images, ``int32`` labels and the class names.

    Raises:
      ValueError: for an unsupported ``name``.
      ImportError: if TensorFlow Datasets is not installed.
      DatasetNotFoundError: if the dataset is not prepared and ``download`` is False.
    """
    if name not in ("cifar10", "cifar100"):
        raise ValueError(
            f"name must be 'cifar10' or 'cifar100' (ImageNet: tfds_imagenet_batches), got {name!r}"
        )
    tf, tfds = _import_tfds()
    builder = _builder(tf, tfds, name, data_dir, download)
    ds = builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
    images, labels = tfds.as_numpy(ds)
    names = tuple(builder.info.features["label"].names)
    return ArrayDataset(np.asarray(images, np.uint8), np.asarray(labels, np.int32), names)


def load_tfds_folder(root: str, split: str = "train") -> ArrayDataset:
    """Loads one split of an image folder through TFDS (``tfds.folder_dataset.ImageFolder``) into memory.

    The TFDS counterpart of :func:`flatjax.data.load_image_folder` for the same layout,
    ``root/<split>/<class>/*.jpg``: TensorFlow decodes the images (its JPEG decoder differs from
    Pillow's by a few grey levels: at most 4, 1.0 on average, on CIFAR-sized JPEGs). Examples come in
    flatjax's order (classes sorted, files sorted by name within a class), so the two loaders give the
    same labels in the same order.

    Args:
      root: folder holding ``<split>/<class>/`` sub-folders of equally sized images.
      split: sub-folder name, e.g. ``"train"`` or ``"test"``.

    Returns:
      ``uint8`` ``(N, H, W, 3)`` images, ``int32`` labels and the class names (sorted folder names).

    Raises:
      ImportError: if TensorFlow Datasets is not installed.
      DatasetNotFoundError: if ``root/split`` does not exist.

    Example::

        >>> train = flatjax.data.load_tfds_folder("CIFAR-10-images", "train")  # doctest: +SKIP
    """
    tf, tfds = _import_tfds()
    if not tf.io.gfile.isdir(f"{root}/{split}"):
        raise DatasetNotFoundError(f"No folder {root}/{split}: expected {root}/{split}/<class>/*.jpg")
    builder = tfds.folder_dataset.ImageFolder(str(root))
    ds = builder.as_dataset(split=split, batch_size=-1, shuffle_files=False)
    examples = tfds.as_numpy(ds)
    names = [f.decode() if isinstance(f, bytes) else str(f) for f in examples["image/filename"]]
    labels = np.asarray(examples["label"], np.int32)
    order = sorted(range(len(names)), key=lambda i: (labels[i], names[i].rsplit("/", 1)[-1]))
    class_names = tuple(builder.info.features["label"].names)
    return ArrayDataset(np.asarray(examples["image"], np.uint8)[order], labels[order], class_names)


def tfds_imagenet_batches(
    split: str,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    image_size: int = 224,
    data_dir: str | None = None,
    shuffle_buffer: int = 16_384,
    drop_last: bool | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Streams ImageNet-1k (``imagenet2012``) batches as normalized ``float32`` NumPy.

    Train: Inception-style random-resized crop (area 8-100%, aspect 3/4-4/3) to
    ``image_size`` and a random horizontal flip, shuffled, repeating forever.
    Eval: resize the shorter side to ``image_size / 0.875`` (256 for 224) and centre
    crop, one pass. Both normalize with the ImageNet mean/std. In a multi-process run
    each process reads its own shard (``tfds.split_for_jax_process``).

    Args:
      split: ``"train"`` or ``"validation"`` (or a TFDS sub-split).
      batch_size: per-process batch size.
      train: training (random, infinite) or evaluation (deterministic, one pass).
      seed: seed of the shuffle and of the random crops/flips.
      image_size: output side.
      data_dir: TFDS data folder.
      shuffle_buffer: shuffle buffer (train only).
      drop_last: drop the final partial batch (default: ``train``).

    Returns:
      An iterator of ``{"image": (B, S, S, 3) float32, "label": (B,) int32}``.

    Raises:
      ImportError: if TensorFlow Datasets is not installed.
      DatasetNotFoundError: if ImageNet has not been prepared (manual download).
    """
    tf, tfds = _import_tfds()
    builder = _builder(tf, tfds, "imagenet2012", data_dir, download=False)
    if hasattr(tfds, "split_for_jax_process"):
        split = tfds.split_for_jax_process(split)
    ds = builder.as_dataset(
        split=split, shuffle_files=train, decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=seed),
    )
    mean = tf.constant(IMAGENET_MEAN, tf.float32) * 255.0
    std = tf.constant(IMAGENET_STD, tf.float32) * 255.0

    def train_map(i: Any, ex: Any) -> tuple[Any, Any]:
        seeds = tf.random.experimental.stateless_split(tf.stack([tf.cast(seed, tf.int64), i]), 2)
        shape = tf.io.extract_jpeg_shape(ex["image"])
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape, tf.zeros([0, 0, 4], tf.float32), seed=seeds[0], min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        img = tf.io.decode_and_crop_jpeg(ex["image"], window, channels=3)
        img = tf.image.resize(img, [image_size, image_size], method="bicubic")
        img = tf.image.stateless_random_flip_left_right(img, seed=seeds[1])
        return (img - mean) / std, ex["label"]

    def eval_map(ex: Any) -> tuple[Any, Any]:
        img = tf.io.decode_jpeg(ex["image"], channels=3)
        shape = tf.cast(tf.shape(img)[:2], tf.float32)
        scale = (image_size / 0.875) / tf.reduce_min(shape)
        img = tf.image.resize(img, tf.cast(tf.round(shape * scale), tf.int32), method="bicubic")
        img = tf.image.resize_with_crop_or_pad(img, image_size, image_size)
        return (img - mean) / std, ex["label"]

    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    if train:
        ds = ds.repeat().shuffle(shuffle_buffer, seed=seed).enumerate().map(
            train_map, num_parallel_calls=tf.data.AUTOTUNE
        )
    else:
        ds = ds.map(eval_map, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=train if drop_last is None else drop_last)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    for images, labels in tfds.as_numpy(ds):
        yield {"image": images.astype(np.float32), "label": labels.astype(np.int32)}
