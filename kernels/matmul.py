"""``quantized_matmul``: ``y = x @ dequant(W).T`` with a gradient for ``x`` only.

``W`` is a ``QuantizedArray`` of shape ``(out, in)`` (PyTorch / bitsandbytes
layout, blocks along ``in``); ``x`` is ``(..., in)`` and ``y`` is ``(..., out)``
in ``x.dtype``, accumulated in float32 (``preferred_element_type``).

The custom VJP saves only ``W`` (the packed codes and scales), never a
dequantized copy, and computes ``dx = dy @ dequant(W)`` by dequantizing again
in the backward pass. The frozen base gets no gradient (zero cotangents).

Backends: ``"xla"`` is the plain jnp reference (dequantize, then ``dot``) and
what CPUs run; the Pallas kernels of the GPU issue plug in here. ``"auto"``
picks per platform.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qlora_jax.quant import QuantizedArray

BACKENDS = ("auto", "xla")


def _dense(x: jax.Array, q: QuantizedArray) -> jax.Array:
    w = q.dequantize(x.dtype)
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _dense_t(dy: jax.Array, q: QuantizedArray) -> jax.Array:
    w = q.dequantize(dy.dtype)
    dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(dy.dtype)


@jax.custom_vjp
def _xla_matmul(x: jax.Array, q: QuantizedArray) -> jax.Array:
    return _dense(x, q)


def _xla_fwd(x, q):
    return _dense(x, q), q


def _zero_cotangent(leaf: jax.Array):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
        return jnp.zeros_like(leaf)
    return jnp.zeros(leaf.shape, jax.dtypes.float0)


def _xla_bwd(q, dy):
    return _dense_t(dy, q), jax.tree_util.tree_map(_zero_cotangent, q)


_xla_matmul.defvjp(_xla_fwd, _xla_bwd)


def quantized_matmul(x: jax.Array, q: QuantizedArray, backend: str = "auto") -> jax.Array:
    """``x @ dequant(q).T`` for ``x`` of shape ``(..., in)`` and ``q`` of shape ``(out, in)``."""
    _check(x, q, backend)
    return _xla_matmul(x, q)


def _check(x, q, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if not isinstance(q, QuantizedArray):
        raise ValueError(f"quantized_matmul expects a QuantizedArray weight, got {type(q).__name__}")
    if q.ndim != 2:
        raise ValueError(f"quantized weight must be 2-D (out, in), got shape {q.shape}")
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"x.shape={tuple(x.shape)} does not match weight (out, in)={q.shape}: last dim must be {q.shape[1]}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating point, got {x.dtype}")
