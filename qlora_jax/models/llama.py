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

The decoder layers are one ``nn.scan`` (``scanned_layers``), so a model of any depth
compiles one layer: every layer variable is stacked along a leading layer axis under
``layers/`` (``frozen/layers/self_attn/q_proj/kernel`` is a ``QuantizedArray`` whose
leaves are ``(L, ...)``; ``params/layers/.../lora_a`` is ``(L, in, r)``). Below
``layers`` the names mirror Hugging Face's, so loaders map
``model.layers.3.self_attn.q_proj.weight`` to index 3 of ``layers/self_attn/q_proj``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from qlora_jax.kernels import BACKENDS
from qlora_jax.layers import FROZEN, QLoRADense, QuantConfig
from qlora_jax.models.attention import IMPLEMENTATIONS, attention
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.rope import apply_rope, inv_frequencies

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REMAT_POLICIES = ("none", "full", "offload", "dots_saveable", "nothing_saveable")
LAYER_INPUT = "decoder_layer_input"  # the checkpoint_name of each layer's saved input


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
    """SwiGLU, ``down(silu(gate(x)) * up(x))``, as a scan body: ``__call__(carry, x) -> (carry, y)``."""

    deterministic: bool = True

    @nn.compact
    def __call__(self, carry, x):
        c, det = self.config, self.deterministic
        gate = self.dense(c.intermediate_size, "gate_proj")(x, det)
        up = self.dense(c.intermediate_size, "up_proj")(x, det)
        return carry, self.dense(c.hidden_size, "down_proj")(jax.nn.silu(gate) * up, det)


def tiled_mlp(layer: _Sublayer, x: jax.Array, tile: int, deterministic: bool) -> jax.Array:
    """``MLP(x)``, ``x`` ``(B, T, hidden)``, computed over sequence tiles of ``tile`` tokens when ``T > tile``.

    Each tile's ``(B, tile, intermediate)`` arrays exist one tile at a time, in the forward and,
    through a rematerialized scan body, in the backward; only the tiles' inputs (``x`` itself) are
    saved. The weights are the scan's broadcast variables, so the layout (``mlp/gate_proj/...``) and
    the LoRA gradients (summed over tiles) are those of the untiled MLP. ``T`` is padded up to a
    multiple of ``tile``; the padded rows are dropped. The cost is one more MLP forward per step.
    """
    args = (layer.config, layer.lora, layer.quant, layer.dtype, layer.backend, layer.attention)
    b, t, d = x.shape
    if not tile or t <= tile:
        return MLP(*args, deterministic=deterministic, name="mlp")(None, x)[1]
    n = -(-t // tile)
    tiles = jnp.pad(x, ((0, 0), (0, n * tile - t), (0, 0))).reshape(b, n, tile, d).swapaxes(0, 1)
    body = nn.remat(MLP, prevent_cse=False)
    scan = nn.scan(body, variable_broadcast=["params", FROZEN], split_rngs={"params": False, "dropout": True},
                   length=n)
    _, y = scan(*args, deterministic=deterministic, name="mlp")(None, tiles)
    return y.swapaxes(0, 1).reshape(b, n * tile, -1)[:, :t]


class DecoderLayer(_Sublayer):
    """One pre-norm block; ``__call__(h, positions, segment_ids, kv, index) -> (h, new kv)``.

    ``kv`` is this layer's ``{"k", "v"}`` cache (``(B, S, KV, head_dim)`` each) or ``None``;
    ``index`` is where the new keys go. The layer's input is tagged ``LAYER_INPUT``
    (``checkpoint_name``) so that the ``offload`` remat policy can move it to host memory.
    """

    deterministic: bool = True
    mlp_tile: int = 0  # tokens per MLP tile (tiled_mlp); 0: the whole sequence at once

    @nn.compact
    def __call__(self, h, positions, segment_ids, kv, index):
        c = self.config
        h = checkpoint_name(h, LAYER_INPUT)
        cache = None if kv is None else {**kv, "index": index}
        attn_out, new_cache = Attention(c, self.lora, self.quant, self.dtype, self.backend, self.attention,
                                        name="self_attn")(
            RMSNorm(c.rms_norm_eps, name="input_layernorm")(h), positions, segment_ids, cache, self.deterministic)
        h = h + attn_out
        x = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(h)
        h = h + tiled_mlp(self, x, self.mlp_tile, self.deterministic)
        return h, None if new_cache is None else {"k": new_cache["k"], "v": new_cache["v"]}


def remat_policy(remat: str):
    """The ``jax.checkpoint`` policy of a ``REMAT_POLICIES`` name (``full``: save nothing but the layer's input).

    ``offload`` saves nothing on the device: each layer's input (``LAYER_INPUT``) goes to
    ``pinned_host`` memory in the forward and comes back for that layer's backward.
    """
    if remat not in REMAT_POLICIES or remat == "none":
        raise ValueError(f"remat={remat!r} has no checkpoint policy; choose from {REMAT_POLICIES[1:]}")
    if remat == "full":
        return None
    if remat == "offload":
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT],
            offload_src="device", offload_dst="pinned_host")
    return getattr(jax.checkpoint_policies, remat)


