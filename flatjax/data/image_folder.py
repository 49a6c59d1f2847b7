"""Image-folder datasets: ``root/<split>/<class>/*.{jpg,png,...}`` decoded into NumPy.

Classes are the sub-folders of ``root/<split>`` in alphabetical order (label = index
in that order), files are read in sorted order, and the decoded ``uint8`` arrays can
be cached as an ``.npz`` so later runs skip decoding. The same loader reads CIFAR-10
exported as JPEGs (whose class folders sort into the usual CIFAR-10 label order).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from flatjax.data.dataset import ArrayDataset, DatasetNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".webp")
CIFAR10_ENV_VAR = "FLATJAX_CIFAR10_DIR"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


def list_image_folder(
    root: str | os.PathLike, split: str, *, class_names: Sequence[str] | None = None,
    limit_per_class: int | None = None,
) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """Lists the image files of one split.

    Args:
      root: dataset folder holding ``<split>/<class>/`` sub-folders.
      split: sub-folder name, e.g. ``"train"`` or ``"test"``.
      class_names: classes to read, in label order; default: every sub-folder of
        ``root/split``, sorted. Pass the training split's names when loading a test
        split that may lack some classes.
      limit_per_class: keep only the first N files (sorted by name) of each class.

    Returns:
      ``(paths, labels, class_names)``.

    Raises:
      DatasetNotFoundError: if ``root/split`` or a class folder is missing, or no image
        is found.
      ValueError: if ``limit_per_class`` is not positive.
    """
    if limit_per_class is not None and limit_per_class < 1:
        raise ValueError(f"limit_per_class must be a positive int or None, got {limit_per_class}")
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DatasetNotFoundError(
            f"No folder {split_dir}. Expected the layout {Path(root)}/{split}/<class>/*.jpg "
            f"(one sub-folder per class; extensions {', '.join(IMAGE_EXTENSIONS)})."
        )
    if class_names is None:
        class_names = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            raise DatasetNotFoundError(f"No class folder {class_dir} (class_names={list(class_names)}).")
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if limit_per_class is not None:
            files = files[:limit_per_class]
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise DatasetNotFoundError(f"No images under {split_dir}/<class>/ (extensions {IMAGE_EXTENSIONS}).")
    return paths, np.asarray(labels, dtype=np.int32), tuple(class_names)


def _decode(path: Path, image_size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if image_size is not None and im.size != (image_size[1], image_size[0]):
            im = im.resize((image_size[1], image_size[0]), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _try_decode(path: Path, image_size: tuple[int, int] | None) -> np.ndarray | Exception:
    # PIL's errors ("image file is truncated", "Truncated File Read", ...) carry no path, and one
    # bad file among thousands must be findable: keep the error and report every bad file at once.
    try:
        return _decode(path, image_size)
    except MemoryError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ...
        return err


def _decode_error(root: Path, split: str, paths: list[Path], labels: np.ndarray,
                  class_names: tuple[str, ...], failed: list[tuple[int, Exception]]) -> OSError:
    shown = "".join(
        f"\n  {paths[i]} (split {split!r}, class {class_names[labels[i]]!r}): "
        f"{type(err).__name__}: {err}" for i, err in failed[:5])
    more = f"\n  ... and {len(failed) - 5} more" if len(failed) > 5 else ""
    return OSError(
        f"could not decode {len(failed)} of {len(paths)} image files under {root / split}:{shown}{more}\n"
        "These files are damaged (e.g. cut short by an interrupted download or unpacking) or are not "
        "images: re-download / re-extract the dataset, or delete the listed files and load again."
    )


def _size_error(root: Path, split: str, paths: list[Path], images: list[np.ndarray]) -> ValueError:
    first: dict[tuple[int, int], Path] = {}
    for p, im in zip(paths, images):
        first.setdefault(im.shape[:2], p)
    counts = Counter(im.shape[:2] for im in images).most_common()
    sizes = ", ".join(f"{h}x{w} ({n} file{'s' * (n != 1)}, e.g. {first[(h, w)]})"
                      for (h, w), n in counts[:4])
    more = f", and {len(counts) - 4} more sizes" if len(counts) > 4 else ""
    return ValueError(
        f"images under {root / split} have {len(counts)} different sizes (height x width): "
        f"{sizes}{more}. From Python, pass image_size=(height, width) to load_image_folder / "
        "load_cifar10_folder to resize them while loading. The training CLI (python -m "
        "experiments.train) has no resize option: resize the image files themselves to one size "
        "first (e.g. with PIL, or ImageMagick's mogrify -resize), or delete the odd ones."
    )


def _cache_file(cache_dir: Path, split: str, paths: list[Path], labels: np.ndarray,
                class_names: tuple[str, ...], image_size: tuple[int, int] | None) -> Path:
    # Keyed on every file's path, size and mtime, so edits to the folder invalidate it.
    h = hashlib.sha1()
    h.update(json.dumps([list(class_names), image_size, labels.tolist()]).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return cache_dir / f"imagefolder-{split}-{h.hexdigest()[:16]}.npz"


def load_image_folder(
    root: str | os.PathLike,
    split: str = "train",
    *,
    class_names: Sequence[str] | None = None,
    limit_per_class: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 1,
) -> ArrayDataset:
    """Decodes ``root/<split>/<class>/*`` into a ``uint8`` ``(N, H, W, 3)`` dataset.

    Args:
      root: dataset folder.
      split: sub-folder to read (``"train"``, ``"test"``, ...).
      class_names: classes in label order (default: sorted sub-folders of the split).
      limit_per_class: read only the first N files of each class (a quick subset).
      image_size: resize every image to ``(height, width)`` (or a square side) with
        bilinear filtering; required when the images differ in size.
      cache_dir: folder for an ``.npz`` cache of the decoded arrays (created if
        needed); ``None`` disables caching.
      num_workers: decoding threads.

    Returns:
      An :class:`ArrayDataset` with ``uint8`` RGB images and ``int32`` labels.

    Raises:
      DatasetNotFoundError: if the folder layout is missing.
      OSError: if some files cannot be decoded (damaged or not images); the message lists
        their paths. Nothing is cached then.
      ValueError: for bad ``image_size``/``num_workers``, or images of different sizes
        without ``image_size`` (the message names the sizes and an example file of each).
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    size: tuple[int, int] | None
    if image_size is None:
        size = None
    elif isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)  # type: ignore[assignment]
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    paths, labels, names = list_image_folder(
        root, split, class_names=class_names, limit_per_class=limit_per_class
    )
    cache_path = None
    if cache_dir is not None:
        cache_path = _cache_file(Path(cache_dir), split, paths, labels, names, size)
        if cache_path.exists():
            try:
                with np.load(cache_path) as z:
                    return ArrayDataset(z["image"], z["label"], tuple(str(s) for s in z["class_names"]))
            except Exception as err:  # a damaged cache (e.g. copied half-way) is rebuilt, not fatal
                warnings.warn(f"ignoring unreadable image-folder cache {cache_path} "
                              f"({type(err).__name__}: {err}); decoding the images again",
                              RuntimeWarning, stacklevel=2)
    if num_workers == 1:
        decoded = [_try_decode(p, size) for p in paths]
    else:
        with ThreadPoolExecutor(num_workers) as pool:
            decoded = list(pool.map(lambda p: _try_decode(p, size), paths))
    failed = [(i, d) for i, d in enumerate(decoded) if isinstance(d, Exception)]
    if failed:
        raise _decode_error(Path(root), split, paths, labels, names, failed) from failed[0][1]
    images: list[np.ndarray] = decoded  # type: ignore[assignment]
    if len({im.shape for im in images}) > 1:
        raise _size_error(Path(root), split, paths, images)
    data = ArrayDataset(np.stack(images), labels, names)
    if cache_path is not None:
        _write_cache(cache_path, data)
    return data


def _write_cache(cache_path: Path, data: ArrayDataset) -> None:
    # Written only after every file decoded, to a per-process temporary name and renamed
    # atomically, so a failed or killed run (or two runs at once) never leaves half a cache.
    # The cache only saves time: a failure to write it warns instead of losing the decoded data.
    tmp = cache_path.with_suffix(f".{os.getpid()}.tmp.npz")
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, image=data.image, label=data.label, class_names=np.asarray(data.class_names))
        os.replace(tmp, cache_path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write the image-folder cache {cache_path} ({err}); "
                      "the images will be decoded again next time", RuntimeWarning, stacklevel=3)


def resolve_cifar10_dir(path: str | os.PathLike | None = None) -> Path:
    """Finds a CIFAR-10 image folder from ``path`` or ``$FLATJAX_CIFAR10_DIR``.

    Accepts the folder holding ``train/`` and ``test/``, or its parent when the
    folder is called ``CIFAR-10-images-jpg`` (the name inside the common JPEG archive).

    Args:
      path: explicit location; overrides the environment variable.

    Returns:
      The folder that contains ``train/`` and ``test/``.

    Raises:
      DatasetNotFoundError: with instructions, if no such folder is found.
    """
    given = path if path is not None else os.environ.get(CIFAR10_ENV_VAR)
    if given:
        p = Path(given).expanduser()
        for cand in (p, p / "CIFAR-10-images-jpg"):
            if (cand / "train").is_dir() and (cand / "test").is_dir():
                return cand
        if p.is_file() and p.name.endswith((".tar.gz", ".tgz", ".tar")):
            hint = f"{p} is an archive: unpack it first (tar xzf {p} -C <folder>) and point to the folder."
        else:
            hint = f"{p} has no train/ and test/ sub-folders."
    else:
        hint = f"No path given and ${CIFAR10_ENV_VAR} is not set."
    raise DatasetNotFoundError(
        f"CIFAR-10 image folder not found. {hint}\n"
        f"Pass path=... or set {CIFAR10_ENV_VAR} to a folder laid out as\n"
        "  <dir>/train/<class>/*.jpg|png  and  <dir>/test/<class>/*.jpg|png\n"
        f"with the 10 class folders {', '.join(CIFAR10_CLASSES)} (any PNG/JPEG export of "
        "CIFAR-10 works, e.g. an unpacked CIFAR-10-images-jpg archive).\n"
        'Alternatively install TensorFlow Datasets (pip install "flatjax[tfds]") and use '
        'flatjax.data.load_tfds("cifar10", download=True), or train on the offline '
        "default flatjax.data.load_digits()."
    )


def load_cifar10_folder(
    path: str | os.PathLike | None = None, split: str = "train", **kw
) -> ArrayDataset:
    """Loads CIFAR-10 from an image folder (see :func:`resolve_cifar10_dir`).

    Args:
      path: dataset folder; default ``$FLATJAX_CIFAR10_DIR``.
      split: ``"train"`` (50,000 images) or ``"test"`` (10,000).
      **kw: passed to :func:`load_image_folder` (``limit_per_class``, ``cache_dir``,
        ``num_workers``, ...).

    Returns:
      ``uint8`` ``(N, 32, 32, 3)`` images with the standard CIFAR-10 labels.

    Raises:
      ValueError: if ``split`` is not ``"train"`` or ``"test"``.
      DatasetNotFoundError: if the folder cannot be found.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = resolve_cifar10_dir(path)
    kw.setdefault("class_names", CIFAR10_CLASSES)
    return load_image_folder(root, split, **kw)
