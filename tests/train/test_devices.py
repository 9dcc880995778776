"""The trainer's start-up line about its devices, and the warning when JAX misses an NVIDIA GPU."""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass

import jax
import pytest

from qlora_jax.train import devices as dev


@dataclass
class FakeDevice:
    platform: str
    device_kind: str
    name: str

    def __str__(self) -> str:
        return self.name


@pytest.fixture(autouse=True)
def _no_platform_choice(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)


def test_message_names_platform_and_count_here():
    message, warning = dev.describe_devices(gpu_present=lambda: False)
    n, platform = jax.device_count(), jax.devices()[0].platform
    assert message.startswith(f"training on {n} {platform} device(s): ")
    assert str(jax.devices()[0]) in message or jax.devices()[0].device_kind in message
    assert warning is None


def test_gpu_kinds_are_counted():
    gpus = [FakeDevice("gpu", "NVIDIA H200", f"cuda:{i}") for i in range(8)]
    message, warning = dev.describe_devices(gpus, gpu_present=lambda: pytest.fail("probed on a GPU platform"))
    assert message == "training on 8 gpu device(s): 8x NVIDIA H200" and warning is None


def test_many_cpu_devices_are_shortened():
    cpus = [FakeDevice("cpu", "cpu", f"cpu:{i}") for i in range(6)]
    message, _ = dev.describe_devices(cpus, gpu_present=lambda: False)
    assert message == "training on 6 cpu device(s): cpu:0, cpu:1, cpu:2, cpu:3, ... (6 in all)"


def test_warns_when_a_gpu_is_present_but_jax_is_on_the_cpu(caplog):
    cpus = [FakeDevice("cpu", "cpu", "cpu:0")]
    logger = logging.getLogger("qlora_jax.test_devices")
    with caplog.at_level(logging.INFO, logger=logger.name):
        message, warning = dev.log_devices(logger, cpus, gpu_present=lambda: True)
    assert warning is not None and "NVIDIA GPU is present" in warning and "jax[cuda12]" in warning
    levels = {r.levelno: r.getMessage() for r in caplog.records}
    assert levels[logging.INFO] == message and levels[logging.WARNING] == warning


def test_no_warning_without_a_gpu():
    cpus = [FakeDevice("cpu", "cpu", "cpu:0")]
    assert dev.describe_devices(cpus, gpu_present=lambda: False)[1] is None


def test_an_explicit_cpu_choice_is_not_warned_about(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    message, warning = dev.describe_devices([FakeDevice("cpu", "cpu", "cpu:0")], gpu_present=lambda: True)
    assert warning is None and "(JAX_PLATFORMS=cpu)" in message


def test_probe_reads_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setattr(dev, "PROC_GPUS", str(tmp_path / "no-proc"))
    smi = tmp_path / "nvidia-smi"
    monkeypatch.setattr(dev.shutil, "which", lambda name: str(smi) if name == "nvidia-smi" else None)
    smi.write_text('#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-0)"\n')
    smi.chmod(0o755)
    assert dev.nvidia_gpu_present()
    smi.write_text('#!/bin/sh\necho "No devices were found"\nexit 6\n')
    assert not dev.nvidia_gpu_present()
    smi.write_text("#!/bin/sh\nexec sleep 5\n")
    assert not dev.nvidia_gpu_present(timeout_s=0.2)


def test_probe_reads_proc(tmp_path, monkeypatch):
    (tmp_path / "0000:00:1e.0").mkdir()
    monkeypatch.setattr(dev, "PROC_GPUS", str(tmp_path))
    monkeypatch.setattr(dev.shutil, "which", lambda name: None)
    assert dev.nvidia_gpu_present()
    monkeypatch.setattr(dev, "PROC_GPUS", str(tmp_path / "absent"))
    assert not dev.nvidia_gpu_present()


def test_probe_survives_a_broken_nvidia_smi(monkeypatch):
    monkeypatch.setattr(dev, "PROC_GPUS", "/nonexistent")
    monkeypatch.setattr(dev.shutil, "which", lambda name: "/usr/bin/nvidia-smi")

    def broken(*args, **kwargs):
        raise subprocess.SubprocessError("driver gone")

    monkeypatch.setattr(dev.subprocess, "run", broken)
    assert not dev.nvidia_gpu_present()