def scanned_layers(remat: str, num_layers: int):
    """``DecoderLayer`` as one ``nn.scan`` over a leading layer axis of every variable.

    Each layer's variables (packed 4-bit codes and scales, norms, LoRA ``A``/``B``) are
    stacked along axis 0 under ``layers/...``; the hidden state is the scan's carry, the KV
    cache is scanned with the weights, positions and segment ids are broadcast. With
    ``remat`` the layer is rematerialized inside the scan, so the backward scan recomputes
    one layer at a time from its saved input.
    """
    layer_cls = DecoderLayer
    if remat != "none":
        layer_cls = nn.remat(DecoderLayer, policy=remat_policy(remat), prevent_cse=False)
    return nn.scan(layer_cls, variable_axes={"params": 0, FROZEN: 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=num_layers)


class LlamaForCausalLM(nn.Module):
    """The decoder and its head; ``__call__(tokens) -> logits`` (and the new cache when given one)."""

    config: LlamaConfig
    lora: LoraConfig = LoraConfig()
    quant: QuantConfig | None = QuantConfig()
    dtype: Any = jnp.bfloat16
    remat: str = "none"
    backend: str = "auto"  # the 4-bit matmul's backend (qlora_jax.kernels.BACKENDS; docs/kernels.md)
    attention: str = "auto"  # the attention implementation (qlora_jax.models.attention.IMPLEMENTATIONS)
    mlp_tile: int = 0  # tokens per MLP sequence tile (tiled_mlp: long sequences); 0: untiled

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {BACKENDS}")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r} is not one of {IMPLEMENTATIONS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        if not isinstance(self.mlp_tile, int) or isinstance(self.mlp_tile, bool) or self.mlp_tile < 0:
            raise ValueError(f"mlp_tile={self.mlp_tile!r} must be an int >= 0 (tokens per MLP tile; 0: untiled)")
        super().__post_init__()

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, deterministic: bool = True,
                 return_hidden: bool = False):
        c = self.config
        b, t = tokens.shape
        if cache is not None:
            _check_cache(cache, c)
        if positions is None:
            start = 0 if cache is None else cache["index"]
            positions = jnp.broadcast_to(jnp.arange(t)[None, :] + start, (b, t))
        embedding = self.variable(FROZEN, "embed_tokens", self._random_table).value
        embedding = jax.lax.stop_gradient(embedding)
        h = jnp.take(embedding, tokens, axis=0).astype(self.dtype)
        layers = scanned_layers(self.remat if cache is None else "none", c.num_hidden_layers)(
            c, self.lora, self.quant, self.dtype, self.backend, self.attention, deterministic=deterministic,
            mlp_tile=self.mlp_tile, name="layers")
        kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        h, new_kv = layers(h, positions, segment_ids, kv, None if cache is None else cache["index"])
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
        if cache is None:
            return logits
        return logits, {**new_kv, "index": cache["index"] + t}

    def _random_table(self) -> jax.Array:
        """A fresh ``(vocab, hidden)`` bf16 table, N(0, 0.02^2), for a model built without weights."""
        shape = (self.config.vocab_size, self.config.hidden_size)
        return (jax.random.normal(self.make_rng("params"), shape, jnp.float32) * 0.02).astype(jnp.bfloat16)


def _check_cache(cache, config: LlamaConfig) -> None:
    if not isinstance(cache, dict) or set(cache) != {"k", "v", "index"}:
        raise ValueError("cache must be init_cache's {'k', 'v', 'index'} (one stacked array per k and v, "
                         f"layers on axis 0); got {type(cache).__name__} "
                         f"{sorted(cache) if isinstance(cache, dict) else ''}")
    if cache["k"].shape[0] != config.num_hidden_layers:
        raise ValueError(f"cache['k'] has shape {cache['k'].shape}: axis 0 must be the "
                         f"{config.num_hidden_layers} layers")


def head_table(config: LlamaConfig, variables) -> jax.Array:
    """The frozen ``(vocab, hidden)`` output table: ``lm_head``, or the embeddings when tied."""
    frozen = variables[FROZEN]
    return frozen["embed_tokens"] if config.tie_word_embeddings else frozen["lm_head"]


def init_cache(config: LlamaConfig, batch: int, max_length: int, dtype=jnp.bfloat16) -> dict[str, jax.Array]:
    """An empty KV cache, stacked like the layers: ``k, v`` of ``(L, batch, max_length, KV, head_dim)`` and a fill index."""
    shape = (config.num_hidden_layers, batch, max_length, config.num_key_value_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32)}
