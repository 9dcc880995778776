"""Preference-tuning steps (DPO, ORPO): chosen and rejected rows in one forward, the reference with LoRA off.

A preference batch (``qlora_jax.train.preference_data.preference_batch``) holds ``A`` micro-batches
(gradient accumulation) of ``2P`` rows of ``T`` tokens, every array ``(A, 2P, T)``: in each
micro-batch the ``P`` chosen rows come first and their ``P`` rejected rows after them (pair ``i``
is rows ``i`` and ``P + i``), so one forward runs both, as TRL's concatenated batch does. Keys:
``tokens``, ``targets``, ``positions``, ``segment_ids`` (as the SFT batch), ``loss_mask`` (1 on
the completion's targets) and ``target_mask`` (1 on every real target, prompt included: ORPO's
NLL); optionally ``ref_logps`` ``(A, 2P)``, the reference's log-probs computed beforehand
(``make_reference_step``), which then replace the reference forward.

Per row, with ``m`` the loss mask and ``log p(y_t)`` from ``qlora_jax.train.loss.token_nll``
(chunks of tokens through the head; no ``(2P, T, vocab)`` logits):

    logps = sum_t m_t log p(y_t)          (sequence_logps; a row's summed completion log-prob)

The reference policy is the same variables through ``model.clone(lora_enabled=False)``: the
frozen 4-bit base alone, under ``stop_gradient``, no second copy of any weight. A pair counts
when both its rows have a completion target (padding pairs are all zeros and count for nothing);
with ``N`` real pairs in the whole batch (all micro-batches),

    DPO:   loss = sum_pairs dpo_loss / N                                   (preference_loss.dpo_loss)
    ORPO:  loss = sum_{chosen rows, t} target_mask * nll / N_tok + sum_pairs orpo_loss / N

(``N_tok`` the chosen rows' real targets). ``N`` and ``N_tok`` come from the masks before any
forward, so each micro-batch's gradient is its exact share and accumulation is exact. Metrics
are TRL's (``preference_loss``), each the mean over the batch's real pairs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from qlora_jax.layers import merge
from qlora_jax.models.decoder import head_table
from qlora_jax.train.loss import token_nll
from qlora_jax.train.preference_loss import check_beta, check_dpo_args, dpo_loss, orpo_loss

PREFERENCE_KEYS = ("tokens", "targets", "loss_mask", "target_mask", "segment_ids", "positions")


def token_logps(model, variables, micro: dict[str, Any], rng=None, deterministic: bool = True,
                loss_chunk: int = 0) -> jax.Array:
    """``(R, T)`` float32 ``log p(targets)`` of each token of ``R`` rows (``-token_nll`` through the frozen head).

    ``loss_chunk``: tokens per chunk of the head (0: by vocabulary size).
    """
    hidden = model.apply(variables, micro["tokens"], positions=micro["positions"], segment_ids=micro["segment_ids"],
                         deterministic=deterministic, rngs=None if deterministic else {"dropout": rng},
                         return_hidden=True)
    head = jax.lax.stop_gradient(head_table(model.config, variables))
    return -token_nll(hidden, head, micro["targets"], loss_chunk, softcap=model.config.final_softcap)


def sequence_logps(logps: jax.Array, mask: jax.Array) -> jax.Array:
    """``(R,)``: each row's ``sum_t mask * logps`` (``logps``, ``mask`` ``(R, T)``; masked tokens add exactly 0)."""
    return jnp.sum(jnp.where(mask > 0, logps, 0.0), axis=-1)


def reference_logps(model, frozen, micro: dict[str, Any], loss_chunk: int = 0, params=None) -> jax.Array:
    """``(R,)`` completion log-probs of the reference policy, without gradient.

    ``params`` None: ``model`` with LoRA off, on ``frozen`` alone (the base: TRL's reference for a
    new adapter). ``params`` given: those adapters, held fixed (TRL's frozen "ref" copy when
    re-training an existing adapter, e.g. DPO from an SFT adapter; precompute it once with
    ``make_reference_step``).
    """
    if params is None:
        model, variables = model.clone(lora_enabled=False), frozen
    else:
        variables = merge(jax.lax.stop_gradient(params), frozen)
    logps = token_logps(model, variables, micro, None, True, loss_chunk)
    return jax.lax.stop_gradient(sequence_logps(logps, micro["loss_mask"]))


