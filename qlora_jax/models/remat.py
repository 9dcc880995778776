"""Layer rematerialization whose recomputation waits for the backward pass.

``jax.checkpoint`` (``nn.remat``) keeps only a layer's inputs and recomputes the rest
in the backward pass. What stops XLA from merging that recomputation with the forward
pass (common-subexpression elimination) or running it early is an optimization
barrier on those inputs. jaxlib 0.10.2's CPU compiler loses the barrier: it merges or
hoists every layer's recomputation into the forward pass, so remat costs the extra
FLOPs and saves no memory. A 6-layer Llama's gradient (``tests/models/test_remat.py``)
needs 133.5 MB of XLA temporaries without remat and 129.7 MB with plain ``nn.remat``
on jaxlib 0.10.2 (26.9 MB on 0.11.2); with ``remat_layer``, 27.1 MB on both.

``remat_layer`` makes the ordering a data dependency that no compiler pass can drop
(``qlora_jax.kernels.schedule.tie_to``).
It wraps the checkpointed layer in a custom VJP whose backward first ties every saved
input (the layer's input, its packed weights and LoRA factors, the dropout key) to the
incoming output cotangent ``g``::

    keep = (c == c) | (c != c),   c = g.ravel()[0]         (true for every float, NaN included)
    input' = where(keep, input, 0)

XLA cannot evaluate ``keep`` at compile time, so the recomputation reads ``input'``,
which exists only once ``g`` does, and differs from the forward's ``input``, so nothing
is merged. The values are unchanged (``keep`` is always true); the cost is one select
pass over the saved inputs per layer, small next to the layer itself.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from qlora_jax.kernels.schedule import tie_to


def remat_layer(layer: nn.Module, *args, call: Callable[..., Any]) -> Any:
    """``call(layer, *args)``, with ``layer`` (an ``nn.remat`` module) recomputed only in the backward pass.

    ``call(mdl, *args)`` returns the layer's output, a float array whose cotangent
    gates the recomputation (module docstring). Gradients flow to the ``params``
    collection and to ``args``; integer ``args`` get zero (float0) cotangents.
    """

    def forward(mdl, *xs):
        return nn.vjp(call, mdl, *xs)

    def backward(vjp_fn, g):
        return tie_to(vjp_fn, g)(g)

    return nn.custom_vjp(call, forward_fn=forward, backward_fn=backward)(layer, *args)
