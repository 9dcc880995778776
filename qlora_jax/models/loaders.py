"""``from_pretrained``: one entry point for a Hugging Face folder, a GGUF file, or a bnb 4-bit folder.

    model, variables, tokenizer = from_pretrained(path, quantization=QuantConfig(), lora=LoraConfig())
    logits = model.apply(variables, tokens)

A folder is read as ``config.json`` plus one or many ``*.safetensors`` (with
``model.safetensors.index.json`` when sharded), memory-mapped and streamed one
tensor at a time. A folder saved by transformers with bitsandbytes 4-bit
weights (``*.weight.quant_state.bitsandbytes__nf4`` keys) is read without
re-quantizing. ``quantization=None`` loads a float base (parity tests, bf16 LoRA).
``attention`` names the attention implementation (``qlora_jax.models.attention``); ``mlp_tile``
computes the MLP over sequence tiles of that many tokens (``qlora_jax.models.blocks.tiled_mlp``);
``residual_dtype`` is the residual stream's dtype (``qlora_jax.models.decoder``; None: ``dtype``).
``adapter`` names a PEFT LoRA folder (ours or peft's): its ``adapter_config.json`` replaces
``lora`` and its weights the fresh adapter, so ``model.apply(variables, tokens)`` is base plus adapter.
The family (``qlora_jax.models.family``) comes from ``config.json``'s ``model_type`` or the
GGUF's ``general.architecture``. An error about a file's content names the file, and the
tensor where there is one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.layers import QuantConfig
from qlora_jax.models.blocks import LoraConfig
from qlora_jax.models.config import from_hf_config
from qlora_jax.models.decoder import CausalLM
from qlora_jax.models.gguf_loader import GGUFModel
from qlora_jax.models.tokenizer import TextTokenizer, tokenizer_from_hf_folder
from qlora_jax.models.weights import variables_from_tensors
from qlora_jax.quant.bnb import find_bnb_prefixes, from_bnb_state_dict


def from_pretrained(
    path: str | os.PathLike,
    quantization: QuantConfig | None = QuantConfig(),
    lora: LoraConfig = LoraConfig(),
    dtype=jnp.bfloat16,
    base_dtype=jnp.bfloat16,
    key: jax.Array | None = None,
    remat: str = "none",
    attention: str = "auto",
    mlp_tile: int = 0,
    residual_dtype=None,
    adapter: str | os.PathLike | None = None,
) -> tuple[CausalLM, dict[str, Any], TextTokenizer | None]:
    """Loads a model for QLoRA; see the module docstring. The tokenizer is ``None`` if the folder has none."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model at {path}: expected a Hugging Face folder or a .gguf file")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"{path} is a file but not a .gguf; pass a GGUF file or a Hugging Face folder")
        gguf = GGUFModel(path)
        config, tensors, read_tokenizer = gguf.config, gguf.tensors(), lambda: gguf.tokenizer
        where = lambda: path  # noqa: E731
    else:
        try:
            config = from_hf_config(path)
        except ValueError as e:
            raise ValueError(f"{os.path.join(path, 'config.json')}: {e}") from None
        tensors = FolderTensors(path)
        has_tokenizer = os.path.exists(os.path.join(path, "tokenizer.json"))
        read_tokenizer = lambda: tokenizer_from_hf_folder(path) if has_tokenizer else None  # noqa: E731
        where = lambda: tensors.current or path  # noqa: E731
    if adapter is not None:
        from qlora_jax.models.export import load_peft_adapter

        adapter_params, adapter_lora = load_peft_adapter(adapter, num_layers=config.num_hidden_layers)
        lora = dataclasses.replace(adapter_lora, fp32_output=lora.fp32_output)  # a precision option, not the adapter's
    try:
        variables = variables_from_tensors(config, tensors, quant=quantization, lora=lora, key=key,
                                           base_dtype=base_dtype)
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(where()) else f"{where()}: {message}") from None
    if adapter is not None:
        variables["params"] = _adapter_params(os.fspath(adapter), variables["params"], adapter_params)
    model = CausalLM(config, lora, quant=quantization, dtype=dtype, remat=remat, attention=attention,
                     mlp_tile=mlp_tile, residual_dtype=residual_dtype)
    return model, variables, read_tokenizer()


def _adapter_params(adapter: str, fresh: dict[str, Any], loaded: dict[str, Any]) -> dict[str, Any]:
    """The adapter's LoRA leaves in place of the fresh ones, after checking they fit this model."""
    fresh_flat = dict(jax.tree_util.tree_flatten_with_path(fresh)[0])
    loaded_flat = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    name = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)  # noqa: E731
    extra = sorted(name(p) for p in set(loaded_flat) - set(fresh_flat))
    missing = sorted(name(p) for p in set(fresh_flat) - set(loaded_flat))
    if extra or missing:
        raise ValueError(f"{adapter} does not fit this model: adapter tensors {extra[:4]} have no place, "
                         f"and {missing[:4]} are missing")
    for path, leaf in fresh_flat.items():
        if tuple(loaded_flat[path].shape) != tuple(leaf.shape):
            raise ValueError(f"{adapter}: {name(path)} has shape {tuple(loaded_flat[path].shape)}, this model needs "
                             f"{tuple(leaf.shape)} (an adapter of another model?)")
    return jax.tree.map(lambda f, a: jnp.asarray(a, f.dtype), fresh, loaded)


def safetensors_files(folder: str) -> list[str]:
    """The weight files of a folder: the index's shards, or every ``*.safetensors``."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not there: {missing}")
        return [os.path.join(folder, s) for s in shards]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    return [os.path.join(folder, f) for f in files]


class FolderTensors:
    """Streams ``(name, array)`` from a folder's safetensors files; bnb 4-bit weights come out as
    ``QuantizedArray`` (their keys grouped). ``current`` is the file being read, for errors."""

    def __init__(self, folder: str):
        self.folder = folder
        self.current: str | None = None

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        from safetensors import SafetensorError, safe_open

        for file in safetensors_files(self.folder):
            self.current = file
            try:
                f = safe_open(file, framework="flax")
                keys = list(f.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise ValueError(f"{file} is not a readable safetensors file: {e}") from None
            prefixes = find_bnb_prefixes(dict.fromkeys(keys))
            quant_keys = {k for p in prefixes for k in keys if k == p or k.startswith(p + ".")}
            for p in prefixes:
                yield p, from_bnb_state_dict({k: np.asarray(_read(f, file, k)) for k in keys
                                              if k == p or k.startswith(p + ".")}, prefix=p)
            for k in keys:
                if k not in quant_keys:
                    yield k, _read(f, file, k)


def _read(f, file: str, key: str):
    """One tensor of an open safetensors file, or an error that names the file and the tensor."""
    from safetensors import SafetensorError

    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file}: tensor {key} cannot be read ({e}); the file is damaged or truncated") from None
