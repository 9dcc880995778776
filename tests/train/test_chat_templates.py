"""Each family's real chat template (vendored in tests/data/chat_templates, sources in SOURCES.md):
rendered as transformers renders it, and masked so that exactly the assistant turns are trained on."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from qlora_jax.models.tokenizer import tokenizer_from_hf_folder
from qlora_jax.train.records import encode_record

pytestmark = pytest.mark.oracle
TEMPLATES = pathlib.Path(__file__).resolve().parents[1] / "data" / "chat_templates"
# per template: special tokens, bos, eos, the end-of-turn text trained after each reply, whether a system turn is allowed
FAMILIES = {
    "qwen3": (["<|im_start|>", "<|im_end|>", "<think>", "</think>"], None, "<|im_end|>", "<|im_end|>", True),
    "gemma2": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>", False),
    "gemma3": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>", True),
    "phi3": (["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"], "<s>",
             "<|endoftext|>", "<|end|>", True),
    "phi4": (["<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>", "<|im_end|>", True),
}
AVAILABLE = sorted(p.stem for p in TEMPLATES.glob("*.jinja"))


def _folder(tmp_path, name):
    specials, bos, eos, _, _ = FAMILIES[name]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tk = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[], fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    folder = tmp_path / name
    folder.mkdir()
    tk.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": bos, "eos_token": eos, "chat_template": (TEMPLATES / f"{name}.jinja").read_text(),
           "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def _conversation(system: bool):
    msgs = [{"role": "user", "content": "What is the weather like?"},
            {"role": "assistant", "content": "Sunny, 21 degrees."},
            {"role": "user", "content": "And tomorrow?"},
            {"role": "assistant", "content": "Rain in the afternoon."}]
    return ([{"role": "system", "content": "You are brief."}] if system else []) + msgs


def test_every_family_has_its_template():
    assert AVAILABLE == sorted(FAMILIES), f"vendored templates: {AVAILABLE}"


@pytest.mark.parametrize("name", AVAILABLE)
def test_rendered_as_transformers_renders_it(tmp_path, name):
    import transformers

    folder = _folder(tmp_path, name)
    ours = tokenizer_from_hf_folder(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    msgs = _conversation(FAMILIES[name][4])
    for k in range(1, len(msgs) + 1):
        for gen in (False, True):
            want = theirs.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(msgs[:k], add_generation_prompt=gen) == want, (k, gen)


@pytest.mark.parametrize("name", AVAILABLE)
def test_masking_trains_on_exactly_the_assistant_turns(tmp_path, name):
    _, _, _, end_of_turn, system = FAMILIES[name]
    tok = tokenizer_from_hf_folder(_folder(tmp_path, name))
    msgs = _conversation(system)
    ex = encode_record({"messages": msgs}, tok)
    assert list(ex.tokens) == tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False))
    runs, current = [], []
    for t, on in zip(ex.tokens.tolist(), ex.trainable.tolist()):
        if on:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    texts = [tok.decode(r, skip_special_tokens=False) for r in runs]
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert len(texts) == len(replies), texts
    for text, reply in zip(texts, replies):
        assert text.endswith(reply + end_of_turn), (text, reply)
        assert len(text) <= len(reply + end_of_turn) + len("<think>\n\n</think>\n\n"), text  # nothing of the prompt
    assert not np.any(ex.trainable[:1])
