"""Preference losses on sequence log-probs: DPO (sigmoid, robust, IPO) and ORPO, with TRL's semantics and names.

Everything here is per pair: arrays are ``(P,)`` float32 over ``P`` (chosen, rejected) pairs,
and each function returns ``(losses (P,), metrics)`` where ``metrics`` maps TRL's metric names
to ``(P,)`` per-pair values; the batch's value of a metric is their mean over the real pairs
(``masked_mean``), which is what TRL logs (its per-batch ``.mean()``).

**DPO** (``dpo_loss``; TRL 1.16 ``DPOTrainer._compute_loss``, ``f_divergence_type="reverse_kl"``).
With ``pi_c, pi_r`` the policy's summed completion log-probs of the chosen and rejected rows,
``ref_c, ref_r`` the reference's, and the log-ratio margin

    delta = (pi_c - ref_c) - (pi_r - ref_r)

the per-pair loss of each ``loss_type`` is

    sigmoid:  -(1 - eps) log sigma(beta delta) - eps log sigma(-beta delta)
    robust:   (-(1 - eps) log sigma(beta delta) + eps log sigma(-beta delta)) / (1 - 2 eps)
    ipo:      (delta_bar - 1 / (2 beta))^2,   delta_bar = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r

with ``eps`` the label smoothing and ``n_c, n_r`` the completion token counts (at least 1).
``sigmoid`` with ``eps > 0`` is conservative DPO (cDPO), TRL's ``sigmoid`` up to 0.28; TRL
0.29 and later ignore ``label_smoothing`` in ``sigmoid`` (``eps = 0`` there) and apply it in
``robust`` only. IPO's length normalization is TRL's (its comment: confirmed with the IPO
authors; TRL counts the completion tokens of the unshifted rows, the same count unless a prompt
is empty). Metrics: ``rewards/chosen = beta (pi_c - ref_c)``, ``rewards/rejected = beta (pi_r -
ref_r)``, ``rewards/margins`` their difference, ``rewards/accuracies = [chosen reward >
rejected reward]`` (strict, as TRL), ``logps/chosen = pi_c``, ``logps/rejected = pi_r``.

**ORPO** (``orpo_loss``; TRL 1.16 ``trl.experimental.orpo.ORPOTrainer``, moved out of the
main trainers in 0.2x). With ``a_c, a_r`` the policy's completion log-probs averaged over the
completion tokens (``logps / n``, in ``(-inf, 0)``):

    log_odds = (a_c - a_r) - (log(1 - exp(a_c)) - log(1 - exp(a_r)))
    loss     = nll - beta * mean_pairs(log sigma(log_odds))

where ``nll`` is the chosen rows' mean next-token NLL over all their real tokens, prompt
included (TRL: "orpo chosen nll loss is computed over the full prompt and response"; it is a
batch-level term, added by the step, not here: ``orpo_loss`` returns the odds-ratio part
``-beta log sigma(log_odds)`` per pair). ``beta`` is the paper's lambda. ``log(1 - exp(x))``
is ``log1mexp``. Metrics: ``rewards/chosen = beta a_c``, ``rewards/rejected = beta a_r``,
margins and accuracies as DPO's, ``logps/chosen = a_c``, ``logps/rejected = a_r`` (averaged, as
TRL logs them), ``log_odds_ratio = log sigma(log_odds)``, ``log_odds_chosen = log_odds``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo")


def check_beta(beta: float) -> None:
    """``ValueError`` unless ``beta`` is a number > 0 (DPO's inverse temperature, ORPO's lambda)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta={beta!r} must be a number > 0")


