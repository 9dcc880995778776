"""``scripts/train.py --loop.objective dpo | orpo`` end to end on a tiny model: metrics, resume, a starting adapter."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from tinymodel import write_tiny_model

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = pathlib.Path(__file__).resolve().parents[2]
WORDS = ["yes", "no", "maybe", "hello", "world", "cat", "dog", "blue", "red", "fine"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    path = base / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(120):
            prompt = " ".join(rng.choice(WORDS, size=4))
            f.write(json.dumps({"prompt": prompt, "chosen": " yes " + prompt,
                                "rejected": " " + " ".join(rng.choice(WORDS, size=5))}) + "\n")
            if i == 7:
                f.write(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")  # line 9: no 'rejected'
    return write_tiny_model(str(base / "model")), str(path)


def _train(tiny, out, *extra):
    model, pairs = tiny
    args = ["--model.path", model, "--data.train_path", pairs, "--data.seq_len", "32", "--data.eval_fraction", "0.1",
            "--loop.objective", "dpo", "--loop.steps", "6", "--loop.batch_size", "4", "--loop.eval_every", "3",
            "--loop.eval_batches", "2", "--loop.sample_tokens", "0", "--checkpoint.every", "3",
            "--optim.learning_rate", "1e-2", "--lora.dropout", "0", "--output.dir", str(out), *extra]
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def dpo_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    return out, _train(tiny, out).stderr


def test_dpo_trains_with_trls_metrics(dpo_run):
    out, stderr = dpo_run
    rows = _rows(out)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    names = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected"}
    assert names <= set(train[0])
    # step 1: the adapter starts at B = 0, so the policy is the reference: every reward 0, loss log 2, up to
    # float32 rounding of sequence log-probs of ~100 nats (two programs): beta * 100 * 2^-23 * a few tokens' sums
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(train[0]["rewards/margins"]) < 1e-5
    assert train[-1]["rewards/margins"] > 0 and train[-1]["loss"] < math.log(2)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert abs(evals[0]["eval_rewards/margins"]) < 1e-5 < evals[-1]["eval_rewards/margins"]
    assert {f"eval_{n}" for n in names} <= set(evals[-1])
    assert "line 9: field 'rejected' is missing" in stderr  # the bad record, named and skipped
    assert " | acc " in stderr and " | margin " in stderr  # the progress lines show them
    assert (out / "rewards.png").stat().st_size > 1000 and (out / "adapter" / "adapter_config.json").exists()


def test_dpo_resumes_exactly(dpo_run, tiny, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(dpo_run[0], out)
    shutil.rmtree(out / "checkpoints" / "6")
    _train(tiny, out, "--checkpoint.resume", "true")
    ours, ref = _rows(out), _rows(dpo_run[0])
    assert [r["loss"] for r in ours if "loss" in r] == [r["loss"] for r in ref if "loss" in r]


def test_orpo_from_a_starting_adapter(dpo_run, tiny, tmp_path):
    """``--model.adapter``: the run starts from the DPO run's adapter (its rank and alpha), ORPO's metrics."""
    out = tmp_path / "orpo"
    _train(tiny, out, "--loop.objective", "orpo", "--loop.steps", "3", "--loop.eval_every", "0",
           "--checkpoint.every", "0", "--model.adapter", str(dpo_run[0] / "adapter"), "--lora.rank", "4")
    train = [r for r in _rows(out) if "loss" in r]
    assert len(train) == 3 and {"nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/margins"} <= set(train[0])
    assert all(math.isfinite(r["loss"]) for r in train)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 16  # the starting adapter's rank, not lora.rank's 4
    # started from the DPO adapter: the chosen replies are already preferred at step 1
    assert train[0]["rewards/margins"] > 0
