"""Packaging and layering rules."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pathlib
import sys

import qlora_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Dependencies run one way: a package may import only those to its left.
LAYERS = ["quant", "kernels", "layers", "models", "optim", "train"]


def test_kernels_installed_under_qlora_jax_not_top_level():
    mod = importlib.import_module("qlora_jax.kernels")
    assert pathlib.Path(mod.__file__).resolve().parent == ROOT / "kernels"
    # a top-level `kernels` (the Hugging Face package bnb and transformers import) must never be ours
    spec = importlib.util.find_spec("kernels")
    assert spec is None or pathlib.Path(spec.origin or "").resolve().parent != ROOT / "kernels"
    top = sys.modules.get("kernels")
    assert top is None or pathlib.Path(getattr(top, "__file__", "") or "").resolve().parent != ROOT / "kernels"


def test_public_api_reexported():
    for name in ("quantize", "dequantize", "QuantizedArray", "to_bnb_state_dict", "from_bnb_state_dict"):
        assert hasattr(qlora_jax, name)


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_layering_is_one_way():
    dirs = {"kernels": ROOT / "kernels"} | {p: ROOT / "qlora_jax" / p for p in LAYERS if p != "kernels"}
    for i, layer in enumerate(LAYERS):
        if not dirs[layer].exists():
            continue
        higher = LAYERS[i + 1 :]
        for path in dirs[layer].rglob("*.py"):
            for name in _imports(path):
                parts = name.split(".")
                if parts[0] == "qlora_jax" and len(parts) > 1:
                    assert parts[1] not in higher, f"{path.relative_to(ROOT)} imports {name} (a higher layer)"