def check_dpo_args(beta: float, loss_type: str, label_smoothing: float) -> None:
    """``ValueError`` naming the argument when ``beta``, ``loss_type`` or ``label_smoothing`` is out of range."""
    check_beta(beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {DPO_LOSS_TYPES}")
    top = 0.5 if loss_type == "robust" else 1.0
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing < top:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, {top}) for loss_type={loss_type!r}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError(f"label_smoothing={label_smoothing!r} has no meaning for loss_type='ipo'; pass 0")


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array,
             *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: jax.Array | None = None, rejected_tokens: jax.Array | None = None):
    """``(losses (P,), metrics)``: DPO's per-pair loss of ``loss_type`` (module docstring) and TRL's metrics.

    The four log-prob arrays are ``(P,)`` sums over each row's completion tokens; the reference
    ones should carry no gradient (the caller stops it). ``chosen_tokens`` / ``rejected_tokens``
    ``(P,)``: completion token counts, needed by ``ipo`` only.
    """
    check_dpo_args(beta, loss_type, label_smoothing)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    chosen_ratio = f32(policy_chosen) - f32(ref_chosen)
    rejected_ratio = f32(policy_rejected) - f32(ref_rejected)
    delta = chosen_ratio - rejected_ratio
    eps = float(label_smoothing)
    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * jax.nn.log_sigmoid(beta * delta) - eps * jax.nn.log_sigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1.0 - eps) * jax.nn.log_sigmoid(beta * delta)
                  + eps * jax.nn.log_sigmoid(-beta * delta)) / (1.0 - 2.0 * eps)
    else:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type='ipo' needs chosen_tokens and rejected_tokens (completion token counts)")
        per_token = (chosen_ratio / jnp.maximum(f32(chosen_tokens), 1.0)
                     - rejected_ratio / jnp.maximum(f32(rejected_tokens), 1.0))
        losses = (per_token - 1.0 / (2.0 * beta)) ** 2
    chosen_reward = jax.lax.stop_gradient(beta * chosen_ratio)
    rejected_reward = jax.lax.stop_gradient(beta * rejected_ratio)
    metrics = reward_metrics(chosen_reward, rejected_reward, policy_chosen, policy_rejected)
    return losses, metrics


def reward_metrics(chosen_reward, rejected_reward, chosen_logps, rejected_logps) -> dict[str, jax.Array]:
    """TRL's per-pair ``rewards/*`` and ``logps/*`` metrics, ``(P,)`` float32 each, without gradient."""
    sg = lambda x: jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))  # noqa: E731
    chosen_reward, rejected_reward = sg(chosen_reward), sg(rejected_reward)
    return {"rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
            "rewards/margins": chosen_reward - rejected_reward,
            "rewards/accuracies": (chosen_reward > rejected_reward).astype(jnp.float32),
            "logps/chosen": sg(chosen_logps), "logps/rejected": sg(rejected_logps)}


def log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for ``x < 0``: ``log1p(-exp(x))`` below ``-log 2``, ``log(-expm1(x))`` above (TRL's split).

    Each branch is evaluated at a value where it is finite, so the unused one puts no NaN in the gradient.
    """
    t = -math.log(2.0)
    low = jnp.where(x < t, x, t)  # the first branch's input: x where it is taken, else t (finite, unused)
    high = jnp.where(x < t, t, x)
    return jnp.where(x < t, jnp.log1p(-jnp.exp(low)), jnp.log(-jnp.expm1(high)))


def orpo_loss(chosen_avg_logps: jax.Array, rejected_avg_logps: jax.Array, *, beta: float = 0.1):
    """``(losses (P,), metrics)``: ORPO's odds-ratio term ``-beta log sigma(log_odds)`` per pair and TRL's metrics.

    ``chosen_avg_logps`` / ``rejected_avg_logps`` ``(P,)``: completion log-probs averaged over the
    completion tokens, each ``< 0``. The chosen NLL term and the ``nll_loss`` metric are the
    step's (module docstring).
    """
    check_beta(beta)
    a_c = jnp.asarray(chosen_avg_logps, jnp.float32)
    a_r = jnp.asarray(rejected_avg_logps, jnp.float32)
    log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
    ratio = jax.nn.log_sigmoid(log_odds)
    metrics = reward_metrics(beta * a_c, beta * a_r, a_c, a_r)
    metrics |= {"log_odds_ratio": jax.lax.stop_gradient(ratio), "log_odds_chosen": jax.lax.stop_gradient(log_odds)}
    return -beta * ratio, metrics


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum(mask * values) / max(sum(mask), 1)`` over the last axis: the mean over real pairs (``mask`` 0 or 1)."""
    mask = jnp.asarray(mask, jnp.float32)
    return jnp.sum(jnp.where(mask > 0, values, 0.0), axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
