"""SentencePiece ('llama'-type) GGUF tokenizers against SentencePiece itself and transformers' GGUF reader.

SentencePiece BPE models are trained here on the shipped chitchat conversations (with byte
fallback, as Llama 2, Gemma and Phi-3 have it), once with the dummy prefix space (Llama 2 / Phi-3)
and once without (Gemma), each with user-defined and control pieces. Their tables are written as
llama.cpp's converter writes them (tokens, scores, token types, special ids, add_space_prefix) into
a GGUF file that ``from_pretrained`` reads.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qlora_jax.models.tokenizer import (GGUF_BYTE, GGUF_CONTROL, GGUF_NORMAL, GGUF_UNKNOWN, GGUF_UNUSED,
                                        GGUF_USER_DEFINED, tokenizer_from_gguf_fields)

spm = pytest.importorskip("sentencepiece")
pytestmark = pytest.mark.oracle

USER = ["<start_of_turn>", "<end_of_turn>"]
TEXTS = [
    "Hello world! How are you doing today?",
    " leading space and  two spaces,   three, and a tab\there.",
    "Numbers 12345 and 3.14159; punctuation: (a), [b], {c}.",
    "Unicode: café naïve façade, 日本語のテキスト, emoji 🙂🚀, Ωμέγα.",
    "line one\nline two\n\nline four",
    "<start_of_turn>user\nWhat's up?<end_of_turn>\n<start_of_turn>model\nNot much.<end_of_turn>",
    "",
    "a",
]


def _corpus(tmp_path_factory) -> str:
    from qlora_jax.train.chitchat import conversations

    path = tmp_path_factory.mktemp("spm") / "corpus.txt"
    lines = [m["content"] for conv in itertools.islice(conversations(), 3000) for m in conv]
    path.write_text("\n".join(lines), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module", params=[True, False], ids=["space-prefix", "no-prefix"])
def trained(request, tmp_path_factory):
    """``(SentencePieceProcessor, GGUF tokenizer fields)`` of a model trained here."""
    prefix = request.param
    out = tmp_path_factory.mktemp("model")
    spm.SentencePieceTrainer.train(
        input=_corpus(tmp_path_factory), model_prefix=str(out / "m"), model_type="bpe", vocab_size=800,
        byte_fallback=True, add_dummy_prefix=prefix, user_defined_symbols=USER, control_symbols=["<ctrl>"],
        character_coverage=0.9995, split_digits=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, split_by_whitespace=False, minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_file=str(out / "m.model"))
    return sp, gguf_fields(sp, prefix)


def gguf_fields(sp, prefix: bool) -> dict:
    """The tokenizer tables llama.cpp's converter writes for a SentencePiece model."""
    def kind(i):
        piece = sp.id_to_piece(i)
        if sp.is_unknown(i):
            return GGUF_UNKNOWN
        if sp.is_control(i):
            return GGUF_CONTROL
        if sp.is_byte(i):
            return GGUF_BYTE
        if sp.is_unused(i):
            return GGUF_UNUSED
        return GGUF_USER_DEFINED if piece in USER else GGUF_NORMAL

    n = sp.get_piece_size()
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
            "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(), "tokenizer.ggml.add_space_prefix": prefix}


def _sp_encode(sp, text: str) -> list[int]:
    """The ids llama.cpp gives ``text``: user-defined and control pieces are split out whole, and every
    fragment of plain text between them is SentencePiece-encoded on its own, with the dummy prefix
    space where the model adds one (llama.cpp prefixes each fragment that follows a special piece;
    Hugging Face's legacy Llama tokenizer does the same, SentencePiece only the first)."""
    pieces = [*USER, "<ctrl>", "<s>", "</s>"]
    ids, rest = [], text
    while rest:
        hits = [(rest.find(p), p) for p in pieces if p in rest]
        if not hits:
            return ids + sp.encode(rest)
        at, piece = min(hits)
        if at:
            ids += sp.encode(rest[:at])
        ids.append(sp.piece_to_id(piece))
        rest = rest[at + len(piece):]
    return ids


def test_encode_equals_sentencepiece(trained):
    sp, fields = trained
    ours = tokenizer_from_gguf_fields(fields)
    for text in TEXTS:
        assert ours.encode(text) == _sp_encode(sp, text), text


def test_encode_equals_sentencepiece_on_held_out_chitchat(trained):
    from qlora_jax.train.chitchat import conversations

    sp, fields = trained
    ours = tokenizer_from_gguf_fields(fields)
    held_out = [m["content"] for conv in itertools.islice(conversations(), 3000, 3100) for m in conv]
    mismatched = [t for t in held_out if ours.encode(t) != _sp_encode(sp, t)]
    assert not mismatched, (len(mismatched), len(held_out), mismatched[:3])


