"""The parts every decoder family is built from: norms, self-attention, the gated MLP, LoRA settings.

Shapes: hidden states ``(B, T, hidden)``; positions and segment ids ``(B, T)`` int.
Every projection is a ``QLoRADense`` named as in Hugging Face (``q_proj``, ``qkv_proj``,
...); it gets LoRA when the family resolves it among ``LoraConfig.targets``. Norm
weights, like the embeddings, live in the ``"frozen"`` collection, unquantized.

* ``RMSNorm``: ``x / sqrt(mean(x^2) + eps) * (offset + w)`` in float32 (Gemma: offset 1).
* ``SelfAttention``: projections, optional per-head q/k RMSNorm (Qwen3, Gemma 3), rope,
  the KV cache, and ``qlora_jax.models.attention.attention`` with the layer's window,
  scale and soft-cap. When layers differ in window (Gemma 2 / 3), the layer's ``kind``
  (0 full, 1 sliding, a scanned value) picks one of two branches with ``lax.switch``,
  so every attention implementation sees a static window.
* ``GatedMLP``: ``down(act(gate(x)) * up(x))``, act SiLU or tanh-GELU, gate and up
  separate or fused (Phi-3's ``gate_up_proj``); ``tiled_mlp`` runs it over sequence tiles.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qlora_jax.layers import FROZEN, QLoRADense, QuantConfig
from qlora_jax.models.attention import attention
from qlora_jax.models.config import ModelConfig
from qlora_jax.models.rope import apply_rope, rope_frequencies

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULL, SLIDING = 0, 1  # a layer's kind, as scanned
LAYER_INPUT = "decoder_layer_input"  # the checkpoint_name of each layer's saved input (remat offload)


def _field(default, help: str):
    """A dataclass field with the help text the trainer's ``--help`` shows."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which projections get LoRA, and its hyper-parameters: the one definition (the trainer's ``lora`` section).

    ``targets`` are projection names; each family maps them to its own
    (``Family.resolve_targets``: the Llama names stand for Phi-3's fused projections).
    Errors name the field as ``lora.<field>``.
    """

    rank: int = _field(16, "LoRA rank r; 0 disables LoRA")
    alpha: float = _field(16.0, "LoRA scale numerator: updates are scaled by alpha/r (alpha/sqrt(r) with rsLoRA)")
    dropout: float = _field(0.0, "dropout on the LoRA input, in [0, 1)")
    use_rslora: bool = _field(False, "rank-stabilized scaling alpha/sqrt(r)")
    targets: tuple[str, ...] = _field(LLAMA_TARGETS, "comma-separated projections that get LoRA")
    use_dora: bool = _field(False, "DoRA (weight-decomposed LoRA, peft's use_dora): a trainable magnitude per "
                            "output of each adapted projection (qlora_jax.layers.dora)")
    fp32_output: bool = _field(False, "compute each LoRA term in float32 and add it to its projection's output "
                               "in float32 (QLoRADense.fp32_output; as peft over a float32 residual stream)")

    def __post_init__(self):
        from qlora_jax.models.family import known_targets

        def fail(name, requirement):
            raise ValueError(f"lora.{name}={getattr(self, name)!r} {requirement}")

        for name in ("use_rslora", "use_dora", "fp32_output"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be a bool")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            fail("rank", "must be an int")
        for name in ("alpha", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(name, "must be a number")
            object.__setattr__(self, name, float(value))
        if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
            fail("targets", "must be a sequence of projection names")
        object.__setattr__(self, "targets", tuple(self.targets))  # hashable: a model field, a jit key
        if self.rank < 0:
            fail("rank", "must be >= 0")
        if not self.alpha > 0:
            fail("alpha", "must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", "must be in [0, 1)")
        if self.rank and not self.targets:
            fail("targets", f"is empty; name at least one of {LLAMA_TARGETS}")
        unknown = [t for t in self.targets if t not in known_targets()]
        if unknown:
            fail("targets", f"has {unknown}, not projections; choose from {known_targets()}")
        if len(set(self.targets)) != len(self.targets):
            fail("targets", "names a projection twice")
        if self.use_dora and self.rank == 0:
            fail("use_dora", "needs lora.rank >= 1 (DoRA adapts through LoRA's A and B)")


def without_adapters(lora: LoraConfig) -> LoraConfig:
    """``lora`` at rank 0 (no DoRA): every ``QLoRADense`` built from it is its frozen base alone.

    A rank-0 ``QLoRADense`` returns ``x W^T [+ bias]`` before it declares or reads any LoRA
    leaf, so a model built with it runs on the variables of the adapted model, ignoring
    ``params`` (``CausalLM(lora_enabled=False)``).
    """
    return dataclasses.replace(lora, rank=0, use_dora=False)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * (offset + weight)`` in float32, returned in ``x.dtype``."""

    eps: float
    offset: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = jnp.zeros if self.offset else jnp.ones
        weight = self.variable(FROZEN, "weight", lambda: init((x.shape[-1],), jnp.float32)).value
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = jax.lax.stop_gradient(weight).astype(jnp.float32)
        if self.offset:
            scale = self.offset + scale
        return (y * scale).astype(x.dtype)


def norm(config: ModelConfig, name: str) -> RMSNorm:
    """The family's RMSNorm (its eps and offset) named ``name``."""
    return RMSNorm(config.rms_norm_eps, config.norm_offset, name=name)


@functools.cache
def _resolved_targets(model_type: str, targets: tuple[str, ...]) -> frozenset[str]:
    from qlora_jax.models.family import family_for_model_type

    return frozenset(family_for_model_type(model_type).resolve_targets(targets))


def lora_targets(config: ModelConfig, lora: LoraConfig) -> frozenset[str]:
    """The projections of ``config``'s family that get LoRA under ``lora``."""
    return frozenset() if lora.rank == 0 else _resolved_targets(config.model_type, tuple(lora.targets))


class Sublayer(nn.Module):
    """Fields shared by the decoder's parts, and their one way to build a projection."""

    config: ModelConfig
    lora: LoraConfig
    quant: QuantConfig | None
    dtype: Any
    backend: str = "auto"
    attention: str = "auto"

    def parts(self) -> tuple:
        """The shared fields, positionally, to build a sibling part."""
        return (self.config, self.lora, self.quant, self.dtype, self.backend, self.attention)

    def dense(self, features: int, name: str, bias: bool = False) -> QLoRADense:
        """A ``QLoRADense`` that gets LoRA if the family resolves ``name`` among the targets."""
        lora = self.lora
        rank = lora.rank if name in lora_targets(self.config, lora) else 0
        return QLoRADense(features=features, rank=rank, alpha=lora.alpha, dropout=lora.dropout,
                          use_rslora=lora.use_rslora, use_dora=lora.use_dora, use_bias=bias,
                          fp32_output=lora.fp32_output, quant=self.quant,
                          dtype=self.dtype, backend=self.backend, name=name)


class SelfAttention(Sublayer):
    """``__call__(x, positions, segment_ids, kv, index, kind, deterministic) -> (out, new kv)``.

    ``kv`` is this layer's ``{"k", "v"}`` cache (``(B, S, KV, head_dim)`` each) or ``None``;
    ``index`` is then ``(slot, start)``: the slot where the new keys go, and each row's first
    slot that is not left padding (``(B,)``); ``kind`` is the layer's ``FULL`` / ``SLIDING``.
    """

    def project(self, x, deterministic):
        """``q (B, T, H * D)``, ``k`` and ``v`` ``(B, T, KV * D)``: three projections (Phi-3 fuses them)."""
        c = self.config
        q = self.dense(c.num_attention_heads * c.head_dim, "q_proj", c.attention_bias)(x, deterministic)
        k = self.dense(c.num_key_value_heads * c.head_dim, "k_proj", c.attention_bias)(x, deterministic)
        v = self.dense(c.num_key_value_heads * c.head_dim, "v_proj", c.attention_bias)(x, deterministic)
        return q, k, v

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv, index, kind, deterministic):
        c = self.config
        b, t, _ = x.shape
        q, k, v = self.project(x, deterministic)
        q = q.reshape(b, t, c.num_attention_heads, c.head_dim)
        k = k.reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = v.reshape(b, t, c.num_key_value_heads, c.head_dim)
        if c.qk_norm:
            q, k = norm(c, "q_norm")(q), norm(c, "k_norm")(k)
        attend = functools.partial(self._attend, positions=positions, segment_ids=segment_ids, kv=kv, index=index)
        windows = set(c.layer_windows())
        if len(windows) == 1:
            (window,) = windows
            out, new_kv = attend(q, k, v, window=window)
        else:
            out, new_kv = jax.lax.switch(kind, [functools.partial(attend, window=None),
                                                functools.partial(attend, window=c.sliding_window)], q, k, v)
        out = self.dense(c.hidden_size, "o_proj", c.o_proj_bias)(out.reshape(b, t, -1), deterministic)
        return out, new_kv

    def _attend(self, q, k, v, *, positions, segment_ids, kv, index, window):
        """Rope, the cache and attention for one window; pure JAX (a ``lax.switch`` branch)."""
        c = self.config
        inv_freq, scale = rope_frequencies(c, positions, local=window is not None)
        q, k = apply_rope(q, positions, inv_freq, scale), apply_rope(k, positions, inv_freq, scale)
        q_pos = positions
        if kv is None:
            keys, values, k_pos, k_seg, k_valid, new_kv = k, v, positions, segment_ids, None, None
        else:  # the mask in cache slots (a row's rope positions start after its left padding)
            slot, start = index
            keys, values, k_pos, k_valid, new_kv = update_cache(kv, slot, k, v)
            k_valid &= k_pos >= start[:, None]
            q_pos = jnp.broadcast_to(slot + jnp.arange(q.shape[1])[None, :], positions.shape)
            k_seg = segment_ids = None
        dt = self.dtype
        out = attention(q.astype(dt), keys.astype(dt), values.astype(dt), q_positions=q_pos,
                        kv_positions=k_pos, q_segment_ids=segment_ids, kv_segment_ids=k_seg, kv_valid=k_valid,
                        window=window, scale=c.attn_scale, softcap=c.attn_softcap, implementation=self.attention)
        return out, new_kv


