"""``quantized_matmul``: ``y = x @ dequant(W).T`` on any backend, with a gradient for ``x`` only.

``W`` is a ``QuantizedArray`` of shape ``(out, in)`` (PyTorch / bitsandbytes
layout, blocks along ``in``); ``x`` is ``(..., in)`` and ``y`` is ``(..., out)``
in ``x.dtype``, accumulated in float32.

Backends (``BACKENDS``):

* ``"xla"``: the plain jnp reference, ``dot(x, dequantize(W).T)``. What CPUs run;
  XLA fuses the dequantize into one pass that writes the bf16 weight once.
* ``"pallas"``: the fused Pallas kernel (``fused_matmul``): tiles of ``W`` are
  decoded in registers, no bf16 copy of ``W`` is ever written.
* ``"pallas_unfused"``: the Pallas dequantize kernel, then XLA's (cuBLAS) dot:
  one layer's bf16 weight lives for one matmul. Large ``M`` is compute-bound,
  where the vendor GEMM can beat a Pallas dot.
* ``"triton"``: the optional jax-triton fused kernel (GPU only, imported lazily).
* ``"auto"``: ``"xla"`` on CPUs and for weights the kernels cannot tile; on a
  GPU ``"pallas"`` for ``M <= AUTO_FUSED_MAX_M`` rows and ``"pallas_unfused"``
  above (``scripts/gpu_check.sh`` measures the crossover; docs/kernels.md).

One ``custom_vjp`` wraps them all. Its residual is ``W`` alone (packed codes and
scales, never a dequantized copy), its backward returns ``dx = dy @ dequant(W)``
from the same backend (or, with ``bwd="reference"``, from ``jax.vjp`` of the jnp
reference) and ``None`` for the frozen weight.

On a CPU backend the Pallas kernels run in interpret mode (``interpret=None``),
which is how the tests prove them without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from qlora_jax.kernels import compat
from qlora_jax.kernels.dequantize import pallas_dequantize
from qlora_jax.kernels.fused_matmul import MatmulBlockSizes, fused_matmul_2d
from qlora_jax.kernels.operands import flat_unsupported_reason, matrix_unsupported_reason, operands
from qlora_jax.kernels.schedule import tie_to
from qlora_jax.quant import QuantizedArray

BACKENDS = ("auto", "xla", "pallas", "pallas_unfused", "triton")
BWD_MODES = ("kernel", "reference")
# Provisional until measured on the H200 (docs/kernels.md): decode- and small-batch
# shapes are bound by reading W, where the fused kernel reads 4x fewer bytes.
AUTO_FUSED_MAX_M = 64


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one call runs: resolved backend, backward mode, tiles, interpret flag (static, hashable)."""

    backend: str
    bwd: str = "kernel"
    block_sizes: MatmulBlockSizes | None = None
    bwd_block_sizes: MatmulBlockSizes | None = None
    interpret: bool = False


def _dense(lhs, q: QuantizedArray, transpose: bool = False):
    """The jnp reference: ``lhs @ dequant(W).T``, or ``lhs @ dequant(W)`` when ``transpose``.

    The dequantization is tied to ``lhs`` (``kernels.schedule``): otherwise XLA dequantizes
    every layer's weight at the start of the step and keeps all the copies alive.
    """
    w = tie_to(q, lhs).dequantize(lhs.dtype)
    dims = (((lhs.ndim - 1,), (0 if transpose else 1,)), ((), ()))
    return jax.lax.dot_general(lhs, w, dims, preferred_element_type=jnp.float32).astype(lhs.dtype)


def _unfused(lhs, q: QuantizedArray, plan: Plan, transpose: bool):
    w = pallas_dequantize(tie_to(q, lhs), lhs.dtype, interpret=plan.interpret)  # tied, as in _dense
    dims = (((1,), (0,)), ((), ())) if transpose else (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(lhs, w, dims, preferred_element_type=jnp.float32).astype(lhs.dtype)


def _fused(lhs, q: QuantizedArray, plan: Plan, transpose: bool):
    n, k = q.shape
    bs = plan.bwd_block_sizes if transpose else plan.block_sizes
    bs = bs or MatmulBlockSizes.get_default(lhs.shape[0], n, k, q.blocksize, transpose)
    bs.check(lhs.shape[0], n, k, q.blocksize, transpose)
    quant = (q.quant_type, q.blocksize, q.nested_blocksize)
    return fused_matmul_2d(lhs, operands(q, n), shape_nk=(n, k), quant=quant, block_sizes=bs,
                           interpret=plan.interpret, transpose=transpose)


def _triton(lhs, q: QuantizedArray, plan: Plan, transpose: bool):
    from qlora_jax.kernels import triton_matmul  # lazy: jax-triton is an optional GPU dependency

    return triton_matmul.matmul_2d(lhs, q, transpose=transpose, block_sizes=plan.block_sizes)


_KERNELS = {"pallas": _fused, "pallas_unfused": _unfused, "triton": _triton}


def _apply(lhs, q: QuantizedArray, plan: Plan, transpose: bool):
    """``lhs @ W.T`` (or ``lhs @ W`` when ``transpose``) for ``lhs`` of any rank, on ``plan.backend``."""
    if plan.backend == "xla":
        return _dense(lhs, q, transpose)
    flat = lhs.reshape(-1, lhs.shape[-1])
    out = _KERNELS[plan.backend](flat, q, plan, transpose)
    return out.reshape(lhs.shape[:-1] + (out.shape[-1],))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, q, plan: Plan):
    return _apply(x, q, plan, transpose=False)


