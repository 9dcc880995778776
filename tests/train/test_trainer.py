"""``Trainer``: when hooks run, what rows the metrics get, the bad-step rule (a scripted step function)."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

from qlora_jax.train.trainer import Trainer, TrainState


class Rows:
    def __init__(self):
        self.rows = []

    def write(self, **row):
        self.rows.append(row)


class Quiet:
    def update(self, *a):
        self.last = a


def _step(losses):
    """A step that adds 1 to params and reports the next scripted loss (NaN: not finite)."""
    it = iter(losses)

    def step(params, opt_state, batch, rng):
        loss = next(it)
        return params + 1, opt_state, {"loss": loss, "grad_norm": 0.5, "tokens": 3.0, "finite": np.isfinite(loss),
                                       "rewards/margins": 2 * loss}

    return step


def _trainer(total, losses=None, **kw):
    batches = ({"tokens": np.zeros((1, 2, 4), np.int32)} for _ in itertools.count())
    metrics = Rows()
    trainer = Trainer(_step(losses or [1.0] * total), batches, total, metrics=metrics, progress=Quiet(),
                      lr_at=lambda s: 0.1 * s, **kw)
    return trainer, metrics


def _state(step=0):
    return TrainState(step, 0, None, jax.random.key(0))


def test_hooks_run_every_n_at_the_end_and_at_a_fresh_start():
    trainer, _ = _trainer(7)
    seen = {"a": [], "b": [], "c": []}
    trainer.add_hook("a", lambda t, s: seen["a"].append(s.step), every=3)
    trainer.add_hook("b", lambda t, s: seen["b"].append(s.step), every=3, at_start=True, at_end=False)
    trainer.add_hook("c", lambda t, s: seen["c"].append(s.step), at_end=True)
    final = trainer.train(_state())
    assert final.step == 7 and final.params == 7
    assert seen == {"a": [3, 6, 7], "b": [0, 3, 6], "c": [7]}


def test_a_resumed_run_skips_start_hooks_and_one_at_its_end_runs_end_hooks_once():
    trainer, _ = _trainer(5)
    seen = []
    trainer.add_hook("h", lambda t, s: seen.append(s.step), every=2, at_start=True)
    assert trainer.train(_state(3)).step == 5 and seen == [4, 5]
    trainer, metrics = _trainer(5)
    trainer.add_hook("h", lambda t, s: seen.append(("end", s.step)), every=2, at_start=True)
    trainer.train(_state(5))
    assert seen[-1] == ("end", 5) and len(seen) == 3 and metrics.rows == []


def test_rows_carry_every_scalar_of_the_step():
    trainer, metrics = _trainer(4, [4.0, 3.0, 2.0, 1.0], log_every=2)
    trainer.train(_state())
    assert [r["step"] for r in metrics.rows] == [2, 4]
    row = metrics.rows[-1]
    assert row["loss"] == 1.0 and row["rewards/margins"] == 2.0 and row["target_tokens"] == 3 and row["finite"] is True
    assert row["lr"] == pytest.approx(0.3) and row["tokens_per_s"] > 0


def test_non_finite_steps_are_logged_and_too_many_stop_the_run():
    nan = float("nan")
    trainer, metrics = _trainer(10, [1.0, nan, 1.0, nan, nan, nan, 1.0], log_every=100, max_bad_steps=3,
                                checkpoint_dir="/ckpt")
    with pytest.raises(RuntimeError, match=r"stopped at step 6: 3 consecutive .* in /ckpt"):
        trainer.train(_state())
    assert [r["step"] for r in metrics.rows] == [2, 4, 5, 6] and not metrics.rows[0]["finite"]


@pytest.mark.slow
def test_run_takes_a_users_hook(tmp_path):
    """``run(config, hooks=[...])``: a user's hook runs on the real loop with the model and base at hand."""
    from tinymodel import write_chats, write_tiny_model

    from qlora_jax.layers import merge
    from qlora_jax.train.config import parse_config
    from qlora_jax.train.loop import run
    from qlora_jax.train.trainer import Hook

    model_dir, chats = write_tiny_model(str(tmp_path / "model")), write_chats(str(tmp_path / "c.jsonl"), 60)
    config = parse_config(["--model.path", model_dir, "--data.train_path", chats, "--data.seq_len", "32",
                           "--loop.steps", "4", "--loop.batch_size", "2", "--loop.eval_every", "0",
                           "--loop.sample_tokens", "0", "--output.export_peft", "false", "--output.plot", "false",
                           "--output.progress", "false", "--output.dir", str(tmp_path / "out")])
    seen = []

    def norm_of_b(trainer, state):  # a user's own evaluation: here, how far LoRA's B moved from zero
        ctx = trainer.context
        variables = merge(state.params, ctx["frozen"])
        b = variables["params"]["layers"]["self_attn"]["q_proj"]["lora_b"]
        seen.append((state.step, float(np.abs(np.asarray(b)).max()), type(ctx["model"]).__name__))

    summary = run(config, hooks=[Hook("b_norm", norm_of_b, every=2, at_start=True)])
    assert [s for s, _, _ in seen] == [0, 2, 4] and seen[0][1] == 0.0 and seen[-1][1] > 0
    assert seen[0][2] == "CausalLM" and summary["steps"] == 4
