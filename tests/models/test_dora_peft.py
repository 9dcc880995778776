"""DoRA against peft (``use_dora=True``) on a tiny Llama with an NF4 base: logits, gradients, adapter files.

Both sides hold the same 4-bit bytes: transformers + bitsandbytes quantize the tiny model and
save it, and we load that folder as is. bnb runs in train mode, where its CPU matmul
dequantizes to float32 (in eval mode on an AVX512-BF16 CPU it takes a bf16 kernel), and
peft's DoRA norm dequantizes the same bytes, so the two compute one float32 function and
differ in summation order only: ``reorder_rtol`` of the longest chain of sums. Forward: per layer
the projections' inputs (3 x hidden, intermediate), the attention over T tokens, and the head
over hidden; backward: twice that, plus the B * T tokens each weight gradient sums over.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.layers import QuantConfig, merge, split_trainable
from qlora_jax.models import LoraConfig
from qlora_jax.models.export import load_peft_adapter, save_merged, save_peft_adapter
from qlora_jax.models.stacking import layer_slice
from testlib import assert_trees_close, fixed_mask, fixed_mask_layer, reorder_rtol

pytestmark = pytest.mark.oracle

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 64, 128, 2, 256
B, T = 2, 10
LORA = LoraConfig(rank=4, alpha=8.0, use_dora=True, targets=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))
N_FWD = LAYERS * (3 * HIDDEN + INTERMEDIATE + T) + HIDDEN
N_BWD = 2 * N_FWD + B * T


@pytest.fixture(scope="module")
def bnb_folder(tmp_path_factory):
    """A tiny random Llama, quantized to NF4 (double quant) by transformers + bitsandbytes and saved."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                   num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2)
    hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + 1.0)
    root = tmp_path_factory.mktemp("dora")
    hf.save_pretrained(root / "float")
    quantized = transformers.AutoModelForCausalLM.from_pretrained(root / "float", dtype=torch.float32,
                                                                  quantization_config=_bnb_config())
    quantized.save_pretrained(root / "nf4")
    return root / "nf4"


def _bnb_config():
    import torch
    import transformers

    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)


def _theirs(folder):
    """The saved NF4 model in train mode (module docstring)."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()  # docstring


def _ours(folder, lora=LORA):
    import qlora_jax as qj

    return qj.from_pretrained(folder, quantization=QuantConfig("nf4", 64, True), lora=lora, dtype=jnp.float32,
                              base_dtype=jnp.float32)[:2]


def _perturb(rng, params):
    """Random A and B (B non-zero), the magnitude moved 10% off its init: every term of DoRA matters."""
    def move(path, p):
        noise = rng.standard_normal(p.shape).astype(np.float32)
        if jax.tree_util.keystr(path).endswith("['lora_magnitude']"):
            return p * (1.0 + 0.1 * noise)
        return p + 0.1 * noise
    return jax.tree_util.tree_map_with_path(move, params)


def _torch_tree(peft_model, like, attribute: str):
    """peft's trainable tensors (``attribute``: "data" or "grad") in our stacked layout and shapes."""
    named = dict(peft_model.named_parameters())

    def pick(path, leaf):
        keys = [k.key for k in path]  # ("layers", *module, leaf)
        module, ours = ".".join(keys[1:-1]), keys[-1]
        name = {"lora_a": "lora_A.default.weight", "lora_b": "lora_B.default.weight",
                "lora_magnitude": "lora_magnitude_vector.default.weight"}[ours]
        per_layer = [getattr(named[f"base_model.model.model.layers.{i}.{module}.{name}"], attribute).numpy()
                     for i in range(leaf.shape[0])]
        return np.stack([p if ours == "lora_magnitude" else p.T for p in per_layer])

    return jax.tree_util.tree_map_with_path(pick, like)


def _ce(logits, targets):
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])


def test_magnitude_init_equals_peft(bnb_folder):
    import peft

    _, v = _ours(bnb_folder)
    theirs = peft.get_peft_model(_theirs(bnb_folder), peft.LoraConfig(
        r=LORA.rank, lora_alpha=LORA.alpha, target_modules=list(LORA.targets), use_dora=True))
    # peft's init: ||dequant(W)||_row with B = 0 (a sum of `in` squares, in <= INTERMEDIATE)
    expect = _flat(_torch_tree(theirs, v["params"], "data"))
    magnitudes = {k: m for k, m in _flat(v["params"]).items() if k[-1] == "lora_magnitude"}
    assert len(magnitudes) == len(LORA.targets)
    for key, m in magnitudes.items():
        assert_trees_close(m, expect[key], reorder_rtol(INTERMEDIATE))


