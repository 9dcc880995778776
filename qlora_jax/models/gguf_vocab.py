"""A ``TextTokenizer`` as a GGUF file's ``tokenizer.*`` fields: the inverse of ``tokenizer_from_gguf_fields``.

Both GGUF tokenizer types our reader knows are written, from the ``tokenizers`` BPE model
inside the ``TextTokenizer``:

* ``gpt2`` (byte-level BPE: SmolLM2, Llama 3, Qwen2/3): ``tokens`` (id order), ``token_type``,
  ``merges`` ("left right", best first) and ``pre``, llama.cpp's name for the pre-tokenizer
  regex (``TextTokenizer.gguf_pre`` when the tokenizer came from a GGUF, otherwise recognized
  from the ``tokenizer.json``: digits split one by one is ``smollm``, a plain GPT-2 byte level
  is ``gpt2``, Llama 3's and Qwen2's split regexes are ``llama-bpe`` and ``qwen2``).
* ``llama`` (SentencePiece BPE with byte fallback: Llama 2, Mistral v0.1): ``tokens``,
  ``token_type``, ``scores`` and ``add_space_prefix``. SentencePiece joins the adjacent pair
  whose concatenation has the highest score; the BPE model ranks merges instead, so the score of
  a piece is minus the rank of the first merge that makes it (``-(len(merges) + id)`` for a piece
  no merge makes), which orders the joins as the merges do (``sentencepiece_merges`` reads it back).

Token types (llama.cpp's): added special tokens CONTROL, other added tokens USER_DEFINED, the
``<0xXX>`` pieces of a SentencePiece model BYTE, its unknown piece UNKNOWN, the rest NORMAL. A model
whose embedding has more rows than the tokenizer has tokens gets ``[PAD{i}]`` UNUSED tokens, as
llama.cpp's converter pads them. Special ids: ``bos`` / ``eos`` / ``padding_token_id``; the Jinja chat
template is ``tokenizer.chat_template``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from qlora_jax.models.tokenizer import (GGUF_BYTE, GGUF_CONTROL, GGUF_NORMAL, GGUF_UNKNOWN, GGUF_UNUSED,
                                        GGUF_USER_DEFINED, SPM_SPACE, TextTokenizer)

_BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")
# a fragment of each split regex llama.cpp knows by name, as the tokenizer.json files spell it
_PRE_REGEX = {"llama-bpe": r"\p{N}{1,3}", "qwen2": r"|\p{N}|"}


def gguf_tokenizer_fields(tokenizer: TextTokenizer, vocab_size: int | None = None) -> dict[str, Any]:
    """The ``tokenizer.*`` key/values of ``tokenizer`` (``vocab_size``: the model's rows, padded up to)."""
    data = json.loads(tokenizer.tokenizer.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer model type {model.get('type')!r}: only BPE tokenizers (byte-level or "
                         "SentencePiece-style) can be written to GGUF")
    added = {int(t["id"]): t for t in data.get("added_tokens") or []}
    by_id = {int(i): t for t, i in model["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    n = max(by_id) + 1
    if vocab_size is not None and n > vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    n = max(n, vocab_size or 0)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges") or []]
    spm = bool(model.get("byte_fallback"))
    unk = model.get("unk_token")
    types = []
    for i, t in enumerate(tokens):
        if i not in by_id:
            types.append(GGUF_UNUSED)
        elif i in added:
            types.append(GGUF_CONTROL if added[i].get("special") else GGUF_USER_DEFINED)
        elif spm and _BYTE_PIECE.match(t):
            types.append(GGUF_BYTE)
        elif unk is not None and t == unk:
            types.append(GGUF_UNKNOWN)
        else:
            types.append(GGUF_NORMAL)
    out: dict[str, Any] = {"tokenizer.ggml.model": "llama" if spm else "gpt2", "tokenizer.ggml.tokens": tokens,
                           "tokenizer.ggml.token_type": types}
    if spm:
        out["tokenizer.ggml.scores"] = merge_scores(tokens, merges)
        out["tokenizer.ggml.add_space_prefix"] = _adds_space_prefix(data)
        if unk is not None and unk in model["vocab"]:
            out["tokenizer.ggml.unknown_token_id"] = int(model["vocab"][unk])
    else:
        out["tokenizer.ggml.merges"] = merges
        out["tokenizer.ggml.pre"] = tokenizer.gguf_pre or pre_tokenizer_name(data.get("pre_tokenizer"))
    out["tokenizer.ggml.add_bos_token"] = _adds_bos(data, tokenizer.token(tokenizer.bos_id))
    for key, value in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                       ("padding_token_id", tokenizer.pad_id)):
        if value is not None:
            out[f"tokenizer.ggml.{key}"] = int(value)
    if tokenizer.chat_template:
        out["tokenizer.chat_template"] = tokenizer.chat_template
    return out


def merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores that order the joins as the ranked ``merges`` do (module docstring)."""
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", "", 1), r)
    return [-float(rank[t]) if t in rank else -float(len(merges) + i) for i, t in enumerate(tokens)]


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a ``tokenizer.json`` pre-tokenizer (``default`` if unknown)."""
    parts = list(_walk(pre))
    if any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts):
        return "smollm"
    for p in parts:
        if p.get("type") == "Split":
            regex = (p.get("pattern") or {}).get("Regex", "")
            for name, fragment in _PRE_REGEX.items():
                if fragment in regex:
                    return name
            return "default"
    if any(p.get("type") == "ByteLevel" for p in parts):
        return "gpt2"
    return "default"


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every dict in a ``tokenizer.json`` component, nested sequences included."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _adds_space_prefix(data: dict[str, Any]) -> bool:
    """True when the normalizer prepends ``▁`` or a Metaspace pre-tokenizer prepends it."""
    for p in _walk([data.get("normalizer"), data.get("pre_tokenizer")]):
        if p.get("type") == "Prepend" and p.get("prepend") == SPM_SPACE:
            return True
        if p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never":
            return True
    return False


def _adds_bos(data: dict[str, Any], bos: str) -> bool:
    """True when the post-processor puts the BOS token first (transformers' ``add_bos_token``)."""
    single = (data.get("post_processor") or {}).get("single") or []
    first = single[0] if single else {}
    return bool(bos) and (first.get("SpecialToken") or {}).get("id") == bos
