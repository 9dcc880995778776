"""PEFT adapter export / import and merged-model export, in Hugging Face's formats.

PEFT (``adapter_config.json`` + ``adapter_model.safetensors``): for each
targeted projection, ``base_model.model.model.layers.{i}.{group}.{proj}.lora_A.weight``
is our ``A.T`` ``(r, in)`` and ``...lora_B.weight`` is ``B.T`` ``(out, r)``; the
scale ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``) is PEFT's.

Merged: a Hugging Face folder (``config.json`` + ``model.safetensors``) whose
projections hold ``dequant(W) + s * (A @ B).T``, loadable by transformers.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.llama import ALL_TARGETS, LoraConfig
from qlora_jax.models.stacking import LAYERS, check_stacked, layer_slice, num_stacked
from qlora_jax.quant import QuantizedArray, dequantize, quantize

_PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")


def _lora_modules(params: dict[str, Any]):
    """Yields ``(layer_index, group, projection, A (in, r), B (r, out))`` in layer order, from the stacked tree."""
    check_stacked(params, "the LoRA params")
    layers = params.get(LAYERS, {})
    if not layers:
        return
    for i in range(num_stacked(layers)):
        for group, projs in layers.items():
            for proj, ab in projs.items():
                yield i, group, proj, ab["lora_a"][i], ab["lora_b"][i]


def save_peft_adapter(folder: str | os.PathLike, params: dict[str, Any], lora: LoraConfig,
                      base_model_name_or_path: str = "") -> None:
    """Writes ``params`` (the LoRA tree) as a PEFT LoRA adapter that ``PeftModel.from_pretrained`` loads."""
    from safetensors.numpy import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    targets = set()
    for i, group, proj, a, b in _lora_modules(params):
        base = f"base_model.model.model.layers.{i}.{group}.{proj}"
        tensors[f"{base}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a, np.float32).T)
        tensors[f"{base}.lora_B.weight"] = np.ascontiguousarray(np.asarray(b, np.float32).T)
        targets.add(proj)
    if not tensors:
        raise ValueError("no LoRA parameters to export (rank 0 or no targets)")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "use_rslora": lora.use_rslora, "target_modules": sorted(targets),
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
    which adds nothing, as PEFT's missing adapter does.
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
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown:
        raise ValueError(f"{cfg_path}: target_modules {unknown} are not Llama projections {ALL_TARGETS}")
    lora = LoraConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                      use_rslora=bool(cfg.get("use_rslora", False)), targets=tuple(t for t in ALL_TARGETS if t in targets))
    per_layer: dict[tuple[str, str, str], dict[int, Any]] = {}
    weights = os.path.join(folder, "adapter_model.safetensors")
    for key, value in load_file(weights).items():
        m = _PEFT_KEY.match(key.replace(".default.", "."))
        if not m:
            raise ValueError(f"adapter tensor {key!r} is not a Llama projection's LoRA weight")
        i, group, proj, ab = m.groups()
        if value.shape[0 if ab == "A" else 1] != lora.rank:
            raise ValueError(f"{key} has shape {value.shape}, inconsistent with r={lora.rank}")
        per_layer.setdefault((group, proj, "lora_a" if ab == "A" else "lora_b"), {})[int(i)] = value.T
    if not per_layer:
        raise ValueError(f"{weights} holds no LoRA weights")
    deepest = max(i for layers in per_layer.values() for i in layers) + 1
    depth = deepest if num_layers is None else num_layers
    if deepest > depth:
        raise ValueError(f"{weights} has an adapter for layer {deepest - 1}, the model has {depth} layers")
    params: dict[str, Any] = {}
    for (group, proj, leaf), layers in per_layer.items():
        shape = next(iter(layers.values())).shape
        odd = [i for i, v in layers.items() if v.shape != shape]
        if odd:
            raise ValueError(f"{weights}: {proj}.{leaf} of layer {odd[0]} has shape {layers[odd[0]].shape[::-1]}, "
                             f"other layers {shape[::-1]}")
        stack = np.zeros((depth, *shape), np.float32)
        for i, v in layers.items():
            stack[i] = v
        params.setdefault(LAYERS, {}).setdefault(group, {}).setdefault(proj, {})[leaf] = jnp.asarray(stack, param_dtype)
    for (group, proj, leaf) in per_layer:
        other = "lora_b" if leaf == "lora_a" else "lora_a"
        if other not in params[LAYERS][group][proj]:
            raise ValueError(f"{weights}: {group}.{proj} has {leaf} weights but no {other}")
    return params, lora


def to_hf_config(config: LlamaConfig, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """A transformers ``config.json`` dict for ``config``."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config.model_type]
    out = {
        "architectures": [arch], "model_type": config.model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta, "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu", "torch_dtype": torch_dtype,
    }
    if config.model_type == "llama":
        out["attention_bias"] = config.attention_bias
    if config.rope_scaling is not None:
        rs = config.rope_scaling
        out["rope_scaling"] = {"rope_type": rs.rope_type, "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                               "high_freq_factor": rs.high_freq_factor,
                               "original_max_position_embeddings": rs.original_max_position_embeddings}
    if config.sliding_window is not None:
        out["sliding_window"] = config.sliding_window
    return out


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
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"model.layers.{i}.{norm}.weight"] = _f32(layer[norm]["weight"])
        for group in ("self_attn", "mlp"):
            for proj, leaves in layer[group].items():
                if not proj.endswith("_proj"):
                    continue
                w = _f32(leaves["kernel"])
                ab = lora_layer.get(group, {}).get(proj)
                if ab is not None:
                    w = w + scale * (np.asarray(ab["lora_a"], np.float32) @ np.asarray(ab["lora_b"], np.float32)).T
                out[f"model.layers.{i}.{group}.{proj}.weight"] = w
                if "bias" in leaves:
                    out[f"model.layers.{i}.{group}.{proj}.bias"] = _f32(leaves["bias"])
    return out


def save_merged(folder: str | os.PathLike, config: LlamaConfig, variables: dict[str, Any], lora: LoraConfig,
                dtype: str = "bfloat16") -> dict[str, np.ndarray]:
    """Writes a transformers-loadable folder with the adapter merged; returns the float32 tensors."""
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
        json.dump(to_hf_config(config, dtype), f, indent=2)
    return tensors


def requantization_error(tensors: dict[str, np.ndarray], quant_type: str = "nf4", blocksize: int = 64) -> float:
    """Relative Frobenius error of re-quantizing the merged projections: ``||W - Q(W)|| / ||W||``."""
    err = norm = 0.0
    for name, w in tensors.items():
        if name.endswith("_proj.weight"):
            back = np.asarray(dequantize(quantize(jnp.asarray(w), quant_type, blocksize), jnp.float32))
            err += float(np.sum((back - w) ** 2))
            norm += float(np.sum(w.astype(np.float64) ** 2))
    if norm == 0:
        raise ValueError("no projection weights in the tensors")
    return float(np.sqrt(err / norm))


def _f32(x) -> np.ndarray:
    if isinstance(x, QuantizedArray):
        return np.asarray(x.dequantize(jnp.float32))
    return np.asarray(jnp.asarray(x, jnp.float32))
