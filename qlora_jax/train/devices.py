"""Which devices a run trains on, said at start, and a warning when JAX misses an NVIDIA GPU.

A fresh venv with the CPU-only jaxlib on a GPU machine trains on the CPU without a word;
``describe_devices`` names the platform, the device count and kinds, and when the platform is
the CPU while the machine has an NVIDIA GPU (``/proc/driver/nvidia/gpus`` has an entry, or
``nvidia-smi -L`` lists one) it returns a warning saying how to get the CUDA plugin. The probe
is an argument, so tests need no GPU.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

import jax

PROC_GPUS = "/proc/driver/nvidia/gpus"
GPU_MISSED = ("an NVIDIA GPU is present but JAX sees only the CPU: install jax[cuda12] (or jax[cuda13] for "
              "CUDA 13 drivers); bash scripts/setup_env.sh installs it when nvidia-smi works")


def nvidia_gpu_present(timeout_s: float = 5.0) -> bool:
    """True when the machine has an NVIDIA GPU: the driver lists one in /proc, or ``nvidia-smi -L`` does."""
    try:
        if os.listdir(PROC_GPUS):
            return True
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        proc = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0 and any(line.startswith("GPU ") for line in proc.stdout.splitlines())


def _kinds(devices: Sequence[Any]) -> str:
    """'8x NVIDIA H200', or the device names where the kind is only the platform ('cpu:0, cpu:1')."""
    if all(d.device_kind == d.platform for d in devices):
        names = [str(d) for d in devices[:4]]
        return ", ".join(names) + (f", ... ({len(devices)} in all)" if len(devices) > 4 else "")
    return ", ".join(f"{n}x {kind}" for kind, n in collections.Counter(d.device_kind for d in devices).items())


def describe_devices(devices: Sequence[Any] | None = None,
                     gpu_present: Callable[[], bool] = nvidia_gpu_present) -> tuple[str, str | None]:
    """``(message, warning or None)`` for the devices a run trains on (default ``jax.devices()``)."""
    devices = list(jax.devices() if devices is None else devices)
    platform = devices[0].platform
    message = f"training on {len(devices)} {platform} device(s): {_kinds(devices)}"
    if jax.process_count() > 1:
        message += f" over {jax.process_count()} processes"
    warning = None
    if platform == "cpu":
        chosen = os.environ.get("JAX_PLATFORMS", "")
        if chosen and not any(p in chosen for p in ("cuda", "gpu")):
            message += f" (JAX_PLATFORMS={chosen})"  # the CPU was asked for: no warning
        elif gpu_present():
            warning = GPU_MISSED
    return message, warning


def log_devices(logger: logging.Logger, devices: Sequence[Any] | None = None,
                gpu_present: Callable[[], bool] = nvidia_gpu_present) -> tuple[str, str | None]:
    """Logs ``describe_devices``: the message at INFO, the warning (if any) at WARNING; returns both."""
    message, warning = describe_devices(devices, gpu_present)
    logger.info("%s", message)
    if warning:
        logger.warning("%s", warning)
    return message, warning
