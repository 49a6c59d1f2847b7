"""Streaming input pipeline for large image datasets, on Grain (``pip install "flatjax[experiments,data]"``).

:func:`load_image_folder` decodes a whole split into one in-memory array: right for CIFAR, impossible
for ImageNet (1.3 M JPEGs). This module reads the same ``root/<split>/<class>/*.jpg`` layout (or any
random-access source: ``tfds.data_source(...)``, ``grain.sources.ArrayRecordDataSource``) lazily,
with `Grain <https://google-grain.readthedocs.io>`_'s dataset API::

    source  ->  decode + augment (per example)  ->  shard  ->  shuffle (per epoch)  ->  batch  ->  repeat
                   `MapDataset.map_with_index`       slice       `shuffle(seed)`       drop rem.
            ->  to_iter_dataset (reader threads)  ->  mp_prefetch (worker processes)

* Per-process sharding: process ``jax.process_index()`` of ``jax.process_count()`` reads every
  ``count``-th file (balanced classes), all shards the same length; override with ``shard_index`` /
  ``shard_count``.
* Shuffle: a fresh permutation of the shard every epoch, from ``seed`` and the epoch number.
* Augmentation: each example draws from its own generator ``example_rng(seed, epoch, index)`` (``index``:
  the file's position in the source), so the batches do not depend on ``worker_count``,
  ``read_threads`` or on resuming.
* Batches: ``{"image": (B, S, S, 3) float32 (ImageNet mean/std normalized) or uint8, "label": (B,) int32}``;
  every epoch drops its own remainder (``drop_remainder``, default for training).
* Exact resume: the iterator is a Grain ``DatasetIterator``; ``get_state()`` / ``set_state()`` give its
  position (a small JSON-able dict, consumed batches only: prefetched ones are produced again), and
  :func:`save_state` / :func:`restore_state` put it in the orbax checkpoint beside the training state.

Train augmentations (``augment``): ``"inception"`` (random-resized crop, area 8-100 %, aspect 3/4-4/3,
to ``image_size``, bilinear, then horizontal flip: the ResNet-on-ImageNet recipe of the papers),
``"randaugment"`` (inception + RandAugment(2, 14) on the crop: the ViT recipe), ``"cifar"`` (resize to
``image_size`` if needed, flip, 4-pixel pad-and-crop), ``"cutout"`` (cifar + Cutout 16x16 after
normalization), ``"none"``. Evaluation (``train=False``) is always resize + centre crop (the central
``crop_fraction`` = 87.5 % of the shorter side, i.e. resize to 256 then crop 224), in file order.

Example (makes a tiny folder first; ``shard_index``/``shard_count`` default to the JAX process):

>>> import os, tempfile
>>> import numpy as np
>>> from PIL import Image
>>> from flatjax.data.streaming import streaming_batches, checkpoint_manager, save_state, restore_state
>>> tmp = tempfile.TemporaryDirectory()
>>> for c in ("cat", "dog"):
...     os.makedirs(f"{tmp.name}/train/{c}")
...     for i in range(4):
...         Image.fromarray(np.full((40, 35, 3), 60 * i, np.uint8)).save(f"{tmp.name}/train/{c}/{i}.jpg")
>>> kw = dict(batch_size=4, image_size=32, augment="inception", seed=0, worker_count=0)
>>> it = streaming_batches(tmp.name, "train", **kw)
>>> batch = next(it)
>>> batch["image"].shape, batch["image"].dtype, batch["label"].shape, batch["label"].dtype
((4, 32, 32, 3), dtype('float32'), (4,), dtype('int32'))
>>> it.get_state()                      # JSON-able position: batches consumed
{'next_index': 1}

Saving it with the training state in one orbax checkpoint, and resuming:

>>> mngr = checkpoint_manager(f"{tmp.name}/ckpt")          # items "state" and "data"
>>> save_state(mngr, 1, {"w": np.arange(3.0, dtype=np.float32)}, it)
True
>>> mngr.wait_until_finished()
>>> expected = next(it)["image"]
>>> fresh = streaming_batches(tmp.name, "train", **kw)     # e.g. in the resumed process
>>> state = restore_state(mngr, {"w": np.zeros(3, np.float32)}, fresh)   # also rewinds `fresh`
>>> np.asarray(state["w"]).tolist(), bool((next(fresh)["image"] == expected).all())
([0.0, 1.0, 2.0], True)
>>> it.close(); fresh.close(); mngr.close(); tmp.cleanup()

In a training loop::

    mngr = checkpoint_manager(ckpt_dir)
    it = streaming_batches(root, "train", batch_size=256, seed=0, worker_count=8)
    if mngr.latest_step() is not None:                                    # --resume
        state = restore_state(mngr, state, it)
    for step in range(int(state["step"]), num_steps):
        state = train_step(state, next(it))
        save_state(mngr, step + 1, state, it)
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from flatjax.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    cutout,
    normalize,
    random_crop,
)
from flatjax.data.dataset import DatasetNotFoundError
from flatjax.data.image_folder import list_image_folder
from flatjax.data.randaugment import rand_augment

TRAIN_AUGMENTS = ("inception", "randaugment", "cifar", "cutout", "none")
OUTPUT_DTYPES = ("float32", "uint8")
#: Item names of the composite orbax checkpoint written by :func:`save_state`.
STATE_ITEM = "state"
DATA_ITEM = "data"
_INSTALL = 'Grain is not installed: pip install "flatjax[data]" (or pip install grain)'


def _allow_unparsed_absl_flags() -> None:
    """Grain 0.2.18 reads its absl flag ``grain_enable_multiprocess_worker_profiling`` when it starts workers,
    which raises ``UnparsedFlagAccessError`` in a script that never parsed absl flags (google/grain#1355, fixed
    after 0.2.18). Mark that one flag as given (its value stays the default), as Grain does for its debug flags."""
    from absl import flags

    name = "grain_enable_multiprocess_worker_profiling"
    if not flags.FLAGS.is_parsed() and name in flags.FLAGS and not flags.FLAGS[name].present:
        flags.FLAGS[name].present = True


def _import_grain() -> Any:
    try:
        import grain
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{_INSTALL} (needed by flatjax.data.streaming; import failed: {e})") from e
    return grain


# ---- sources -------------------------------------------------------------------------------------------


class ImageFolderSource:
    """Random-access source over ``root/<split>/<class>/*`` image files (a Grain ``RandomAccessDataSource``).

    Lists the files only (sorted, classes = sorted sub-folder names as :func:`load_image_folder`); each
    record is ``{"path": str, "label": int32}`` and is decoded later, in the pipeline's workers.

    Args:
      root: dataset folder holding ``<split>/<class>/`` sub-folders.
      split: sub-folder name (``"train"``, ``"val"``, ...).
      class_names: classes in label order (default: sorted sub-folders). Pass the training split's
        names for an evaluation split.
      limit_per_class: keep only the first N files of each class.

    Raises:
      DatasetNotFoundError: if ``root/split`` or a class folder is missing, or it holds no image.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *,
                 class_names: Sequence[str] | None = None, limit_per_class: int | None = None) -> None:
        try:
            paths, labels, names = list_image_folder(root, split, class_names=class_names,
                                                     limit_per_class=limit_per_class)
        except DatasetNotFoundError as e:
            raise DatasetNotFoundError(f"root={str(root)!r}, split={split!r}: {e}") from e
        self.root = str(root)
        self.split = split
        self.paths = [str(p) for p in paths]
        self.labels = labels
        self.class_names = names

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"path": self.paths[index], "label": self.labels[index]}

    def __repr__(self) -> str:
        return (f"ImageFolderSource(root={self.root!r}, split={self.split!r}, "
                f"{len(self)} files, {len(self.class_names)} classes)")


# ---- per-example transforms -----------------------------------------------------------------------------


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of example ``index`` (its position in the source) in ``epoch`` of a run seeded ``seed``."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def random_resized_crop_box(
    height: int, width: int, rng: np.random.Generator, *,
    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10,
) -> tuple[int, int, int, int]:
    """Inception-style crop window ``(top, left, h, w)``: area ``scale`` of the image, aspect ``ratio``.

    The torchvision ``RandomResizedCrop`` procedure: up to ``attempts`` draws of an area fraction
    (uniform in ``scale``) and a log-uniform aspect ratio; the first window that fits is placed
    uniformly; if none fits, the largest centred window with its aspect clamped into ``ratio``.
    """
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, crop_fraction: float = 0.875) -> tuple[int, int, int, int]:
    """Centred square window ``(top, left, side, side)``, ``side`` = ``crop_fraction`` of the shorter side.

    Cropping it and resizing to ``S`` equals resizing the shorter side to ``S / crop_fraction`` and
    cropping the centre ``S x S`` (the standard ImageNet evaluation: 256 then 224), in one resampling.
    """
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    side = max(1, int(round(min(height, width) * crop_fraction)))
    return (height - side) // 2, (width - side) // 2, side, side


def _open_image(record: Any) -> Any:
    """A PIL RGB image from a record's ``"path"``, encoded ``"image"`` bytes or decoded ``"image"`` array."""
    from PIL import Image

    if "path" in record:
        where = record["path"]
        try:
            with Image.open(where) as im:
                return im.convert("RGB")
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise OSError(f"could not decode image file {where}: {type(e).__name__}: {e}") from e
    image = record["image"]
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(image)) as im:
                return im.convert("RGB")
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise OSError(f"could not decode the encoded image of a record (label {record.get('label')}): "
                          f"{type(e).__name__}: {e}") from e
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array.astype(np.uint8)).convert("RGB")


@dataclasses.dataclass(frozen=True)
class ImageNetTransform:
    """Decode + augment one record into ``{"image": (S, S, 3), "label": int32}``.

    Attributes:
      image_size: output side ``S``.
      train: training augmentation (``augment``) or evaluation (resize + centre crop).
      augment: one of :data:`TRAIN_AUGMENTS` (see the module docstring); ignored when not ``train``.
      scale, ratio: random-resized-crop area fraction and aspect-ratio ranges.
      randaugment: ``(num_ops, magnitude)`` of ``augment="randaugment"`` (the m-ARWP ViT code: 2, 14).
      crop_fraction: evaluation centre crop (0.875: 224 out of 256).
      output_dtype: ``"float32"`` (``(x / 255 - mean) / std``) or ``"uint8"`` (raw pixels, 4x less
        inter-process traffic: normalize on the device).
      mean, std: normalization statistics in [0, 1] units.
    """

    image_size: int = 224
    train: bool = True
    augment: str = "inception"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    randaugment: tuple[int, int] = (2, 14)
    crop_fraction: float = 0.875
    output_dtype: str = "float32"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, (int, np.integer)) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        if self.augment not in TRAIN_AUGMENTS:
            raise ValueError(f"augment must be one of {TRAIN_AUGMENTS}, got {self.augment!r}")
        if self.output_dtype not in OUTPUT_DTYPES:
            raise ValueError(f"output_dtype must be one of {OUTPUT_DTYPES}, got {self.output_dtype!r}")
        if self.train and self.augment == "cutout" and self.output_dtype != "float32":
            raise ValueError("augment='cutout' zeroes normalized pixels: it needs output_dtype='float32'")
        # validate the ranges once, here, rather than in every worker
        random_resized_crop_box(1, 1, np.random.default_rng(0), scale=self.scale, ratio=self.ratio)
        center_crop_box(1, 1, self.crop_fraction)
        normalize(np.zeros((1, 1, 1, 3), np.uint8), self.mean, self.std)  # checks mean/std
        std = np.asarray(self.std, np.float32)
        # (x / 255 - mean) / std as one multiply-add in place: 3x faster than augment.normalize at 224x224
        # (equal to it within 1e-6); this is a third of the per-image cost at ImageNet size.
        object.__setattr__(self, "_scale", (1.0 / (255.0 * std)).astype(np.float32))
        object.__setattr__(self, "_offset", (-np.asarray(self.mean, np.float32) / std).astype(np.float32))

    def __call__(self, record: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Transforms one record (``{"path" | "image", "label"}``) with the example's generator."""
        from PIL import Image

        im = _open_image(record)
        s = int(self.image_size)
        width, height = im.size
        mode = self.augment if self.train else "eval"
        if mode in ("inception", "randaugment"):
            top, left, h, w = random_resized_crop_box(height, width, rng, scale=self.scale, ratio=self.ratio)
        elif mode == "eval":
            top, left, h, w = center_crop_box(height, width, self.crop_fraction)
        else:  # cifar, cutout, none: the whole image
            top, left, h, w = 0, 0, height, width
        if (top, left, h, w) != (0, 0, s, s) or (width, height) != (s, s):
            im = im.resize((s, s), Image.BILINEAR, box=(left, top, left + w, top + h))
        x = np.asarray(im, dtype=np.uint8)[None]
        if mode in ("inception", "randaugment", "cifar", "cutout") and rng.random() < 0.5:
            x = x[:, :, ::-1]
        if mode == "randaugment":
            x = rand_augment(np.ascontiguousarray(x), rng, num_ops=self.randaugment[0],
                             magnitude=self.randaugment[1])
        if mode in ("cifar", "cutout"):
            x = random_crop(x, rng, padding=4)
        if self.output_dtype == "float32":
            x = x.astype(np.float32)
            x *= self._scale
            x += self._offset
            if mode == "cutout":
                x = cutout(x, rng, size=16, p=0.5)
        return {"image": np.ascontiguousarray(x[0]), "label": np.int32(record["label"])}


class _IndexedTransform:
    """``map_with_index`` step: splits Grain's index into (epoch, position in the source) for the RNG."""

    def __init__(self, transform: Callable[[Any, np.random.Generator], dict], seed: int, num_records: int,
                 parse_record: Callable[[Any], Any] | None, with_index: bool) -> None:
        self.transform = transform
        self.seed = seed
        self.num_records = num_records
        self.parse_record = parse_record
        self.with_index = with_index

    def map_with_index(self, index: int, record: Any) -> dict[str, np.ndarray]:
        epoch, position = divmod(int(index), self.num_records)
        if self.parse_record is not None:
            record = self.parse_record(record)
        out = self.transform(record, example_rng(self.seed, epoch, position))
        if self.with_index:
            out["index"] = np.int32(position)
        return out

    __call__ = map_with_index


# ---- the pipeline ---------------------------------------------------------------------------------------


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not isinstance(shard_count, (int, np.integer)) or shard_count < 1:
        raise ValueError(f"shard_count must be a positive int, got {shard_count!r}")
    if not isinstance(shard_index, (int, np.integer)) or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be an int in [0, shard_count={shard_count}), got {shard_index!r}")
    return int(shard_index), int(shard_count)


def streaming_dataset(
    source: str | os.PathLike | Any,
    split: str = "train",
    *,
    batch_size: int,
    train: bool = True,
    image_size: int = 224,
    augment: str = "inception",
    seed: int = 0,
    num_epochs: int | None = None,
    drop_remainder: bool | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    output_dtype: str = "float32",
    transform: Callable[[Any, np.random.Generator], dict] | None = None,
    parse_record: Callable[[Any], Any] | None = None,
    class_names: Sequence[str] | None = None,
    limit_per_class: int | None = None,
    with_index: bool = False,
) -> Any:
    """The batched Grain ``MapDataset`` of this process's shard (lazy: nothing is decoded yet).

    ``len()`` of the result is the number of batches (per epoch when ``num_epochs=1``); ``ds[i]`` decodes
    batch ``i``. :func:`streaming_batches` adds reader threads and worker processes and iterates it.

    Args:
      source: an image folder ``root`` (read as ``root/<split>/<class>/*``, see :class:`ImageFolderSource`)
        or any random-access source (``len`` and ``[i]``) whose records are dicts with ``"label"`` and
        either ``"path"`` or ``"image"`` (encoded bytes or a decoded ``uint8`` HWC array), e.g.
        ``tfds.data_source("imagenet2012", split="train")``; with ``parse_record`` any records
        (``grain.sources.ArrayRecordDataSource`` bytes ...).
      split: sub-folder of an image-folder ``root`` (ignored for other sources).
      batch_size: examples per batch (per process).
      train: shuffle every epoch and augment (``augment``); False: file order, resize + centre crop,
        one epoch by default.
      image_size: output side (224 for ImageNet, 32 for CIFAR).
      augment: training augmentation, one of :data:`TRAIN_AUGMENTS`.
      seed: seed of the shuffles and of every example's augmentation, in [0, 2**32).
      num_epochs: passes over the data; ``None``: forever for training, 1 for evaluation.
      drop_remainder: drop each epoch's final partial batch (default: ``train``).
      shard_index, shard_count: this process's shard; default ``jax.process_index()`` /
        ``jax.process_count()``. Shard ``i`` holds files ``i, i + count, ...`` trimmed to a common length.
      output_dtype: ``"float32"`` (ImageNet mean/std normalized) or ``"uint8"``.
      transform: replaces the decode + augment step: ``transform(record, rng) -> {"image", "label"}``
        (picklable when ``worker_count > 0``), e.g. an :class:`ImageNetTransform` with other ``scale``,
        ``randaugment`` magnitudes or ``mean``/``std``; ``image_size``, ``augment`` and ``output_dtype``
        are then ignored.
      parse_record: applied to each raw record first (module-level, picklable).
      class_names, limit_per_class: passed to :class:`ImageFolderSource`.
      with_index: add ``"index"``: ``(B,) int32``, each example's position in the source.

    Returns:
      A ``grain.MapDataset`` of ``{"image": (B, S, S, 3), "label": (B,) int32}`` batches.

    Raises:
      DatasetNotFoundError: if the folder is missing or holds no image.
      ValueError: for an invalid argument (the message names it), or a shard smaller than a batch.
      ImportError: if Grain is not installed.
    """
    grain = _import_grain()
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if num_epochs is not None and (not isinstance(num_epochs, (int, np.integer)) or num_epochs < 1):
        raise ValueError(f"num_epochs must be a positive int or None, got {num_epochs!r}")
    if transform is not None and not callable(transform):
        raise ValueError(f"transform must be callable as transform(record, rng), got {type(transform).__name__}")
    if parse_record is not None and not callable(parse_record):
        raise ValueError(f"parse_record must be callable, got {type(parse_record).__name__}")
    shard_index, shard_count = _shard(shard_index, shard_count)
    if transform is None:
        transform = ImageNetTransform(image_size=image_size, train=train, augment=augment,
                                      output_dtype=output_dtype)
    if isinstance(source, (str, os.PathLike)):
        source = ImageFolderSource(source, split, class_names=class_names, limit_per_class=limit_per_class)
    elif not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise ValueError("source must be an image-folder path or a random-access source (len() and [i]), "
                         f"got {type(source).__name__}")
    n = len(source)
    if n == 0:
        raise DatasetNotFoundError(f"source={source!r} has no records")
    per_shard = n // shard_count
    if per_shard == 0:
        raise ValueError(f"source has {n} records, fewer than shard_count={shard_count}")
    if drop_remainder is None:
        drop_remainder = train
    if drop_remainder and per_shard < batch_size:
        raise ValueError(f"batch_size={batch_size} exceeds the {per_shard} examples of each of the "
                         f"{shard_count} shard(s): with drop_remainder no batch would be produced")
    if num_epochs is None:
        num_epochs = None if train else 1

    ds = grain.MapDataset.source(source)
    ds = ds.map_with_index(_IndexedTransform(transform, int(seed), n, parse_record, with_index))
    ds = ds[shard_index:per_shard * shard_count:shard_count]
    if train:
        ds = ds.shuffle(seed=int(seed))
    ds = ds.batch(int(batch_size), drop_remainder=bool(drop_remainder))
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds


def streaming_batches(
    source: str | os.PathLike | Any,
    split: str = "train",
    *,
    batch_size: int,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 2,
    prefetch_buffer_size: int = 4,
    **kwargs: Any,
) -> Any:
    """A checkpointable iterator of batches: :func:`streaming_dataset` read by threads and worker processes.

    Same seed, same batches, whatever ``worker_count`` and ``read_threads`` (each example's randomness
    comes from :func:`example_rng`). ``it.get_state()`` returns the position (a JSON-able dict of
    consumed batches); ``it.set_state(state)`` on a fresh iterator of the same pipeline continues exactly
    there. Close it with ``it.close()`` to stop the workers early (they also stop with the process).

    Worker processes are started with ``spawn``: a script using ``worker_count > 0`` needs the
    ``if __name__ == "__main__":`` guard, and a custom ``transform`` must be importable (module-level).

    Example::

        it = streaming_batches("/data/imagenet", "train", batch_size=256, image_size=224,
                               augment="inception", seed=0, worker_count=8)
        batch = next(it)        # {"image": (256, 224, 224, 3) float32, "label": (256,) int32}

    Args:
      source, split: see :func:`streaming_dataset`.
      batch_size: examples per batch (per process).
      worker_count: decoding processes (0: decode in this process's reader threads).
      worker_buffer_size: batches each worker keeps ready.
      read_threads: threads per process fetching batches in parallel (0: none).
      prefetch_buffer_size: batches each process's threads keep ready (at least ``read_threads``).
      **kwargs: the other arguments of :func:`streaming_dataset` (``train``, ``image_size``, ``augment``,
        ``seed``, ``num_epochs``, ``shard_index``, ``shard_count``, ``output_dtype`` ...).

    Returns:
      A ``grain.DatasetIterator`` with ``get_state()`` / ``set_state()``.

    Raises:
      ValueError: for a bad ``worker_count``, ``worker_buffer_size``, ``read_threads`` or
        ``prefetch_buffer_size`` (and see :func:`streaming_dataset`).
    """
    for name, value, low in (("worker_count", worker_count, 0), ("worker_buffer_size", worker_buffer_size, 1),
                             ("read_threads", read_threads, 0), ("prefetch_buffer_size", prefetch_buffer_size, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    grain = _import_grain()
    ds = streaming_dataset(source, split, batch_size=batch_size, **kwargs)
    read = grain.ReadOptions(num_threads=int(read_threads),
                             prefetch_buffer_size=max(int(prefetch_buffer_size), int(read_threads)))
    it_ds = ds.to_iter_dataset(read)
    if worker_count > 0:
        _allow_unparsed_absl_flags()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(worker_count), per_worker_buffer_size=int(worker_buffer_size)))
    return iter(it_ds)


def batches_per_epoch(num_examples: int, batch_size: int, *, shard_count: int = 1,
                      drop_remainder: bool = True) -> int:
    """Batches each process reads per epoch from ``num_examples`` records (as :func:`streaming_dataset`)."""
    per_shard = num_examples // shard_count
    return per_shard // batch_size if drop_remainder else -(-per_shard // batch_size)


# ---- checkpoints ----------------------------------------------------------------------------------------


def checkpoint_manager(directory: str | os.PathLike, *, max_to_keep: int | None = 2,
                       options: Any = None) -> Any:
    """An ``orbax.checkpoint.CheckpointManager`` with two items: ``"state"`` (arrays) and ``"data"`` (iterator).

    Args:
      directory: checkpoint folder (created if needed).
      max_to_keep: checkpoints kept (None: all); ignored when ``options`` is given.
      options: an ``ocp.CheckpointManagerOptions`` to use instead.

    Returns:
      The manager, for :func:`save_state` / :func:`restore_state`.
    """
    import orbax.checkpoint as ocp

    grain = _import_grain()
    options = options or ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(
        Path(directory).absolute(), options=options,
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                       DATA_ITEM: grain.checkpoint.CheckpointHandler()})


def save_state(manager: Any, step: int, state: Any, data_iterator: Any, *, force: bool = True) -> bool:
    """Saves the training ``state`` (a pytree of arrays) and the iterator's position as checkpoint ``step``.

    Equivalent to::

        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator)))

    The iterator's position is written (``data/process_<i>-of-<n>.json``, one per JAX process) before
    this returns, so the loop may go on reading; the arrays are committed in the background as usual.

    Returns:
      Whether orbax saved (see ``CheckpointManager.save``).
    """
    import orbax.checkpoint as ocp

    grain = _import_grain()
    return manager.save(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(state),
        DATA_ITEM: grain.checkpoint.CheckpointSave(data_iterator)}), force=force)


def restore_state(manager: Any, template: Any, data_iterator: Any, step: int | None = None) -> Any:
    """Restores checkpoint ``step`` (default: the latest): returns the state, rewinds ``data_iterator``.

    Args:
      manager: from :func:`checkpoint_manager`.
      template: a pytree shaped like the saved state (e.g. the freshly initialised one); only its
        shapes and dtypes are used.
      data_iterator: a fresh iterator of the same pipeline (same source, seed, batch size, shard);
        its position is set to the saved one in place.
      step: which checkpoint.

    Returns:
      The restored state (same tree structure as ``template``).

    Raises:
      FileNotFoundError: if the folder holds no checkpoint.
    """
    import jax
    import orbax.checkpoint as ocp

    grain = _import_grain()
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), template)
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(abstract),
        DATA_ITEM: grain.checkpoint.CheckpointRestore(data_iterator)}))
    return restored[STATE_ITEM]
