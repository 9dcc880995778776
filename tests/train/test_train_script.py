"""``scripts/train.py`` end to end on a tiny model: outputs, exact resume after SIGKILL, several devices."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tblog import assert_tensorboard_matches_metrics
from tinymodel import write_chats, write_tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(str(base / "model")), write_chats(str(base / "chats.jsonl"), 400)


def _args(tiny, out, *extra):
    model, chats = tiny
    return ["--model.path", model, "--data.train_path", chats, "--data.seq_len", "64", "--data.eval_fraction", "0.1",
            "--loop.steps", str(STEPS), "--loop.batch_size", "8", "--loop.eval_every", "4", "--loop.eval_batches", "2",
            "--loop.sample_prompt", "hello", "--loop.sample_tokens", "6", "--checkpoint.every", "2",
            "--checkpoint.keep", "3", "--optim.learning_rate", "3e-3", "--output.dir", str(out), *extra]


def _env(devices: int = 1):
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _train(tiny, out, *extra, devices: int = 1):
    """Runs the trainer with stderr a pipe: the progress shows as plain lines, not the terminal's bar."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *_args(tiny, out, *extra)],
                          capture_output=True, text=True, env=_env(devices), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def _full(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, _train(tiny, out, "--output.export_gguf", "q8_0").stderr


@pytest.fixture(scope="module")
def full_run(_full):
    return _full[0]


@pytest.fixture(scope="module")
def full_run_stderr(_full):
    return _full[1]


def test_outputs(full_run):
    out = pathlib.Path(full_run)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 12] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert all(r["finite"] and r["tokens_per_s"] > 0 and r["lr"] > 0 for r in rows if "loss" in r)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_loss"] < summary["first_loss"] and "sample_before" in summary and "sample_after" in summary
    assert (out / "loss.png").stat().st_size > 1000 and (out / "config.json").exists()
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [8, 10, 12]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 16
    # TensorBoard, read back with tensorboard's EventAccumulator: every metrics.jsonl number at its step
    scalars = assert_tensorboard_matches_metrics(out)
    assert sorted(scalars["train/loss"]) == steps and sorted(scalars["eval/loss"]) == [0, 4, 8, 12]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "eval/ppl"} <= set(scalars)


def test_progress_lines_in_a_log(full_run_stderr):
    """Off a terminal the progress is one plain line per logged step (no carriage returns), log lines kept."""
    assert "\r" not in full_run_stderr
    lines = [line for line in full_run_stderr.splitlines() if line.startswith("step ") and " tok/s | ETA " in line]
    assert [line.split()[1] for line in lines] == [f"{s}/{STEPS}" for s in range(1, STEPS + 1)]
    assert "step 4: held-out loss" in full_run_stderr


