"""A Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2) with QLoRA projections.

    h_0 = embed(tokens)
    h   = h + o_proj(attn(rope(q_proj(n1(h))), rope(k_proj(n1(h))), v_proj(n1(h))))   (per layer)
    h   = h + down_proj(silu(gate_proj(n2(h))) * up_proj(n2(h)))
    logits = lm_head(norm(h))      (lm_head = embed.T when embeddings are tied)

Shapes: tokens ``(B, T)`` int; logits ``(B, T, vocab)`` float32 (or, with
``return_hidden=True``, the normed ``(B, T, hidden)`` states that the chunked loss
takes with ``head_table``). Attention goes through ``qlora_jax.models.attention``
(``attention=`` picks the implementation): grouped-query (``H`` query heads share
``KV`` key/value heads), causal, and with ``segment_ids`` a token attends only
within its own segment (packed sequences). RMSNorm math is float32. Every projection is a ``QLoRADense``; embeddings, norms
and the head live in the ``"frozen"`` collection, unquantized.

Variable names mirror Hugging Face's (``layers_3/self_attn/q_proj``), so loaders
map ``model.layers.3.self_attn.q_proj.weight`` by rule.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qlora_jax.kernels import BACKENDS
from qlora_jax.layers import FROZEN, QLoRADense, QuantConfig
from qlora_jax.models.attention import IMPLEMENTATIONS, attention
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.remat import remat_layer
from qlora_jax.models.rope import apply_rope, inv_frequencies

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which projections get LoRA, and its hyper-parameters (QLoRA paper defaults: all seven)."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    targets: tuple[str, ...] = ALL_TARGETS

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(ALL_TARGETS))
        if unknown:
            raise ValueError(f"lora targets {unknown} are not projections; choose from {ALL_TARGETS}")
        if self.rank < 0:
            raise ValueError(f"lora rank={self.rank} must be >= 0")


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` in float32, returned in ``x.dtype``."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.variable(FROZEN, "weight", lambda: jnp.ones((x.shape[-1],), jnp.float32)).value
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * jax.lax.stop_gradient(weight).astype(jnp.float32)).astype(x.dtype)


class _Sublayer(nn.Module):
    """Fields shared by the decoder's parts, and their one way to build a projection."""

    config: LlamaConfig
    lora: LoraConfig
    quant: QuantConfig | None
    dtype: Any
    backend: str = "auto"
    attention: str = "auto"

    def dense(self, features: int, name: str, bias: bool = False) -> QLoRADense:
        """A ``QLoRADense`` that gets LoRA if ``name`` is one of the targets."""
        lora = self.lora
        return QLoRADense(features=features, rank=lora.rank if name in lora.targets else 0, alpha=lora.alpha,
                          dropout=lora.dropout, use_rslora=lora.use_rslora, use_bias=bias, quant=self.quant,
                          dtype=self.dtype, backend=self.backend, name=name)


class Attention(_Sublayer):
    @nn.compact
    def __call__(self, x, positions, segment_ids, cache, deterministic):
        c = self.config
        b, t, _ = x.shape
        q = self.dense(c.num_attention_heads * c.head_dim, "q_proj", c.attention_bias)(x, deterministic)
        k = self.dense(c.num_key_value_heads * c.head_dim, "k_proj", c.attention_bias)(x, deterministic)
        v = self.dense(c.num_key_value_heads * c.head_dim, "v_proj", c.attention_bias)(x, deterministic)
        inv_freq = inv_frequencies(c)
        q = apply_rope(q.reshape(b, t, c.num_attention_heads, c.head_dim), positions, inv_freq)
        k = apply_rope(k.reshape(b, t, c.num_key_value_heads, c.head_dim), positions, inv_freq)
        v = v.reshape(b, t, c.num_key_value_heads, c.head_dim)
        if cache is None:
            keys, values, k_pos, k_seg, k_valid, new_cache = k, v, positions, segment_ids, None, None
        else:
            keys, values, k_pos, k_valid, new_cache = _update_cache(cache, k, v, positions)
            k_seg = None
        out = attention(q, keys.astype(self.dtype), values.astype(self.dtype), q_positions=positions, kv_positions=k_pos,
                        q_segment_ids=segment_ids, kv_segment_ids=k_seg, kv_valid=k_valid, window=c.sliding_window,
                        implementation=self.attention)
        out = self.dense(c.hidden_size, "o_proj")(out.reshape(b, t, -1), deterministic)
        return out, new_cache


def _update_cache(cache, k, v, positions):
    """Writes ``k, v`` at ``cache["index"]`` and returns the full cache for attention."""
    index = cache["index"]
    keys = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, axis=1)
    values = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, axis=1)
    length = keys.shape[1]
    slots = jnp.arange(length)[None, :]
    k_pos = jnp.broadcast_to(slots, (k.shape[0], length))
    k_valid = k_pos < index + k.shape[1]
    return keys, values, k_pos, k_valid, {"k": keys, "v": values, "index": index + k.shape[1]}


