"""The run's logs as people read them: TensorBoard events, Weights & Biases, the progress bar, the smoothed plot."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pty
import select
import sys
import time
import types

import numpy as np
import pytest
from tblog import expected_scalars, read_tensorboard

from qlora_jax.train import sinks, tfevents
from qlora_jax.train.config import OutputSection
from qlora_jax.train.plot import ema, ema_weight, plot_losses, smoothing_time_constant
from qlora_jax.train.progress import Progress, resolve_progress
from qlora_jax.train.report import MetricsLog
from qlora_jax.train.sinks import Fanout, TensorBoardLog, WandbLog, make_sinks, scalar_tag, scalars

# --- smoothing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.9, 0.99])
def test_ema_keeps_a_constant(weight):
    np.testing.assert_allclose(ema(np.full(50, 2.75), weight), 2.75, rtol=1e-14)


def test_ema_is_the_normalized_weighted_mean():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=30), 0.8
    for i in (0, 7, 29):
        weights = w ** (i - np.arange(i + 1))
        np.testing.assert_allclose(ema(x, w)[i], (weights * x[: i + 1]).sum() / weights.sum(), rtol=1e-12)
    np.testing.assert_array_equal(ema(x, 0.0), x)


def test_ema_step_response_decays_with_its_time_constant():
    """A step from a to b at index k: s_i - b = (a - b)(w^(i-k+1) - w^(i+1)) / (1 - w^(i+1)); ~ e^(-n/tau)."""
    tau, k, a, b = 5.0, 200, 3.0, 1.0
    w = ema_weight(tau)
    x = np.where(np.arange(400) < k, a, b)
    s = ema(x, w)
    i = np.arange(k, 400)
    exact = (a - b) * (w ** (i - k + 1) - w ** (i + 1)) / (1 - w ** (i + 1))
    np.testing.assert_allclose(s[k:] - b, exact, rtol=1e-9, atol=1e-15)
    # one time constant after the step the gap has fallen by 1/e (k >> tau: the start has no weight left)
    n = np.array([5, 10, 20])
    np.testing.assert_allclose((s[k - 1 + n] - b) / (a - b), np.exp(-n / tau), rtol=1e-6)
    assert s[k - 1] == pytest.approx(a)


def test_ema_rejects_bad_arguments():
    with pytest.raises(ValueError, match="weight=1.0"):
        ema([1.0], 1.0)
    with pytest.raises(ValueError, match="tau=0"):
        ema_weight(0)
    with pytest.raises(ValueError, match="1-D"):
        ema(np.ones((2, 2)), 0.5)
    assert [smoothing_time_constant(n) for n in (3, 40, 500, 10**5)] == [1.0, 4.0, 50.0, 100.0]


def test_plot_writes_a_png(tmp_path):
    rng = np.random.default_rng(1)
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    log.write(step=0, eval_loss=4.0, eval_ppl=math.exp(4.0))
    for s in range(1, 41):
        log.write(step=s, loss=float(4 - s / 20 + rng.normal(scale=0.2)), lr=1e-3)
        if s % 10 == 0:
            log.write(step=s, eval_loss=4 - s / 20, eval_ppl=1.0)
    log.write(step=41, loss=float("nan"), lr=1e-3)  # a skipped step is left out, not plotted
    log.close()
    plot_losses(str(tmp_path / "metrics.jsonl"), str(tmp_path / "loss.png"))
    data = (tmp_path / "loss.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# --- TensorBoard ----------------------------------------------------------------------------------------------


def test_crc32c_known_values():
    """RFC 3720 B.4 and the usual check value."""
    assert tfevents.crc32c(b"123456789") == 0xE3069283
    assert tfevents.crc32c(bytes(32)) == 0x8A9136AA and tfevents.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tfevents.crc32c(bytes(range(32))) == 0x46DD794E


def test_event_bytes_parse_as_tensorboards_protos():
    """Our hand-encoded Event messages, parsed by tensorboard's compiled protobuf classes."""
    from tensorboard.compat.proto import event_pb2

    e = event_pb2.Event.FromString(tfevents.event(7, 123.5, scalars={"train/loss": 1.25, "eval/ppl": 3e7}))
    assert (e.wall_time, e.step) == (123.5, 7)
    assert [(v.tag, v.simple_value) for v in e.summary.value] == [("train/loss", 1.25), ("eval/ppl", float(np.float32(3e7)))]
    e = event_pb2.Event.FromString(tfevents.event(2**40, 0.0, file_version="brain.Event:2"))
    assert (e.step, e.file_version) == (2**40, "brain.Event:2")
    e = event_pb2.Event.FromString(tfevents.event(-3, 0.0, session_start=True))
    assert e.step == -3 and e.session_log.status == e.session_log.START
    framed = tfevents.record(b"abc")
    assert len(framed) == 8 + 4 + 3 + 4 and framed[12:15] == b"abc"



