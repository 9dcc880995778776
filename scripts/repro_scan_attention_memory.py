"""Reproducer (work in progress, issue 14): chunked attention's gradient inside lax.scan needs O(T^2) XLA temporaries
(130 / 427 MiB at T = 2048 / 4096, against 17.6 / 22.7 MiB unrolled; jax 0.10.2, CPU). Not a finished script."""
import jax, jax.numpy as jnp
from qlora_jax.models.attention import attention
def temp(T, scan):
    q=jax.ShapeDtypeStruct((1,T,4,32),jnp.float32); k=jax.ShapeDtypeStruct((1,T,2,32),jnp.float32)
    pos=jax.ShapeDtypeStruct((1,T),jnp.int32)
    def f(q,k,v,pos):
        att=lambda q: attention(q,k,v,q_positions=pos,kv_positions=pos,q_segment_ids=pos,kv_segment_ids=pos,implementation="chunked")
        if scan:
            def body(c,_): return att(c)+c, None
            return jax.lax.scan(body, q, None, length=2)[0].sum()
        return att(att(q)+q).sum()
    g=jax.jit(jax.grad(f)).lower(q,k,k,pos).compile()
    return g.memory_analysis().temp_size_in_bytes/2**20
for scan in (False, True):
    print(scan, [round(temp(T,scan),1) for T in (2048,4096)], flush=True)