def make_reference_step(model, loss_chunk: int = 0) -> Callable:
    """``reference_step(frozen, batch, params=None) -> (A, 2P)`` reference log-probs (``reference_logps``), to store
    as ``batch["ref_logps"]`` (not jitted)."""

    def reference_step(frozen, batch, params=None):
        return jax.lax.map(lambda micro: reference_logps(model, frozen, micro, loss_chunk, params),
                           _model_inputs(batch))

    return reference_step


def _model_inputs(batch):
    return {k: batch[k] for k in PREFERENCE_KEYS}


def _pair_mask(loss_mask: jax.Array) -> jax.Array:
    """``(..., P)`` float32: 1 where both rows of a pair have a completion target (``loss_mask`` ``(..., 2P, T)``)."""
    counts = jnp.sum(loss_mask, axis=-1)
    p = counts.shape[-1] // 2
    return ((counts[..., :p] > 0) & (counts[..., p:] > 0)).astype(jnp.float32)


def _totals(batch) -> dict[str, jax.Array]:
    """The batch's normalizers, from its masks alone: real pairs and the chosen rows' real targets (each >= 1)."""
    p = batch["loss_mask"].shape[-2] // 2
    return {"pairs": jnp.maximum(jnp.sum(_pair_mask(batch["loss_mask"])), 1.0),
            "chosen_targets": jnp.maximum(jnp.sum(batch["target_mask"][..., :p, :].astype(jnp.float32)), 1.0)}


def _pair_sum(values: jax.Array, pair: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(pair > 0, values, 0.0))


def _split(x):
    p = x.shape[0] // 2
    return x[:p], x[p:]


def dpo_objective(model, *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                  loss_chunk: int = 0) -> Callable:
    """``objective(params, frozen, micro, rng, totals, deterministic) -> (loss share, metric shares)`` of DPO.

    A micro-batch's share of the batch's loss and of each metric's mean (module docstring): summing
    the shares over the micro-batches gives the batch's values.
    """
    check_dpo_args(beta, loss_type, label_smoothing)

    def objective(params, frozen, micro, rng, totals, deterministic):
        mask = micro["loss_mask"]
        pair = _pair_mask(mask)
        logps = sequence_logps(token_logps(model, merge(params, frozen), micro, rng, deterministic, loss_chunk), mask)
        ref = micro["ref_logps"] if "ref_logps" in micro else reference_logps(model, frozen, micro, loss_chunk)
        (pc, pr), (rc, rr), (nc, nr) = _split(logps), _split(jax.lax.stop_gradient(ref)), _split(jnp.sum(mask, -1))
        losses, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                   chosen_tokens=nc, rejected_tokens=nr)
        shares = {k: _pair_sum(v, pair) / totals["pairs"] for k, v in metrics.items()}
        return _pair_sum(losses, pair) / totals["pairs"], shares

    return objective


