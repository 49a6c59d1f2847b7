"""Multi-process runs of the training CLI: one JAX process per host (or per group of local devices).

Every process runs the same command; :func:`initialize` starts JAX's distributed runtime before any device
is touched, after which ``jax.devices()`` lists the devices of every process and the CLI's ``"data"`` or
``(probe, data)`` mesh spans them all. Each process reads only its rows of every global batch
(:func:`flatjax.data.sharding.process_rows`), all processes take part in every orbax checkpoint (each saves
and restores its own shards; replicated arrays are written once), and process 0 alone writes metrics,
tables and exported parameters and shows the progress bar.

Start-up: ``--distributed`` detects the cluster (Cloud TPU pod slices, SLURM, Open MPI: JAX reads the
coordinator, process count and id from the environment); ``--coordinator-address HOST:PORT
--num-processes N --process-id I`` name them explicitly (process 0 serves the coordinator on HOST:PORT).
On CPU the processes exchange collectives over gloo. A process that dies stops sending heartbeats; after
``--heartbeat-timeout`` seconds JAX's coordination service terminates every other process with the error
"Terminating process because the JAX distributed service detected fatal errors ... another task died",
so a run never hangs on a lost peer.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

FLAGS = ("coordinator_address", "num_processes", "process_id")


def add_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("multi-process runs (one JAX process per host; every process runs the same "
                                  "command)")
    g.add_argument("--distributed", action="store_true",
                   help="start JAX's distributed runtime, detecting coordinator, process count and id from the "
                        "cluster (Cloud TPU pod slice, SLURM, Open MPI)")
    g.add_argument("--coordinator-address", help="HOST:PORT where process 0 serves the coordinator")
    g.add_argument("--num-processes", type=int, help="number of processes (with --coordinator-address)")
    g.add_argument("--process-id", type=int, help="this process's id, 0 .. num-processes - 1")
    g.add_argument("--heartbeat-timeout", type=int, default=100,
                   help="seconds after which a silent process counts as dead and the others exit (default 100)")
    g.add_argument("--init-timeout", type=int, default=300,
                   help="seconds to wait for every process to join (default 300)")


def initialize(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Starts JAX's distributed runtime when the flags ask for it (``parser.error`` for flags that cannot)."""
    given = [getattr(args, f) is not None for f in FLAGS]
    if not args.distributed and not any(given):
        return
    if any(given) and not all(given):
        parser.error("--coordinator-address, --num-processes and --process-id go together (or give --distributed "
                     "alone on a Cloud TPU pod slice, SLURM or Open MPI, where JAX detects them)")
    if all(given):
        host, _, port = args.coordinator_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            parser.error(f"--coordinator-address must be HOST:PORT, got {args.coordinator_address!r}")
        if args.num_processes < 1:
            parser.error(f"--num-processes must be an integer >= 1, got {args.num_processes}")
        if not 0 <= args.process_id < args.num_processes:
            parser.error(f"--process-id must be in 0 .. {args.num_processes - 1}, got {args.process_id}")
    for name in ("heartbeat_timeout", "init_timeout"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(args, name)}")
    # CPU devices of different processes exchange collectives over gloo (GPUs and TPUs use their own)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {"initialization_timeout": args.init_timeout, "heartbeat_timeout_seconds": args.heartbeat_timeout}
    if all(given):  # serve on the address given, not on every interface of the host
        kw.update(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                  process_id=args.process_id, coordinator_bind_address=args.coordinator_address)
    jax.distributed.initialize(**kw)


def is_main() -> bool:
    """Whether this process writes files and logs (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches this point (a no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true in any process: e.g. Ctrl-C on one process stops all after the same update."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
