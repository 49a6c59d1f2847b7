"""Placing host batches on devices, split along the batch axis."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def data_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = "data") -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices) with one axis, ``axis_name``."""
    devs = np.asarray(jax.devices() if devices is None else list(devices))
    return Mesh(devs, (axis_name,))


def process_rows(mesh: Mesh, batch_size: int, *, axis_name: str = "data") -> tuple[int, int]:
    """The rows ``[start, stop)`` of every global batch that this process's devices hold.

    With the batch split over ``axis_name`` (``NamedSharding(mesh, P(axis_name))``), a process needs only the rows
    of its own devices: on a data mesh over every process, its block of ``batch_size / process_count`` rows; on a
    ``(probe, data)`` mesh whose probe groups lie on different processes, the whole batch (each group holds a
    replica). A single process holds ``(0, batch_size)``. Feed these rows to :func:`shard_batch` with
    ``global_size=batch_size`` (e.g. ``BatchIterator(..., rows=process_rows(mesh, batch_size))``).

    Raises:
      ValueError: if ``batch_size`` is not divisible by the devices along ``axis_name``, or this process's
        rows are not one contiguous block (a mesh whose device order interleaves processes).
    """
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name must be one of the mesh axes {tuple(mesh.shape)}, got {axis_name!r}")
    if batch_size % mesh.shape[axis_name]:
        raise ValueError(f"batch_size must be divisible by the {mesh.shape[axis_name]} devices of mesh axis "
                         f"{axis_name!r}, got {batch_size}")
    held = set()
    for index in NamedSharding(mesh, P(axis_name)).addressable_devices_indices_map((batch_size,)).values():
        held.update(range(batch_size)[index[0]])
    start, stop = min(held), max(held) + 1
    if len(held) != stop - start:
        raise ValueError(f"this process's devices hold rows {sorted(held)} of each batch, not one block: build the "
                         "mesh from jax.devices() in order (each process's devices adjacent along the batch axis)")
    return start, stop


def shard_batch(
    batch: Mapping[str, Any], mesh: Mesh | None = None, *, axis_name: str = "data", global_size: int | None = None
) -> dict[str, jax.Array]:
    """Puts every array of ``batch`` on the mesh, split along its leading (batch) axis.

    Uses ``NamedSharding(mesh, P(axis_name))``: device ``i`` of the axis holds rows
    ``[i * B/n, (i + 1) * B/n)``; other mesh axes (if any) hold replicas.

    Multi-process runs: with ``global_size=B``, ``batch`` holds this process's rows
    :func:`process_rows` of the global batch of ``B`` rows, and each device gets its part of
    them (exact for any mesh layout). Without it, each process passes an equal, contiguous share
    (``jax.make_array_from_process_local_data``).

    Args:
      batch: dict of host arrays with a common leading dimension.
      mesh: device mesh; default :func:`data_mesh` over all devices.
      axis_name: mesh axis to split the batch over.
      global_size: rows of the global batch (``batch`` then holds this process's rows of it).

    Returns:
      A dict of globally sharded ``jax.Array`` s.

    Raises:
      ValueError: if ``axis_name`` is not a mesh axis or the local batch size is not
        divisible by the number of local devices along it (or, with ``global_size``, is
        not this process's number of rows).
    """
    mesh = data_mesh(axis_name=axis_name) if mesh is None else mesh
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name must be one of the mesh axes {tuple(mesh.shape)}, got {axis_name!r}")
    sharding = NamedSharding(mesh, P(axis_name))
    if global_size is not None:
        start, stop = process_rows(mesh, global_size, axis_name=axis_name)

        def local_rows(index: slice) -> slice:  # a device's rows of the global batch, in this process's rows
            rows = range(global_size)[index]
            return slice(rows.start - start, rows.stop - start)

        out = {}
        for key, value in batch.items():
            x = np.asarray(value)
            if x.ndim == 0 or x.shape[0] != stop - start:
                raise ValueError(f"batch[{key!r}] must hold this process's {stop - start} rows [{start}, {stop}) of "
                                 f"the global batch of {global_size}, got leading dimension {x.shape[:1]}")
            out[key] = jax.make_array_from_callback((global_size, *x.shape[1:]), sharding,
                                                    lambda index, x=x: x[local_rows(index[0]), *index[1:]])
        return out
    n = mesh.shape[axis_name] // jax.process_count()
    out = {}
    for key, value in batch.items():
        x = np.asarray(value)
        if x.ndim == 0 or x.shape[0] % max(n, 1):
            raise ValueError(
                f"batch[{key!r}] has leading dimension {x.shape[:1]}, which must be divisible by "
                f"the {n} devices of mesh axis {axis_name!r} (use drop_last=True or pad)"
            )
        if jax.process_count() == 1:
            out[key] = jax.device_put(x, sharding)
        else:
            out[key] = jax.make_array_from_process_local_data(sharding, x)
    return out