def orpo_objective(model, *, beta: float = 0.1, loss_chunk: int = 0) -> Callable:
    """``objective(params, frozen, micro, rng, totals, deterministic) -> (loss share, metric shares)`` of ORPO.

    The chosen NLL over every real target of the chosen rows (prompt included, as TRL) plus the
    odds-ratio term on completion log-probs averaged per row (``preference_loss.orpo_loss``).
    """
    check_beta(beta)

    def objective(params, frozen, micro, rng, totals, deterministic):
        mask = micro["loss_mask"]
        pair = _pair_mask(mask)
        tok = token_logps(model, merge(params, frozen), micro, rng, deterministic, loss_chunk)
        logps, counts = sequence_logps(tok, mask), jnp.sum(mask, -1)
        # a padding pair's average would be 0 (log(1 - e^0) = -inf): it gets -1 instead and counts for nothing
        avg = jnp.where(counts > 0, logps / jnp.maximum(counts, 1.0), -1.0)
        (ac, ar) = _split(avg)
        losses, metrics = orpo_loss(ac, ar, beta=beta)
        chosen_targets = _split(micro["target_mask"])[0]
        nll = -jnp.sum(jnp.where(chosen_targets > 0, _split(tok)[0], 0.0)) / totals["chosen_targets"]
        shares = {k: _pair_sum(v, pair) / totals["pairs"] for k, v in metrics.items()}
        shares["nll_loss"] = jax.lax.stop_gradient(nll)
        return nll + _pair_sum(losses, pair) / totals["pairs"], shares

    return objective


def _accumulate(objective, params, frozen, batch, rng, deterministic: bool, with_grad: bool):
    """``(loss, metrics, grads or None)``: the objective's shares summed over the ``A`` micro-batches."""
    totals = _totals(batch)
    n_micro = batch["tokens"].shape[0]
    rngs = jax.random.split(rng, n_micro)

    def one(micro, r):
        f = lambda p: objective(p, frozen, micro, r, totals, deterministic)  # noqa: E731
        if with_grad:
            (loss, shares), grads = jax.value_and_grad(f, has_aux=True)(params)
            return loss, shares, grads
        loss, shares = f(params)
        return loss, shares, None

    first = jax.tree.map(lambda x: x[0], batch)
    shapes = jax.eval_shape(one, first, rngs[0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(carry, xs):
        return jax.tree.map(jnp.add, carry, one(*xs)), None

    (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (batch, rngs))
    return loss, metrics, grads


def _make_step(objective, tx: optax.GradientTransformation) -> Callable:
    def step(params, opt_state, frozen, batch: dict[str, Any], rng):
        loss, metrics, grads = _accumulate(objective, params, frozen, batch, rng, False, True)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {"loss": loss, "tokens": jnp.sum(batch["loss_mask"].astype(jnp.float32)), "grad_norm": grad_norm,
                   "finite": finite, **metrics}
        return optax.apply_updates(params, updates), opt_state, metrics

    return step


def make_dpo_step(model, tx: optax.GradientTransformation, beta: float = 0.1, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0, loss_chunk: int = 0) -> Callable:
    """``step(params, opt_state, frozen, batch, rng) -> (params, opt_state, metrics)`` of DPO (not jitted here).

    ``metrics``: ``loss``, ``tokens`` (completion targets), ``grad_norm`` (before clipping),
    ``finite`` (False: the optimizer skipped the step, as ``make_train_step``'s guard), and TRL's
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
    ``logps/chosen``, ``logps/rejected``; every value a () array.
    """
    return _make_step(dpo_objective(model, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                    loss_chunk=loss_chunk), tx)


def make_orpo_step(model, tx: optax.GradientTransformation, beta: float = 0.1, loss_chunk: int = 0) -> Callable:
    """``step(params, opt_state, frozen, batch, rng) -> (params, opt_state, metrics)`` of ORPO (not jitted here).

    ``metrics``: ``make_dpo_step``'s (rewards and logps as ORPO defines them) and ``nll_loss``,
    ``log_odds_ratio``, ``log_odds_chosen``. ``beta`` is ORPO's lambda.
    """
    return _make_step(orpo_objective(model, beta=beta, loss_chunk=loss_chunk), tx)


def make_preference_eval_step(objective) -> Callable:
    """``eval_step(params, frozen, batch) -> (loss, metrics)`` of ``dpo_objective`` / ``orpo_objective``, no dropout."""

    def eval_step(params, frozen, batch):
        loss, metrics, _ = _accumulate(objective, params, frozen, batch, jax.random.key(0), True, False)
        return loss, metrics

    return eval_step
