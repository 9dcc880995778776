"""Float32 rounding control that survives XLA fusion."""

from __future__ import annotations

import jax.numpy as jnp


def rounded(product: jnp.ndarray) -> jnp.ndarray:
    """Returns ``product`` such that a following add cannot fuse with it into an FMA.

    XLA's CPU and GPU backends contract ``a * b + c`` into one fused multiply-add
    (a single rounding) inside a fusion, and they drop ``optimization_barrier``
    and no-op ``reduce_precision`` before that happens. bitsandbytes rounds the
    product first, so matching its bytes needs the two roundings. A select on
    ``p == p`` is opaque to the contraction (it is not a no-op for NaN), and
    costs one compare. NaN products become 0; callers never produce NaN.
    """
    return jnp.where(product == product, product, jnp.zeros_like(product))


def true_divide(x: jnp.ndarray, divisor: jnp.ndarray) -> jnp.ndarray:
    """``x / divisor`` as an IEEE float32 division, ``divisor`` broadcast to ``x``.

    XLA rewrites a division by a broadcast value into a multiplication by its
    reciprocal (two roundings, a different last bit), and it hoists selects out
    of broadcasts, so ``rounded`` cannot hide one. Adding ``x * 0`` (which XLA
    may not fold: it is NaN for infinite ``x``) makes the divisor a real per-
    element array, and the division stays the one bitsandbytes performs.
    """
    return x / (divisor + x * jnp.zeros((), x.dtype))
