"""The Mixtral family: Llama's attention and a sparse mixture of SwiGLU experts, top-2 routed.

    p     = softmax(x R^T)                  (router R (E, hidden), float32)
    w, e  = top_k(p), renormalized          (k = experts_per_token)
    y     = sum_j w_j * W2[e_j] (silu(W1[e_j] x) * W3[e_j] x)

The experts are stored as HF writes them (``block_sparse_moe.experts.{e}.w1.weight``, ...)
and held as one 4-bit stack per weight (``layers/block_sparse_moe/experts/w1/kernel``, a
``QuantizedArray`` whose leaves are ``(L, E, ...)``; each expert's bytes are bitsandbytes'
bytes of that ``(out, in)`` matrix). ``experts_mlp`` dequantizes a layer's experts and runs
them as a grouped matmul (``jax.lax.ragged_dot`` over the tokens sorted by expert), or
``"dense"`` (every expert on every token, weighted; the reference). LoRA goes on the
attention projections (``q_proj k_proj v_proj o_proj``); the experts and the router stay
frozen. Not yet: LoRA on the experts, the load-balancing loss (no trainable router), MLP
sequence tiles (``mlp_tile`` is ignored by the experts).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qlora_jax.layers import FROZEN, QuantConfig
from qlora_jax.layers.qlora_dense import torch_linear_init
from qlora_jax.models import llama
from qlora_jax.models.blocks import FULL, DecoderLayerBase, Sublayer, activation, norm
from qlora_jax.models.config import ModelConfig, common_fields
from qlora_jax.models.family import Family, LayerTensor
from qlora_jax.models.stacking import stack_layers
from qlora_jax.quant import QuantizedArray, quantize

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_IMPLEMENTATIONS = ("grouped", "dense")


def expert_weights(kernel, dtype) -> jax.Array:
    """``(E, out, in)`` in ``dtype`` from a layer's expert stack (4-bit or float)."""
    kernel = jax.lax.stop_gradient(kernel)
    if isinstance(kernel, QuantizedArray):
        return jax.vmap(lambda q: q.dequantize(dtype))(kernel)
    return kernel.astype(dtype)


