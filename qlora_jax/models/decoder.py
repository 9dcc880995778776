"""``CausalLM``: any registered family's decoder layers as one scan, between the embeddings and the head.

    h_0    = embed(tokens) * embed_multiplier
    h_l    = layer_l(h_{l-1})                 (the family's layer, ``qlora_jax.models.family``)
    logits = cap(head(norm(h_L)))             (head = embed.T when embeddings are tied;
                                               cap(l) = c tanh(l / c) with a final soft-cap, else l)

The residual stream ``h`` is carried in ``residual_dtype`` (the compute dtype when None):
each sublayer reads its normed input in the compute dtype and its output is added in
``residual_dtype``, so a float32 stream keeps what a bf16 one rounds away (docs/benchmarks.md,
training quality). The head reads ``norm(h_L)`` in the compute dtype.

Shapes: tokens ``(B, T)`` int; logits ``(B, T, vocab)`` float32 (or, with
``return_hidden=True``, the normed ``(B, T, hidden)`` states that the chunked loss
takes with ``head_table``, the cap applied there). Attention goes through
``qlora_jax.models.attention`` (``attention=`` picks the implementation); with
``segment_ids`` a token attends only within its own segment (packed sequences).

The decoder layers are one ``nn.scan`` (``scanned_layers``), so a model of any depth
compiles one layer: every layer variable is stacked along a leading layer axis under
``layers/`` (``frozen/layers/self_attn/q_proj/kernel`` is a ``QuantizedArray`` whose
leaves are ``(L, ...)``; ``params/layers/.../lora_a`` is ``(L, in, r)``). Below
``layers`` the names mirror Hugging Face's, so loaders map
``model.layers.3.self_attn.q_proj.weight`` to index 3 of ``layers/self_attn/q_proj``.
Each layer's kind (full or sliding-window attention) is scanned with the weights.

``lora_enabled=False`` runs the same variables with every adapter off: each projection is its
frozen base alone (LoRA's ``s B(A(x))`` and DoRA's rescaling both gone), as peft's
``disable_adapter()`` does. ``model.clone(lora_enabled=False).apply(variables, ...)`` is the
base model's output, the ``params`` collection is not read, and its gradient through that
call is exactly zero: the reference policy of preference tuning (``qlora_jax.train.preference``)
at no extra memory.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.kernels import check_backend
from qlora_jax.layers import FROZEN, QuantConfig
from qlora_jax.models.attention import IMPLEMENTATIONS, soft_cap
from qlora_jax.models.blocks import FULL, LAYER_INPUT, SLIDING, LoraConfig, norm, without_adapters
from qlora_jax.models.config import ModelConfig

REMAT_POLICIES = ("none", "full", "offload", "dots_saveable", "nothing_saveable")


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


def scanned_layers(layer_cls: type, remat: str, num_layers: int):
    """``layer_cls`` as one ``nn.scan`` over a leading layer axis of every variable.

    Each layer's variables (packed 4-bit codes and scales, norms, LoRA ``A``/``B``) are
    stacked along axis 0 under ``layers/...``; the hidden state is the scan's carry, the KV
    cache and the layer kinds are scanned with the weights, positions and segment ids are
    broadcast. With ``remat`` the layer is rematerialized inside the scan, so the backward
    scan recomputes one layer at a time from its saved input.
    """
    if remat != "none":
        layer_cls = nn.remat(layer_cls, policy=remat_policy(remat), prevent_cse=False)
    return nn.scan(layer_cls, variable_axes={"params": 0, FROZEN: 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, 0), length=num_layers)


def layer_kinds(config: ModelConfig) -> np.ndarray:
    """``(L,)`` int32: each layer's ``FULL`` or ``SLIDING``."""
    return np.asarray([FULL if w is None else SLIDING for w in config.layer_windows()], np.int32)