def update_cache(kv, index, k, v):
    """Writes ``k, v`` at ``index`` and returns the full cache for attention, and the new ``{"k", "v"}``."""
    keys = jax.lax.dynamic_update_slice_in_dim(kv["k"], k.astype(kv["k"].dtype), index, axis=1)
    values = jax.lax.dynamic_update_slice_in_dim(kv["v"], v.astype(kv["v"].dtype), index, axis=1)
    length = keys.shape[1]
    k_pos = jnp.broadcast_to(jnp.arange(length)[None, :], (k.shape[0], length))
    k_valid = k_pos < index + k.shape[1]
    return keys, values, k_pos, k_valid, {"k": keys, "v": values}


def activation(name: str):
    """The gated MLP's activation: ``silu`` or ``gelu_tanh`` (PyTorch's tanh-approximate GELU)."""
    return jax.nn.silu if name == "silu" else functools.partial(jax.nn.gelu, approximate=True)


class GatedMLP(Sublayer):
    """``down(act(gate(x)) * up(x))`` as a scan body: ``__call__(carry, x) -> (carry, y)``.

    ``fused``: gate and up are one ``gate_up_proj`` whose first half is the gate (Phi-3).
    """

    deterministic: bool = True
    fused: bool = False

    @nn.compact
    def __call__(self, carry, x):
        c, det = self.config, self.deterministic
        if self.fused:
            gate, up = jnp.split(self.dense(2 * c.intermediate_size, "gate_up_proj")(x, det), 2, axis=-1)
        else:
            gate = self.dense(c.intermediate_size, "gate_proj")(x, det)
            up = self.dense(c.intermediate_size, "up_proj")(x, det)
        return carry, self.dense(c.hidden_size, "down_proj")(activation(c.hidden_act)(gate) * up, det)


