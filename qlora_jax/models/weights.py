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
from qlora_jax.layers.dora import stacked_weight_norms
from qlora_jax.models.blocks import LoraConfig, lora_targets
from qlora_jax.models.config import ModelConfig
from qlora_jax.models.family import LayerTensor, family_of
from qlora_jax.models.stacking import LAYERS, StackedWriter
from qlora_jax.quant import QuantizedArray, quantize

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")
_TOP = {"model.embed_tokens.weight": ("embed_tokens",), "lm_head.weight": ("lm_head",), "model.norm.weight": ("norm", "weight")}
_LEAF = {"proj": "kernel", "bias": "bias", "norm": "weight", "float": "weight", "table": "weight"}


def expected_tensors(config: ModelConfig) -> dict[str, LayerTensor]:
    """Every HF tensor name the model needs, with its shape and kind (the family's layer tensors, per layer)."""
    c = config
    table = {"model.embed_tokens.weight": LayerTensor((c.vocab_size, c.hidden_size), "table"),
             "model.norm.weight": LayerTensor((c.hidden_size,), "norm")}
    if not c.tie_word_embeddings:
        table["lm_head.weight"] = LayerTensor((c.vocab_size, c.hidden_size), "table")
    layer = family_of(c).layer_tensors(c)
    for i in range(c.num_hidden_layers):
        table.update({f"model.layers.{i}.{name}": t for name, t in layer.items()})
    return table


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the model needs, with its shape."""
    return {name: t.shape for name, t in expected_tensors(config).items()}


def tree_path(name: str, kind: str) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """``(path below the collection or below layers/, stacking index or None)`` of an HF tensor name.

    The index is ``(layer,)``, or ``(layer, expert)`` for a numbered component below the layer
    (``block_sparse_moe.experts.3.w1.weight``: expert 3 of the ``(L, E, ...)`` stack
    ``layers/block_sparse_moe/experts/w1/kernel``).
    """
    if name in _TOP:
        return _TOP[name], None
    m = _LAYER.match(name)
    parts = m.group(2).split(".")[:-1]
    numbers = tuple(int(p) for p in parts if p.isdigit())
    return (*(p for p in parts if not p.isdigit()), _LEAF[kind]), (int(m.group(1)), *numbers)


def _stack_sizes(config: ModelConfig, index: tuple[int, ...]) -> tuple[int, ...]:
    return (config.num_hidden_layers, config.num_experts)[: len(index)]


def variables_from_tensors(
    config: ModelConfig,
    tensors: Iterable[tuple[str, Any]],
    quant: QuantConfig | None = QuantConfig(),
    lora: LoraConfig = LoraConfig(),
    key: jax.Array | None = None,
    base_dtype=jnp.bfloat16,
    param_dtype=jnp.float32,
) -> dict[str, Any]:
    """``{"params": LoRA, "frozen": base}`` for ``CausalLM(config, lora, quant)``.

    Raises ``ValueError`` naming unknown, missing, mis-shaped or non-finite tensors.
    """
    table = expected_tensors(config)
    frozen: dict[str, Any] = {}
    layers = StackedWriter(config.num_hidden_layers)
    seen = set()
    unknown = []
    for name, value in tensors:
        if name not in table:
            if config.tie_word_embeddings and name == "lm_head.weight" or _IGNORED.search(name):
                continue
            unknown.append(name)
            continue
        shape = tuple(value.shape)
        if shape != table[name].shape:
            raise ValueError(f"tensor {name} has shape {shape}, the config needs {table[name].shape}")
        path, index, stored = _place(name, table[name].kind, value, quant, base_dtype)
        # wait for this tensor's conversion before reading the next: with async dispatch the
        # float copies would otherwise pile up, and peak memory would be the float model's
        if index is None:
            _set(frozen, path, jax.block_until_ready(stored))
        else:
            layers.write(path, index, stored, _stack_sizes(config, index))
        del value, stored
        seen.add(name)
    if unknown:
        raise ValueError(f"{len(unknown)} tensors the {config.model_type} model does not use: {unknown[:5]}")
    missing = [n for n in table if n not in seen]
    if missing:
        raise ValueError(f"{len(missing)} tensors missing from the checkpoint, e.g. {missing[:5]}")
    for path, stack in layers.items():
        _set(frozen, (LAYERS, *path), stack)
    params = init_lora(config, lora, jax.random.key(0) if key is None else key, param_dtype, frozen)
    return {"params": params, FROZEN: frozen}


def init_lora(config: ModelConfig, lora: LoraConfig, key: jax.Array, param_dtype=jnp.float32,
              frozen: dict[str, Any] | None = None) -> dict[str, Any]:
    """PEFT's init for every targeted projection: ``A ~ U(+-1/sqrt(in))`` ``(in, r)``, ``B = 0`` ``(r, out)``.

    Stacked over the layers (``(L, in, r)`` and ``(L, r, out)``); layer ``i``'s ``A`` is
    drawn from the ``k``-th split of ``key`` in HF tensor order, as it always was. With
    ``lora.use_dora`` each projection also gets PEFT's DoRA magnitude ``lora_magnitude``
    ``(L, out)``: the row norms of the base ``kernel`` in ``frozen`` (which DoRA then needs).
    """
    if lora.use_dora and lora.rank and frozen is None:
        raise ValueError("init_lora: lora.use_dora needs the frozen base weights (frozen=) for DoRA's magnitudes")
    per_layer: dict[tuple[str, ...], list] = {}
    targets = lora_targets(config, lora)
    if not targets:
        return {}
    for name, t in expected_tensors(config).items():
        if t.kind != "proj" or not name.startswith("model.layers."):
            continue
        path, _ = tree_path(name, t.kind)
        if path[-2] not in targets:
            continue
        out_f, in_f = t.shape
        key, sub = jax.random.split(key)
        bound = 1.0 / math.sqrt(in_f)
        per_layer.setdefault(path[:-1] + ("lora_a",), []).append(
            jax.random.uniform(sub, (in_f, lora.rank), param_dtype, -bound, bound))
        per_layer.setdefault(path[:-1] + ("lora_b",), []).append(jnp.zeros((lora.rank, out_f), param_dtype))
    params: dict[str, Any] = {}
    for path, leaves in per_layer.items():
        _set(params, (LAYERS, *path), jnp.stack(leaves))
        if lora.use_dora and path[-1] == "lora_b":
            kernel = frozen[LAYERS]
            for part in path[:-1]:
                kernel = kernel[part]
            _set(params, (LAYERS, *path[:-1], "lora_magnitude"),
                 stacked_weight_norms(kernel["kernel"]).astype(param_dtype))
    return params


def _place(name: str, kind: str, value, quant: QuantConfig | None,
           base_dtype) -> tuple[tuple[str, ...], tuple[int, ...] | None, Any]:
    """``(path, stacking index, stored value)``: the index is ``None`` outside the decoder layers."""
    path, layer = tree_path(name, kind)
    if isinstance(value, QuantizedArray):  # pre-quantized (a bnb checkpoint): kept, or dequantized for a float base
        if kind != "proj" or layer is None:
            raise ValueError(f"tensor {name} is 4-bit quantized; only projection weights may be")
        return path, layer, value if quant is not None else value.dequantize(base_dtype)
    value = jnp.asarray(value)
    if kind == "proj" and quant is not None:  # quantize rejects NaN / inf itself, with their positions
        try:
            return path, layer, quantize(value, quant.quant_type, quant.blocksize, double_quant=quant.double_quant)
        except ValueError as e:
            raise ValueError(f"tensor {name}: {e}") from None
    _check_finite(name, value)
    return path, layer, value.astype(jnp.float32 if kind in ("norm", "float") else base_dtype)


def _check_finite(name: str, value: jax.Array) -> None:
    """Raises naming ``name`` when a float base tensor holds NaN or inf (quantize does the same for 4-bit ones)."""
    if not jnp.issubdtype(value.dtype, jnp.floating) or isinstance(value, jax.core.Tracer):  # traced: a plan
        return
    bad = int(jnp.sum(~jnp.isfinite(value)))
    if bad:
        first = np.argwhere(~np.isfinite(np.asarray(value)))[0].tolist()
        raise ValueError(f"tensor {name} holds {bad} NaN or inf values (the first at index {first}); "
                         "the checkpoint is damaged")


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
