"""The merged model (base + LoRA folded in) as a GGUF file for llama.cpp, Ollama and transformers.

Covered: the Llama family (``llama`` and ``mistral`` as llama.cpp's ``llama`` architecture,
``qwen2`` as ``qwen2``; SmolLM2 is ``llama``), Qwen3 (``qwen3``) and Phi-3 (``phi3``: fused
``attn_qkv`` / ``ffn_up`` as our tensors are, ``attention.sliding_window``, LongRoPE as the
``rope_factors_long`` / ``rope_factors_short`` tensors with ``rope.scaling.attn_factor`` and
``rope.scaling.original_context_length``). Other families are refused with an error naming them
(Gemma's file fixes what the config says: llama.cpp decides its query scale, Gemma 3's layer
pattern and local rope base in code; Mixtral's experts are stacked per layer).

Layout, as llama.cpp's ``convert_hf_to_gguf.py`` writes it and ``gguf_loader`` reads it back:

* tensors: ``token_embd``, ``output_norm``, ``output`` (left out when the embeddings are tied)
  and ``blk.{i}.{attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down, attn_norm,
  ffn_norm, attn_q_norm, attn_k_norm}.{weight, bias}`` (the family's ``gguf_names``); a ``llama``
  file's ``attn_q`` / ``attn_k`` rows (and biases) are permuted for llama.cpp's rotary layout
  (``permute_rows``, which ``unpermute_rows`` undoes on read).
* types: 1-D tensors (norms, biases) float32 in every case; matrices float32 (``f32``),
  float16 (``f16``: round to nearest even) or ``q8_0``: each row cut in blocks of 32 values
  ``x``, stored as one float16 scale ``d = max|x| / 127`` and 32 int8 codes ``q = round(x / d)``,
  read as ``d * q`` (34 bytes per 32 values; a matrix whose rows are not a multiple of 32 long
  stays float16). Per value ``|x - f16(d) q| <= d / 2 + 127 |d - f16(d)| <= d (1/2 + 127 * 2^-11)``.
* metadata: ``general.architecture``, ``general.name``, ``general.file_type``, and
  ``<arch>.{vocab_size, context_length, embedding_length, block_count, feed_forward_length,
  attention.head_count, attention.head_count_kv, attention.key_length, attention.value_length,
  attention.layer_norm_rms_epsilon, rope.freq_base, rope.dimension_count}``; ``linear`` rope scaling
  as ``rope.scaling.type`` / ``rope.scaling.factor``, Llama 3.1's ``llama3`` scaling as the
  ``rope_freqs`` tensor of per-frequency divisors (as llama.cpp's converter writes it; ours reads it
  back, ``rope.llama3_from_divisors``; transformers' GGUF reader ignores it). A sliding window
  (Mistral v0.1) has no key in these architectures: llama.cpp attends to the whole context, which
  changes nothing within the window (a warning says so).
* tokenizer: ``gguf_vocab.gguf_tokenizer_fields`` (tokens, types, merges or scores, special ids,
  chat template).

The file is written to a temporary name beside ``path`` and renamed over it at the end, so an
interrupted export never leaves a partial file under the final name.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from qlora_jax.models.config import ModelConfig
from qlora_jax.models.family import family_of
from qlora_jax.models.llama import permute_rows
from qlora_jax.models.tokenizer import TextTokenizer

log = logging.getLogger("qlora_jax.models")

DTYPES = ("f32", "f16", "q8_0")
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}  # -> GGUF
Q8_BLOCK = 32
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def gguf_architecture(config: ModelConfig) -> str:
    """llama.cpp's ``general.architecture`` for ``config``, or an error naming the family that has no writer."""
    if config.model_type not in ARCHITECTURES:
        raise ValueError(f"GGUF export supports the model types {sorted(ARCHITECTURES)} (families llama, qwen3, "
                         "phi3); "
                         f"model_type={config.model_type!r} of the {family_of(config).name} family is not covered")
    if config.model_type == "llama" and (config.attention_bias or config.o_proj_bias):
        raise ValueError("GGUF export: a llama model with attention_bias is not covered (llama.cpp's llama "
                         "architecture file our reader reads has no q/k/v/o biases)")
    return ARCHITECTURES[config.model_type]


def gguf_tensor_names(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, str]:
    """HF name -> GGUF name of every tensor to write (a tied head is left out)."""
    inverse = {hf: key for key, hf in family_of(config).gguf_names.items()}
    out = {}
    for name in tensors:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name in _TOP:
            out[name] = _TOP[name]
            continue
        parts = name.split(".")
        module = ".".join(parts[3:-1])
        if parts[:2] != ["model", "layers"] or module not in inverse:
            raise ValueError(f"GGUF export: tensor {name!r} has no llama.cpp name in the {family_of(config).name} family")
        out[name] = f"blk.{parts[2]}.{inverse[module]}.{parts[-1]}"
    return out


def to_gguf_layout(name: str, w: np.ndarray, config: ModelConfig) -> np.ndarray:
    """``w`` as llama.cpp stores it: a ``llama`` file's q/k rows permuted (``permute_rows``)."""
    if gguf_architecture(config) == "llama":
        if ".self_attn.q_proj." in name:
            return permute_rows(w, config.num_attention_heads)
        if ".self_attn.k_proj." in name:
            return permute_rows(w, config.num_key_value_heads)
    return w