def test_gguf_export_is_the_merged_model(full_run, tiny):
    """``--output.export_gguf q8_0``: model.gguf holds the base (NF4, as trained) with the exported adapter
    merged in, its matrices q8_0-rounded, and the tokenizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from qlora_jax.models import LoraConfig
    from qlora_jax.models.export import merged_tensors
    from qlora_jax.models.gguf_loader import GGUFModel
    from qlora_jax.models.loaders import from_pretrained

    _, v, tok = from_pretrained(tiny[0], adapter=os.path.join(full_run, "adapter"))
    lora = json.loads((pathlib.Path(full_run) / "adapter" / "adapter_config.json").read_text())
    merged = merged_tensors(v, LoraConfig(rank=lora["r"], alpha=lora["lora_alpha"]))
    gg = GGUFModel(os.path.join(full_run, "model.gguf"))
    back = dict(gg.tensors())
    assert sorted(back) == sorted(merged)
    for name, w in merged.items():
        want = w if w.ndim == 1 else dequantize(quantize(w, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
        np.testing.assert_array_equal(back[name], want, err_msg=name)
    assert gg.tokenizer.encode("hello <|im_end|>") == tok.encode("hello <|im_end|>")
    assert gg.tokenizer.chat_template == tok.chat_template


@pytest.mark.oracle
def test_peft_loads_the_adapter(full_run, tiny):
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.numpy import load_file

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(full_run, "adapter"))
    ours = load_file(os.path.join(full_run, "adapter", "adapter_model.safetensors"))
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items() if "lora_" in k}
    assert len(theirs) == len(ours) == 2 * 7 * 2
    for name, value in ours.items():
        key = name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        np.testing.assert_array_equal(theirs[key], value)
    assert float(np.abs(ours["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]).max()) > 0  # trained


def test_sigkill_then_resume_gives_the_same_losses(full_run, tiny, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *_args(tiny, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any('"step": 7,' in line for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(out))
    assert killed_at < STEPS
    # a half-written checkpoint of a later step must be ignored
    (out / "checkpoints" / f"{STEPS - 1}.orbax-checkpoint-tmp-1").mkdir(parents=True)
    _train(tiny, out, "--checkpoint.resume", "true")
    resumed, reference = _losses(out), _losses(full_run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == reference  # bit for bit, step for step
    # the resumed writer purged the killed run's events after the checkpoint: TensorBoard shows metrics.jsonl
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert sorted(assert_tensorboard_matches_metrics(out)["train/loss"]) == list(range(1, STEPS + 1))


@pytest.mark.e2e
def test_several_devices_match_one(full_run, tiny, tmp_path):
    """8 simulated devices (data 4 x fsdp 2), with remat full: same losses within float32 reduction-order noise."""
    out = tmp_path / "mesh"
    proc = _train(tiny, out, "--mesh.data", "4", "--mesh.fsdp", "2", "--model.remat", "full", devices=8)
    assert json.loads((out / "summary.json").read_text())["devices"] == 8, proc.stderr[-2000:]
    ours, ref = _losses(out), _losses(full_run)
    np.testing.assert_allclose([ours[s] for s in sorted(ours)], [ref[s] for s in sorted(ref)], rtol=2e-4)


@pytest.mark.e2e
def test_resume_onto_more_devices(full_run, tiny, tmp_path):
    """A checkpoint written on one device restores onto a mesh of eight and continues."""
    out = tmp_path / "reshard"
    shutil.copytree(full_run, out)  # the one-device run, cut back to its step-8 checkpoint
    for p in (out / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > 8:
            shutil.rmtree(p)
    _train(tiny, out, "--checkpoint.resume", "true", "--mesh.data", "4", "--mesh.fsdp", "2", devices=8)
    ours, ref = _losses(out), _losses(full_run)
    np.testing.assert_allclose([ours[s] for s in range(9, STEPS + 1)], [ref[s] for s in range(9, STEPS + 1)], rtol=2e-4)


@pytest.mark.e2e
def test_activation_offload_and_mlp_tiles_train_as_remat_full(tiny, tmp_path):
    """``--model.remat offload --model.mlp_tile 16`` (64-token rows: four MLP tiles) against remat full, both
    without dropout (each MLP tile draws its own masks): on the CPU offload is remat full's program and the
    tiles the same sums per row, so the losses agree within float32 reduction-order noise."""
    runs = {}
    steps = 6  # the losses are what is compared: no samples, checkpoints or plot (the full run checks those)
    for name, extra in (("full", ("--model.remat", "full")),
                        ("offload", ("--model.remat", "offload", "--model.mlp_tile", "16"))):
        out = tmp_path / name
        _train(tiny, out, "--lora.dropout", "0", "--loop.steps", str(steps), "--loop.sample_tokens", "0",
               "--checkpoint.every", "0", "--output.plot", "false", *extra)
        runs[name] = _losses(out)
    ours, ref = runs["offload"], runs["full"]
    assert sorted(ours) == sorted(ref) and len(ref) == steps
    np.testing.assert_allclose([ours[s] for s in sorted(ours)], [ref[s] for s in sorted(ref)], rtol=2e-4)


def _parquet_of_three_formats(chats, path):
    """The tiny chats as one Parquet table of three formats (ShareGPT conversations, Alpaca, text; nulls where a
    row lacks a column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for rec in map(json.loads, open(chats)):
        if "messages" in rec:
            rec = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                                     for m in rec["messages"]]}
        elif "prompt" in rec:
            rec = {"instruction": rec["prompt"], "input": "", "output": rec["completion"]}
        rows.append(rec)
    pq.write_table(pa.Table.from_struct_array(pa.array(rows)), path, row_group_size=64)
    return str(path)


@pytest.mark.e2e
def test_dora_trains_on_parquet_and_exports_its_magnitudes(tiny, tmp_path):
    """One run checked for two things (each was a run of its own):

    * ``--lora.use_dora true``: the magnitudes train with A and B, checkpoint, and export under peft's key.
    * The data are the tiny chats as one Parquet table of ShareGPT, Alpaca and text records: every record is
      usable (400 read, no bad record) and the model learns from them (the held-out loss falls)."""
    from safetensors.numpy import load_file

    path = _parquet_of_three_formats(tiny[1], tmp_path / "chats.parquet")
    out = tmp_path / "dora"
    _train((tiny[0], path), out, "--lora.use_dora", "true", "--loop.steps", "6", "--loop.eval_every", "3",
           "--checkpoint.every", "3", "--loop.sample_tokens", "0", "--output.plot", "false")
    log = (out / "train.log").read_text()
    assert "chats.parquet (Parquet): 400 records" in log and "bad record" not in log
    assert sorted(_losses(out)) == list(range(1, 7)) and all(np.isfinite(list(_losses(out).values())))
    evals = [r["eval_loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    magnitudes = [k for k in tensors if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == 2 * 7  # two layers, seven projections
    # the magnitudes moved off their init: the row norms of the NF4 base
    import jax.numpy as jnp

    import qlora_jax as qj
    from qlora_jax.models import LoraConfig

    _, init, _ = qj.from_pretrained(tiny[0], lora=LoraConfig(use_dora=True), dtype=jnp.float32)
    for i in range(2):
        start = np.asarray(init["params"]["layers"]["self_attn"]["q_proj"]["lora_magnitude"][i])
        trained = tensors[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_magnitude_vector"]
        assert 1e-4 < np.abs(trained - start).max() < 0.1 * np.abs(start).max()
