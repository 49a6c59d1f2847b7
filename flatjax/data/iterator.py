"""Epoch-wise batch iteration over in-memory arrays, with optional host-side prefetch.

Every random choice is a function of ``(seed, epoch, step)``: the shuffle of epoch
``e`` uses ``default_rng([seed, e])`` and the augmentation of batch ``s`` uses
``default_rng([seed, e, s, 1])``. So a run resumed at ``(epoch, step)`` sees exactly
the batches an uninterrupted run would, and prefetching threads cannot change results.

Multi-process runs: ``rows=(start, stop)`` makes each process gather (and augment) only its own rows of
every global batch (:func:`flatjax.data.sharding.process_rows`). The example order is the same in every
process; a process holding part of the batch augments its rows with ``default_rng([seed, e, s, 1, start])``,
so with augmentation the random crops and flips depend on how the batch is split over processes (without
augmentation, the batches equal a single process's exactly).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator, Mapping, TypeVar

import numpy as np

from flatjax.data.augment import Batch, Transform
from flatjax.data.dataset import ArrayDataset

T = TypeVar("T")


class BatchIterator:
    """Yields ``{"image": ..., "label": ...}`` NumPy batches, one epoch at a time.

    Example::

        it = BatchIterator(train, 128, seed=0, transform=train_transform, prefetch=2)
        for epoch in range(epochs):
            for batch in it.epoch(epoch):
                ...
    """

    def __init__(
        self,
        data: ArrayDataset | Mapping[str, np.ndarray],
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        transform: Transform | None = None,
        prefetch: int = 0,
        rows: tuple[int, int] | None = None,
    ) -> None:
        """Sets up the iterator.

        Args:
          data: an :class:`ArrayDataset` or a dict of equally long arrays (every key is
            batched; typically ``"image"`` and ``"label"``).
          batch_size: examples per batch.
          shuffle: draw a new permutation every epoch; otherwise keep the stored order.
          drop_last: drop the final incomplete batch (``False`` yields it, smaller).
          seed: non-negative seed for shuffling and augmentation.
          transform: ``transform(batch, rng) -> batch`` applied to every batch, e.g. an
            :class:`~flatjax.data.augment.ImageTransform`.
          prefetch: batches prepared ahead in a background thread (0: none).
          rows: ``(start, stop)``: yield only these rows of every batch (this process's
            share of a global batch, see the module docstring); default all.

        Raises:
          ValueError: for an empty dataset, arrays of different lengths, or a bad
            ``batch_size``, ``seed``, ``prefetch`` or ``rows``.
        """
        arrays = data.as_dict() if isinstance(data, ArrayDataset) else dict(data)
        lengths = {k: len(v) for k, v in arrays.items()}
        if not arrays or len(set(lengths.values())) != 1:
            raise ValueError(f"data must hold arrays of one common, non-zero length, got {lengths}")
        self._n = next(iter(lengths.values()))
        if self._n == 0:
            raise ValueError("data must not be empty")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if drop_last and batch_size > self._n:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {self._n} examples with drop_last=True "
                "(no batch would be produced)"
            )
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if rows is not None and not (drop_last and 0 <= rows[0] < rows[1] <= batch_size):
            raise ValueError(f"rows must be (start, stop) with 0 <= start < stop <= batch_size={batch_size} (and "
                             f"drop_last=True: every global batch full), got {rows!r}")
        self.rows = None if rows is None or tuple(rows) == (0, batch_size) else tuple(rows)
        self._arrays = arrays
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)
        self.transform = transform
        self.prefetch = prefetch

    @property
    def num_examples(self) -> int:
        """Examples in the dataset."""
        return self._n

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self._n, self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def order(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch`` (a permutation, or ``arange`` without shuffle)."""
        if not self.shuffle:
            return np.arange(self._n)
        return np.random.default_rng([self.seed, epoch]).permutation(self._n)

    def _batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        order = self.order(epoch)
        for step in range(start_step, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            stream = [self.seed, epoch, step, 1]
            if self.rows is not None:
                idx, stream = idx[self.rows[0]:self.rows[1]], stream + [self.rows[0]]
            batch = {k: v[idx] for k, v in self._arrays.items()}
            if self.transform is not None:
                batch = self.transform(batch, np.random.default_rng(stream))
            yield batch

    def epoch(self, epoch: int, *, start_step: int = 0) -> Iterator[Batch]:
        """Iterates over the batches of one epoch.

        Args:
          epoch: epoch index (>= 0); it selects the shuffle and augmentation streams.
          start_step: skip the first ``start_step`` batches (to resume mid-epoch).

        Returns:
          An iterator of batch dicts (prefetched in a thread if ``prefetch > 0``).

        Raises:
          ValueError: for a negative ``epoch`` or ``start_step`` out of range.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step must be in [0, {len(self)}], got {start_step}")
        it = self._batches(epoch, start_step)
        return prefetch(it, self.prefetch) if self.prefetch else it


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


def prefetch(iterable: Iterable[T], size: int = 2) -> Iterator[T]:
    """Runs ``iterable`` in a background thread, keeping up to ``size`` items ready.

    Exceptions raised by the producer are re-raised in the consumer; abandoning the
    returned iterator (or closing it) stops the thread.

    Args:
      iterable: the producer, e.g. batches with augmentation (NumPy releases the GIL
        in most array ops, so augmentation overlaps with the training step), or
        ``map(shard_batch, batches)`` to also overlap host-to-device copies.
      size: queue capacity (>= 1).

    Returns:
      An iterator over the same items, in the same order.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    q: queue.Queue[Any] = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterable:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Raised(e))

    thread = threading.Thread(target=produce, daemon=True, name="flatjax-prefetch")
    thread.start()

    def consume() -> Iterator[T]:
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, _Raised):
                    raise item.exc
                yield item
        finally:
            stop.set()
            thread.join(timeout=5.0)

    return consume()