def tiled_mlp(layer: Sublayer, x: jax.Array, tile: int, deterministic: bool, fused: bool = False) -> jax.Array:
    """``GatedMLP(x)``, ``x`` ``(B, T, hidden)``, computed over sequence tiles of ``tile`` tokens when ``T > tile``.

    Each tile's ``(B, tile, intermediate)`` arrays exist one tile at a time, in the forward and,
    through a rematerialized scan body, in the backward; only the tiles' inputs (``x`` itself) are
    saved. The weights are the scan's broadcast variables, so the layout (``mlp/gate_proj/...``) and
    the LoRA gradients (summed over tiles) are those of the untiled MLP. ``T`` is padded up to a
    multiple of ``tile``; the padded rows are dropped. The cost is one more MLP forward per step.
    """
    args = layer.parts()
    b, t, d = x.shape
    if not tile or t <= tile:
        return GatedMLP(*args, deterministic=deterministic, fused=fused, name="mlp")(None, x)[1]
    n = -(-t // tile)
    tiles = jnp.pad(x, ((0, 0), (0, n * tile - t), (0, 0))).reshape(b, n, tile, d).swapaxes(0, 1)
    body = nn.remat(GatedMLP, prevent_cse=False)
    scan = nn.scan(body, variable_broadcast=["params", FROZEN], split_rngs={"params": False, "dropout": True},
                   length=n)
    _, y = scan(*args, deterministic=deterministic, fused=fused, name="mlp")(None, tiles)
    return y.swapaxes(0, 1).reshape(b, n * tile, -1)[:, :t]


class DecoderLayerBase(Sublayer):
    """What every family's layer takes: ``__call__(h, positions, segment_ids, kv, index, kind) -> (h, new kv)``.

    The layer tags its input with ``checkpoint_name(h, LAYER_INPUT)`` so that the ``offload``
    remat policy (``qlora_jax.models.decoder.remat_policy``) can move it to host memory.
    """

    deterministic: bool = True
    mlp_tile: int = 0  # tokens per MLP tile (tiled_mlp); 0: the whole sequence at once

    def begin(self, h, positions, segment_ids, kv, index, kind, attention_cls: type | None = None):
        """How every family's layer begins: ``(h tagged LAYER_INPUT, self_attn(input_layernorm(h)), new kv)``.

        Called from the layer's ``nn.compact`` ``__call__``; ``attention_cls`` replaces
        ``SelfAttention`` (Phi-3's fused projections).
        """
        from jax.ad_checkpoint import checkpoint_name

        h = checkpoint_name(h, LAYER_INPUT)
        out, new_kv = (attention_cls or SelfAttention)(*self.parts(), name="self_attn")(
            norm(self.config, "input_layernorm")(h), positions, segment_ids, kv, index, kind, self.deterministic)
        return h, out, new_kv
