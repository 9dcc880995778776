"""The loss-curve PNG: raw train loss (faint), its bias-corrected EMA (bold), held-out loss points.

Smoothing is TensorBoard's scalar smoothing: an exponential moving average started
at zero and divided by the weight it has accumulated so far (as Adam's bias
correction), so the first points are not pulled towards zero::

    m_0 = 0,   m_i = w * m_{i-1} + (1 - w) * x_i,   s_i = m_i / (1 - w ** (i + 1))     (i = 0, 1, ...)

``s_i`` is a weighted mean of ``x_0 .. x_i`` with weights ``w ** (i - j)`` (the
weights sum to one), so a constant input stays exactly constant, and after a step
from ``a`` to ``b`` at index ``k`` the gap ``s_i - b`` is
``(a - b) * (w ** (i - k + 1) - w ** (i + 1)) / (1 - w ** (i + 1))``: it shrinks by
``1/e`` every ``tau = -1 / ln(w)`` points once ``i >> k``. The plot picks ``tau``
from the number of points (``smoothing_time_constant``).
"""

from __future__ import annotations

import math

import numpy as np

from qlora_jax.train.report import read_metrics


def ema_weight(tau: float) -> float:
    """The EMA weight ``w = exp(-1 / tau)`` whose memory decays by ``1/e`` every ``tau`` points; ``tau > 0``."""
    if not tau > 0:
        raise ValueError(f"{tau=} must be > 0")
    return math.exp(-1.0 / tau)


def ema(values, weight: float) -> np.ndarray:
    """Bias-corrected EMA of ``values`` (1-D), ``s_i = m_i / (1 - w ** (i + 1))`` (module docstring); float64.

    ``weight`` in ``[0, 1)``: 0 returns the input; closer to 1 smooths more.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"{weight=} must be in [0, 1)")
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"values.shape={x.shape} must be 1-D")
    out, m = np.empty_like(x), 0.0
    for i, v in enumerate(x):
        m = weight * m + (1.0 - weight) * v
        out[i] = m / (1.0 - weight ** (i + 1))
    return out


def smoothing_time_constant(n_points: int) -> float:
    """``tau`` for ``n_points`` logged losses: a tenth of them, clamped to [1, 100] points (40 steps: tau 4).

    A tenth keeps the curve's lag behind a trend (``tau`` points) small next to the run's length; the cap keeps
    a long run's curve following changes within 100 points.
    """
    return min(max(n_points / 10.0, 1.0), 100.0)


def plot_losses(metrics_path: str, png_path: str) -> None:
    """Train loss per logged step (faint) with its EMA (bold) and held-out loss at its steps; matplotlib (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        tau = smoothing_time_constant(len(losses))
        ax.plot(steps, losses, color="C0", alpha=0.3, linewidth=1, label="train loss")
        ax.plot(steps, ema(losses, ema_weight(tau)), color="C0", linewidth=2,
                label=f"train loss, EMA (tau {tau:.3g} points)")
    if evals:
        ax.plot(*zip(*evals), "o-", color="C1", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


REWARD_PANELS = (("rewards/accuracies", "reward accuracy (chosen > rejected)"),
                 ("rewards/margins", "reward margin (chosen - rejected)"))


def plot_rewards(metrics_path: str, png_path: str) -> bool:
    """A preference run's reward accuracy and margin per step (faint, EMA bold) and held out; False if none."""
    rows = read_metrics(metrics_path)
    if not any(name in r for r in rows for name, _ in REWARD_PANELS):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(REWARD_PANELS), figsize=(11, 4), dpi=110)
    for ax, (name, label) in zip(axes, REWARD_PANELS):
        train = [(r["step"], r[name]) for r in rows if name in r and math.isfinite(r[name])]
        evals = [(r["step"], r[f"eval_{name}"]) for r in rows if f"eval_{name}" in r]
        if train:
            steps, values = zip(*train)
            tau = smoothing_time_constant(len(values))
            ax.plot(steps, values, color="C0", alpha=0.3, linewidth=1, label="train")
            ax.plot(steps, ema(values, ema_weight(tau)), color="C0", linewidth=2, label=f"train, EMA (tau {tau:.3g})")
        if evals:
            ax.plot(*zip(*evals), "o-", color="C1", label="held out")
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return True
