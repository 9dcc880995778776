"""``lora_product``: LoRA's ``s * (x @ A) @ B`` with a backward written for row-major GEMMs.

Shapes: ``x`` ``(..., in)``, ``A`` ``(in, r)``, ``B`` ``(r, out)``; the result is
``(..., out)`` in ``out_dtype`` (``x.dtype`` when None; float32 keeps a small update from
being rounded to the compute dtype: ``u`` and ``B`` are then float32 too). With ``u = x @ A`` (saved
from the forward, ``(M, r)``) and the incoming ``dy`` ``(M, out)``:

    g  = s * dy @ B.T                    (M, r)
    dB = s * u.T @ dy                    (r, out)
    dA = (g.T @ x).T                     (in, r)
    dx = g @ A.T                         (M, in)

These are the gradients autodiff derives; what differs is the layout. Weight
gradients contract over the ``M`` tokens, i.e. the *leading* dimension of both
operands. GEMM libraries without a transposed-left-operand mode (XLA's CPU dot
through YNNPACK) make one operand physically transposed, and XLA's layout choice
transposed the large ``(M, out)`` gradient, fused with whatever elementwise
backward produced it: a large share of a CPU training step (docs/benchmarks.md, "Where
the time goes", has the profile).
Here only the rank-``r`` matrices ``u`` and ``g`` are transposed (``r * M``
elements), so every GEMM reads its large operand as stored. On a GPU cuBLAS
takes any layout and the two small transposes cost nothing measurable.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NN = (((1,), (0,)), ((), ()))  # (m, k) @ (k, n)
_NT = (((1,), (1,)), ((), ()))  # (m, k) @ (n, k).T


def _dot(lhs, rhs, dims, dtype):
    return jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def lora_product(x: jax.Array, a: jax.Array, b: jax.Array, scaling: float, out_dtype=None) -> jax.Array:
    """``scaling * (x @ a) @ b`` for ``x`` ``(..., in)``, ``a`` ``(in, r)``, ``b`` ``(r, out)``, in ``out_dtype``."""
    return _forward(x, a, b, scaling, out_dtype)[0]


def _forward(x, a, b, scaling, out_dtype):
    if x.shape[-1] != a.shape[0] or a.shape[1] != b.shape[0]:
        raise ValueError(f"lora_product: x {tuple(x.shape)}, A {tuple(a.shape)}, B {tuple(b.shape)} "
                         "do not chain as (..., in) @ (in, r) @ (r, out)")
    od = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    # the forward's products come out in the output dtype (as ``(x @ A) @ B`` would): a remat policy
    # that saves dots (dots_saveable) then keeps them at that size
    x2 = x.reshape(-1, x.shape[-1])
    u = jax.lax.dot_general(x2, a.astype(x.dtype), _NN, preferred_element_type=None if od == x.dtype else od)
    y = jax.lax.dot_general(u, b.astype(od), _NN) * jnp.asarray(scaling, od)
    # x itself (not x2) is saved: q/k/v (and gate/up) share one input, and one residual buffer
    return y.reshape(x.shape[:-1] + (b.shape[1],)), (x, u, a, b)


def _bwd(scaling, out_dtype, saved, dy):
    x, u, a, b = saved
    x2, x_shape, dt = x.reshape(-1, x.shape[-1]), x.shape, x.dtype
    dy2 = dy.reshape(-1, dy.shape[-1]).astype(u.dtype)
    g = (jax.lax.dot_general(dy2, b.astype(u.dtype), _NT, preferred_element_type=jnp.float32) * scaling).astype(dt)
    db = jax.lax.dot_general(u.T, dy2, _NN, preferred_element_type=jnp.float32) * scaling
    da = _dot(g.T, x2, _NN, jnp.float32).T
    dx = _dot(g, a.astype(dt), _NT, dt)
    return dx.reshape(x_shape), da.astype(a.dtype), db.astype(b.dtype)


lora_product.defvjp(_forward, _bwd)
