"""Rotary position embeddings (Hugging Face's rotate-half layout), with Llama 3.1, linear and LongRoPE scaling.

For rotary dim ``d`` (``head_dim`` or its leading ``partial_rotary_factor``) and position
``p``: ``inv_freq[j] = theta^(-2j/d)`` (j < d/2), ``angle = p * inv_freq``, and the rotated
part ``x = [x1, x2]`` (halves) of a head becomes
``m * (x * cos(angle ++ angle) + [-x2, x1] * sin(angle ++ angle))``; the dims past ``d``
pass unchanged. ``m`` is 1 except under LongRoPE (its ``attention_factor``).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from qlora_jax.models.config import ModelConfig


def _base_inv(theta: float, dim: int) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def inv_frequencies(config: ModelConfig, local: bool = False) -> np.ndarray:
    """``(rotary_dim / 2,)`` float32 inverse frequencies after the configured scaling.

    ``local``: those of the sliding-window layers, which use ``local_rope_theta`` unscaled
    (Gemma 3) when it is set. LongRoPE has two sets; this is the short one
    (``rope_frequencies`` picks per call).
    """
    d = config.rotary_dim
    if local and config.local_rope_theta is not None:
        return _base_inv(config.local_rope_theta, d).astype(np.float32)
    inv = _base_inv(config.rope_theta, d)
    rs = config.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    if rs.rope_type == "linear":
        return (inv / rs.factor).astype(np.float32)
    if rs.rope_type == "longrope":
        return (inv / np.asarray(rs.short_factor, np.float64)).astype(np.float32)
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


LLAMA3_ORIGINAL = 8192  # Llama 3.1's original context: the representative llama3_from_divisors reports


def llama3_from_divisors(divisors, theta: float, dim: int):
    """The ``llama3`` ``RopeScaling`` whose ``base_inv / inv_frequencies`` are ``divisors`` (llama.cpp's
    ``rope_freqs`` tensor), or None when every divisor is 1.

    The divisor ``v`` of a frequency is 1 (short wavelengths), ``factor`` (long ones) or, between,
    ``1 / ((1 - s) / factor + s)`` with ``s = (orig / wavelen - low) / (high - low)``, linear in
    ``inv_freq = 2 pi / wavelen``. A line fitted through ``s(inv_freq)`` of the blended frequencies
    gives the two boundary wavelengths ``orig / low`` (s = 0) and ``orig / high`` (s = 1); the divisors
    depend on ``orig``, ``low`` and ``high`` only through them, so ``orig`` is reported as
    ``LLAMA3_ORIGINAL``. Raises ``ValueError`` when the divisors are not of this shape (fewer than two
    blended frequencies, or a fit that does not reproduce them to 1e-4).
    """
    from qlora_jax.models.config import RopeScaling

    v = np.asarray(divisors, np.float64)
    factor = float(v.max())
    if np.allclose(v, 1.0):
        return None
    inv = _base_inv(theta, dim)
    if v.shape != inv.shape:
        raise ValueError(f"rope_freqs has {v.size} divisors; the rotary dim {dim} needs {inv.size}")
    blended = (v > 1 + 1e-6) & (v < factor * (1 - 1e-6))
    if blended.sum() < 2:
        raise ValueError("rope_freqs: fewer than two blended frequencies, the llama3 boundaries are not determined")
    s = (1 / v[blended] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv[blended], s, 1)
    to_factor = LLAMA3_ORIGINAL / (2 * math.pi)  # orig / wavelen at a boundary inv_freq
    low, high = to_factor * (-intercept / slope), to_factor * (1 - intercept) / slope
    try:  # s grows with inv_freq, so 0 < low < high; anything else is another scheme
        rs = RopeScaling("llama3", factor=factor, low_freq_factor=float(low), high_freq_factor=float(high),
                         original_max_position_embeddings=LLAMA3_ORIGINAL)
    except ValueError as e:
        raise ValueError(f"rope_freqs is not llama3 scaling (the fitted boundaries are invalid: {e})") from None
    probe = ModelConfig(vocab_size=1, hidden_size=dim, intermediate_size=1, num_hidden_layers=1, num_attention_heads=1,
                        num_key_value_heads=1, head_dim=dim, rope_theta=theta, rope_scaling=rs)
    back = _base_inv(theta, dim) / inv_frequencies(probe)
    if not np.allclose(back, v, rtol=1e-4):
        raise ValueError(f"rope_freqs is not llama3 scaling (the best fit is off by {np.abs(back / v - 1).max():.2g})")
    return rs


def rope_frequencies(config: ModelConfig, positions: jnp.ndarray, local: bool = False) -> tuple[jnp.ndarray, float]:
    """``(inv_freq, m)`` for a call at ``positions`` ``(B, T)``.

    LongRoPE uses its long factors once a position reaches ``original_max_position_embeddings``
    (``max(positions) + 1`` beyond it, for the whole call, as transformers decides it).
    """
    inv = jnp.asarray(inv_frequencies(config, local))
    rs = config.rope_scaling
    if local and config.local_rope_theta is not None or rs is None or rs.rope_type != "longrope":
        return inv, 1.0
    long = jnp.asarray((_base_inv(config.rope_theta, config.rotary_dim)
                        / np.asarray(rs.long_factor, np.float64)).astype(np.float32))
    beyond = jnp.max(positions) + 1 > rs.original_max_position_embeddings
    return jnp.where(beyond, long, inv), rs.attention_factor


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq, scale: float = 1.0) -> jnp.ndarray:
    """Rotates the leading ``2 * len(inv_freq)`` dims of ``x`` ``(B, T, heads, head_dim)`` by ``positions`` ``(B, T)``.

    In float32; cos and sin are multiplied by ``scale`` (LongRoPE's attention factor).
    """
    angle = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (B, T, d/2)
    angle = jnp.concatenate([angle, angle], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    rot = angle.shape[-1]
    xr, rest = x32[..., :rot], x32[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    out = xr * cos + rotated * sin
    if rest.shape[-1]:
        out = jnp.concatenate([out, rest], axis=-1)
    return out.astype(x.dtype)
