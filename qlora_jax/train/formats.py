"""Record formats as people have them, mapped onto the three shapes of ``records.py``.

``canonical(record, columns, instruction_format, chat)`` returns a record of one of the shapes
``text``, ``prompt`` + ``completion``, ``messages`` (which ``records.encode_record`` tokenizes
and masks), after these steps:

1. **Column mapping** (``columns``, from ``parse_columns(["prompt=question", ...])``): field
   ``question`` of the record is read as ``prompt``; a field already called ``prompt`` is then
   ignored. ``text=`` (no column) ignores a field named ``text``: for datasets that carry a
   pre-rendered ``text`` beside their ``instruction`` / ``output`` (tatsu-lab/alpaca). Other
   fields pass through as they are.
2. **ShareGPT**: ``{"conversations": [{"from": ..., "value": ...}, ...]}`` becomes
   ``{"messages": [{"role": ..., "content": ...}, ...]}`` with ``from`` mapped by ``SHAREGPT_ROLES``
   (``system``; ``human`` and ``user`` to ``user``; ``gpt`` and ``assistant`` to
   ``assistant``); entries with ``role`` / ``content`` are taken too. Other roles (``tool``,
   ``function_call``, ...) make the record bad, named. The chat template and the
   assistant-only masking then apply as to any ``messages`` record.
3. **Alpaca**: ``{"instruction", "input" (optional, may be empty or null), "output"}``. The
   request is ``instruction``, or ``instruction + "\\n\\n" + input`` when ``input`` is not blank.
   ``instruction_format`` says how it is rendered:

   - ``chat``: ``{"messages": [user: request, assistant: output]}``, through the tokenizer's
     chat template, as any conversation (a system prompt is the template's own default, if any);
   - ``alpaca``: Stanford Alpaca's prompt template (``ALPACA_PROMPT`` / ``ALPACA_PROMPT_NO_INPUT``)
     as ``prompt`` and ``output`` as ``completion`` (an ``eos`` is appended, the prompt is masked);
   - ``auto`` (default): ``chat`` when the tokenizer has a chat template (``chat=True``), else
     ``alpaca``. The chat template is preferred because the model then sees instructions as it
     will at inference through the same template, as conversations already are.

A field whose value is null counts as absent (at the top level and in a ShareGPT turn): a table
has every column in every row, null where a record lacks it, and ``datasets``' JSON writes those
nulls. A record with fields of more than one format (``conversations`` beside ``messages``, say) is
bad. Errors are ``RecordError`` naming the field as the record spells it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qlora_jax.train.records import RecordError, record_shape, string_field

INSTRUCTION_FORMATS = ("auto", "chat", "alpaca")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMATS = {  # format: its fields (a record of the format has at least one of them)
    "text": ("text",), "prompt/completion": ("prompt", "completion"), "messages": ("messages",),
    "ShareGPT": ("conversations",), "Alpaca": ("instruction", "output"),
}
FIELDS = ("text", "prompt", "completion", "messages", "conversations", "instruction", "input", "output")
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Response:\n")


def parse_columns(items: Sequence[str], name: str = "data.columns") -> dict[str, str]:
    """``["prompt=question", "text="]`` as ``{"prompt": "question", "text": ""}``; ``ValueError`` naming ``name``."""
    out: dict[str, str] = {}
    for item in items:
        field, eq, column = (part.strip() for part in item.partition("="))
        if not eq or not field:
            raise ValueError(f"{name}: {item!r} must be FIELD=COLUMN (FIELD= to ignore a column named FIELD)")
        if field not in FIELDS:
            raise ValueError(f"{name}: {item!r} maps to {field!r}, not one of {', '.join(FIELDS)}")
        if field in out:
            raise ValueError(f"{name}: {field!r} is mapped twice")
        if column and column in out.values():
            raise ValueError(f"{name}: column {column!r} is mapped twice")
        out[field] = column
    return out


def source_columns(columns: Mapping[str, str]) -> set[str]:
    """The record fields ``canonical`` may read under ``columns``: what a table reader needs to decode."""
    return {columns.get(f, f) for f in FIELDS} - {""}


def _rename(record: dict, columns: Mapping[str, str]) -> dict:
    out = {k: v for k, v in record.items() if k not in columns and k not in columns.values()}
    for field, column in columns.items():
        if column and column in record:
            out[field] = record[column]
    return out


def _sharegpt(turns: Any) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"field 'conversations' must be a non-empty list, got {type(turns).__name__} {turns!r:.40}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"field 'conversations'[{i}] must be an object, got {type(turn).__name__}")
        turn = {k: v for k, v in turn.items() if v is not None}  # a table's struct has every entry's fields
        role, content = ("from", "value") if "from" in turn or "value" in turn else ("role", "content")
        for field in (role, content):
            if field not in turn:
                raise RecordError(f"field 'conversations'[{i}][{field!r}] is missing")
        if turn[role] not in SHAREGPT_ROLES:
            raise RecordError(f"field 'conversations'[{i}][{role!r}] is {turn[role]!r}, not one of "
                              f"{', '.join(SHAREGPT_ROLES)}")
        text = string_field(turn, content, True, f"'conversations'[{i}][{content!r}]")
        messages.append({"role": SHAREGPT_ROLES[turn[role]], "content": text})
    return messages


def _alpaca(record: Mapping, instruction_format: str, chat: bool) -> dict:
    for field in ("instruction", "output"):
        if field not in record:
            raise RecordError(f"field {field!r} is missing (an Alpaca record needs 'instruction' and 'output')")
    instruction = string_field(record, "instruction", True, "'instruction'")
    output = string_field(record, "output", True, "'output'")
    extra = record.get("input")
    if extra is not None:
        extra = string_field(record, "input", False, "'input'")
    has_input = bool(extra and extra.strip())
    if instruction_format == "chat" or (instruction_format == "auto" and chat):
        request = instruction + "\n\n" + extra if has_input else instruction
        return {"messages": [{"role": "user", "content": request}, {"role": "assistant", "content": output}]}
    template = ALPACA_PROMPT if has_input else ALPACA_PROMPT_NO_INPUT
    return {"prompt": template.format(instruction=instruction, input=extra), "completion": output}


def canonical(record: Any, columns: Mapping[str, str] | None = None, instruction_format: str = "auto",
              chat: bool = True) -> Any:
    """``record`` in one of the three shapes of ``records.py`` (see the module docstring).

    ``chat``: whether the tokenizer has a chat template (for ``instruction_format="auto"``).
    Records that are not objects, or of none of the formats, are returned for
    ``records.record_shape`` to name what is wrong.
    """
    if instruction_format not in INSTRUCTION_FORMATS:
        raise ValueError(f"{instruction_format=} is not one of {INSTRUCTION_FORMATS}")
    if not isinstance(record, dict):
        return record
    record = {k: v for k, v in record.items() if v is not None}
    if not columns:
        return _convert(record, instruction_format, chat)
    try:
        return _convert(_rename(record, columns), instruction_format, chat)
    except RecordError as err:
        mapping = ",".join(f"{f}={c}" for f, c in columns.items())
        raise RecordError(f"{err}; with data.columns {mapping} (fields of the record: "
                          f"{', '.join(map(repr, record)) or 'none'})") from None


def _convert(record: dict, instruction_format: str, chat: bool) -> dict:
    formats = [f for f, fields in FORMATS.items() if any(k in record for k in fields)]
    if len(formats) > 1:
        raise RecordError(f"fields of more than one format: {' and '.join(formats)} (data.columns can ignore one: "
                          "FIELD=)")
    if not formats:
        raise RecordError("none of the formats: needs 'text', 'prompt' + 'completion', 'messages', 'conversations' "
                          f"(ShareGPT) or 'instruction' + 'output' (Alpaca) (fields: {', '.join(map(repr, record)) or 'none'}"
                          "; data.columns maps other names)")
    if formats == ["ShareGPT"]:
        return {"messages": _sharegpt(record["conversations"])}
    if formats == ["Alpaca"]:
        return _alpaca(record, instruction_format, chat)
    record_shape(record)  # here, so that a mapped record's errors name the mapping
    return record
