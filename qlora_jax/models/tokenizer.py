"""Tokenizer + chat template, from a Hugging Face folder or a GGUF file's metadata.

``TextTokenizer`` wraps a ``tokenizers.Tokenizer`` with its special ids and the
model's Jinja chat template (``apply_chat_template(messages)`` renders it the
way transformers does: ``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token`` and any extra variables such as Qwen3's ``enable_thinking``, in a
sandboxed environment with transformers' ``raise_exception``, ``strftime_now``,
``tojson`` and loop controls, which the Gemma, Qwen3 and Phi templates use).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
GGUF_NORMAL, GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED, GGUF_BYTE = 1, 2, 3, 4, 5, 6
SPM_SPACE = "\u2581"  # SentencePiece's visible space, "▁"


@dataclasses.dataclass
class TextTokenizer:
    tokenizer: Tokenizer
    bos_id: int | None
    eos_id: int | None
    chat_template: str | None = None
    pad_id: int | None = None
    gguf_pre: str | None = None  # llama.cpp's pre-tokenizer name (tokenizer.ggml.pre), when read from a GGUF

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token(self, token_id: int | None) -> str:
        return "" if token_id is None else self.tokenizer.id_to_token(token_id)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """The prompt text for ``messages`` ([{"role", "content"}, ...]) per the model's template.

        ``variables`` reach the template too (``enable_thinking=False`` for Qwen3). A template
        that rejects the conversation (``raise_exception``) raises ``ValueError`` with its message.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; format the prompt yourself")
        import jinja2

        try:
            return compiled_template(self.chat_template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.token(self.bos_id), eos_token=self.token(self.eos_id), **variables)
        except jinja2.TemplateError as err:
            raise ValueError(f"the chat template failed: {err}") from None


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def compiled_template(template: str):
    """``template`` compiled once, in the environment transformers renders chat templates in."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def tokenizer_from_gguf_fields(meta: Mapping[str, Any]) -> TextTokenizer:
    """The tokenizer of a GGUF file's ``tokenizer.ggml.*`` fields.

    ``gpt2``: byte-level BPE (Llama 3, SmolLM2, Qwen2/3); ``llama``: SentencePiece BPE with byte
    fallback (Llama 2, Mistral v0.1, Gemma 2/3, Phi-3), see ``sentencepiece_tokenizer``.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tk = byte_level_bpe_tokenizer(meta)
    elif kind == "llama":
        tk = sentencepiece_tokenizer(meta)
    else:
        raise ValueError(f"GGUF tokenizer.ggml.model={kind!r} is not supported ('gpt2' byte-level BPE or "
                         "'llama' SentencePiece)")
    return TextTokenizer(tk, meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id"),
                         meta.get("tokenizer.chat_template"), meta.get("tokenizer.ggml.padding_token_id"),
                         meta.get("tokenizer.ggml.pre"))


def byte_level_bpe_tokenizer(meta: Mapping[str, Any]) -> Tokenizer:
    """GPT-2 style byte-level BPE from ``tokens`` and ``merges``; control tokens are special."""
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or ()]  # GGUF has no empty arrays
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):  # digits one by one, as their HF files
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    tk.add_special_tokens([tokens[i] for i, t in enumerate(types) if t == GGUF_CONTROL])
    return tk


def sentencepiece_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven BPE, best first.

    SentencePiece (and llama.cpp's ``llm_tokenizer_spm``) repeatedly joins the adjacent pair of
    pieces whose concatenation is a normal vocabulary piece with the highest score. A merge table
    ranked by that score does the same in ``tokenizers``' BPE: every split ``t = l + r`` of a normal
    piece ``t`` into two normal pieces is a merge ``(l, r)`` of rank ``-score(t)``; ties go to the
    lower token ids, as the vocabulary orders them.
    """
    normal = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == GGUF_NORMAL}
    ranked = []
    for t, i in normal.items():
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_tokenizer(meta: Mapping[str, Any]) -> Tokenizer:
    """A SentencePiece BPE model (GGUF ``llama`` type) as a ``tokenizers.Tokenizer``.

    As llama.cpp tokenizes it: spaces become ``▁``, one ``▁`` is prepended when
    ``tokenizer.ggml.add_space_prefix`` (default true; Gemma's files say false), the pieces are
    joined by ``sentencepiece_merges`` over the whole text (no split at spaces), and a character
    no piece covers falls back to its UTF-8 bytes, the ``<0xXX>`` pieces. Control tokens are
    special (matched whole, dropped by ``decode``), user-defined ones are matched whole and kept.
    Decoding reverses it: ``▁`` to space, byte pieces fused back into UTF-8, the prefix space off.
    """
    tokens = list(meta["tokenizer.ggml.tokens"])
    n = len(tokens)
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * n)
    types = list(meta.get("tokenizer.ggml.token_type") or [GGUF_NORMAL] * n)
    if len(scores) != n or len(types) != n:
        raise ValueError(f"tokenizer.ggml.scores ({len(scores)}) and token_type ({len(types)}) must have one entry "
                         f"per token ({n})")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < n else None
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=sentencepiece_merges(tokens, scores, types), unk_token=unk,
                              fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend(SPM_SPACE)] if prefix else []
    tk.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPM_SPACE)])
    strip = [decoders.Strip(" ", 1, 0)] if prefix else []
    tk.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    tk.add_tokens([AddedToken(tokens[i], normalized=False, special=False) for i in range(n)
                   if types[i] == GGUF_USER_DEFINED])
    tk.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True) for i in range(n)
                           if types[i] == GGUF_CONTROL])
    return tk


def save_tokenizer(tokenizer: TextTokenizer, folder: str | os.PathLike) -> None:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (what ``tokenizer_from_hf_folder`` reads back)."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tokenizer.tokenizer.save(os.path.join(folder, "tokenizer.json"))
    cfg = {"bos_token": tokenizer.token(tokenizer.bos_id) or None, "eos_token": tokenizer.token(tokenizer.eos_id) or None,
           "pad_token": tokenizer.token(tokenizer.pad_id) or None}
    if tokenizer.chat_template:
        cfg["chat_template"] = tokenizer.chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)


def tokenizer_from_hf_folder(folder: str | os.PathLike) -> TextTokenizer:
    """``tokenizer.json`` + ``tokenizer_config.json`` (special tokens, chat template) of a HF folder."""
    folder = os.fspath(folder)
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer.json in {folder}")
    tk = Tokenizer.from_file(path)
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    cfg = json.load(open(cfg_path, encoding="utf-8")) if os.path.exists(cfg_path) else {}

    def token_id(field: str) -> int | None:
        value = cfg.get(field)
        if isinstance(value, dict):
            value = value.get("content")
        return tk.token_to_id(value) if value else None

    return TextTokenizer(tk, token_id("bos_token"), token_id("eos_token"), cfg.get("chat_template"), token_id("pad_token"))
