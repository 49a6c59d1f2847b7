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


def shard_batch(
    batch: Mapping[str, Any], mesh: Mesh | None = None, *, axis_name: str = "data"
) -> dict[str, jax.Array]:
    """Puts every array of ``batch`` on the mesh, split along its leading (batch) axis.

    Uses ``NamedSharding(mesh, P(axis_name))``: device ``i`` of the axis holds rows
    ``[i * B/n, (i + 1) * B/n)``; other mesh axes (if any) hold replicas. In a
    multi-process run each process passes its local part of the global batch.

    Args:
      batch: dict of host arrays with a common leading dimension.
      mesh: device mesh; default :func:`data_mesh` over all devices.
      axis_name: mesh axis to split the batch over.

    Returns:
      A dict of globally sharded ``jax.Array`` s.

    Raises:
      ValueError: if ``axis_name`` is not a mesh axis or the local batch size is not
        divisible by the number of local devices along it.
    """
    mesh = data_mesh(axis_name=axis_name) if mesh is None else mesh
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name must be one of the mesh axes {tuple(mesh.shape)}, got {axis_name!r}")
    sharding = NamedSharding(mesh, P(axis_name))
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
