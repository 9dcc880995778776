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

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

GGUF_CONTROL = 3  # tokenizer.ggml.token_type of special/control tokens


@dataclasses.dataclass
class TextTokenizer:
    tokenizer: Tokenizer
    bos_id: int | None
    eos_id: int | None
    chat_template: str | None = None

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
    """Builds the byte-level BPE tokenizer of a ``gpt2``-type GGUF (Llama 3, SmolLM2, Qwen2)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model={kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):  # digits one by one, as their HF files
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    tk.add_special_tokens([tokens[i] for i, t in enumerate(types) if t == GGUF_CONTROL])
    return TextTokenizer(tk, meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id"),
                         meta.get("tokenizer.chat_template"))


def save_tokenizer(tokenizer: TextTokenizer, folder: str | os.PathLike) -> None:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (what ``tokenizer_from_hf_folder`` reads back)."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tokenizer.tokenizer.save(os.path.join(folder, "tokenizer.json"))
    cfg = {"bos_token": tokenizer.token(tokenizer.bos_id) or None, "eos_token": tokenizer.token(tokenizer.eos_id) or None}
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

    return TextTokenizer(tk, token_id("bos_token"), token_id("eos_token"), cfg.get("chat_template"))
