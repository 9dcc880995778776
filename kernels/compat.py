"""Everything in the kernels that differs between jax versions or platforms.

The kernels run on jax 0.10.2 (CPU CI) and 0.11.2 (the GPU machine). Pallas'
default GPU backend differs between the two (Mosaic GPU in 0.10.2, Triton in
0.11.2), so every ``pallas_call`` passes Triton ``CompilerParams`` explicitly.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import re

import jax
from jax.experimental.pallas import triton as pl_triton

_PRINT_TRITON_IR = contextvars.ContextVar("qlora_jax_print_triton_ir", default=False)


def triton_params(num_warps: int, num_stages: int):
    """Pallas compiler parameters that select the Triton backend on any supported jax."""
    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def default_interpret() -> bool:
    """Pallas kernels run in interpret mode when the default backend is the CPU (tests, CI)."""
    return jax.default_backend() == "cpu"


def on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def lower_for_device(fn, *args, device_kind: str = "NVIDIA H200", platform: str = "cuda"):
    """Lowers ``jax.jit(fn)(*args)`` for an abstract GPU, without one.

    Runs on the CPU: the Pallas kernels go through the Triton lowering, so an op
    that Triton cannot compile (a gather from a loaded vector, say) raises here
    instead of on the GPU. ``args`` may be ``jax.ShapeDtypeStruct``s.
    """
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform=platform)
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))


def pallas_debug() -> bool:
    """The ``debug=`` every ``pallas_call`` passes: True only inside ``triton_ir``."""
    return _PRINT_TRITON_IR.get()


def triton_ir(fn, *args) -> list[str]:
    """The Triton IR (text) of every Pallas kernel in ``jax.jit(fn)(*args)``, lowered for an abstract H200.

    Pallas prints a kernel's Triton module when its ``pallas_call`` has
    ``debug=True``; this captures that print, strips the location annotations,
    and returns one module per kernel, ready for ``triton.compile`` (which
    tests/kernels/triton_check.py uses to check shared memory and registers).
    """
    token = _PRINT_TRITON_IR.set(True)
    jax.clear_caches()  # traces made without debug would be reused otherwise
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            lower_for_device(fn, *args)
    finally:
        _PRINT_TRITON_IR.reset(token)
        jax.clear_caches()
    modules = []
    for chunk in out.getvalue().split("The Triton module for pallas_call")[1:]:
        chunk = chunk.split("The kernel jaxpr for pallas_call")[0]
        text = chunk[chunk.index("module") : chunk.rindex("}") + 1]
        text = "\n".join(line for line in text.splitlines() if not line.startswith("#loc"))
        text = re.sub(r' "[^"\n]*"\(#loc\d*\)| \(#loc\d*\)| #loc\d*\b| \[unknown\]', "", text)
        modules.append(text + "\n")
    return modules