class MLP(_Sublayer):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    @nn.compact
    def __call__(self, x, deterministic):
        c = self.config
        gate = self.dense(c.intermediate_size, "gate_proj")(x, deterministic)
        up = self.dense(c.intermediate_size, "up_proj")(x, deterministic)
        return self.dense(c.hidden_size, "down_proj")(jax.nn.silu(gate) * up, deterministic)


class DecoderLayer(_Sublayer):
    @nn.compact
    def __call__(self, h, positions, segment_ids, cache, deterministic):
        c = self.config
        attn_out, new_cache = Attention(c, self.lora, self.quant, self.dtype, self.backend, self.attention,
                                        name="self_attn")(
            RMSNorm(c.rms_norm_eps, name="input_layernorm")(h), positions, segment_ids, cache, deterministic)
        h = h + attn_out
        x = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(h)
        h = h + MLP(c, self.lora, self.quant, self.dtype, self.backend, self.attention, name="mlp")(x, deterministic)
        return h, new_cache


class LlamaForCausalLM(nn.Module):
    """The decoder and its head; ``__call__(tokens) -> logits`` (and the new cache when given one)."""

    config: LlamaConfig
    lora: LoraConfig = LoraConfig()
    quant: QuantConfig | None = QuantConfig()
    dtype: Any = jnp.bfloat16
    remat: str = "none"
    backend: str = "auto"  # the 4-bit matmul's backend (qlora_jax.kernels.BACKENDS; docs/kernels.md)
    attention: str = "auto"  # the attention implementation (qlora_jax.models.attention.IMPLEMENTATIONS)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {BACKENDS}")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r} is not one of {IMPLEMENTATIONS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        super().__post_init__()

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, deterministic: bool = True,
                 return_hidden: bool = False):
        c = self.config
        b, t = tokens.shape
        if positions is None:
            start = 0 if cache is None else cache[0]["index"]
            positions = jnp.broadcast_to(jnp.arange(t)[None, :] + start, (b, t))
        embedding = self.variable(FROZEN, "embed_tokens", self._random_table).value
        embedding = jax.lax.stop_gradient(embedding)
        h = jnp.take(embedding, tokens, axis=0).astype(self.dtype)
        layer_cls = DecoderLayer
        if self.remat != "none":
            policy = None if self.remat == "full" else getattr(jax.checkpoint_policies, self.remat)
            layer_cls = nn.remat(DecoderLayer, policy=policy, static_argnums=(5,))
        new_cache = []
        for i in range(c.num_hidden_layers):
            layer = layer_cls(c, self.lora, self.quant, self.dtype, self.backend, self.attention, name=f"layers_{i}")
            if self.remat != "none" and cache is None:
                call = functools.partial(_layer_output, deterministic=deterministic)
                h, layer_cache = remat_layer(layer, h, positions, segment_ids, call=call), None
            else:
                h, layer_cache = layer(h, positions, segment_ids, None if cache is None else cache[i], deterministic)
            new_cache.append(layer_cache)
        h = RMSNorm(c.rms_norm_eps, name="norm")(h)
        if return_hidden:
            if cache is not None:
                raise ValueError("return_hidden=True is for training (no KV cache)")
            return h
        if c.tie_word_embeddings:
            head = embedding
        else:
            head = jax.lax.stop_gradient(self.variable(FROZEN, "lm_head", self._random_table).value)
        logits = jnp.einsum("btd,vd->btv", h, head.astype(self.dtype), preferred_element_type=jnp.float32)
        return logits if cache is None else (logits, new_cache)

    def _random_table(self) -> jax.Array:
        """A fresh ``(vocab, hidden)`` bf16 table, N(0, 0.02^2), for a model built without weights."""
        shape = (self.config.vocab_size, self.config.hidden_size)
        return (jax.random.normal(self.make_rng("params"), shape, jnp.float32) * 0.02).astype(jnp.bfloat16)


def _layer_output(layer, h, positions, segment_ids, deterministic):
    """A decoder layer's hidden-state output without a KV cache (what ``remat_layer`` recomputes)."""
    return layer(h, positions, segment_ids, None, deterministic)[0]


def head_table(config: LlamaConfig, variables) -> jax.Array:
    """The frozen ``(vocab, hidden)`` output table: ``lm_head``, or the embeddings when tied."""
    frozen = variables[FROZEN]
    return frozen["embed_tokens"] if config.tie_word_embeddings else frozen["lm_head"]


def init_cache(config: LlamaConfig, batch: int, max_length: int, dtype=jnp.bfloat16) -> list[dict[str, jax.Array]]:
    """An empty KV cache: per layer ``k, v`` of ``(batch, max_length, KV, head_dim)`` and a fill index."""
    shape = (batch, max_length, config.num_key_value_heads, config.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32)}
            for _ in range(config.num_hidden_layers)]
