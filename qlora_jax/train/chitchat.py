"""The ``chitchat-dataset`` package's conversations as messages-shaped JSONL (the trainer's default data).

``dataset.json`` maps an id to ``{"messages": [turn, ...], ...}``; a turn is a list of
``{"text", "sender", "timestamp"}`` from one sender. Each conversation becomes
``{"messages": [{"role", "content"}, ...]}``: a turn's non-empty texts joined with "\\n";
the first turn's sender is "user", every other sender "assistant", and turns alternate.
Conversations are dropped when they have no assistant turn, or when a turn has no text
or does not alternate (it could not be given a role that keeps user/assistant order):
4,008 of the 7,168 are kept (3,150 have a single turn). ``write_chitchat_jsonl`` can also
cut them into runs of a few turns, which suits a short ``seq_len`` (see there).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator

PACKAGE = "chitchat_dataset"


def dataset_path() -> str:
    """``dataset.json`` of the installed ``chitchat-dataset`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the chitchat-dataset package is not installed: pip install chitchat-dataset==0.9.0")
    return os.path.join(spec.submodule_search_locations[0], "dataset.json")


def to_messages(conversation: dict) -> list[dict[str, str]] | None:
    """One conversation's ``messages`` (roles and contents), or None if it is dropped (see the module)."""
    turns = conversation.get("messages") or []
    messages, first, last = [], None, None
    for turn in turns:
        senders = {m.get("sender") for m in turn}
        texts = [m["text"] for m in turn if isinstance(m.get("text"), str) and m["text"].strip()]
        if len(senders) != 1 or not texts:
            return None
        sender = senders.pop()
        if sender == last:
            return None
        first = sender if first is None else first
        messages.append({"role": "user" if sender == first else "assistant", "content": "\n".join(texts)})
        last = sender
    return messages if any(m["role"] == "assistant" for m in messages) else None


def conversations(path: str | None = None) -> Iterator[list[dict[str, str]]]:
    """The kept conversations' messages, in the file's order."""
    with open(path or dataset_path(), encoding="utf-8") as f:
        data = json.load(f)
    for conversation in data.values():
        messages = to_messages(conversation)
        if messages is not None:
            yield messages


def write_chitchat_jsonl(path: str | os.PathLike, limit: int | None = None,
                         turns_per_record: int | None = None) -> int:
    """Writes up to ``limit`` records (all when None) to ``path`` as JSONL; returns how many.

    A record is a whole conversation, or with ``turns_per_record`` (even) a run of that many
    consecutive turns of one, starting at a user turn (runs without an assistant turn are
    dropped). Whole conversations average ~950 tokens with SmolLM2's template: at
    ``seq_len=256`` only ~21% of their tokens fit, while runs of 6 turns (23,770 records, median
    ~160 tokens) keep nearly all of them.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"{limit=} must be >= 1 or None")
    if turns_per_record is not None and (turns_per_record < 2 or turns_per_record % 2):
        raise ValueError(f"{turns_per_record=} must be an even number >= 2 (a user turn, then an assistant one)")
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for messages in conversations():
            step = turns_per_record or len(messages)
            for run in (messages[i:i + step] for i in range(0, len(messages), step)):
                if limit is not None and count >= limit:
                    return count
                if any(m["role"] == "assistant" for m in run):
                    f.write(json.dumps({"messages": run}, ensure_ascii=False) + "\n")
                    count += 1
    return count


def write_chitchat_preferences(path: str | os.PathLike, limit: int | None = None, context_turns: int = 3,
                               seed: int = 0) -> int:
    """Writes up to ``limit`` preference records to ``path`` as JSONL; returns how many.

    One record per assistant turn that follows a user turn: ``prompt`` is up to ``context_turns``
    turns before it, ending at that user turn; ``chosen`` is the real reply, ``rejected`` an
    assistant reply drawn at random (``seed``) from another conversation, all as messages. A model
    that learns the preference prefers replies that answer what was said.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"{limit=} must be >= 1 or None")
    import numpy as np

    convs = list(conversations())
    replies = [(c, m["content"]) for c, msgs in enumerate(convs) for m in msgs if m["role"] == "assistant"]
    rng = np.random.default_rng(seed)
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for c, msgs in enumerate(convs):
            for i, m in enumerate(msgs):
                if m["role"] != "assistant" or i == 0 or msgs[i - 1]["role"] != "user":
                    continue
                if limit is not None and count >= limit:
                    return count
                other, text = replies[int(rng.integers(len(replies)))]
                while other == c or text == m["content"]:
                    other, text = replies[int(rng.integers(len(replies)))]
                prompt = msgs[max(0, i - context_turns):i]
                while prompt[0]["role"] != "user":
                    prompt = prompt[1:]
                record = {"prompt": prompt, "chosen": [m], "rejected": [{"role": "assistant", "content": text}]}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
    return count
