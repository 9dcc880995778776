"""8-bit blockwise AdamW (bitsandbytes' ``AdamW8bit``) as an optax ``GradientTransformation``.

For a parameter ``p`` with gradient ``g`` at step ``t = 1, 2, ...``, in float32:

    m_t = (1 - b1) * g + b1 * m_{t-1}
    v_t = (1 - b2) * g * g + b2 * v_{t-1}
    u_t = (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)        (scale_by_adam_8bit)
    p  <- p - lr_t * (u_t + weight_decay * mask * p)                   (adamw_8bit)

which is ``optax.scale_by_adam`` / ``optax.adamw`` (decoupled weight decay) line for
line. The difference is storage: between steps, ``m`` and ``v`` of a parameter with
at least ``min_8bit_size`` elements live as ``QuantizedMoment``s, the flattened
tensor cut into blocks of ``blocksize`` with one float32 ``absmax`` per block and one
uint8 code per element (``quantize_8bit``: bitsandbytes' ``quantize_blockwise``
byte for byte); ``m`` on bnb's signed dynamic map, ``v`` on the unsigned one.
Each step dequantizes them (``code[q] * absmax``), computes ``u_t`` from the fresh
``m_t``, ``v_t`` and requantizes, as bnb's blockwise kernels do. Smaller parameters
keep float32 ``m``, ``v`` (bnb's 32-bit state under 4096 elements).

State memory per element: ``2 + 8 / blocksize`` bytes (2.03 at 256) against 8
for float32 Adam.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qlora_jax.quant.blockwise8 import dequantize_8bit, quantize_8bit
from qlora_jax.quant.codebooks import dynamic_map


@dataclasses.dataclass(frozen=True)
class QuantizedMoment:
    """One Adam moment in 8 bits: ``codes`` ``(n,)`` uint8, ``absmax`` ``(ceil(n / blocksize),)`` float32.

    Static metadata: the moment's ``shape``, ``blocksize`` and ``signed`` (bnb's
    signed dynamic map for ``m``, the unsigned one for ``v``). Value of element
    ``i``: ``dynamic_map(signed)[codes[i]] * absmax[i // blocksize]``.
    """

    codes: jax.Array
    absmax: jax.Array
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    blocksize: int = dataclasses.field(metadata=dict(static=True))
    signed: bool = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def quantize(cls, x: jax.Array, blocksize: int, signed: bool) -> QuantizedMoment:
        """Blockwise absmax quantization of ``x`` (any shape, float32) on the dynamic map."""
        codes, absmax = quantize_8bit(x, dynamic_map(signed), blocksize)
        return cls(codes, absmax, tuple(x.shape), blocksize, signed)

    def dequantize(self) -> jax.Array:
        """The float32 moment, of shape ``self.shape``."""
        flat = dequantize_8bit(self.codes, self.absmax, dynamic_map(self.signed), self.blocksize)
        return flat.reshape(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored: ``n + 4 * ceil(n / blocksize)``."""
        return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in (self.codes, self.absmax))


jax.tree_util.register_dataclass(
    QuantizedMoment, data_fields=["codes", "absmax"], meta_fields=["shape", "blocksize", "signed"]
)

Moment = Any  # per parameter: a float32 array or a QuantizedMoment


class ScaleByAdam8bitState(NamedTuple):
    """``count``: ``()`` int32 steps taken; ``mu``, ``nu``: the params' tree of moments."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def _check_args(b1, b2, eps, blocksize, min_8bit_size) -> None:
    for name, beta in (("b1", b1), ("b2", b2)):
        if isinstance(beta, numbers.Real) and not 0.0 <= beta < 1.0:
            raise ValueError(f"{name}={beta} must be in [0, 1)")
    if isinstance(eps, numbers.Real) and eps < 0:
        raise ValueError(f"eps={eps} must be >= 0")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize={blocksize!r} must be a positive power of two")
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 1:
        raise ValueError(f"min_8bit_size={min_8bit_size!r} must be a positive int")


def _check_params(params) -> None:
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = getattr(p, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            kind = dtype if dtype is not None else type(p).__name__
            raise ValueError(
                f"adam_8bit: parameter {jax.tree_util.keystr(path)} is {kind}; "
                "every parameter must be a floating-point array"
            )


def _load(moment: Moment) -> jax.Array:
    return moment.dequantize() if isinstance(moment, QuantizedMoment) else moment


def _store(value: jax.Array, like: Moment) -> Moment:
    if isinstance(like, QuantizedMoment):
        return QuantizedMoment.quantize(value, like.blocksize, like.signed)
    return value


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    blocksize: int = 256,
    min_8bit_size: int = 4096,
) -> optax.GradientTransformation:
    """Adam's rescaling (``optax.scale_by_adam``) with blockwise 8-bit moments.

    ``init(params)`` returns ``ScaleByAdam8bitState`` with zero moments: a float32
    array of the parameter's shape when it has fewer than ``min_8bit_size``
    elements, else ``QuantizedMoment``s (codes 0, absmax 0, which dequantize to
    exact zeros, as bnb's initial state). ``update(grads, state, params=None)``
    returns ``u_t`` of the module docstring per leaf, computed in float32 from
    grads of any float dtype and cast to the parameter's dtype (the gradient's when
    ``params`` is None). Everything is jit-able; the state may be donated.
    """
    _check_args(b1, b2, eps, blocksize, min_8bit_size)

    def init_fn(params):
        _check_params(params)

        def zeros(p, signed):
            z = jnp.zeros(p.shape, jnp.float32)
            return z if p.size < min_8bit_size else QuantizedMoment.quantize(z, blocksize, signed)

        mu = jax.tree.map(lambda p: zeros(p, True), params)
        nu = jax.tree.map(lambda p: zeros(p, False), params)
        return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), mu, nu)

    def update_fn(updates, state, params=None):
        count = optax.safe_increment(state.count)
        bc1 = (1 - b1**count).astype(jnp.float32)  # optax's bias correction, same ops
        bc2 = (1 - b2**count).astype(jnp.float32)

        def leaf(g, m, v, p):
            g32 = g.astype(jnp.float32)
            m_new = (1 - b1) * g32 + b1 * _load(m)
            v_new = (1 - b2) * g32**2 + b2 * _load(v)
            u = (m_new / bc1) / (jnp.sqrt(v_new / bc2) + eps)
            dtype = g.dtype if p is None else p.dtype
            return u.astype(dtype), _store(m_new, like=m), _store(v_new, like=v)

        grads, treedef = jax.tree.flatten(updates)
        mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        ps = [None] * len(grads) if params is None else treedef.flatten_up_to(params)
        out = [leaf(*args) for args in zip(grads, mus, nus, ps)]
        u, mu, nu = (treedef.unflatten([o[i] for o in out]) for i in range(3))
        return u, ScaleByAdam8bitState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    blocksize: int = 256,
    min_8bit_size: int = 4096,
) -> optax.GradientTransformation:
    """AdamW with 8-bit blockwise state (bitsandbytes' ``AdamW8bit``), optax's ``adamw`` structure.

    ``chain(scale_by_adam_8bit(...), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``: the update is
    ``-lr_t * (u_t + weight_decay * mask * p)``. ``learning_rate`` is a float or
    an optax schedule of the step count; ``mask`` is a pytree of bools or a
    callable of the params, as in ``optax.adamw``. The state is a tuple of the
    three transforms' states, the first a ``ScaleByAdam8bitState``.
    """
    return optax.chain(
        scale_by_adam_8bit(b1, b2, eps, blocksize, min_8bit_size),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
