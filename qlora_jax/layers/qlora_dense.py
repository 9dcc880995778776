"""``QLoRADense``: a frozen (4-bit or float) linear base plus a trainable LoRA adapter.

    y = x @ W.T [+ bias] + s * dropout(x) @ A @ B,     s = alpha / r  (alpha / sqrt(r) with rsLoRA)

Shapes: ``x`` is ``(..., in)``; the base ``W`` is ``(out, in)`` (PyTorch /
bitsandbytes layout, so a quantized ``W`` is byte-compatible with bnb); ``A`` is
``(in, r)`` and ``B`` is ``(r, out)`` (PEFT's ``lora_A.weight`` / ``lora_B.weight``
transposed). The LoRA term is ``lora_product``, whose backward keeps every large
GEMM operand in its stored layout.

Trainability is structural: ``W`` (a ``QuantizedArray`` or a float array) and the
bias live in the ``"frozen"`` collection, so the ``"params"`` collection holds
LoRA's ``A`` and ``B`` alone and ``jax.grad`` over ``params`` is all a trainer
needs. The quantized base matmul goes through ``qlora_jax.kernels.quantized_matmul``
on ``backend`` (``"auto"``: jnp reference on CPUs, Pallas kernels on GPUs;
docs/kernels.md), whose custom VJP saves only the packed weight and returns a
gradient for ``x`` only.

Init follows PEFT: ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (kaiming-uniform with
a = sqrt(5)), ``B = 0``, so a fresh adapter leaves the output unchanged. A fresh
base (no loaded weights) is initialised like ``torch.nn.Linear`` and quantized.

``use_dora``: DoRA as peft computes it (``qlora_jax.layers.dora``): a third trainable leaf,
the magnitude ``lora_magnitude`` ``(out,)`` (initialised to the base's row norms), and

    y = x @ W.T [+ bias] + (g - 1) * (h @ W.T) + g * s * h @ A @ B,    g = m / ||W + s (A B)^T||_row

with ``h = dropout(x)`` (``h @ W.T`` is ``x @ W.T`` itself when no dropout is active); the
row norm is computed from the 4-bit base in chunks and gets no gradient.

``fp32_output`` (with ``rank >= 1``): the LoRA term ``s * (h @ A) @ B`` is computed with a float32
``x @ A`` and float32 ``B`` and added to the base output in float32, and the layer returns float32
(peft's LoRA over a float32 residual stream does the same). In the compute dtype (bf16) a LoRA term
much smaller than the base output, as every early update is, rounds away in the sum.

Three dtypes: ``dtype`` for compute (bf16), ``param_dtype`` for LoRA (fp32), and
the fixed storage of the base (uint8 codes, or ``base_dtype`` when unquantized).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from qlora_jax.kernels import check_backend, quantized_matmul
from qlora_jax.kernels.schedule import tie_to
from qlora_jax.layers.dora import dora_delta, weight_norm
from qlora_jax.layers.lora_product import lora_product
from qlora_jax.quant import QuantizedArray, quantize
from qlora_jax.quant.api import check_blocksize
from qlora_jax.quant.codebooks import QUANT_TYPES

FROZEN = "frozen"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a base weight is stored: ``None`` in place of this means float storage (the trainer's ``quant`` section).

    Errors name the field as ``quant.<field>``.
    """

    quant_type: str = dataclasses.field(default="nf4", metadata={"help": "4-bit code table", "choices": QUANT_TYPES})
    blocksize: int = dataclasses.field(default=64, metadata={"help": "weights per absmax scale: a power of two in "
                                                                     "[32, 4096]"})
    double_quant: bool = dataclasses.field(default=True, metadata={"help": "quantize the absmax scales to 8 bits "
                                                                            "as well"})

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant.quant_type={self.quant_type!r} is not one of {QUANT_TYPES}")
        check_blocksize(self.blocksize, name="quant.blocksize")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"quant.double_quant={self.double_quant!r} must be a bool")


