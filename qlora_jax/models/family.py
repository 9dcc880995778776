"""The model-family registry: one module per family, and the lookups the loaders, exports and planner use.

A ``Family`` holds everything that differs between decoder families:

* ``parse_hf`` / ``parse_gguf``: a ``config.json`` dict or GGUF metadata -> ``ModelConfig``;
* ``layer``: the Flax decoder layer (``qlora_jax.models.blocks``' parts, in the family's order);
* ``layer_tensors(config)``: each decoder layer's tensors in HF naming relative to
  ``model.layers.{i}.`` with their shapes and kinds (``LayerTensor``); the variable tree
  mirrors these names (``self_attn.q_proj.weight`` -> ``layers/self_attn/q_proj/kernel``),
  so loaders, PEFT and merged export need no per-family code;
* ``targets``: the projections LoRA may adapt (peft's ``target_modules`` names), and
  ``target_aliases``: Llama names a fused projection stands for (Phi-3's ``qkv_proj``);
* ``hf_config``: the family's part of a merged export's ``config.json``;
* ``gguf_names`` / ``gguf_tensor``: llama.cpp's block tensor names and how to undo its changes.

``FAMILY_MODULES`` is the registry: a new family is one module under ``qlora_jax.models``
that defines ``FAMILY``, and its name here.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Any

FAMILY_MODULES = ("llama", "qwen3", "gemma", "phi3", "mixtral")
KINDS = ("proj", "bias", "norm", "float", "table")


@dataclasses.dataclass(frozen=True)
class LayerTensor:
    """One tensor of a decoder layer: its HF shape and kind.

    ``proj``: a linear weight ``(out, in)``, 4-bit quantized and LoRA-able; ``bias``: a
    projection's bias; ``norm``: a norm weight, kept in float32; ``float``: another frozen
    float32 matrix (Mixtral's router); ``table``: the embeddings or the output head (outside
    the layers).
    """

    shape: tuple[int, ...]
    kind: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"LayerTensor.kind={self.kind!r} is not one of {KINDS}")


@dataclasses.dataclass(frozen=True)
class Family:
    """What one decoder family needs beyond the shared blocks (module docstring)."""

    name: str
    model_types: tuple[str, ...]
    architectures: Mapping[str, str]  # model_type -> the transformers class a merged export names
    layer: type
    targets: tuple[str, ...]
    parse_hf: Callable[[dict[str, Any]], Any]
    layer_tensors: Callable[[Any], dict[str, LayerTensor]]
    hf_config: Callable[[Any], dict[str, Any]]
    target_aliases: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    gguf_architectures: tuple[str, ...] = ()
    parse_gguf: Callable[[Mapping[str, Any], frozenset[str]], Any] | None = None
    gguf_names: Mapping[str, str] = dataclasses.field(default_factory=dict)  # blk.N.<key> -> HF relative name
    gguf_tensor: Callable[[str, Any, Any], Any] | None = None  # (HF name, array, config) -> array in HF's form

    def resolve_targets(self, targets: tuple[str, ...]) -> tuple[str, ...]:
        """``targets`` in this family's projection names, in ``self.targets`` order.

        All seven Llama names (``LoraConfig``'s default) mean every projection the family adapts.
        A fused projection stands for the Llama names it fuses (Phi-3: ``q_proj, k_proj,
        v_proj`` -> ``qkv_proj``) when all of them are named; naming only some is an error,
        since one LoRA pair cannot adapt part of a fused weight.
        """
        from qlora_jax.models.blocks import LLAMA_TARGETS

        if set(targets) == set(LLAMA_TARGETS):  # the default, "every projection": every one this family adapts
            return self.targets
        chosen = {t for t in targets if t in self.targets}
        for fused, parts in self.target_aliases.items():
            named = [p for p in parts if p in targets]
            if named and len(named) < len(parts):
                raise ValueError(f"the {self.name} family fuses {', '.join(parts)} into {fused}: name all of them "
                                 f"or {fused} (lora targets name only {', '.join(named)})")
            if named:
                chosen.add(fused)
        aliased = {p for parts in self.target_aliases.values() for p in parts}
        unknown = sorted(t for t in targets if t not in self.targets and t not in aliased)
        if unknown:
            raise ValueError(f"lora targets {unknown} are not projections of the {self.name} family; "
                             f"choose from {self.targets}")
        return tuple(t for t in self.targets if t in chosen)


@functools.cache
def families() -> tuple[Family, ...]:
    """Every registered family, in ``FAMILY_MODULES`` order."""
    return tuple(importlib.import_module(f"qlora_jax.models.{m}").FAMILY for m in FAMILY_MODULES)


def supported_model_types() -> tuple[str, ...]:
    return tuple(t for f in families() for t in f.model_types)


def known_targets() -> tuple[str, ...]:
    """Every projection name some family can adapt (its own or an alias)."""
    names: dict[str, None] = {}
    for f in families():
        names.update(dict.fromkeys(f.targets))
        for parts in f.target_aliases.values():
            names.update(dict.fromkeys(parts))
    return tuple(names)


def family_of(config) -> Family:
    """The family of a ``ModelConfig`` (by its ``model_type``)."""
    return family_for_model_type(config.model_type)


def family_for_model_type(model_type: str) -> Family:
    for f in families():
        if model_type in f.model_types:
            return f
    raise ValueError(f"model_type={model_type!r} is not supported; supported: {supported_model_types()}")


def family_for_hf(cfg: Mapping[str, Any]) -> Family:
    """The family that reads this ``config.json`` dict, or an error naming its model_type and architectures."""
    model_type = cfg.get("model_type")
    for f in families():
        if model_type in f.model_types:
            return f
    raise ValueError(f"config.json model_type={model_type!r} (architectures={cfg.get('architectures')}) is not "
                     f"supported; supported: {supported_model_types()}")


def family_for_gguf(architecture: str | None) -> Family:
    supported = tuple(a for f in families() for a in f.gguf_architectures)
    for f in families():
        if architecture in f.gguf_architectures:
            return f
    raise ValueError(f"GGUF general.architecture={architecture!r} is not supported; supported: {supported}")
