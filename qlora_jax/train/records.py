"""Training records from JSONL: the three shapes, their token masks, and a streaming byte-offset index.

One JSON object per line, in one of three shapes (other fields are ignored):

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

An ``Example`` holds ``tokens (L,) int32`` and ``trainable (L,) bool``: ``trainable[j]``
says token ``j`` is in the trained part, so the loss includes predicting it from tokens
``< j`` (token 0 has nothing before it and is never a target).

``RecordIndex`` scans a file once, streaming (one line in memory at a time), and keeps
for each usable record its byte offset (``offsets``, int64), its 0-based line number
(``lines``) and its token count (``lengths``); records are read back by offset. Bad
lines (invalid JSON, none of the shapes, empty content, wrong types) are skipped,
counted and logged; blank lines are skipped silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SHAPES = {"text": ("text",), "prompt/completion": ("prompt", "completion"), "messages": ("messages",)}
MAX_REPORTED = 5  # bad lines named in logs and errors


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


def _string(record: Mapping, field: str, non_empty: bool, where: str = "") -> str:
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
        _string(record, "text", True)
    elif shape == "prompt/completion":
        _string(record, "prompt", False)
        _string(record, "completion", True)
    else:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise RecordError(f"field 'messages' must be a non-empty list, got {_type(messages)} {messages!r:.40}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise RecordError(f"field 'messages'[{i}] must be an object, got {_type(m)}")
            for field in ("role", "content"):
                if field not in m:
                    raise RecordError(f"field 'messages'[{i}][{field!r}] is missing")
            if m["role"] not in ROLES:
                raise RecordError(f"field 'messages'[{i}]['role'] is {m['role']!r}, not one of {', '.join(ROLES)}")
            _string(m, "content", True, f"'messages'[{i}]['content']")
        if not any(m["role"] == "assistant" for m in messages):
            raise RecordError("field 'messages' has no assistant message (nothing to train on)")
    return shape


def render_chat(tokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    """``tokenizer.apply_chat_template`` (the template is compiled once; it is rendered ~2x per assistant turn)."""
    if not tokenizer.chat_template:
        raise RecordError("field 'messages' needs a chat template, and the tokenizer has none")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except ValueError as err:
        raise RecordError(f"field 'messages': {err}") from None


def _encode_messages(tokenizer, messages: list, max_len: int | None) -> Example:
    full = render_chat(tokenizer, messages, False)
    enc = tokenizer.tokenizer.encode(full, add_special_tokens=False)
    tokens = np.asarray(enc.ids, np.int32)
    starts = np.fromiter((start for start, _ in enc.offsets), np.int64, len(tokens))  # char offsets into `full`
    cut = len(full)
    if max_len is not None and len(tokens) > max_len:
        cut, tokens, starts = int(starts[max_len]), tokens[:max_len], starts[:max_len]
    trainable = np.zeros(len(tokens), bool)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
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


def _parse(line: bytes) -> Any:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError(f"not UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(f"invalid JSON: {err.msg} at column {err.colno}") from None


class RecordIndex:
    """Usable records of a JSONL file, indexed in one streaming pass and read back by byte offset.

    Attributes (N usable records): ``offsets (N,) int64`` byte offset of each record's line,
    ``lines (N,) int64`` its 0-based line number, ``lengths (N,) int32`` its token count,
    ``trainable (N,) int32`` how many of those are loss targets (token 0 never is); ``num_bad`` and ``bad``
    (the first ``MAX_REPORTED`` bad lines as ``(1-based line, reason)``).

    Indexing tokenizes every record once (to count tokens and catch records that do not
    render), cut to ``max_len`` tokens when given (see ``encode_record``). With ``max_records``
    it stops after that many usable records for which ``counts(line)`` is true (all, without
    ``counts``). Raises ``ValueError`` naming the file
    and its first bad lines when no usable record is found.
    """

    def __init__(self, path: str | os.PathLike, tokenizer, *, add_bos: bool = False, max_len: int | None = None,
                 max_records: int | None = None, counts: Callable[[int], bool] | None = None):
        if max_len is not None and max_len < 2:
            raise ValueError(f"{max_len=} must be >= 2 or None")
        self.path, self.tokenizer, self.add_bos, self.max_len = os.fspath(path), tokenizer, add_bos, max_len
        offsets, lines, lengths, trainable, self.bad, self.num_bad = [], [], [], [], [], 0
        counted, offset = 0, 0
        with open(self.path, "rb") as f:
            for line_no, line in enumerate(f):
                start, offset = offset, offset + len(line)
                if line_no == 0 and line.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
                    line, start = line[3:], start + 3
                if not line.strip():
                    continue
                try:
                    ex = encode_record(_parse(line), tokenizer, add_bos=add_bos, max_len=max_len)
                except RecordError as err:
                    self.num_bad += 1
                    if len(self.bad) < MAX_REPORTED:
                        self.bad.append((line_no + 1, str(err)))
                    continue
                offsets.append(start), lines.append(line_no)
                lengths.append(len(ex)), trainable.append(int(ex.trainable[1:].sum()))
                counted += counts is None or counts(line_no)
                if max_records is not None and counted >= max_records:
                    break
        self.offsets = np.asarray(offsets, np.int64)
        self.lines = np.asarray(lines, np.int64)
        self.lengths = np.asarray(lengths, np.int32)
        self.trainable = np.asarray(trainable, np.int32)
        self._file, self._lock = None, threading.Lock()
        if self.num_bad:
            logger.warning("%s: skipped %d bad record(s) of %d; %s", self.path, self.num_bad,
                           self.num_bad + len(self), self.bad_summary())
        if not len(self):
            raise ValueError(f"no usable records in {self.path}: "
                             + (f"{self.num_bad} bad line(s); {self.bad_summary()}" if self.num_bad else "it is empty"))
        logger.info("%s: %d records, %d tokens", self.path, len(self), int(self.lengths.sum()))

    def bad_summary(self) -> str:
        return "; ".join(f"line {n}: {reason}" for n, reason in self.bad)

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, i: int) -> dict:
        """The JSON object of usable record ``i`` (0 <= i < N), read at its byte offset (thread-safe)."""
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "rb")
            self._file.seek(int(self.offsets[i]))
            line = self._file.readline()
        try:
            return _parse(line)
        except RecordError as err:
            raise ValueError(f"{self.path} line {self.lines[i] + 1}: {err} (did the file change since indexing?)") from None

    def example(self, i: int) -> Example:
        """The tokens and mask of record ``i``; ``ValueError`` if the file changed since indexing."""
        try:
            ex = encode_record(self.read(i), self.tokenizer, add_bos=self.add_bos, max_len=self.max_len)
        except RecordError as err:
            raise ValueError(f"{self.path} line {self.lines[i] + 1}: {err} (did the file change since indexing?)") from None
        if len(ex) != self.lengths[i]:
            raise ValueError(f"{self.path} line {self.lines[i] + 1}: {len(ex)} tokens, indexed as {self.lengths[i]} "
                             "(did the file or the tokenizer change since indexing?)")
        return ex

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> RecordIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):  # picklable: the open file and the lock are not carried
        return {k: v for k, v in self.__dict__.items() if k not in ("_file", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _file=None, _lock=threading.Lock())
