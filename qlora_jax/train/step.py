"""The jitted train and eval steps: masked next-token loss, gradient accumulation, a NaN/Inf guard.

A batch holds ``A`` micro-batches (gradient accumulation) of ``B`` rows of
``T`` tokens: every array is ``(A, B, T)``. With ``m`` the loss mask and
``nll = -log softmax(logits)[target]`` in float32 (computed by ``qlora_jax.train.loss``
in chunks of tokens through the head, so no ``(B, T, vocab)`` logits exist),

    loss = sum_{a,b,t} m * nll / sum_{a,b,t} m        (a token-weighted mean over the whole batch)

and the gradient is that of ``loss``: each micro-batch's gradient of its *sum*
of losses is accumulated (``lax.scan``) and divided once by the total count, so
accumulation is exact, not an average of per-micro-batch means.

The guard: the optimizer is built with ``make_optimizer(..., skip_nonfinite=True)``
(``optax.apply_if_finite`` inside the offload wrapper, so the choice is made
where the state lives): if any gradient is not finite, the update is zero and
the optimizer state stays as it was. The step reports ``finite = False``; the
loop counts such steps and stops after several in a row.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qlora_jax.layers import merge
from qlora_jax.models.decoder import head_table
from qlora_jax.train.loss import token_nll


class StepMetrics(NamedTuple):
    loss: jax.Array  # () float32, token-weighted mean over the batch
    tokens: jax.Array  # () float32, trainable tokens in the batch
    grad_norm: jax.Array  # () float32, global norm before clipping
    finite: jax.Array  # () bool: False when the step was skipped


def token_losses(model, variables, batch, rng, deterministic: bool, loss_chunk: int = 0):
    """``(sum of masked nll, count of masked tokens)`` of one micro-batch of ``(B, T)`` arrays.

    ``loss_chunk``: tokens per chunk of the head and cross-entropy (0: by vocabulary size).
    """
    hidden = model.apply(variables, batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                         deterministic=deterministic, rngs=None if deterministic else {"dropout": rng},
                         return_hidden=True)
    head = jax.lax.stop_gradient(head_table(model.config, variables))
    nll = token_nll(hidden, head, batch["targets"], loss_chunk, softcap=model.config.final_softcap)
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def make_train_step(model, tx: optax.GradientTransformation, loss_chunk: int = 0) -> Callable:
    """``step(params, opt_state, frozen, batch, rng) -> (params, opt_state, StepMetrics)`` (not jitted here)."""

    def micro_grad(params, frozen, micro, rng):
        def f(p):
            total, count = token_losses(model, merge(p, frozen), micro, rng, deterministic=False, loss_chunk=loss_chunk)
            return total, count

        (total, count), grads = jax.value_and_grad(f, has_aux=True)(params)
        return total, count, grads

    def step(params, opt_state, frozen, batch: dict[str, Any], rng):
        n_micro = batch["tokens"].shape[0]
        rngs = jax.random.split(rng, n_micro)
        zeros = jax.tree.map(jnp.zeros_like, params)

        def body(carry, xs):
            total, count, grads = carry
            micro, r = xs
            t, c, g = micro_grad(params, frozen, micro, r)
            return (total + t, count + c, jax.tree.map(jnp.add, grads, g)), None

        (total, count, grads), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(()), zeros), (batch, rngs))
        denom = jnp.maximum(count, 1.0)
        loss = total / denom
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, StepMetrics(loss, count, grad_norm, finite)

    return step


def make_eval_step(model, loss_chunk: int = 0) -> Callable:
    """``eval_step(params, frozen, batch) -> (sum of nll, token count)`` over a ``(A, B, T)`` batch."""

    def eval_step(params, frozen, batch):
        def body(carry, micro):
            t, c = token_losses(model, merge(params, frozen), micro, None, deterministic=True, loss_chunk=loss_chunk)
            return (carry[0] + t, carry[1] + c), None

        (total, count), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), batch)
        return total, count

    return eval_step
