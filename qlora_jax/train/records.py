"""Training records: the three shapes, and their tokens and loss masks.

A record is a JSON-like object in one of three shapes (other fields are ignored):

- ``{"text": str}``: every token is trained on, and an appended ``eos``.
- ``{"prompt": str, "completion": str}``: ``encode(prompt) + encode(completion) + [eos]``;
  the completion's tokens and the ``eos`` are trained on, the prompt's are not.
- ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``:
  rendered with the tokenizer's chat template (``add_generation_prompt=False``) and
  tokenized whole. The tokens trained on are each assistant message's content and the
  end-of-turn token that closes it (ChatML's ``<|im_end|>``); not its role header
  (what ``add_generation_prompt`` adds), not the whitespace the template writes after the
  end-of-turn token, not system or user messages. No ``eos`` is appended: the template
  closes the turn. The spans come from rendering prefixes: assistant message ``i`` runs
  from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
  ``render(messages[:i + 1])`` less trailing whitespace (each checked to be a prefix of the
  full render); a token of the full render is trained on when its first character lies in
  such a span, so the ids are exactly ``encode(apply_chat_template(messages))``. The end of
  a turn is its content, found after its header, plus the end-of-turn text that follows it
  in every rendering (``_turn_end``), so templates that render a last turn unlike the same
  turn with more after it (Qwen3's empty think block, Phi-3's closing ``<|endoftext|>``)
  are masked right too.

Content counts as empty when it is only whitespace; a prompt may be empty.

Files and their readers are in ``sources.py``; other formats (ShareGPT, Alpaca, renamed
columns) are mapped onto these shapes by ``formats.py``; ``index.RecordIndex`` ties them together.

An ``Example`` holds ``tokens (L,) int32`` and ``trainable (L,) bool``: ``trainable[j]``
says token ``j`` is in the trained part, so the loss includes predicting it from tokens
``< j`` (token 0 has nothing before it and is never a target).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ROLES = ("system", "user", "assistant")
SHAPES = {"text": ("text",), "prompt/completion": ("prompt", "completion"), "messages": ("messages",)}


class RecordError(ValueError):
    """A record that cannot be trained on; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Example:
    """``tokens (L,) int32`` and ``trainable (L,) bool`` (token ``j`` is in the trained part)."""

    tokens: np.ndarray
    trainable: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def truncate(self, n: int) -> Example:
        return self if len(self) <= n else Example(self.tokens[:n], self.trainable[:n])


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def string_field(record: Mapping, field: str, non_empty: bool, where: str = "") -> str:
    """``record[field]``, a string (non-blank when ``non_empty``), or ``RecordError`` naming ``where`` (or the field)."""
    name = where or repr(field)
    value = record[field]
    if not isinstance(value, str):
        raise RecordError(f"field {name} must be a string, got {_type(value)}")
    if non_empty and not value.strip():
        raise RecordError(f"field {name} is empty")
    return value


def record_shape(record: Any) -> str:
    """Validates ``record`` and returns its shape: "text", "prompt/completion" or "messages"."""
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {_type(record)}")
    shapes = [s for s, fields in SHAPES.items() if any(f in record for f in fields)]
    if not shapes:
        raise RecordError(f"none of the shapes: needs 'text', 'prompt' + 'completion' or 'messages' "
                          f"(fields: {', '.join(map(repr, record)) or 'none'})")
    if len(shapes) > 1:
        raise RecordError(f"fields of more than one shape: {' and '.join(shapes)}")
    shape = shapes[0]
    for field in SHAPES[shape]:
        if field not in record:
            raise RecordError(f"field {field!r} is missing (a prompt needs a completion)")
    if shape == "text":
        string_field(record, "text", True)
    elif shape == "prompt/completion":
        string_field(record, "prompt", False)
        string_field(record, "completion", True)
    else:
        check_messages(record["messages"], "messages")
    return shape


