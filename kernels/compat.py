"""Everything in the kernels that differs between jax versions or platforms.

The kernels run on jax 0.10.2 (CPU CI) and 0.11.2 (the GPU machine). Pallas'
default GPU backend differs between the two (Mosaic GPU in 0.10.2, Triton in
0.11.2), so every ``pallas_call`` passes Triton ``CompilerParams`` explicitly.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import triton as pl_triton


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
