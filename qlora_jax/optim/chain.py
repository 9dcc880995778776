"""The default QLoRA optimizer: clip by global norm, AdamW (32- or 8-bit state), warmup + schedule.

QLoRA's recipe (Dettmers et al. 2023, arXiv 2305.14314, and its artidoro/qlora scripts): max grad norm 0.3, AdamW with lr 2e-4 and
weight decay 0, a constant schedule with 3% linear warmup. Every piece is a
field of ``OptimizerConfig``; ``make_optimizer(config, total_steps)`` builds

    chain(clip_by_global_norm(max_grad_norm),          # on the device: it needs every leaf
          offload_to_host(adamw(schedule, ...)),       # state in host memory if config.offload
          scale_lora_b(lora_plus_ratio))               # LoRA+, only when the ratio is not 1

It is meant for the LoRA parameters alone (the ``"params"`` collection); the
frozen base never reaches the optimizer.

LoRA+ (arXiv 2402.12354): ``B`` learns ``lora_plus_ratio`` times faster than ``A``. AdamW's
update of a leaf is ``-lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p)``, linear in ``lr``,
so multiplying the updates of every ``lora_b`` leaf by the ratio is AdamW with ``lr_B = ratio *
lr`` for them (decay included), as LoRA+'s parameter groups set it. The ratio is stateless: it
adds no optimizer state.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from qlora_jax.optim.adamw8bit import adamw_8bit
from qlora_jax.optim.offload import MEMORY_KINDS, offload_to_host, top_level_group

SCHEDULES = ("constant", "cosine", "linear")
STATE_BITS = (32, 8)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Hyperparameters of the QLoRA optimizer; defaults are the QLoRA paper's."""

    learning_rate: float = 2e-4
    schedule: str = "constant"  # after warmup: constant, cosine (to final_lr_ratio), linear (to 0)
    warmup_ratio: float = 0.03  # fraction of total steps spent in linear warmup from 0
    final_lr_ratio: float = 0.0  # cosine's end value, as a fraction of learning_rate
    max_grad_norm: float | None = 0.3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    state_bits: int = 32  # 8: blockwise 8-bit moments (bitsandbytes' 8-bit AdamW)
    offload: bool = False  # keep the optimizer state in host memory between steps
    offload_per_layer: bool = False  # update the offloaded state one layer at a time
    lora_plus_ratio: float = 1.0  # LoRA+: learning rate of every lora_b leaf over the others' (1: plain AdamW)

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not one of {SCHEDULES}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ValueError(f"final_lr_ratio={self.final_lr_ratio} must be in [0, 1]")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be > 0 (or None: no clipping)")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.state_bits not in STATE_BITS:
            raise ValueError(f"state_bits={self.state_bits} must be one of {STATE_BITS}")
        if self.offload_per_layer and not self.offload:
            raise ValueError("offload_per_layer=True needs offload=True")
        if not self.lora_plus_ratio > 0:
            raise ValueError(f"lora_plus_ratio={self.lora_plus_ratio} must be > 0 (1: plain AdamW)")


def make_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup over ``round(warmup_ratio * total_steps)`` steps, then the configured decay."""
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1")
    lr = config.learning_rate
    warmup = int(round(config.warmup_ratio * total_steps))
    rest = max(total_steps - warmup, 1)
    if config.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif config.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, rest, alpha=config.final_lr_ratio)
    else:
        after = optax.linear_schedule(lr, 0.0, rest)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(config: OptimizerConfig, total_steps: int, memory_kind: str = "pinned_host",
                   skip_nonfinite: bool = False) -> optax.GradientTransformation:
    """The chain of the module docstring for ``total_steps`` optimizer steps.

    ``skip_nonfinite``: a step whose gradients hold NaN or Inf changes nothing
    (zero update, state kept; ``optax.apply_if_finite`` placed inside the offload
    wrapper, on the device, where the state is updated).
    """
    if memory_kind not in MEMORY_KINDS:
        raise ValueError(f"memory_kind={memory_kind!r} is not one of {MEMORY_KINDS}")
    schedule = make_schedule(config, total_steps)
    kw = dict(b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay)
    adam = adamw_8bit(schedule, **kw) if config.state_bits == 8 else optax.adamw(schedule, **kw)
    if skip_nonfinite:  # never gives up by itself: the trainer stops after too many bad steps in a row
        adam = optax.apply_if_finite(adam, max_consecutive_errors=2**31 - 1)
    if config.offload:
        per_layer = config.offload_per_layer
        adam = offload_to_host(adam, memory_kind, group_by=top_level_group if per_layer else None, split_layers=per_layer)
    parts = [optax.clip_by_global_norm(config.max_grad_norm)] if config.max_grad_norm is not None else []
    if config.lora_plus_ratio != 1.0:  # only then: a checkpoint's state keeps its structure
        adam = optax.chain(adam, scale_lora_b(config.lora_plus_ratio))
    return optax.chain(*parts, adam)


LORA_B = "lora_b"


def scale_lora_b(ratio: float) -> optax.GradientTransformation:
    """Multiplies the updates of every leaf named ``lora_b`` by ``ratio`` (LoRA+; module docstring)."""

    def update(updates, state, params=None):
        del params

        def scale(path, u):
            return u * ratio if path and getattr(path[-1], "key", None) == LORA_B else u

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