def route(x: jax.Array, router: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``(weights (N, k) float32, experts (N, k) int32)`` of tokens ``x`` ``(N, hidden)``, in float32."""
    logits = jnp.einsum("nh,eh->ne", x.astype(jnp.float32), jax.lax.stop_gradient(router).astype(jnp.float32))
    top, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
    return top / jnp.sum(top, axis=-1, keepdims=True), experts


def experts_mlp(x: jax.Array, weights: jax.Array, experts: jax.Array, w1, w2, w3, act,
                implementation: str = "grouped") -> jax.Array:
    """``sum_j weights[:, j] * expert_{experts[:, j]}(x)`` for ``x`` ``(N, hidden)``; ``w*`` are ``(E, out, in)``."""
    if implementation not in EXPERT_IMPLEMENTATIONS:
        raise ValueError(f"experts implementation={implementation!r} is not one of {EXPERT_IMPLEMENTATIONS}")
    f32 = jnp.float32
    if implementation == "dense":
        gate = jnp.einsum("nh,eih->nei", x, w1, preferred_element_type=f32)
        up = jnp.einsum("nh,eih->nei", x, w3, preferred_element_type=f32)
        y = jnp.einsum("nei,ehi->neh", (act(gate) * up).astype(x.dtype), w2, preferred_element_type=f32)
        dense = jnp.zeros((x.shape[0], w1.shape[0]), f32).at[jnp.arange(x.shape[0])[:, None], experts].set(weights)
        return jnp.einsum("neh,ne->nh", y, dense).astype(x.dtype)
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # the (token, slot) pairs grouped by expert
    rows = x[order // k]
    sizes = jnp.bincount(flat, length=w1.shape[0]).astype(jnp.int32)
    gate = jax.lax.ragged_dot(rows, w1.transpose(0, 2, 1), sizes, preferred_element_type=f32)
    up = jax.lax.ragged_dot(rows, w3.transpose(0, 2, 1), sizes, preferred_element_type=f32)
    y = jax.lax.ragged_dot((act(gate) * up).astype(x.dtype), w2.transpose(0, 2, 1), sizes, preferred_element_type=f32)
    y = jnp.zeros_like(y).at[order].set(y).reshape(n, k, -1)
    return jnp.einsum("nkh,nk->nh", y, weights).astype(x.dtype)


class FrozenWeight(nn.Module):
    """One frozen leaf: the router's float32 ``weight``, or a ``kernel`` stacked over ``count`` experts."""

    shape: tuple[int, ...]
    leaf: str
    quant: QuantConfig | None = None
    count: int = 0

    @nn.compact
    def __call__(self):
        return self.variable(FROZEN, self.leaf, self._init).value

    def _init(self):
        key = self.make_rng("params")
        if not self.count:
            return jax.random.normal(key, self.shape, jnp.float32) * 0.02
        ws = [torch_linear_init(k, self.shape).astype(jnp.bfloat16) for k in jax.random.split(key, self.count)]
        if self.quant is None:
            return jnp.stack(ws)
        q = self.quant
        return stack_layers([quantize(w, q.quant_type, q.blocksize, double_quant=q.double_quant) for w in ws])


class SparseMoe(Sublayer):
    """The router (``gate``) and the experts' stacks (``experts/w1``, ``w2``, ``w3``) of one layer."""

    implementation: str = "grouped"

    @nn.compact
    def __call__(self, x):
        c = self.config
        b, t, h = x.shape
        router = FrozenWeight((c.num_experts, h), "weight", name="gate")()
        kernels = _Experts(c, self.quant, name="experts")()
        x2 = x.reshape(b * t, h).astype(self.dtype)
        weights, chosen = route(x2, router, c.experts_per_token)
        w1, w2, w3 = (expert_weights(kernels[n], self.dtype) for n in ("w1", "w2", "w3"))
        y = experts_mlp(x2, weights, chosen, w1, w2, w3, activation(c.hidden_act), self.implementation)
        return y.reshape(b, t, h)


class _Experts(nn.Module):
    """The three expert stacks under ``experts/`` (HF's ``experts.{e}.w1`` without the number)."""

    config: ModelConfig
    quant: QuantConfig | None

    @nn.compact
    def __call__(self):
        c = self.config
        shapes = {"w1": (c.intermediate_size, c.hidden_size), "w2": (c.hidden_size, c.intermediate_size),
                  "w3": (c.intermediate_size, c.hidden_size)}
        return {n: FrozenWeight(s, "kernel", self.quant, c.num_experts, name=n)() for n, s in shapes.items()}


class DecoderLayer(DecoderLayerBase):
    """Llama's pre-norm block with the sparse experts in place of the MLP."""

    @nn.compact
    def __call__(self, h, positions, segment_ids, kv, index, kind=FULL):
        c = self.config
        h, attn_out, new_kv = self.begin(h, positions, segment_ids, kv, index, kind)
        h = h + attn_out.astype(h.dtype)
        moe = SparseMoe(*self.parts(), name="block_sparse_moe")(norm(c, "post_attention_layernorm")(h))
        return h + moe.astype(h.dtype), new_kv


def layer_tensors(c: ModelConfig) -> dict[str, LayerTensor]:
    h, i = c.hidden_size, c.intermediate_size
    out = {**llama.attention_tensors(c),
           "block_sparse_moe.gate.weight": LayerTensor((c.num_experts, h), "float")}
    for e in range(c.num_experts):
        for name, shape in (("w1", (i, h)), ("w2", (h, i)), ("w3", (i, h))):
            out[f"block_sparse_moe.experts.{e}.{name}.weight"] = LayerTensor(shape, "proj")
    out.update({n: LayerTensor((h,), "norm") for n in ("input_layernorm.weight", "post_attention_layernorm.weight")})
    return out


def parse_hf(cfg: dict[str, Any]) -> ModelConfig:
    for key in ("num_local_experts", "num_experts_per_tok"):
        if key not in cfg:
            raise ValueError(f"config.json is missing the field {key!r}")
    fields = common_fields(cfg)
    return ModelConfig(**fields, num_experts=int(cfg["num_local_experts"]),
                       experts_per_token=int(cfg["num_experts_per_tok"]),
                       **llama.sliding_fields(cfg, fields["num_hidden_layers"], True))


def hf_config(c: ModelConfig) -> dict[str, Any]:
    return {"hidden_act": "silu", "num_local_experts": c.num_experts, "num_experts_per_tok": c.experts_per_token,
            "sliding_window": c.sliding_window}


FAMILY = Family(
    name="mixtral",
    model_types=("mixtral",),
    architectures={"mixtral": "MixtralForCausalLM"},
    layer=DecoderLayer,
    targets=TARGETS,
    parse_hf=parse_hf,
    layer_tensors=layer_tensors,
    hf_config=hf_config,
)
