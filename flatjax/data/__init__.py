"""Datasets, augmentations and batch iteration for the experiments.

* :func:`load_digits` - the offline default (scikit-learn's 8x8 digits).
* :func:`load_image_folder` / :func:`load_cifar10_folder` - ``root/<split>/<class>/*.jpg``.
* :func:`load_tfds` / :func:`load_tfds_folder` / :func:`tfds_imagenet_batches` - TensorFlow Datasets
  (optional extra, imported lazily): prepared datasets, an image folder read by TFDS, ImageNet streamed.
* :mod:`~flatjax.data.augment` - crop, flip, normalization, Cutout, RandAugment.
* :class:`BatchIterator`, :func:`prefetch`, :func:`shard_batch`, :func:`process_rows` - feeding devices
  (in a multi-process run, each process its own rows of every global batch).
* :func:`streaming_batches` / :func:`streaming_dataset` - a Grain pipeline (worker processes, per-process
  sharding, checkpointable iterator) for image folders too large for memory, e.g. ImageNet (extras
  ``flatjax[experiments,data]``: Pillow, orbax, Grain; checkpoint helpers in :mod:`flatjax.data.streaming`).
"""

from flatjax.data.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTransform,
    channel_mean_std,
    cifar_transforms,
    cutout,
    flip_horizontal,
    normalize,
    random_crop,
    random_flip,
)
from flatjax.data.dataset import ArrayDataset, DatasetNotFoundError
from flatjax.data.digits import load_digits
from flatjax.data.image_folder import (
    CIFAR10_ENV_VAR,
    load_cifar10_folder,
    load_image_folder,
    resolve_cifar10_dir,
)
from flatjax.data.iterator import BatchIterator, prefetch
from flatjax.data.randaugment import rand_augment
from flatjax.data.sharding import data_mesh, process_rows, shard_batch
from flatjax.data.streaming import (
    ImageFolderSource,
    ImageNetTransform,
    batches_per_epoch,
    center_crop_box,
    example_rng,
    random_resized_crop_box,
    streaming_batches,
    streaming_dataset,
)
from flatjax.data.tfds import load_tfds, load_tfds_folder, tfds_imagenet_batches

__all__ = [
    "ArrayDataset",
    "BatchIterator",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_ENV_VAR",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DatasetNotFoundError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderSource",
    "ImageNetTransform",
    "ImageTransform",
    "batches_per_epoch",
    "center_crop_box",
    "channel_mean_std",
    "cifar_transforms",
    "cutout",
    "data_mesh",
    "example_rng",
    "flip_horizontal",
    "load_cifar10_folder",
    "load_digits",
    "load_image_folder",
    "load_tfds",
    "load_tfds_folder",
    "normalize",
    "prefetch",
    "rand_augment",
    "random_crop",
    "random_flip",
    "random_resized_crop_box",
    "resolve_cifar10_dir",
    "process_rows",
    "shard_batch",
    "streaming_batches",
    "streaming_dataset",
    "tfds_imagenet_batches",
]
