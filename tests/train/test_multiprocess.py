"""``scripts/train.py`` as several real processes on loopback (jax.distributed, gloo CPU collectives).

Every run uses ``--data.streams 2``: the same global batches whatever the number of processes,
so a run of two processes x two devices is held to one process x four devices within 2e-4,
the float32 reduction-order noise of a different device layout (as 8 simulated devices are).
Each process is bounded by a timeout; a run that fails kills its peers.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from tinymodel import write_chats, write_tiny_model

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 8
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(str(base / "model")), write_chats(str(base / "chats.jsonl"), 300)


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory, monkeypatch_module):
    """One persistent XLA cache for the module's runs: a restarted run compiles nothing again."""
    monkeypatch_module.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("xla_cache")))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _args(tiny, out, *extra):
    model, chats = tiny
    return ["--model.path", model, "--data.train_path", chats, "--data.seq_len", "64", "--data.eval_fraction", "0.1",
            "--data.streams", "2", "--loop.steps", str(STEPS), "--loop.batch_size", "8", "--loop.eval_every", "4",
            "--loop.eval_batches", "2", "--loop.sample_tokens", "0", "--checkpoint.every", "2", "--checkpoint.keep", "3",
            "--optim.learning_rate", "3e-3", "--output.dir", str(out), *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tiny, out, processes: int, devices: int, *extra) -> list[subprocess.Popen]:
    """``processes`` trainers of ``devices`` CPU devices each, on a fresh loopback port."""
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
                        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *_args(tiny, out, *extra)]
    if processes > 1:
        cmd += ["--mesh.coordinator", f"127.0.0.1:{_free_port()}", "--mesh.num_processes", str(processes),
                "--mesh.timeout_s", "120"]
    os.makedirs(out, exist_ok=True)
    return [subprocess.Popen(cmd + (["--mesh.process_id", str(i)] if processes > 1 else []), env=env,
                             stdout=open(os.path.join(out, f"stdout.{i}"), "w"), stderr=subprocess.STDOUT)
            for i in range(processes)]


def _finish(procs, out) -> None:
    """Waits for all; on a failure or the timeout, kills the rest and shows the logs."""
    deadline = time.time() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    logs = "\n".join(f"--- process {i}\n" + pathlib.Path(out, f"stdout.{i}").read_text()[-3000:]
                     for i in range(len(procs)))
    assert codes == [0] * len(procs), logs


def _train(tiny, out, processes, devices, *extra) -> pathlib.Path:
    _finish(_start(tiny, out, processes, devices, *extra), out)
    return pathlib.Path(out)


def _losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was written twice: metrics.jsonl is process 0's alone"
    return {r["step"]: r["loss"] for r in rows if "loss" in r} | {-r["step"]: r["eval_loss"] for r in rows
                                                                  if "eval_loss" in r}


def _close(ours: dict, ref: dict, steps) -> None:
    np.testing.assert_allclose([ours[s] for s in steps], [ref[s] for s in steps], rtol=2e-4)


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    """The reference: one process with four devices."""
    return _losses(_train(tiny, tmp_path_factory.mktemp("one"), 1, 4))


@pytest.fixture(scope="module")
def fsdp_run(tiny, tmp_path_factory):
    """Two processes x two devices, the fsdp axis over all four (spanning both processes), with samples."""
    return _train(tiny, tmp_path_factory.mktemp("fsdp"), 2, 2, "--mesh.data", "1", "--mesh.fsdp", "4",
                  "--loop.sample_prompt", "hello", "--loop.sample_tokens", "4")


def test_two_processes_with_fsdp_across_them_match_one(fsdp_run, one_process):
    ours = _losses(fsdp_run)
    assert sorted(s for s in ours if s > 0) == list(range(1, STEPS + 1))
    _close(ours, one_process, sorted(one_process))  # train and held-out losses
    summary = json.loads((fsdp_run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 4 and summary["fsdp_sharded_leaves"] > 0
    assert summary["sample_before"] is not None and "sample_after" in summary


def test_side_effects_are_process_zeros_and_logs_name_the_process(fsdp_run):
    assert (fsdp_run / "adapter" / "adapter_model.safetensors").exists() and (fsdp_run / "loss.png").exists()
    assert "p1/2 INFO" in (fsdp_run / "train.p1.log").read_text()
    assert "p0/2 INFO" in (fsdp_run / "train.log").read_text()
    assert '"last_loss"' in (fsdp_run / "stdout.0").read_text()  # the report is process 0's
    assert '"last_loss"' not in (fsdp_run / "stdout.1").read_text()
    checkpoints = sorted(int(p.name) for p in (fsdp_run / "checkpoints").iterdir() if p.name.isdigit())
    assert checkpoints[-1] == STEPS


def test_resume_on_one_process_from_two(fsdp_run, tiny, one_process, tmp_path):
    """The two-process checkpoint of step 4 restores onto one process with two devices and continues."""
    out = tmp_path / "moved"
    shutil.copytree(fsdp_run, out)
    for p in (out / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > 4:
            shutil.rmtree(p)
    _train(tiny, out, 1, 2, "--checkpoint.resume", "true")
    assert "resumed from step 4" in (out / "train.log").read_text()
    _close(_losses(out), one_process, range(5, STEPS + 1))


def test_sigkill_one_process_then_resume_both(tiny, one_process, tmp_path):
    """Process 1 is SIGKILLed after step 5 (process 0, stuck in a collective, is then killed too: JAX
    would abort it after its heartbeat timeout); both restart with checkpoint.resume and finish with the
    losses of an uninterrupted run."""
    out = tmp_path / "killed"
    procs = _start(tiny, out, 2, 2, "--mesh.data", "4")
    metrics, deadline = out / "metrics.jsonl", time.time() + TIMEOUT_S
    try:
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if metrics.exists() and '"step": 5,' in metrics.read_text():
                break
            time.sleep(0.02)
        assert all(p.poll() is None for p in procs), "the run ended before it could be killed"
        procs[1].send_signal(signal.SIGKILL)
    finally:
        time.sleep(1.0)
        for p in procs:
            p.kill()
            p.wait()
    killed_at = max(s for s in _losses(out))
    assert killed_at < STEPS
    _train(tiny, out, 2, 2, "--mesh.data", "4", "--checkpoint.resume", "true")
    ours = _losses(out)
    assert "resumed from step" in (out / "train.log").read_text()
    assert sorted(s for s in ours if s > 0) == list(range(1, STEPS + 1))
    _close(ours, one_process, sorted(one_process))