def test_scalar_tags():
    assert scalar_tag("eval_loss") == "eval/loss" and scalar_tag("grad_norm") == "train/grad_norm"
    assert scalars({"step": 3, "loss": 1.5, "finite": True, "note": "x"}) == {"train/loss": 1.5, "train/finite": 1.0}


def _rows(n: int, offset: float = 0.0):
    rng = np.random.default_rng(2)
    yield {"step": 0, "eval_loss": 4.2 + offset, "eval_ppl": math.exp(4.2 + offset)}
    for s in range(1, n + 1):
        yield {"step": s, "loss": float(rng.uniform(1, 4)) + offset, "grad_norm": float(rng.uniform(0, 2)),
               "lr": 1e-3 * s / n, "target_tokens": 480, "tokens_per_s": float(rng.uniform(100, 900)),
               "seconds": 0.5, "finite": True}


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    metrics = Fanout(MetricsLog(str(tmp_path / "metrics.jsonl")), TensorBoardLog(str(tmp_path / "tensorboard"), 0))
    for row in _rows(6):
        metrics.write(**row)
    metrics.close()
    ours = read_tensorboard(str(tmp_path / "tensorboard"))
    assert ours == expected_scalars(str(tmp_path / "metrics.jsonl"))
    assert set(ours) == {"eval/loss", "eval/ppl", "train/loss", "train/grad_norm", "train/lr", "train/target_tokens",
                         "train/tokens_per_s", "train/seconds", "train/finite"}
    assert sorted(ours["train/loss"]) == list(range(1, 7)) and list(ours["eval/loss"]) == [0]


def test_tensorboard_resume_rewrites_the_steps_after_the_checkpoint(tmp_path):
    """A resumed run's writer purges steps > start written before (TensorBoard's restart), as metrics.jsonl is cut."""
    tb, path = str(tmp_path / "tensorboard"), str(tmp_path / "metrics.jsonl")
    first = Fanout(MetricsLog(path), TensorBoardLog(tb, purge_step=0))
    for row in _rows(7):
        first.write(**row)
    first.close()
    time.sleep(1.05)  # event file names carry the second they were opened in
    start = 4
    second = Fanout(MetricsLog(path, truncate_after_step=start), TensorBoardLog(tb, purge_step=start + 1))
    for row in _rows(9, offset=10.0):
        if row["step"] > start:
            second.write(**row)
    second.close()
    ours = read_tensorboard(tb)
    assert ours == expected_scalars(path)
    assert ours["train/loss"][4] < 5 < 10 < ours["train/loss"][5]  # old up to the checkpoint, new after it


# --- Weights & Biases ------------------------------------------------------------------------------------------


class _FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, data, step):
                fake.logged.append((step, data))

            def finish(self):
                fake.finished += 1

        return Run()


@pytest.mark.parametrize("env_mode, mode", [(None, "offline"), ("", "offline"), ("online", "online"),
                                            ("disabled", "disabled")])
def test_wandb_mode_follows_the_environment(monkeypatch, tmp_path, env_mode, mode):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    if env_mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env_mode)
    run = WandbLog(str(tmp_path), "proj", {"lora": {"rank": 4}}, name="r1")
    run.write(step=3, loss=1.25, finite=True)
    run.write(step=4, eval_loss=2.5)
    run.close()
    assert fake.inits == [{"project": "proj", "dir": str(tmp_path), "config": {"lora": {"rank": 4}}, "name": "r1",
                           "mode": mode}]
    assert fake.logged == [(3, {"train/loss": 1.25, "train/finite": 1.0}), (4, {"eval/loss": 2.5})]
    assert fake.finished == 1