def torch_linear_init(key: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """``U(-1/sqrt(in), 1/sqrt(in))`` for an ``(out, in)`` weight, as ``torch.nn.Linear``."""
    return _symmetric_uniform(1.0 / math.sqrt(shape[1]))(key, shape, dtype)


class QLoRADense(nn.Module):
    """Frozen base linear (``(out, in)``, quantized or float) + LoRA; see the module docstring."""

    features: int
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    use_bias: bool = False
    fp32_output: bool = False
    quant: QuantConfig | None = QuantConfig()
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32
    base_dtype: jnp.dtype = jnp.bfloat16
    backend: str = "auto"

    def __post_init__(self):
        if self.features <= 0:
            raise ValueError(f"features={self.features} must be positive")
        if self.rank < 0:
            raise ValueError(f"rank={self.rank} must be >= 0 (0 disables LoRA)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        check_backend(self.backend)
        super().__post_init__()

    @property
    def scaling(self) -> float:
        """LoRA's output scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        if self.rank == 0:
            return 0.0
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        in_features = x.shape[-1]
        shape = (self.features, in_features)
        kernel = self.variable(FROZEN, "kernel", self._init_base, shape).value
        if tuple(kernel.shape) != shape:
            raise ValueError(f"{self.name}: kernel has shape {tuple(kernel.shape)}, expected (out, in)={shape}")
        x = x.astype(self.dtype)
        y0 = self._base(x, kernel)
        y = y0
        if self.use_bias:
            bias = self.variable(FROZEN, "bias", lambda: jnp.zeros((self.features,), self.base_dtype)).value
            y = y + jax.lax.stop_gradient(bias).astype(self.dtype)
        if self.rank == 0:
            return y
        bound = 1.0 / math.sqrt(in_features)
        a = self.param("lora_a", _symmetric_uniform(bound), (in_features, self.rank), self.param_dtype)
        b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features), self.param_dtype)
        dropped = self.dropout > 0 and not deterministic
        h = self._dropout(x) if dropped else x
        out_dtype = jnp.float32 if self.fp32_output else self.dtype
        lora = lora_product(h, a.astype(self.dtype), b.astype(out_dtype), self.scaling, out_dtype)
        y = y.astype(out_dtype)
        if not self.use_dora:
            return y + lora
        magnitude = self.param("lora_magnitude", lambda _: weight_norm(kernel).astype(self.param_dtype))
        if tuple(magnitude.shape) != (self.features,):
            raise ValueError(f"{self.name}: lora_magnitude has shape {tuple(magnitude.shape)}, expected (out,)="
                             f"{(self.features,)}")
        norm = weight_norm(kernel, a, b, self.scaling)
        return y + dora_delta(y0, self._base(h, kernel) if dropped else None, lora, magnitude, norm)

    def _dropout(self, x):
        """LoRA's input dropout, while training."""
        # the key tied to x: a rematerialized layer's recomputation then draws its mask from the
        # recomputed input, so XLA cannot merge it with the forward's draw and keep that
        # (T, in) mask alive from the forward to the backward, in every layer
        rng = tie_to(self.make_rng("dropout"), x)
        return nn.Dropout(rate=self.dropout)(x, deterministic=False, rng=rng)

    def _base(self, x, kernel):
        """``x @ W.T`` in the compute dtype; ``W`` gets no gradient."""
        if isinstance(kernel, QuantizedArray):
            return quantized_matmul(x, kernel, self.backend)
        w = jax.lax.stop_gradient(kernel).astype(self.dtype)
        return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=jnp.float32).astype(self.dtype)

    def _init_base(self, shape):
        w = torch_linear_init(self.make_rng("params"), shape)
        if self.quant is None:
            return w.astype(self.base_dtype)
        q = self.quant
        return quantize(w.astype(self.base_dtype), q.quant_type, q.blocksize, double_quant=q.double_quant)


def _symmetric_uniform(bound: float):
    """Initializer drawing ``U(-bound, bound)``."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init