def _flat(tree) -> dict:
    return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_peft_loads_our_dora_adapter_with_our_logits_and_gradients(rng, bnb_folder, tmp_path):
    import peft
    import torch
    from safetensors.numpy import load_file

    model, v = _ours(bnb_folder)
    params, frozen = split_trainable(v)
    params = _perturb(rng, params)
    save_peft_adapter(tmp_path / "ours", params, LORA)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(_theirs(bnb_folder), tmp_path / "ours", is_trainable=True).train()
    # the names are peft's own: what it saves back is our file, key for key and value for value
    theirs.save_pretrained(tmp_path / "theirs")
    ours_file, theirs_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert sorted(ours_file) == sorted(theirs_file)
    assert any(k.endswith(".self_attn.q_proj.lora_magnitude_vector") for k in theirs_file)
    for key, value in ours_file.items():
        np.testing.assert_array_equal(theirs_file[key], value, err_msg=key)

    tokens, targets = rng.integers(0, VOCAB, (B, T)), rng.integers(0, VOCAB, (B, T))
    logits = theirs(torch.from_numpy(tokens)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.from_numpy(targets).reshape(-1))
    loss.backward()

    def our_loss(p):
        out = model.apply(merge(p, frozen), jnp.asarray(tokens))
        return _ce(out, jnp.asarray(targets)), out

    (value, ours_logits), grads = jax.jit(jax.value_and_grad(our_loss, has_aux=True))(params)
    assert_trees_close(ours_logits, logits.detach().numpy(), reorder_rtol(N_FWD))
    assert abs(float(value) - loss.item()) <= reorder_rtol(N_FWD) * loss.item()
    assert_trees_close(grads, _torch_tree(theirs, params, "grad"), reorder_rtol(N_BWD))
    # and DoRA changed the output: the comparison means something
    with torch.no_grad(), theirs.disable_adapter():
        plain = theirs(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(plain - np.asarray(ours_logits)).max() > 100 * reorder_rtol(N_FWD) * np.abs(plain).max()


def test_we_load_peft_dora_adapter(rng, bnb_folder, tmp_path):
    import peft
    import torch

    theirs = peft.get_peft_model(_theirs(bnb_folder), peft.LoraConfig(
        r=LORA.rank, lora_alpha=LORA.alpha, target_modules=list(LORA.targets), use_dora=True))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.mul_(1.0 + 0.1 * torch.randn_like(p)) if "magnitude" in name else p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path)
    params, lora = load_peft_adapter(tmp_path)
    assert lora.use_dora and lora.rank == LORA.rank and set(lora.targets) == set(LORA.targets)
    model, v = _ours(bnb_folder, lora)
    tokens = rng.integers(0, VOCAB, (B, T))
    with torch.no_grad():
        ref = theirs(torch.from_numpy(tokens)).logits.numpy()
    ours = jax.jit(model.apply)(merge(params, split_trainable(v)[1]), jnp.asarray(tokens))
    assert_trees_close(ours, ref, reorder_rtol(N_FWD))


def test_dropout_layer_matches_peft_with_the_same_mask(rng, bnb_folder, tmp_path):
    """peft's dropout branch (``base_result = None``): the base runs again on the dropped input."""
    import peft
    import torch

    from qlora_jax.layers import QLoRADense

    model, v = _ours(bnb_folder)
    params, frozen = split_trainable(v)
    params = _perturb(rng, params)
    save_peft_adapter(tmp_path, params, LORA)
    peft_model = peft.PeftModel.from_pretrained(_theirs(bnb_folder), tmp_path, is_trainable=True).train()
    theirs = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    x = rng.standard_normal((B, T, HIDDEN)).astype(np.float32)
    mask = np.array(fixed_mask(5, x.shape, 0.25))

    class Mask(torch.nn.Module):
        def forward(self, h):
            return h * torch.from_numpy(mask)

    theirs.lora_dropout["default"] = Mask()  # not an Identity: peft takes its dropout branch in train mode
    y = theirs(torch.from_numpy(x))
    cot = rng.standard_normal(y.shape).astype(np.float32)
    (y * torch.from_numpy(cot)).sum().backward()

    layer = fixed_mask_layer(QLoRADense(features=HIDDEN, rank=LORA.rank, alpha=LORA.alpha, dropout=0.25,
                                        use_dora=True, dtype=jnp.float32, quant=QuantConfig("nf4", 64, True)), seed=5)
    ours_p = layer_slice(params["layers"]["self_attn"]["q_proj"], 1)
    kernel = {"kernel": layer_slice(frozen["frozen"]["layers"]["self_attn"]["q_proj"]["kernel"], 1)}

    def apply(p):
        return layer.apply({"params": p, "frozen": kernel}, jnp.asarray(x), deterministic=False,
                           rngs={"dropout": jax.random.key(0)})

    out, pullback = jax.vjp(apply, ours_p)
    (grads,) = pullback(jnp.asarray(cot))
    n = HIDDEN + LORA.rank + HIDDEN  # the norm's squares, the rank-r product, a matmul over in
    assert_trees_close(out, y.detach().numpy(), reorder_rtol(n))
    expect = {"lora_a": theirs.lora_A["default"].weight.grad.numpy().T,
              "lora_b": theirs.lora_B["default"].weight.grad.numpy().T,
              "lora_magnitude": theirs.lora_magnitude_vector["default"].weight.grad.numpy()}
    assert_trees_close(grads, expect, reorder_rtol(2 * n + B * T))


def test_merged_dora_export_loads_in_transformers(rng, bnb_folder, tmp_path):
    import torch
    import transformers

    model, v = _ours(bnb_folder)
    v = {**v, "params": _perturb(rng, v["params"])}
    save_merged(tmp_path, model.config, v, LORA, dtype="float32")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = rng.integers(0, VOCAB, (B, T))
    with torch.no_grad():
        ref = merged(torch.from_numpy(tokens)).logits.numpy()
    assert_trees_close(jax.jit(model.apply)(v, jnp.asarray(tokens)), ref, reorder_rtol(N_FWD))
