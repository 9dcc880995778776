"""PEFT adapter export / import and merged-model export, in Hugging Face's formats.

PEFT (``adapter_config.json`` + ``adapter_model.safetensors``): for each
targeted projection, ``base_model.model.model.layers.{i}.{module}.lora_A.weight``
(``{module}`` is its path in the layer, ``self_attn.q_proj`` or ``mlp.gate_up_proj``)
is our ``A.T`` ``(r, in)`` and ``...lora_B.weight`` is ``B.T`` ``(out, r)``; the
scale ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``) is PEFT's. With DoRA
(``use_dora: true`` in the config) ``...lora_magnitude_vector`` is our magnitude ``(out,)``.

Merged: a Hugging Face folder (``config.json`` + ``model.safetensors``) whose
projections hold ``W' = dequant(W) + s * (A @ B).T``, loadable by transformers; with DoRA
``W' = (m / ||W + s (A B)^T||_row)[:, None] * (W + s (A B)^T)``, as PEFT merges it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from qlora_jax.models.blocks import LoraConfig
from qlora_jax.models.config import ModelConfig
from qlora_jax.models.family import family_of, known_targets
from qlora_jax.models.stacking import LAYERS, check_stacked, layer_slice, num_stacked
from qlora_jax.quant import QuantizedArray, dequantize, quantize

_PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.([\w.]+)\."
                       r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")
_LEAVES = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b", "lora_magnitude_vector": "lora_magnitude",
           "lora_magnitude_vector.weight": "lora_magnitude"}
MAGNITUDE = "lora_magnitude"  # DoRA's magnitude leaf, beside lora_a and lora_b


def _lora_paths(tree: dict[str, Any], prefix: tuple[str, ...] = ()):
    """The paths (below ``layers``) of every module holding ``lora_a`` and ``lora_b``, in tree order."""
    if "lora_a" in tree or "lora_b" in tree:
        yield prefix
        return
    for key, sub in tree.items():
        if isinstance(sub, dict):
            yield from _lora_paths(sub, prefix + (key,))


def _get(tree: dict, path: tuple[str, ...]):
    for part in path:
        tree = tree[part]
    return tree


def _lora_modules(params: dict[str, Any]):
    """Yields ``(layer_index, module path, A (in, r), B (r, out), DoRA magnitude (out,) or None)`` in layer order."""
    check_stacked(params, "the LoRA params")
    layers = params.get(LAYERS, {})
    if not layers:
        return
    paths = list(_lora_paths(layers))
    for i in range(num_stacked(layers)):
        for path in paths:
            ab = _get(layers, path)
            yield i, path, ab["lora_a"][i], ab["lora_b"][i], ab[MAGNITUDE][i] if MAGNITUDE in ab else None


def save_peft_adapter(folder: str | os.PathLike, params: dict[str, Any], lora: LoraConfig,
                      base_model_name_or_path: str = "") -> None:
    """Writes ``params`` (the LoRA tree) as a PEFT LoRA adapter that ``PeftModel.from_pretrained`` loads."""
    from safetensors.numpy import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    targets = set()
    for i, path, a, b, m in _lora_modules(params):
        base = f"base_model.model.model.layers.{i}.{'.'.join(path)}"
        if (m is not None) != lora.use_dora:
            raise ValueError(f"lora.use_dora={lora.use_dora} but {'.'.join(path)} "
                             f"{'has' if m is not None else 'has no'} DoRA magnitude ({MAGNITUDE})")
        tensors[f"{base}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a, np.float32).T)
        tensors[f"{base}.lora_B.weight"] = np.ascontiguousarray(np.asarray(b, np.float32).T)
        if m is not None:
            tensors[f"{base}.lora_magnitude_vector"] = np.asarray(m, np.float32)
        targets.add(path[-1])
    if not tensors:
        raise ValueError("no LoRA parameters to export (rank 0 or no targets)")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "use_rslora": lora.use_rslora, "use_dora": lora.use_dora,
        "target_modules": sorted(targets),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "base_model_name_or_path": base_model_name_or_path,
    }
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def load_peft_adapter(folder: str | os.PathLike, param_dtype=jnp.float32,
                      num_layers: int | None = None) -> tuple[dict[str, Any], LoraConfig]:
    """Reads a PEFT LoRA folder back into ``(params, LoraConfig)``, stacked over the layers.

    ``num_layers`` is the model's depth (default: the highest layer in the file, plus one).
    A layer the adapter leaves out (PEFT's ``layers_to_transform``) gets ``A = B = 0``,
    which adds nothing, as PEFT's missing adapter does; a DoRA adapter (``use_dora``) must cover
    every layer, since the magnitude that leaves a layer unchanged is its base's row norms.
    """
    from safetensors.numpy import load_file

    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, "adapter_config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no adapter_config.json in {folder}")
    cfg = json.load(open(cfg_path, encoding="utf-8"))
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type={cfg.get('peft_type')!r}, only 'LORA' is supported")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = sorted(set(targets) - set(known_targets()))
    if unknown:
        raise ValueError(f"{cfg_path}: target_modules {unknown} are not projections of a supported family "
                         f"{known_targets()}")
    lora = LoraConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                      use_rslora=bool(cfg.get("use_rslora", False)), use_dora=bool(cfg.get("use_dora", False)),
                      targets=tuple(t for t in known_targets() if t in targets))
    per_layer: dict[tuple[str, ...], dict[int, Any]] = {}
    weights = os.path.join(folder, "adapter_model.safetensors")
    for key, value in load_file(weights).items():
        m = _PEFT_KEY.match(key.replace(".default.", "."))
        if not m or m.group(2).split(".")[-1] not in targets:
            raise ValueError(f"{weights}: adapter tensor {key!r} is not the LoRA weight of a decoder-layer "
                             f"projection among target_modules {targets}")
        i, module, leaf = m.group(1), m.group(2), _LEAVES[m.group(3)]
        if leaf == MAGNITUDE and not lora.use_dora:
            raise ValueError(f"{weights}: {key} is a DoRA magnitude but {cfg_path} does not set use_dora")
        if leaf != MAGNITUDE and value.shape[0 if leaf == "lora_a" else 1] != lora.rank:
            raise ValueError(f"{key} has shape {value.shape}, inconsistent with r={lora.rank}")
        per_layer.setdefault((*module.split("."), leaf), {})[int(i)] = value.T
    if not per_layer:
        raise ValueError(f"{weights} holds no LoRA weights")
    deepest = max(i for layers in per_layer.values() for i in layers) + 1
    depth = deepest if num_layers is None else num_layers
    if deepest > depth:
        raise ValueError(f"{weights} has an adapter for layer {deepest - 1}, the model has {depth} layers")
    params: dict[str, Any] = {}
    for (*module, leaf), layers in per_layer.items():
        shape = next(iter(layers.values())).shape
        odd = [i for i, v in layers.items() if v.shape != shape]
        if odd:
            raise ValueError(f"{weights}: {module[-1]}.{leaf} of layer {odd[0]} has shape "
                             f"{layers[odd[0]].shape[::-1]}, other layers {shape[::-1]}")
        stack = np.zeros((depth, *shape), np.float32)
        for i, v in layers.items():
            stack[i] = v
        node = params.setdefault(LAYERS, {})
        for part in module:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(stack, param_dtype)
    for (*module, leaf), layers in per_layer.items():
        have = _get(params[LAYERS], tuple(module))
        for other in ("lora_a", "lora_b", MAGNITUDE) if lora.use_dora else ("lora_a", "lora_b"):
            if other not in have:
                raise ValueError(f"{weights}: {'.'.join(module)} has {leaf} weights but no {other}")
        if lora.use_dora and len(layers) != depth:
            raise ValueError(f"{weights}: the DoRA adapter of {'.'.join(module)} leaves out layers "
                             f"{sorted(set(range(depth)) - set(layers))}; DoRA needs every layer")
    return params, lora


def to_hf_config(config: ModelConfig, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """A transformers ``config.json`` dict for ``config`` (the common fields, then the family's)."""
    family = family_of(config)
    out = {
        "architectures": [family.architectures[config.model_type]], "model_type": config.model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_word_embeddings, "torch_dtype": torch_dtype,
    }
    rs = config.rope_scaling
    if rs is not None and rs.rope_type == "longrope":
        out["rope_scaling"] = {"rope_type": "longrope", "short_factor": list(rs.short_factor),
                               "long_factor": list(rs.long_factor), "attention_factor": rs.attention_factor,
                               "original_max_position_embeddings": rs.original_max_position_embeddings}
        out["original_max_position_embeddings"] = rs.original_max_position_embeddings
    elif rs is not None:
        out["rope_scaling"] = {"rope_type": rs.rope_type, "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                               "high_freq_factor": rs.high_freq_factor,
                               "original_max_position_embeddings": rs.original_max_position_embeddings}
    out.update(family.hf_config(config))
    return out


def _layer_leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()):
    """``(module path, leaves)`` of every module below ``layers`` holding a ``kernel`` or a ``weight``."""
    if "kernel" in tree or "weight" in tree:
        yield prefix, tree
        return
    for key, sub in tree.items():
        if isinstance(sub, dict):
            yield from _layer_leaves(sub, prefix + (key,))


def merged_tensors(variables: dict[str, Any], lora: LoraConfig) -> dict[str, np.ndarray]:
    """HF-named float32 tensors with every adapter folded in: ``W + s * (A @ B).T``."""
    scale = 0.0 if lora.rank == 0 else lora.alpha / (np.sqrt(lora.rank) if lora.use_rslora else lora.rank)
    frozen, params = variables["frozen"], variables.get("params", {})
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": _f32(frozen["embed_tokens"]),
                                  "model.norm.weight": _f32(frozen["norm"]["weight"])}
    if "lm_head" in frozen:
        out["lm_head.weight"] = _f32(frozen["lm_head"])
    check_stacked(variables, "the variables")
    stacked, lora_stacked = frozen[LAYERS], params.get(LAYERS, {})
    for i in range(num_stacked(stacked)):
        layer, lora_layer = layer_slice(stacked, i), layer_slice(lora_stacked, i)
        for path, leaves in _layer_leaves(layer):
            name = f"model.layers.{i}.{'.'.join(path)}"
            if "kernel" not in leaves:  # a norm
                out[f"{name}.weight"] = _f32(leaves["weight"])
                continue
            if _expert_stacked(leaves["kernel"]):  # (E, out, in): HF numbers each expert after "experts"
                at = path.index("experts") + 1
                for e, w in enumerate(_f32(leaves["kernel"])):
                    out[f"model.layers.{i}.{'.'.join((*path[:at], str(e), *path[at:]))}.weight"] = w
                continue
            w = _f32(leaves["kernel"])
            try:
                ab = _get(lora_layer, path)
            except KeyError:
                ab = None
            if ab is not None:
                w = w + scale * (np.asarray(ab["lora_a"], np.float32) @ np.asarray(ab["lora_b"], np.float32)).T
                if lora.use_dora:  # PEFT's DoRA merge: each row rescaled to its magnitude
                    w = (np.asarray(ab[MAGNITUDE], np.float32) / np.sqrt(np.sum(w * w, axis=1)))[:, None] * w
            out[f"{name}.weight"] = w
            if "bias" in leaves:
                out[f"{name}.bias"] = _f32(leaves["bias"])
    return out


TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def save_merged(folder: str | os.PathLike, config: ModelConfig, variables: dict[str, Any], lora: LoraConfig,
                dtype: str = "bfloat16", base_config: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Writes a transformers-loadable folder with the adapter merged; returns the float32 tensors.

    ``base_config``: the base model's ``config.json`` dict, whose special token ids
    (``TOKEN_ID_KEYS``) the merged config keeps.
    """
    import ml_dtypes
    from safetensors.numpy import save_file

    if dtype not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"dtype={dtype!r} must be bfloat16, float16 or float32")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors = merged_tensors(variables, lora)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    save_file({k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in tensors.items()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        hf = to_hf_config(config, dtype)
        hf.update({k: base_config[k] for k in TOKEN_ID_KEYS if base_config and k in base_config})
        json.dump(hf, f, indent=2)
    return tensors


def requantization_error(tensors: dict[str, np.ndarray], quant_type: str = "nf4", blocksize: int = 64) -> float:
    """Relative Frobenius error of re-quantizing the merged projections: ``||W - Q(W)|| / ||W||``."""
    err = norm = 0.0
    for name, w in tensors.items():
        if name.startswith("model.layers.") and w.ndim == 2:
            back = np.asarray(dequantize(quantize(jnp.asarray(w), quant_type, blocksize), jnp.float32))
            err += float(np.sum((back - w) ** 2))
            norm += float(np.sum(w.astype(np.float64) ** 2))
    if norm == 0:
        raise ValueError("no projection weights in the tensors")
    return float(np.sqrt(err / norm))


def _expert_stacked(kernel) -> bool:
    """True for one layer's kernel stacked over experts (codes ``(E, n)``, or a float ``(E, out, in)``)."""
    return kernel.codes.ndim == 2 if isinstance(kernel, QuantizedArray) else np.ndim(kernel) == 3


def _f32(x) -> np.ndarray:
    if isinstance(x, QuantizedArray):
        if x.codes.ndim == 2:
            return np.stack([np.asarray(layer_slice(x, e).dequantize(jnp.float32)) for e in range(x.codes.shape[0])])
        return np.asarray(x.dequantize(jnp.float32))
    return np.asarray(jnp.asarray(x, jnp.float32))