def rope_freqs(config: ModelConfig) -> np.ndarray:
    """Llama 3.1's ``llama3`` rope scaling as llama.cpp's ``rope_freqs``: per frequency, the divisor of
    ``inv_freq`` (1 above ``original / high_freq_factor`` wavelengths, ``factor`` below
    ``original / low_freq_factor``, a smooth blend between; ``rope.inv_frequencies`` has the rule)."""
    from qlora_jax.models.rope import inv_frequencies

    plain = inv_frequencies(dataclasses.replace(config, rope_scaling=None)).astype(np.float64)
    return (plain / inv_frequencies(config)).astype(np.float32)


def encode_tensor(w: np.ndarray, dtype: str):
    """``(array, raw_dtype or None)`` to hand ``GGUFWriter.add_tensor`` for ``dtype`` (module docstring)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    w = np.ascontiguousarray(w, np.float32)
    if w.ndim < 2 or dtype == "f32":
        return w, None
    if dtype == "q8_0" and w.shape[-1] % Q8_BLOCK == 0:
        return quantize(w, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return w.astype(np.float16), None


def save_gguf(path: str | os.PathLike, config: ModelConfig, source: Mapping[str, Any],
              tokenizer: TextTokenizer | None = None, *, lora=None, dtype: str = "f16", name: str = "",
              overwrite: bool = False) -> str:
    """Writes the merged model as a GGUF file (module docstring); returns ``path``.

    ``source``: the model's variables (``{"frozen", "params"}``; then ``lora`` is its ``LoraConfig``),
    merged with ``export.merged_tensors``, or HF-named float tensors already merged. ``tokenizer``:
    written into the file when given (llama.cpp needs it to run the file). An existing ``path`` is
    replaced only with ``overwrite=True``.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    try:
        return _save(path, config, source, tokenizer, lora, dtype, name)
    except ValueError as e:  # every error names the file it was writing
        raise ValueError(f"{path}: {e}") from None


def _save(path: str, config: ModelConfig, source: Mapping[str, Any], tokenizer: TextTokenizer | None, lora,
          dtype: str, name: str) -> str:
    import gguf

    from qlora_jax.models.export import merged_tensors

    if dtype not in DTYPES:
        raise ValueError(f"GGUF export dtype={dtype!r} must be one of {DTYPES}")
    arch = gguf_architecture(config)
    if "frozen" in source:
        if lora is None:
            raise ValueError("save_gguf of model variables needs lora= (the LoraConfig their params were made with)")
        tensors = merged_tensors(source, lora)
    else:
        tensors = {k: np.asarray(v, np.float32) for k, v in source.items()}
    names = gguf_tensor_names(config, tensors)
    _check_shapes(config, tensors)
    if config.sliding_window is not None and arch != "phi3":
        log.warning("GGUF export: sliding_window=%d has no key in llama.cpp's %s architecture; it will attend "
                    "to the whole context", config.sliding_window, arch)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        _write_metadata(w, config, arch, dtype, name)
        if tokenizer is not None:
            _write_tokenizer(w, tokenizer, config.vocab_size)
        if config.rope_scaling is not None and config.rope_scaling.rope_type == "llama3":
            w.add_tensor("rope_freqs.weight", rope_freqs(config))
        if config.rope_scaling is not None and config.rope_scaling.rope_type == "longrope":  # Phi-3: factors as tensors
            for kind in ("long", "short"):
                w.add_tensor(f"rope_factors_{kind}.weight", np.asarray(getattr(config.rope_scaling, f"{kind}_factor"),
                                                                      np.float32))
        for hf, gg in names.items():
            data, raw = encode_tensor(to_gguf_layout(hf, tensors[hf], config), dtype)
            w.add_tensor(gg, data, raw_dtype=raw)
        if arch == "qwen2" and not config.attention_bias:  # llama.cpp's qwen2 has q/k/v biases: zeros change nothing
            _zero_biases(w, config)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _check_shapes(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> None:
    """Every tensor the config needs is there, in its HF shape (llama.cpp would refuse the file later)."""
    from qlora_jax.models.weights import expected_shapes

    want = expected_shapes(config)
    missing = [name for name in want if name not in tensors]
    if missing:
        raise ValueError(f"GGUF export: {len(missing)} tensors the config needs are missing, first {missing[:3]}")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"GGUF export: tensor {name} has shape {tuple(tensors[name].shape)}, the config needs {shape}")


def _write_metadata(w, config: ModelConfig, arch: str, dtype: str, name: str) -> None:
    import gguf

    c = config
    w.add_name(name or f"{arch}-merged")
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.rotary_dim)
    if arch == "phi3" and c.sliding_window is not None:
        w.add_sliding_window(c.sliding_window)
    rs = c.rope_scaling
    if rs is not None and rs.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs.factor)
    elif rs is not None and rs.rope_type == "longrope" and arch == "phi3":
        w.add_rope_scaling_attn_factors(rs.attention_factor)
        w.add_rope_scaling_orig_ctx_len(rs.original_max_position_embeddings)
    elif rs is not None and rs.rope_type != "llama3":
        raise ValueError(f"GGUF export: rope_scaling.rope_type={rs.rope_type!r} is not covered for {arch} "
                         "(linear, llama3; longrope for phi3)")


def _write_tokenizer(w, tokenizer: TextTokenizer, vocab_size: int) -> None:
    from qlora_jax.models.gguf_vocab import gguf_tokenizer_fields

    for key, value in gguf_tokenizer_fields(tokenizer, vocab_size).items():
        if isinstance(value, list):  # types int32, scores float32, strings; GGUF has no empty arrays: add_array
            # leaves them out (a BPE without merges, which llama.cpp cannot run, but our reader reads)
            w.add_array(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)


def _zero_biases(w, config: ModelConfig) -> None:
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    for i in range(config.num_hidden_layers):
        for part, rows in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
            w.add_tensor(f"blk.{i}.{part}.bias", np.zeros(rows, np.float32))