def test_wandb_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match=r"output.wandb needs the wandb package: `pip install wandb`"):
        WandbLog(str(tmp_path), "proj", {})


def test_wandb_offline_for_real(monkeypatch, tmp_path):
    """The real package, offline (no network, no login): it writes its run folder under the run directory."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = WandbLog(str(tmp_path), "qlora-jax-test", {"a": 1})
    for row in _rows(3):
        run.write(**row)
    run.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_make_sinks_by_option_and_process(monkeypatch, tmp_path):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    both = make_sinks(OutputSection(wandb=True), str(tmp_path), 0, {})
    assert [type(s) for s in both] == [TensorBoardLog, WandbLog]
    for s in both:
        s.close()
    assert make_sinks(OutputSection(tensorboard=False), str(tmp_path), 0, {}) == []
    monkeypatch.setattr(sinks.jax, "process_index", lambda: 1)
    assert make_sinks(OutputSection(wandb=True), str(tmp_path), 0, {}) == []
    with pytest.raises(ValueError, match="output.wandb_project"):
        OutputSection(wandb=True, wandb_project=" ")


# --- progress -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("enabled, bar, tty, process, mode", [
    (True, "auto", True, 0, "bar"), (True, "auto", False, 0, "lines"), (True, "always", False, 0, "bar"),
    (True, "never", True, 0, "lines"), (False, "always", True, 0, "off"), (True, "always", True, 1, "off")])
def test_resolve_progress(enabled, bar, tty, process, mode):
    assert resolve_progress(enabled, bar, tty, process) == mode


def test_progress_lines_for_logs():
    stream = io.StringIO()
    p = Progress(10, 2, "lines", stream=stream)
    p.update(3, 2.5, 1234.0)
    p.update(4, 2.25, 1500.0)
    p.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue()
    assert lines[0].startswith("step 3/10 | loss 2.5000 | 1,234 tok/s | ETA ") and ("rss " in lines[0] or "dev " in lines[0])


def test_progress_bar_shows_loss_rate_memory_and_keeps_log_lines_above_it(capsys):
    logger = logging.getLogger("qlora_jax")
    handler = logging.StreamHandler(sys.stderr)  # the trainer's console handler
    logger.addHandler(handler)
    try:
        p = Progress(8, 0, "bar", stream=sys.stderr)
        p.update(1, 3.5, 800.0)
        logging.getLogger("qlora_jax.train").warning("an eval line")
        p.update(8, 1.5, 900.0)
        p.close()
        assert handler in logger.handlers  # the redirection is undone
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "8/8" in err and "loss 1.5000" in err and "900 tok/s" in err and ("rss " in err or "dev " in err)
    # tqdm.write: the bar is cleared, the log line printed whole on its own line, then the bar redrawn
    assert any(part.startswith("an eval line\n") for part in err.split("\r"))


def test_progress_bar_on_a_terminal_that_reports_no_size():
    """A bare pty reports 0 x 0; tqdm would hide the bar below row 0, so it is drawn 100 wide."""
    master, slave = pty.openpty()
    try:
        assert os.get_terminal_size(slave) == (0, 0)
        with os.fdopen(os.dup(slave), "w") as stream:
            p = Progress(4, 0, "bar", stream=stream)
            p.update(4, 0.5, 10.0)
            p.close()
        text = b""
        while select.select([master], [], [], 0.5)[0]:
            text += os.read(master, 65536)
    finally:
        os.close(master)
        os.close(slave)
    last = text.decode().replace("\r\n", "\n").split("\r")[-1].strip()
    assert last.startswith("100%") and "4/4" in last and "loss 0.5000" in last and len(last) <= 100


def test_progress_off_writes_nothing(capsys):
    p = Progress(5, 0, "off")
    p.update(1, 1.0, 1.0)
    p.close()
    assert capsys.readouterr() == ("", "")


def test_metrics_rows_are_json(tmp_path):
    log = MetricsLog(str(tmp_path / "m.jsonl"))
    log.write(step=1, loss=1.0)
    log.close()
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"step": 1, "loss": 1.0}