class CausalLM(nn.Module):
    """The decoder and its head; ``__call__(tokens) -> logits`` (and the new cache when given one)."""

    config: ModelConfig
    lora: LoraConfig = LoraConfig()
    quant: QuantConfig | None = QuantConfig()
    dtype: Any = jnp.bfloat16
    remat: str = "none"
    backend: str = "auto"  # the 4-bit matmul's backend (qlora_jax.kernels.BACKENDS; docs/kernels.md)
    attention: str = "auto"  # the attention implementation (qlora_jax.models.attention.IMPLEMENTATIONS)
    mlp_tile: int = 0  # tokens per MLP sequence tile (blocks.tiled_mlp: long sequences); 0: untiled
    residual_dtype: Any = None  # the residual stream's dtype (the hidden state between sublayers); None: dtype
    lora_enabled: bool = True  # False: every projection is its frozen base alone (module docstring)

    def __post_init__(self):
        from qlora_jax.models.blocks import lora_targets

        check_backend(self.backend)
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r} is not one of {IMPLEMENTATIONS}")
        if self.residual_dtype is not None and jnp.dtype(self.residual_dtype) not in (
                jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"residual_dtype={self.residual_dtype!r} must be float32, bfloat16, float16 or None")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        if not isinstance(self.mlp_tile, int) or isinstance(self.mlp_tile, bool) or self.mlp_tile < 0:
            raise ValueError(f"mlp_tile={self.mlp_tile!r} must be an int >= 0 (tokens per MLP tile; 0: untiled)")
        lora_targets(self.config, self.lora)  # a target the family does not have fails here, by name
        if not isinstance(self.lora_enabled, bool):
            raise ValueError(f"lora_enabled={self.lora_enabled!r} must be a bool")
        super().__post_init__()

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, deterministic: bool = True,
                 return_hidden: bool = False):
        from qlora_jax.models.family import family_of

        c = self.config
        b, t = tokens.shape
        if cache is not None:
            _check_cache(cache, c)
        if cache is not None:
            cache = {"start": jnp.zeros((b,), jnp.int32), **cache}
        if positions is None:  # with a cache: slots, less each row's left padding
            slots = jnp.arange(t)[None, :] + (0 if cache is None else cache["index"])
            positions = jnp.broadcast_to(slots if cache is None else jnp.maximum(slots - cache["start"][:, None], 0),
                                         (b, t))
        embedding = self.variable(FROZEN, "embed_tokens", self._random_table).value
        embedding = jax.lax.stop_gradient(embedding)
        h = jnp.take(embedding, tokens, axis=0).astype(self.residual_dtype or self.dtype)
        if c.embed_multiplier != 1.0:
            h = h * jnp.asarray(c.embed_multiplier, h.dtype)
        lora = self.lora if self.lora_enabled else without_adapters(self.lora)
        layers = scanned_layers(family_of(c).layer, self.remat if cache is None else "none", c.num_hidden_layers)(
            c, lora, self.quant, self.dtype, self.backend, self.attention, deterministic=deterministic,
            mlp_tile=self.mlp_tile, name="layers")
        kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        h, new_kv = layers(h, positions, segment_ids, kv, None if cache is None else (cache["index"], cache["start"]),
                           jnp.asarray(layer_kinds(c)))
        h = norm(c, "norm")(h).astype(self.dtype)
        if return_hidden:
            if cache is not None:
                raise ValueError("return_hidden=True is for training (no KV cache)")
            return h
        if c.tie_word_embeddings:
            head = embedding
        else:
            head = jax.lax.stop_gradient(self.variable(FROZEN, "lm_head", self._random_table).value)
        logits = jnp.einsum("btd,vd->btv", h, head.astype(self.dtype), preferred_element_type=jnp.float32)
        logits = soft_cap(logits, c.final_softcap)
        if cache is None:
            return logits
        return logits, {**new_kv, "index": cache["index"] + t, "start": cache["start"]}

    def _random_table(self) -> jax.Array:
        """A fresh ``(vocab, hidden)`` bf16 table, N(0, 0.02^2), for a model built without weights."""
        shape = (self.config.vocab_size, self.config.hidden_size)
        return (jax.random.normal(self.make_rng("params"), shape, jnp.float32) * 0.02).astype(jnp.bfloat16)


def _check_cache(cache, config: ModelConfig) -> None:
    if not isinstance(cache, dict) or not {"k", "v", "index"} <= set(cache) <= {"k", "v", "index", "start"}:
        raise ValueError("cache must be init_cache's {'k', 'v', 'index', 'start'} (one stacked array per k and v, "
                         f"layers on axis 0); got {type(cache).__name__} "
                         f"{sorted(cache) if isinstance(cache, dict) else ''}")
    if cache["k"].shape[0] != config.num_hidden_layers:
        raise ValueError(f"cache['k'] has shape {cache['k'].shape}: axis 0 must be the "
                         f"{config.num_hidden_layers} layers")


def head_table(config: ModelConfig, variables) -> jax.Array:
    """The frozen ``(vocab, hidden)`` output table: ``lm_head``, or the embeddings when tied."""
    frozen = variables[FROZEN]
    return frozen["embed_tokens"] if config.tie_word_embeddings else frozen["lm_head"]


def init_cache(config: ModelConfig, batch: int, max_length: int, dtype=jnp.bfloat16,
               start=None) -> dict[str, jax.Array]:
    """An empty KV cache, stacked like the layers: ``k, v`` of ``(L, batch, max_length, KV, head_dim)``, a fill index.

    ``start`` ``(batch,)``: each row's left padding, in slots (zeros when None). Slots before a
    row's start are never attended to, and its positions (rope) count from its start, so
    prompts of different lengths share one batch left-padded (``qlora_jax.models.generate``).
    """
    shape = (config.num_hidden_layers, batch, max_length, config.num_key_value_heads, config.head_dim)
    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32).reshape(batch)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32),
            "start": start}