def test_decode_round_trip(trained, rng):
    sp, fields = trained
    ours = tokenizer_from_gguf_fields(fields)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == sp.decode(ids), text
        if "<" not in text:  # after a special piece, the prefix space added to the next fragment stays
            assert ours.decode(ids) == text
    # any id sequence of normal pieces decodes as SentencePiece decodes it (byte pieces that form no valid
    # UTF-8 differ: SentencePiece keeps their ASCII bytes, tokenizers writes U+FFFD for the whole run)
    normal = [i for i, k in enumerate(fields["tokenizer.ggml.token_type"]) if k == GGUF_NORMAL]
    for _ in range(20):
        ids = [int(i) for i in rng.choice(normal, size=int(rng.integers(1, 30)))]
        assert ours.decode(ids) == sp.decode(ids)


def test_special_and_control_tokens(trained):
    sp, fields = trained
    ours = tokenizer_from_gguf_fields(fields)
    start = sp.piece_to_id("<start_of_turn>")
    ids = ours.encode("<start_of_turn>user")
    space = " " if fields["tokenizer.ggml.add_space_prefix"] else ""  # the prefix llama.cpp gives a fragment
    assert ids[0] == start and ours.decode(ids) == sp.decode(ids) == f"<start_of_turn>{space}user"  # kept
    bos = fields["tokenizer.ggml.bos_token_id"]
    assert ours.token(bos) == "<s>" and ours.decode([bos, *ours.encode("hi")]) == "hi"  # control: dropped
    assert ours.encode("<s>") == [bos]


def test_gguf_file_through_from_pretrained_and_transformers(trained, tmp_path):
    """The tables in a GGUF file: our GGUFModel reads the same tokenizer, and transformers' GGUF
    tokenizer (what a Hugging Face user of that file gets) encodes plain text to the same ids."""
    import gguf
    from transformers import AutoTokenizer

    from qlora_jax.models.gguf_loader import GGUFModel

    sp, fields = trained
    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(fields["tokenizer.ggml.tokens"]))
    w.add_tokenizer_model("llama")
    w.add_token_list(fields["tokenizer.ggml.tokens"])
    w.add_token_scores(fields["tokenizer.ggml.scores"])
    w.add_token_types(fields["tokenizer.ggml.token_type"])
    w.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"])
    w.add_unk_token_id(fields["tokenizer.ggml.unknown_token_id"])
    w.add_add_space_prefix(fields["tokenizer.ggml.add_space_prefix"])
    w.add_tensor("token_embd.weight", np.zeros((len(fields["tokenizer.ggml.tokens"]), 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ours = GGUFModel(path).tokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    plain = [t for t in TEXTS if "<" not in t]
    for text in plain:
        assert ours.encode(text) == _sp_encode(sp, text), text
        # transformers' GGUF reader assumes the prefix space, and adds none before a leading space
        # (SentencePiece and llama.cpp do: "▁" + "▁leading"), so only such texts are compared with it
        if fields["tokenizer.ggml.add_space_prefix"] and text and not text[0].isspace():
            assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text


def test_bad_tables():
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "a", "b", "ab"],
              "tokenizer.ggml.scores": [0.0, -1.0, -2.0], "tokenizer.ggml.token_type": [2, 1, 1, 1]}
    with pytest.raises(ValueError, match="scores .3. and token_type .4. must have one entry per token .4."):
        tokenizer_from_gguf_fields(fields)
    with pytest.raises(ValueError, match="'bert' is not supported"):
        tokenizer_from_gguf_fields({**fields, "tokenizer.ggml.model": "bert"})


def test_written_back_by_the_gguf_export(trained):
    """``gguf_tokenizer_fields`` (what ``save_gguf`` writes) of the tokenizer read from these tables: the same
    tokens, types, special ids and prefix flag, and scores that rank the joins as the original's do, so
    the tokenizer read back from them encodes the held-out chitchat as SentencePiece does."""
    from qlora_jax.models.gguf_vocab import gguf_tokenizer_fields
    from qlora_jax.train.chitchat import conversations

    sp, fields = trained
    out = gguf_tokenizer_fields(tokenizer_from_gguf_fields(fields))
    same = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_space_prefix")
    assert {k: out[k] for k in same} == {k: fields[k] for k in same}
    again = tokenizer_from_gguf_fields(out)
    held_out = [m["content"] for conv in itertools.islice(conversations(), 3000, 3100) for m in conv]
    mismatched = [t for t in TEXTS + held_out if again.encode(t) != _sp_encode(sp, t)]
    assert not mismatched, (len(mismatched), mismatched[:3])
