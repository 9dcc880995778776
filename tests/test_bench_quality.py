"""scripts/bench_quality.py's pieces that decide what both stacks see: unpacked rows, the warmup, the table."""

from __future__ import annotations

import numpy as np
import pytest
from testlib import load_script

from qlora_jax.train.data import make_batch
from qlora_jax.train.records import Example

bq = load_script("bench_quality")


def _packed(rng, batch=2, seq=32):
    examples = []
    for _ in range(7):
        n = int(rng.integers(3, 12))
        examples.append(Example(rng.integers(1, 500, n).astype(np.int32), rng.integers(0, 2, n).astype(bool)))
    b, used = make_batch(examples, batch, seq, pack=True)
    assert used >= 3
    return {f: np.asarray(getattr(b, f))[None] for f in bq.FIELDS}


def test_rows_hold_each_packed_example_once(rng):
    """Every example of the packed batch becomes one right-padded row with the same tokens, targets and
    mask, so the masked mean over the rows is the packed batch's masked mean."""
    pytest.importorskip("torch")
    batches = _packed(rng)
    ids, attend, targets, mask = (x.numpy() for x in bq._rows(batches, 0))
    seg = batches["segment_ids"][0]
    assert len(ids) == sum(int(r.max()) for r in seg)
    valid = attend.astype(bool)
    packed = seg > 0
    for name, rows in (("tokens", ids), ("targets", targets), ("loss_mask", mask)):
        np.testing.assert_array_equal(np.sort(rows[valid]), np.sort(batches[name][0][packed]), err_msg=name)
    assert mask[~valid].sum() == 0 and mask.sum() == batches["loss_mask"][0].sum()
    for row, n in zip(ids, attend.sum(1)):  # each row starts at its example's first token: positions from 0
        assert n > 0 and np.all(row[n:] == 0)


def test_schedule_factor_is_optax_warmup():
    from qlora_jax.optim import OptimizerConfig, make_schedule

    schedule = make_schedule(OptimizerConfig(learning_rate=1.0, warmup_ratio=0.1), 100)
    for step in range(0, 30):
        assert bq._schedule_factor(step, 10) == pytest.approx(float(schedule(step)), abs=1e-7)


def test_table_ratios():
    class A:
        steps, batch, seq_len, rank = 10, 2, 64, 8

    results = {("ours-qlora", "float32"): {"curve": [(0, 5.0), (10, 4.04)], "step_s": 1.0},
               ("torch-qlora", "float32"): {"curve": [(0, 5.0), (10, 4.0)], "step_s": 2.0},
               ("ours-lora", "float32"): {"error": "failed: boom"}}
    text = bq.table(results, A)
    assert "| ours-qlora | float32 | 5.0000 | 4.0400 | 1.0100x |  | 1.00 |" in text
    assert "| ours-lora | float32 | failed: boom |" in text


def test_precision_variants_parse_and_compare_with_their_base():
    assert bq.split_variant("ours-qlora-res32-lora32") == ("ours-qlora", ("-res32", "-lora32"))
    assert bq.split_variant("torch-qdora") == ("torch-qdora", ())

    class A:
        steps, batch, seq_len, rank = 10, 2, 64, 8

    results = {("ours-qlora-res32", "bfloat16"): {"curve": [(0, 5.0), (10, 4.2)], "step_s": 1.0},
               ("torch-qlora", "bfloat16"): {"curve": [(0, 5.0), (10, 4.0)], "step_s": 2.0},
               ("ours-lora", "bfloat16"): {"curve": [(0, 5.0), (10, 3.5)], "step_s": 2.0}}
    text = bq.table(results, A)  # vs torch-qlora (the stack's same variant) and vs ours-lora (no -res32 run)
    assert "| ours-qlora-res32 | bfloat16 | 5.0000 | 4.2000 | 1.0500x | 1.2000x | 1.00 |" in text


def test_report_reads_finished_runs_and_runs_nothing(tmp_path, capsys):
    import json

    argv = ["--steps", "10", "--warmup", "2", "--batch", "2", "--cache", str(tmp_path), "--dtypes", "float32,bfloat16",
            "--variants", "ours-qlora,torch-qlora", "--report", "--json", str(tmp_path / "out.json")]
    args = type("A", (), {k: v for k, v in dict(steps=10, eval_every=25, eval_batches=6, batch=2, seq_len=256,
                                                 rank=16, lr=2e-4, warmup=2, seed=0, cache=str(tmp_path)).items()})
    bq._save_json(bq._run_path(args, "ours-qlora", "float32"), {"curve": [[0, 5.0], [10, 4.5]], "step_s": 1.5})
    assert bq.main(argv) == 0
    out = json.loads((tmp_path / "out.json").read_text())["results"]
    assert [(r["variant"], r["dtype"]) for r in out] == [("ours-qlora", "float32")]
    assert "| ours-qlora | float32 | 5.0000 | 4.5000 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bq.main(argv + ["--fresh"])
    with pytest.raises(SystemExit):
        bq.main(argv[:-3] + ["--variants", "ours-qlora-res33"])
