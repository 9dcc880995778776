"""Rotary position embeddings (Hugging Face's rotate-half layout), with Llama 3.1 / linear scaling.

For head dim ``d`` and position ``p``: ``inv_freq[j] = theta^(-2j/d)`` (j < d/2),
``angle = p * inv_freq``, and a head vector ``x = [x1, x2]`` (halves) becomes
``x * cos(angle ++ angle) + [-x2, x1] * sin(angle ++ angle)``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from qlora_jax.models.config import LlamaConfig


def inv_frequencies(config: LlamaConfig) -> np.ndarray:
    """``(head_dim / 2,)`` float32 inverse frequencies after the configured scaling."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = config.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    if rs.rope_type == "linear":
        return (inv / rs.factor).astype(np.float32)
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
    """Rotates ``x`` of shape ``(B, T, heads, head_dim)`` by ``positions`` ``(B, T)``, in float32."""
    angle = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (B, T, d/2)
    angle = jnp.concatenate([angle, angle], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * jnp.cos(angle) + rotated * jnp.sin(angle)).astype(x.dtype)
