"""Preference records ``{"prompt", "chosen", "rejected"}``: tokens, masks and fixed-shape pair batches.

A record is either all strings or all messages (other fields are ignored):

- strings: ``prompt`` (may be empty), ``chosen`` and ``rejected`` (non-blank). Each row is
  ``encode(prompt) + encode(completion) + [eos]``, trained on the completion and the ``eos``
  (a prompt/completion record of ``qlora_jax.train.records``; TRL appends the eos as well).
- messages: ``prompt`` a list of messages (may be empty; any roles), ``chosen`` and ``rejected``
  lists with at least one assistant message (usually exactly one). Each row is the conversation
  ``prompt + completion`` rendered with the chat template, trained on the completion's assistant
  turns only (``records.encode_messages(train_from=len(prompt))``): the prompt is masked, its own
  assistant turns included.

A bad record raises ``RecordError`` naming the field (``'chosen'``, ``'prompt'[1]['role']``, ...).
``max_len`` keeps each row's first tokens; a row left with no completion target is an error
naming its field.

``preference_batch`` lays out ``P`` pairs as ``2P`` rows of ``T`` tokens, one sequence per row (no
packing): the chosen rows first, then the rejected ones in the same order, so pair ``i`` is rows
``i`` and ``P + i``; missing pairs are all-padding rows (``qlora_jax.train.preference`` counts them
for nothing). The arrays are ``qlora_jax.train.data``'s (``tokens``, ``targets``, ``loss_mask``,
``segment_ids``, ``positions``) and ``target_mask``, 1 where ``targets`` is a real next token
(prompt included; ORPO's NLL), all ``(2P, T)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from qlora_jax.train.data import make_batch
from qlora_jax.train.records import (Example, RecordError, check_messages, encode_messages, encode_record,
                                     string_field)

FIELDS = ("prompt", "chosen", "rejected")


class PreferencePair(NamedTuple):
    """One record's two rows, ``Example`` s (``tokens``, ``trainable``): prompt + chosen, prompt + rejected."""

    chosen: Example
    rejected: Example


def check_preference_record(record: Any) -> bool:
    """Validates ``record``; returns True when it is messages, False when strings. ``RecordError`` names the field."""
    if not isinstance(record, dict):
        raise RecordError(f"a preference record must be a JSON object, got {type(record).__name__}")
    for field in FIELDS:
        if field not in record:
            raise RecordError(f"field {field!r} is missing (a preference record needs "
                              f"{', '.join(map(repr, FIELDS))})")
    conversational = isinstance(record["prompt"], list)
    for field in FIELDS:
        value = record[field]
        if conversational and not isinstance(value, list):
            raise RecordError(f"field {field!r} must be a list of messages like 'prompt', got {type(value).__name__}")
        if conversational:
            check_messages(value, field, need_assistant=field != "prompt", allow_empty=field == "prompt")
        else:
            string_field(record, field, field != "prompt")
    return conversational


def encode_preference_record(record: Mapping, tokenizer, *, add_bos: bool = False,
                             max_len: int | None = None) -> PreferencePair:
    """The ``PreferencePair`` of one record (validated first; module docstring).

    ``tokenizer``: a ``TextTokenizer`` (as ``records.encode_record``); ``add_bos`` prepends its
    ``bos_id`` to string records (chat templates write their own).
    """
    conversational = check_preference_record(record)
    rows = []
    for field in ("chosen", "rejected"):
        if conversational:
            messages = [*record["prompt"], *record[field]]
            ex = encode_messages(tokenizer, messages, max_len, train_from=len(record["prompt"]))
            if not ex.trainable[1:].any():
                cut = "" if max_len is None else f" within the first {max_len} tokens"
                raise RecordError(f"field {field!r}: no token to train on{cut} ({len(ex)} tokens)")
        else:
            try:
                ex = encode_record({"prompt": record["prompt"], "completion": record[field]}, tokenizer,
                                   add_bos=add_bos, max_len=max_len)
            except RecordError as err:
                raise RecordError(f"field {field!r}: {err}") from None
        rows.append(ex)
    return PreferencePair(*rows)


def preference_batch(pairs: Sequence[PreferencePair], num_pairs: int, seq_len: int,
                     pad_id: int = 0) -> dict[str, np.ndarray]:
    """``(2 num_pairs, seq_len)`` arrays of up to ``num_pairs`` pairs (module docstring); rows longer than
    ``seq_len`` keep their first ``seq_len`` tokens."""
    if len(pairs) > num_pairs:
        raise ValueError(f"{len(pairs)} pairs do not fit a batch of num_pairs={num_pairs}")
    chosen, placed = make_batch([p.chosen for p in pairs], num_pairs, seq_len, pack=False, pad_id=pad_id)
    rejected, placed_r = make_batch([p.rejected for p in pairs], num_pairs, seq_len, pack=False, pad_id=pad_id)
    assert placed == placed_r == len(pairs)  # one row each, and every row fits: make_batch truncates
    batch = {k: np.concatenate([getattr(chosen, k), getattr(rejected, k)]) for k in chosen._fields}
    seg = batch["segment_ids"]
    target_mask = np.zeros(seg.shape, np.float32)
    target_mask[:, :-1] = (seg[:, :-1] > 0) & (seg[:, 1:] == seg[:, :-1])
    batch["target_mask"] = target_mask
    return batch
