"""Ordering by data dependency: ``tie_to(tree, anchor)`` makes ``tree`` available only once ``anchor`` is.

XLA schedules an op as soon as its inputs exist. Two places need an op to wait:

* the dequantization of a frozen 4-bit weight depends only on the weight, so XLA
  computes every layer's dequantized copy at the start of the step and keeps them
  all until their matmuls run: the temporaries then grow by each layer's whole
  dequantized weight instead of one layer's activations (``tests/kernels/test_schedule.py``
  checks the growth on a small model);
* a rematerialized layer's recomputation must wait for the backward pass (an
  unrolled model needed a custom VJP built on ``tie_to`` for it on jaxlib 0.10.2;
  the layer scan runs forward and backward as two loops and needs none);
* a loop's zero-initialized buffers (accumulators, stacked outputs) are constants:
  XLA merges the identical ones of every layer into one, then gives each loop its
  own copy of it at the start of the step, so every layer's buffers are live at
  once. ``zeros_after`` ties each one to the loop's own input instead.

The tie masks each leaf's bits with a word that is all ones exactly when a predicate of
one element of ``anchor`` holds, a predicate true for every float (``c == c or c != c``,
NaN included) that XLA cannot fold at compile time; floats are masked through their
same-width unsigned integer view. Each leaf then depends on ``anchor`` in the dataflow
graph and keeps its bits. A plain ``where(keep, leaf, 0)`` would not do: XLA moves a later
``convert`` across a select, which makes the forward's and the recomputation's float32
copies of a bfloat16 input one value again, kept from the forward pass to the backward.
The cost is one elementwise pass over ``tree``, which XLA fuses into the consumer where it can.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _keep(anchor: jax.Array) -> jax.Array:
    """A scalar bool that is always true but depends on ``anchor`` and cannot be folded at compile time."""
    c = anchor.ravel()[0]
    return (c == c) | (c != c)


def tie_to(tree: Any, anchor: jax.Array) -> Any:
    """``tree`` bit for bit, every array leaf made to depend on ``anchor`` (module docstring).

    Typed PRNG keys are tied through their key data; non-array leaves pass through.
    """
    keep = _keep(anchor)

    def tie(leaf):
        if not isinstance(leaf, jax.Array):
            return leaf
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(leaf)
            return jax.random.wrap_key_data(tie(jax.random.key_data(leaf)), impl=impl)
        if leaf.dtype == jnp.bool_:
            return leaf & keep
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            return leaf & _word(keep, leaf.dtype)
        bits = np.dtype(f"uint{8 * leaf.dtype.itemsize}")
        return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(leaf, bits) & _word(keep, bits), leaf.dtype)

    return jax.tree.map(tie, tree)


def _word(keep: jax.Array, dtype) -> jax.Array:
    """A scalar of ``dtype`` with every bit set where ``keep`` holds, else 0."""
    return jnp.where(keep, jnp.asarray(np.array(-1).astype(dtype)), jnp.zeros((), dtype))


def zeros_after(anchor: jax.Array, shape, dtype) -> jax.Array:
    """``jnp.zeros(shape, dtype)``, created only once ``anchor`` exists and never shared with another call.

    ``tie_to`` cannot make zeros: ``0 & word`` folds back to the shared constant. This is
    ``where(keep, 0, 1)``, which XLA cannot fold.
    """
    return jnp.broadcast_to(jnp.where(_keep(anchor), 0, 1).astype(dtype), shape)
