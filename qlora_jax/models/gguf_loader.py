"""Loading a GGUF file of any registered family: config, weights (as HF-named tensors) and tokenizer.

Tensors are dequantized to float32 one at a time with ``gguf.quants.dequantize``
and handed on under Hugging Face names, so ``variables_from_tensors`` quantizes
each to NF4 before the next is read. The family (``general.architecture``) names
llama.cpp's block tensors (``Family.gguf_names``) and undoes what llama.cpp's
converter changed (``Family.gguf_tensor``: the Llama q/k row permutation, Gemma's
``+1`` on norm weights). Every error names the file, and the tensor where there is one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from qlora_jax.models.config import ROPE_TENSOR_PREFIX, ModelConfig, from_gguf_metadata
from qlora_jax.models.family import Family, family_for_gguf
from qlora_jax.models.llama import unpermute_rows
from qlora_jax.models.tokenizer import TextTokenizer, tokenizer_from_gguf_fields

__all__ = ["GGUFModel", "hf_name", "open_gguf", "scalar_metadata", "unpermute_rows"]

_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_SKIPPED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")  # rope tables (in the metadata too)


def hf_name(gguf_name: str, family: Family | None = None) -> str:
    """The Hugging Face name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    if family is None:
        family = family_for_gguf("llama")
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = _NAME.match(gguf_name)
    if not m or m.group(2) not in family.gguf_names:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no {family.name}-family counterpart")
    return f"model.layers.{m.group(1)}.{family.gguf_names[m.group(2)]}.{m.group(3)}"


def open_gguf(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` on ``path``, or an error that names the file (missing, bad magic, truncated)."""
    from gguf import GGUFReader

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError / IndexError / struct errors on damaged headers
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ValueError(f"{path} is truncated: tensor {t.name} needs bytes up to {end}, the file has {size}")
    return reader


def scalar_metadata(reader) -> dict[str, Any]:
    """The reader's key/values without the tokenizer's arrays (~100k-string tables, read on demand)."""
    from gguf import GGUFValueType

    return {key: field.contents() for key, field in reader.fields.items()
            if field.types and not (field.types[0] == GGUFValueType.ARRAY and key.startswith("tokenizer."))}


def gguf_metadata(reader) -> dict[str, Any]:
    """``scalar_metadata`` plus the small rope tables llama.cpp stores as tensors (Phi-3's LongRoPE
    ``rope_factors_long`` / ``rope_factors_short``), as float tuples under ``"tensor.<name>"``, for the
    family's ``parse_gguf``."""
    meta = scalar_metadata(reader)
    for t in reader.tensors:
        if t.name in _SKIPPED:
            meta[ROPE_TENSOR_PREFIX + t.name] = tuple(float(v) for v in np.asarray(t.data, np.float32).reshape(-1))
    return meta


class GGUFModel:
    """An open GGUF file: ``config``, ``tokenizer`` and a streaming ``tensors()``."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.reader = open_gguf(self.path)
        self.meta: dict[str, Any] = gguf_metadata(self.reader)
        try:
            self.family = family_for_gguf(self.meta.get("general.architecture"))
            self.config: ModelConfig = from_gguf_metadata(self.meta, {t.name for t in self.reader.tensors})
        except ValueError as e:
            raise ValueError(f"{self.path}: {e}") from None

    @property
    def tokenizer(self) -> TextTokenizer | None:
        """The file's tokenizer, or None when it carries no ``tokenizer.ggml.model``."""
        if "tokenizer.ggml.model" not in self.meta:
            return None
        tables = {key: field.contents() for key, field in self.reader.fields.items() if key.startswith("tokenizer.")}
        try:
            return tokenizer_from_gguf_fields({**self.meta, **tables})
        except (ValueError, KeyError) as e:
            raise ValueError(f"{self.path}: {e}") from None

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """``(hf_name, float32 array)`` one tensor at a time, in HF's layout."""
        from gguf.quants import dequantize

        for t in self.reader.tensors:
            if t.name in _SKIPPED:
                continue
            try:
                name = hf_name(t.name, self.family)
                w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
            except (ValueError, NotImplementedError) as e:
                raise ValueError(f"{self.path}: tensor {t.name}: {e}") from None
            if self.family.gguf_tensor is not None:
                w = self.family.gguf_tensor(name, w, self.config)
            yield name, w