def check_messages(messages: Any, field: str, *, need_assistant: bool = True, allow_empty: bool = False) -> None:
    """Validates ``messages``, the list of ``{"role", "content"}`` in ``record[field]``; errors name ``field``.

    ``need_assistant``: at least one assistant message (something to train on); ``allow_empty``:
    ``[]`` is valid (an empty prompt).
    """
    if not isinstance(messages, list) or not (messages or allow_empty):
        raise RecordError(f"field {field!r} must be a non-empty list, got {_type(messages)} {messages!r:.40}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RecordError(f"field {field!r}[{i}] must be an object, got {_type(m)}")
        for key in ("role", "content"):
            if key not in m:
                raise RecordError(f"field {field!r}[{i}][{key!r}] is missing")
        if m["role"] not in ROLES:
            raise RecordError(f"field {field!r}[{i}]['role'] is {m['role']!r}, not one of {', '.join(ROLES)}")
        string_field(m, "content", True, f"{field!r}[{i}]['content']")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise RecordError(f"field {field!r} has no assistant message (nothing to train on)")


def render_chat(tokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    """``tokenizer.apply_chat_template`` (the template is compiled once; it is rendered ~2x per assistant turn)."""
    if not tokenizer.chat_template:
        raise RecordError("field 'messages' needs a chat template, and the tokenizer has none")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except ValueError as err:
        raise RecordError(f"field 'messages': {err}") from None


def encode_messages(tokenizer, messages: list, max_len: int | None = None, train_from: int = 0) -> Example:
    """The ``Example`` of a validated conversation (module docstring's masking rule), trained only on the
    assistant messages at index ``train_from`` or later (preference pairs: the completion after the prompt)."""
    return _encode_messages(tokenizer, messages, max_len, train_from)


def _encode_messages(tokenizer, messages: list, max_len: int | None, train_from: int = 0) -> Example:
    full = render_chat(tokenizer, messages, False)
    enc = tokenizer.tokenizer.encode(full, add_special_tokens=False)
    tokens = np.asarray(enc.ids, np.int32)
    starts = np.fromiter((start for start, _ in enc.offsets), np.int64, len(tokens))  # char offsets into `full`
    cut = len(full)
    if max_len is not None and len(tokens) > max_len:
        cut, tokens, starts = int(starts[max_len]), tokens[:max_len], starts[:max_len]
    trainable = np.zeros(len(tokens), bool)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < train_from:
            continue
        head = render_chat(tokenizer, messages[:i], True)  # ... + this turn's role header
        if len(head) >= cut:  # this turn (and every later one) starts past the cut: not rendered again
            break
        turn = render_chat(tokenizer, messages[: i + 1], False)  # ... + this turn, closed
        if not (turn.startswith(head) and full.startswith(head)):
            raise RecordError(f"field 'messages'[{i}]: the chat template does not render the conversation as "
                              "growing prefixes (conversation up to this message, then the rest)")
        lo = len(head)
        hi = _turn_end(tokenizer, messages, i, full, lo, turn)
        trainable |= (starts >= lo) & (starts < hi)  # content + end-of-turn token, not the trailing newline
    return Example(tokens, trainable)


def _turn_end(tokenizer, messages: list, i: int, full: str, lo: int, turn: str) -> int:
    """Where assistant turn ``i`` ends in ``full``: after its content (found from ``lo``, the end of its
    header) and the end-of-turn text that closes it.

    That text is what follows the content in every rendering of the turn: as the last turn
    (``turn``), inside ``full``, and followed by one more user message. So ChatML's
    ``<|im_end|>`` is trained on, but not Phi-3's end-of-conversation ``<|endoftext|>`` after a
    last turn, nor the next turn's header. A template that renders a last turn differently
    (Qwen3's empty think block, before the content) is covered as well.
    """
    text = messages[i]["content"].strip()
    at = full.find(text, lo) if text else -1
    if at < 0:
        if full.startswith(turn):  # content the template rewrites: the whole closed turn, as rendered
            return len(turn.rstrip())
        raise RecordError(f"field 'messages'[{i}]: the chat template does not render the conversation as "
                          "growing prefixes, and this message's content is not in the rendered conversation")
    end = at + len(text)
    tails = [full[end:]]
    for other in (turn, _render_or_none(tokenizer, [*messages[: i + 1], {"role": "user", "content": "."}])):
        where = -1 if other is None else other.find(text, lo)
        if where >= 0:
            tails.append(other[where + len(text):])
    closing = os.path.commonprefix(tails)
    if closing not in tails:  # cut inside a token (Phi-3: "<|end|>\n<|" of "<|user|>" / "<|endoftext|>"): back
        closing = closing[: max(closing.rfind(c) for c in " \n\t")] if any(c in closing for c in " \n\t") else ""
    return end + len(closing.rstrip())


def _render_or_none(tokenizer, messages: list) -> str | None:
    try:
        return render_chat(tokenizer, messages, False)
    except RecordError:  # a template may refuse the probe (two user turns in a row, say)
        return None


def encode_record(record: Mapping, tokenizer, *, add_bos: bool = False, max_len: int | None = None) -> Example:
    """The ``Example`` of one record (validated first; see the module docstring for the masking rule).

    ``tokenizer`` is a ``TextTokenizer`` (``encode``, ``eos_id``, ``bos_id``, ``chat_template``,
    ``tokenizer``). ``add_bos`` prepends ``bos_id`` (never trained on) to text and
    prompt/completion records; chat templates write their own. ``max_len`` keeps the first
    ``max_len`` tokens (a conversation's turns past the cut are not even rendered apart).
    Raises ``RecordError`` for a record with nothing to train on within those tokens.
    """
    shape = record_shape(record)
    if shape == "messages":
        ex = _encode_messages(tokenizer, record["messages"], max_len)
    else:
        if tokenizer.eos_id is None:
            raise ValueError("the tokenizer has no eos_id, which text and prompt/completion records end with")
        if add_bos and tokenizer.bos_id is None:
            raise ValueError("add_bos=True, but the tokenizer has no bos_id")
        head = [tokenizer.bos_id] if add_bos else []
        if shape == "text":
            body = tokenizer.encode(record["text"])
        else:
            head, body = head + tokenizer.encode(record["prompt"]), tokenizer.encode(record["completion"])
        tokens = np.asarray(head + body + [tokenizer.eos_id], np.int32)
        ex = Example(tokens, np.arange(len(tokens)) >= len(head))
        if max_len is not None:
            ex = ex.truncate(max_len)
    if not ex.trainable[1:].any():
        cut = "" if max_len is None else f" within the first {max_len} tokens"
        raise RecordError(f"no token to train on{cut} ({len(ex)} tokens)")
    return ex
