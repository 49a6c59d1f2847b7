"""The training CLI's input: datasets, and the two pipelines that feed the loop (``--pipeline``).

``memory`` (default): the split decoded into host memory (:class:`flatjax.data.BatchIterator`); the data
position is a function of ``(seed, epoch, step)``, so a checkpoint needs only the step. ``streaming``: an
image folder read lazily by :mod:`flatjax.data.streaming` (Grain: worker processes, per-example augmentation
from ``(seed, epoch, file)``), for datasets too large for memory; its iterator position is saved in the
orbax checkpoint beside the training state, so ``--resume`` continues exactly there.

In a multi-process run each process reads only its rows of every global batch: the rows its devices hold
(:func:`flatjax.data.sharding.process_rows`); the streaming pipeline reads them as shard ``start / rows`` of
``batch / rows`` (every process holding the whole batch, e.g. one probe group per process, reads shard 0 of 1).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from experiments.configs import TrainConfig
from flatjax import data as fdata

#: memory: the split decoded into memory by flatjax; tfds: an image folder read into memory by TFDS
#: (``tfds.folder_dataset.ImageFolder``); streaming: an image folder read lazily by Grain.
PIPELINES = ("memory", "tfds", "streaming")
#: The in-memory CIFAR augmentations as the streaming pipeline's per-example ones.
STREAMING_AUGMENT = {"none": "none", "basic": "cifar", "cutout": "cutout"}


def load_data(cfg: TrainConfig, data_dir: str | None, pipeline: str = "memory"
              ) -> tuple[fdata.ArrayDataset, fdata.ArrayDataset, Callable | None, Callable | None]:
    """Loads ``(train, test, train_transform, eval_transform)`` for ``cfg.dataset`` into memory
    (``pipeline="tfds"``: the CIFAR-10 image folder read by TFDS rather than by flatjax's decoder).

    Raises:
      DatasetNotFoundError: when a CIFAR folder / TFDS dataset is missing (with instructions).
      ValueError: for an unknown dataset name.
    """
    if cfg.dataset == "digits":
        train, test = fdata.load_digits(seed=0)
        return train, test, None, None
    if cfg.dataset == "cifar10-folder" and pipeline == "tfds":
        folder = str(fdata.resolve_cifar10_dir(data_dir))
        train, test = fdata.load_tfds_folder(folder, "train"), fdata.load_tfds_folder(folder, "test")
    elif cfg.dataset == "cifar10-folder":
        train = fdata.load_cifar10_folder(data_dir, "train")
        test = fdata.load_cifar10_folder(data_dir, "test")
    elif cfg.dataset in ("cifar10", "cifar100"):
        train = fdata.load_tfds(cfg.dataset, "train", data_dir=data_dir)
        test = fdata.load_tfds(cfg.dataset, "test", data_dir=data_dir)
    else:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; choose digits, cifar10-folder, cifar10, cifar100")
    stats = "cifar100" if cfg.dataset == "cifar100" else "cifar10"
    train_tf, eval_tf = fdata.cifar_transforms(cfg.augment, stats=stats)
    return train, test, train_tf, eval_tf


class StreamingSplit:
    """A split of an image folder streamed by Grain, behind the interface the loop uses for the in-memory
    :class:`flatjax.data.BatchIterator`: ``len()`` batches per epoch and ``epoch(e, start_step=s)``.

    The position lives in the iterator (``self.iterator``; saved in the checkpoint), so ``epoch`` only counts:
    it yields the epoch's remaining ``len() - start_step`` batches of the stream.
    """

    def __init__(self, cfg: TrainConfig, data_dir: str, *, rows: tuple[int, int], seed: int,
                 worker_count: int = 2) -> None:
        from flatjax.data import streaming

        if cfg.augment not in STREAMING_AUGMENT:
            raise ValueError(f"--pipeline streaming: the config's augment {cfg.augment!r} has no per-example form "
                             f"(it has {', '.join(STREAMING_AUGMENT)}); use --pipeline memory")
        local, shard_count = rows[1] - rows[0], cfg.batch_size // (rows[1] - rows[0])
        source = streaming.ImageFolderSource(data_dir, "train")
        self.class_names = source.class_names
        self.num_examples = len(source)
        self.iterator = streaming.streaming_batches(
            source, "train", seed=seed, worker_count=worker_count, train=True, num_epochs=None,
            transform=cifar_stream_transform(train=True, augment=STREAMING_AUGMENT[cfg.augment]),
            batch_size=local, shard_index=rows[0] // local, shard_count=shard_count)
        self._len = streaming.batches_per_epoch(len(source), local, shard_count=shard_count)
        self.data_dir = data_dir

    def __len__(self) -> int:
        return self._len

    def epoch(self, epoch: int, *, start_step: int = 0) -> Iterator[dict]:
        for _ in range(start_step, self._len):
            yield next(self.iterator)

    def test_batches(self, batch_size: int) -> Iterator[dict]:
        """Every example of the test split in file order (each process reads all of it)."""
        from flatjax.data import streaming

        return iter(streaming.streaming_dataset(self.data_dir, "test", batch_size=batch_size, train=False,
                                                shard_index=0, shard_count=1, drop_remainder=False,
                                                transform=cifar_stream_transform(train=False)).to_iter_dataset())


def cifar_stream_transform(*, train: bool, augment: str = "none") -> Any:
    """Per-example CIFAR decode + augment: 32x32, CIFAR-10 statistics, evaluation on the whole image."""
    from flatjax.data import streaming

    return streaming.ImageNetTransform(image_size=32, train=train, augment=augment, crop_fraction=1.0,
                                       mean=fdata.CIFAR10_MEAN, std=fdata.CIFAR10_STD)


def batches(it: Any, epoch: int, start: int, per_update: int, second: Any = None) -> Iterator[tuple]:
    """Yields ``(batch, second batch)`` for the updates of ``epoch`` from update index ``start``: the
    second batch is the next one of ``it`` (two batches per update), of the ``second`` stream, or None."""
    gen = it.epoch(epoch, start_step=start * per_update)
    gen2 = second.epoch(epoch, start_step=start) if second is not None else None
    while True:
        try:
            b0 = next(gen)
            b1 = next(gen) if per_update == 2 else (next(gen2) if gen2 is not None else None)
        except StopIteration:
            return
        yield b0, b1
