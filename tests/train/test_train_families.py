"""``scripts/train.py`` end to end on a tiny model of each family beyond Llama: it trains, evaluates, and
exports a PEFT adapter that peft loads onto the transformers model and a merged folder.

No samples (``--loop.sample_tokens 0``): the trainer's sampling is the Llama run's
(``test_train_script.py``), and each family's generation with the KV cache is checked against
transformers in ``tests/models/test_families.py``; here it only added two compiles per family."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
from familymodels import KINDS, hf_model
from tinymodel import write_chats, write_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.oracle]


@pytest.mark.parametrize("kind", KINDS)
def test_each_family_trains_and_exports(tmp_path, kind):
    import peft
    import torch

    folder = tmp_path / "model"
    hf_model(kind, vocab_size=258, bos_token_id=256, eos_token_id=257, pad_token_id=0).save_pretrained(folder)
    write_tokenizer(str(folder))
    chats = write_chats(str(tmp_path / "chats.jsonl"), 120)
    out = tmp_path / "run"
    args = ["--model.path", str(folder), "--data.train_path", chats, "--data.seq_len", "64",
            "--data.eval_fraction", "0.1", "--loop.steps", "4", "--loop.batch_size", "4", "--loop.eval_every", "4",
            "--loop.eval_batches", "1", "--loop.sample_tokens", "0",
            "--optim.learning_rate", "3e-3", "--output.plot", "false", "--output.export_merged", "true",
            "--output.dir", str(out)]
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert any("eval_loss" in r for r in rows)
    model = peft.PeftModel.from_pretrained(hf_model(kind, vocab_size=258, bos_token_id=256, eos_token_id=257,
                                                    pad_token_id=0), out / "adapter").eval()
    assert any("lora_A" in n for n, _ in model.named_parameters())
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert merged["model_type"] == hf_model(kind).config.model_type and merged["eos_token_id"] == 257
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
