"""Hugging Face tensor names -> the model's variable tree, one tensor at a time.

``variables_from_tensors`` consumes ``(name, array)`` pairs in HF naming
(``model.layers.3.self_attn.q_proj.weight``), puts each where the Flax model
expects it (layer 3 of the stacked ``layers/self_attn/q_proj/kernel``,
``qlora_jax.models.stacking``), quantizes projection weights as they arrive (on
the device they live on; the float copy is dropped right after, and the stacked
arrays are written in place), and initialises LoRA as PEFT does. Linear weights keep PyTorch's ``(out, in)`` layout, so NF4 bytes are
bitsandbytes' bytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.layers import FROZEN, QuantConfig
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.llama import LoraConfig
from qlora_jax.models.stacking import LAYERS, StackedWriter
from qlora_jax.quant import QuantizedArray, quantize

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.(weight|bias)$")
_NORM = re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the model needs, with its shape."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        proj = {"self_attn.q_proj": (q, c.hidden_size), "self_attn.k_proj": (kv, c.hidden_size),
                "self_attn.v_proj": (kv, c.hidden_size), "self_attn.o_proj": (c.hidden_size, q),
                "mlp.gate_proj": (c.intermediate_size, c.hidden_size), "mlp.up_proj": (c.intermediate_size, c.hidden_size),
                "mlp.down_proj": (c.hidden_size, c.intermediate_size)}
        for name, shape in proj.items():
            shapes[f"{p}.{name}.weight"] = shape
        if c.attention_bias:
            shapes.update({f"{p}.self_attn.q_proj.bias": (q,), f"{p}.self_attn.k_proj.bias": (kv,),
                           f"{p}.self_attn.v_proj.bias": (kv,)})
        shapes[f"{p}.input_layernorm.weight"] = (c.hidden_size,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (c.hidden_size,)
    return shapes


def variables_from_tensors(
    config: LlamaConfig,
    tensors: Iterable[tuple[str, Any]],
    quant: QuantConfig | None = QuantConfig(),
    lora: LoraConfig = LoraConfig(),
    key: jax.Array | None = None,
    base_dtype=jnp.bfloat16,
    param_dtype=jnp.float32,
) -> dict[str, Any]:
    """``{"params": LoRA, "frozen": base}`` for ``LlamaForCausalLM(config, lora, quant)``.

    Raises ``ValueError`` naming unknown, missing or mis-shaped tensors.
    """
    shapes = expected_shapes(config)
    frozen: dict[str, Any] = {}
    layers = StackedWriter(config.num_hidden_layers)
    seen = set()
    unknown = []
    for name, value in tensors:
        if name not in shapes:
            if config.tie_word_embeddings and name == "lm_head.weight" or _IGNORED.search(name):
                continue
            unknown.append(name)
            continue
        shape = tuple(value.shape)
        if shape != shapes[name]:
            raise ValueError(f"tensor {name} has shape {shape}, the config needs {shapes[name]}")
        path, layer, stored = _place(name, value, quant, base_dtype)
        # wait for this tensor's conversion before reading the next: with async dispatch the
        # float copies would otherwise pile up, and peak memory would be the float model's
        if layer is None:
            _set(frozen, path, jax.block_until_ready(stored))
        else:
            layers.write(path, layer, stored)
        del value, stored
        seen.add(name)
    if unknown:
        raise ValueError(f"{len(unknown)} tensors the {config.model_type} model does not use: {unknown[:5]}")
    missing = [n for n in shapes if n not in seen]
    if missing:
        raise ValueError(f"{len(missing)} tensors missing from the checkpoint, e.g. {missing[:5]}")
    for path, stack in layers.items():
        _set(frozen, (LAYERS, *path), stack)
    params = init_lora(config, lora, jax.random.key(0) if key is None else key, param_dtype)
    return {"params": params, FROZEN: frozen}


def init_lora(config: LlamaConfig, lora: LoraConfig, key: jax.Array, param_dtype=jnp.float32) -> dict[str, Any]:
    """PEFT's init for every targeted projection: ``A ~ U(+-1/sqrt(in))`` ``(in, r)``, ``B = 0`` ``(r, out)``.

    Stacked over the layers (``(L, in, r)`` and ``(L, r, out)``); layer ``i``'s ``A`` is
    drawn from the ``k``-th split of ``key`` in HF tensor order, as it always was.
    """
    per_layer: dict[tuple[str, ...], list] = {}
    if lora.rank == 0:
        return {}
    for name, shape in expected_shapes(config).items():
        m = _LAYER.match(name)
        if not m or m.group(4) != "weight" or m.group(3) not in lora.targets:
            continue
        out_f, in_f = shape
        key, sub = jax.random.split(key)
        bound = 1.0 / math.sqrt(in_f)
        path = (m.group(2), m.group(3))
        per_layer.setdefault(path + ("lora_a",), []).append(
            jax.random.uniform(sub, (in_f, lora.rank), param_dtype, -bound, bound))
        per_layer.setdefault(path + ("lora_b",), []).append(jnp.zeros((lora.rank, out_f), param_dtype))
    params: dict[str, Any] = {}
    for path, leaves in per_layer.items():
        _set(params, (LAYERS, *path), jnp.stack(leaves))
    return params


def _place(name: str, value, quant: QuantConfig | None, base_dtype) -> tuple[tuple[str, ...], int | None, Any]:
    """``(path, layer, stored value)``: ``layer`` is ``None`` outside the decoder layers."""
    if isinstance(value, QuantizedArray):  # pre-quantized (a bnb checkpoint): kept, or dequantized for a float base
        m = _LAYER.match(name)
        if not m or m.group(4) != "weight":
            raise ValueError(f"tensor {name} is 4-bit quantized; only projection weights may be")
        path = (m.group(2), m.group(3), "kernel")
        return path, int(m.group(1)), value if quant is not None else value.dequantize(base_dtype)
    value = jnp.asarray(value)
    if name == "model.embed_tokens.weight":
        return ("embed_tokens",), None, value.astype(base_dtype)
    if name == "lm_head.weight":
        return ("lm_head",), None, value.astype(base_dtype)
    if name == "model.norm.weight":
        return ("norm", "weight"), None, value.astype(jnp.float32)
    m = _NORM.match(name)
    if m:
        return (m.group(2), "weight"), int(m.group(1)), value.astype(jnp.float32)
    m = _LAYER.match(name)
    path, layer = (m.group(2), m.group(3)), int(m.group(1))
    if m.group(4) == "bias":
        return path + ("bias",), layer, value.astype(base_dtype)
    if quant is None:
        return path + ("kernel",), layer, value.astype(base_dtype)
    return path + ("kernel",), layer, quantize(value, quant.quant_type, quant.blocksize, double_quant=quant.double_quant)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def numpy_tensors(state_dict: dict[str, Any]) -> Iterable[tuple[str, np.ndarray]]:
    """``(name, float32 numpy)`` pairs from a torch or numpy state dict (used by tests and converters)."""
    for name, value in state_dict.items():
        if hasattr(value, "detach"):
            value = value.detach().float().cpu().numpy()
        yield name, np.asarray(value)