def _matmul_fwd(x, q, plan):
    return _apply(x, q, plan, transpose=False), q


def _matmul_bwd(plan, q, dy):
    if plan.bwd == "reference":
        dx = jax.vjp(lambda x: _dense(x, q), jnp.zeros(dy.shape[:-1] + (q.shape[1],), dy.dtype))[1](dy)[0]
    else:
        dx = _apply(dy, q, plan, transpose=True)
    return dx, None  # the frozen base gets no gradient


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def check_backend(backend: str) -> str:
    """Returns ``backend`` if it is one of ``BACKENDS``, else raises ``ValueError`` naming them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    return backend


def resolve_backend(backend: str, m: int, q: QuantizedArray) -> str:
    """The concrete backend ``"auto"`` stands for at ``M = m`` rows; explicit names are checked and kept."""
    check_backend(backend)
    if backend == "auto":
        if not compat.on_gpu() or matrix_unsupported_reason(q) is not None:
            return "xla"
        return "pallas" if m <= AUTO_FUSED_MAX_M else "pallas_unfused"
    reason = flat_unsupported_reason(q) if backend == "pallas_unfused" else None
    if backend in ("pallas", "triton"):
        reason = matrix_unsupported_reason(q)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot take this weight: {reason}; use backend='xla' or 'auto'")
    if backend == "triton":
        from qlora_jax.kernels import triton_matmul

        triton_matmul.check_available()
    return backend


def quantized_matmul(x: jax.Array, q: QuantizedArray, backend: str = "auto", *, bwd: str = "kernel",
                     block_sizes: MatmulBlockSizes | None = None, bwd_block_sizes: MatmulBlockSizes | None = None,
                     interpret: bool | None = None) -> jax.Array:
    """``x @ dequant(q).T`` for ``x`` of shape ``(..., in)`` and ``q`` of shape ``(out, in)``.

    ``backend`` picks the implementation (module docstring); ``bwd="reference"``
    computes the backward with ``jax.vjp`` of the jnp reference instead of the
    backend's transposed kernel. ``block_sizes`` / ``bwd_block_sizes`` override
    the fused kernels' tiles; ``interpret`` forces Pallas interpret mode on or off.
    """
    _check(x, q)
    if bwd not in BWD_MODES:
        raise ValueError(f"bwd={bwd!r} is not one of {BWD_MODES}")
    m = math.prod(x.shape[:-1])
    plan = Plan(
        backend=resolve_backend(backend, m, q),
        bwd=bwd,
        block_sizes=block_sizes,
        bwd_block_sizes=bwd_block_sizes,
        interpret=compat.default_interpret() if interpret is None else bool(interpret),
    )
    return _matmul(x, q, plan)


def transposed_matmul(dy: jax.Array, q: QuantizedArray, backend: str = "auto", *,
                      block_sizes: MatmulBlockSizes | None = None, interpret: bool | None = None) -> jax.Array:
    """``dy @ dequant(q)`` for ``dy`` of shape ``(..., out)``: what ``quantized_matmul``'s backward computes.

    Exposed for benchmarks and for callers that need the transposed product
    alone; no gradient is defined for it.
    """
    if not isinstance(q, QuantizedArray) or q.ndim != 2 or dy.shape[-1] != q.shape[0]:
        raise ValueError(f"transposed_matmul needs a 2-D QuantizedArray and dy (..., {getattr(q, 'shape', ('?',))[0]}), "
                         f"got dy.shape={tuple(dy.shape)}")
    m = math.prod(dy.shape[:-1])
    plan = Plan(backend=resolve_backend(backend, m, q), bwd_block_sizes=block_sizes,
                interpret=compat.default_interpret() if interpret is None else bool(interpret))
    return _apply(dy, q, plan, transpose=True)


def _check(x, q) -> None:
    if not isinstance(q, QuantizedArray):
        raise ValueError(f"quantized_matmul expects a QuantizedArray weight, got {type(q).__name__}")
    if q.ndim != 2:
        raise ValueError(f"quantized weight must be 2-D (out, in), got shape {q.shape}")
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"x.shape={tuple(x.shape)} does not match weight (out, in)={q.shape}: last dim must be {q.shape[1]}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating point, got {x.dtype}")
