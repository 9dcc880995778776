"""Several processes, one run: ``jax.distributed`` start-up and the few host-side collectives the trainer needs.

Start-up (``initialize_distributed``), in order of precedence:

1. ``--mesh.coordinator`` / ``--mesh.num_processes`` / ``--mesh.process_id``, else the
   environment variables ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
   ``JAX_PROCESS_ID``: ``jax.distributed.initialize(coordinator, num_processes, process_id)``;
   a value left out is for JAX to find in the cluster's environment.
2. Else, inside a cluster JAX detects itself (SLURM, Open MPI, a TPU pod slice's variables):
   ``jax.distributed.initialize()`` with no arguments.
3. Else one process: nothing to start.

The CPU backend needs a collectives implementation to compute across processes: gloo is
selected before start-up (it does not concern GPUs). When a peer has not arrived after
``timeout_s``, JAX aborts the process from C++ with a bare ``DEADLINE_EXCEEDED``; a watchdog
fires a moment before and ends the process with an error that names the coordinator, the
process and what to check instead.

After start-up every process runs the same program (SPMD): every jitted step, every
``gather_to_host`` and every ``allgather_ints`` must be called by all processes in the same order.
Side effects (files, the progress bar) are for ``is_main_process()`` only.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
CLUSTER_VARS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES")
WATCHDOG_EXIT = 3  # exit status of a process whose peers never arrived


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def resolve_processes(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
                      env: Mapping[str, str] | None = None) -> dict | None:
    """The arguments for ``jax.distributed.initialize``; None for one process. See the module docstring.

    Flags win over the environment. Returns ``{"coordinator_address", "num_processes", "process_id"}``
    (None where JAX should detect the value itself); ``{}`` inside a cluster JAX detects.
    """
    env = os.environ if env is None else env
    coordinator = coordinator or env.get(ENV_COORDINATOR, "").strip()
    num = num_processes or _int_env(env, ENV_NUM_PROCESSES)
    pid = process_id if process_id >= 0 else _int_env(env, ENV_PROCESS_ID)
    if num is not None and num < 1:
        raise ValueError(f"mesh.num_processes ({ENV_NUM_PROCESSES})={num} must be >= 1")
    if pid is not None and (pid < 0 or (num is not None and pid >= num)):
        raise ValueError(f"mesh.process_id ({ENV_PROCESS_ID})={pid} must be in [0, num_processes={num})")
    if coordinator and ":" not in coordinator:
        raise ValueError(f"mesh.coordinator ({ENV_COORDINATOR})={coordinator!r} must be host:port")
    if num == 1 and not coordinator:
        return None
    if coordinator or num is not None or pid is not None:
        return {"coordinator_address": coordinator or None, "num_processes": num, "process_id": pid}
    if any(v in env for v in CLUSTER_VARS):
        return {}
    return None


def _select_cpu_collectives() -> None:
    """gloo, so the CPU backend can run collectives across processes (unless one was chosen already)."""
    try:
        if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # a jax without the option: nothing to choose
        pass


def _watchdog(timeout_s: float, where: str) -> threading.Timer:
    def fire():
        message = (f"jax.distributed: {where}: not every process reached the coordinator within {timeout_s:.0f} s "
                   "(mesh.timeout_s). Check that all processes were started with the same coordinator address and "
                   "process count and distinct process ids, that process 0 runs on the coordinator's host, and "
                   "that its port is reachable from every host")
        log.error("%s", message)
        print(message, file=sys.stderr, flush=True)
        os._exit(WATCHDOG_EXIT)

    timer = threading.Timer(timeout_s, fire)
    timer.daemon = True
    return timer


def initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
                           timeout_s: float = 300.0, env: Mapping[str, str] | None = None) -> bool:
    """Starts ``jax.distributed`` when several processes are asked for; True when it ran (or already had)."""
    if jax.distributed.is_initialized():
        return True
    kwargs = resolve_processes(coordinator, num_processes, process_id, env)
    if kwargs is None:
        return False
    _select_cpu_collectives()
    where = (f"process {kwargs.get('process_id', '?')} of {kwargs.get('num_processes', '?')}, coordinator "
             f"{kwargs.get('coordinator_address') or '(from the cluster)'}")
    log.info("jax.distributed: starting %s (waiting up to %.0f s for the others)", where, timeout_s)
    timer = _watchdog(timeout_s, where)
    timer.start()
    try:
        # JAX's own deadline comes after the watchdog's, which says more
        jax.distributed.initialize(**kwargs, initialization_timeout=int(timeout_s) + 30)
    except (ValueError, RuntimeError) as err:
        raise RuntimeError(f"jax.distributed could not start ({where}): {err}. Set mesh.coordinator, "
                           "mesh.num_processes and mesh.process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                           "JAX_PROCESS_ID) on every process") from err
    finally:
        timer.cancel()
    log.info("jax.distributed: process %d of %d, %d local of %d devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def is_main_process() -> bool:
    """True on the process that writes files and shows progress (process 0)."""
    return jax.process_index() == 0


def process_tag() -> str:
    """'' on one process, else 'p1/2' (process index / count): what log lines and per-process files carry."""
    return "" if jax.process_count() == 1 else f"p{jax.process_index()}/{jax.process_count()}"


def gather_to_host(tree):
    """``tree``'s arrays as whole numpy arrays on every process (a collective when several processes run)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def allgather_ints(values) -> np.ndarray:
    """``(P, *shape)``: every process's int64 ``values`` (the same shape on each), by process index."""
    values = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return values[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).reshape((jax.process_count(), *values.shape))
