"""Loading a Llama-family GGUF file: config, weights (as HF-named tensors) and tokenizer.

Tensors are dequantized to float32 one at a time with ``gguf.quants.dequantize``
and handed on under Hugging Face names, so ``variables_from_tensors`` quantizes
each to NF4 before the next is read. llama.cpp stores ``attn_q`` / ``attn_k``
rows permuted for its rotary layout; for Hugging Face's rotate-half layout this
is undone: ``w.reshape(H, hd/2, 2, in).swapaxes(1, 2).reshape(w.shape)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from qlora_jax.models.config import LlamaConfig, from_gguf_metadata
from qlora_jax.models.tokenizer import TextTokenizer, tokenizer_from_gguf_fields

_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = _NAME.match(gguf_name)
    if not m or m.group(2) not in _BLOCK:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama-family counterpart")
    return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation for ``heads`` heads (works for biases too)."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


class GGUFModel:
    """An open GGUF file: ``config``, ``tokenizer`` and a streaming ``tensors()``."""

    def __init__(self, path: str | os.PathLike):
        from gguf import GGUFReader, GGUFValueType

        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"no GGUF file at {self.path}")
        self.reader = GGUFReader(self.path)
        # scalars only: the token tables (~100k Python strings) are read when the tokenizer is asked for
        self.meta: dict[str, Any] = {key: field.contents() for key, field in self.reader.fields.items()
                                     if field.types and field.types[0] != GGUFValueType.ARRAY}
        self.config: LlamaConfig = from_gguf_metadata(self.meta, {t.name for t in self.reader.tensors})

    @property
    def tokenizer(self) -> TextTokenizer:
        tables = {key: field.contents() for key, field in self.reader.fields.items() if key.startswith("tokenizer.")}
        return tokenizer_from_gguf_fields({**self.meta, **tables})

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """``(hf_name, float32 array)`` one tensor at a time, q/k rows in HF order."""
        from gguf.quants import dequantize

        permuted = self.meta.get("general.architecture") == "llama"
        heads = {"attn_q": self.config.num_attention_heads, "attn_k": self.config.num_key_value_heads}
        for t in self.reader.tensors:
            w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
            kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
            if permuted and kind in heads:
                w = unpermute_rows(w, heads[kind])
            yield hf_name(t.name), w
