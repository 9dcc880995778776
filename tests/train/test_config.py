"""The trainer's configuration: defaults, CLI and file parsing, validation, round trip, --help."""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import numpy as np
import pytest

from qlora_jax.layers.qlora_dense import QuantConfig
from qlora_jax.models.llama import LoraConfig
from qlora_jax.optim import OptimizerConfig
from qlora_jax.train.cli import format_value
from qlora_jax.train.config import (
    DEFAULT_LORA,
    OPTIM_HELP,
    LoopSection,
    MeshSection,
    ModelSection,
    QuantSection,
    TrainConfig,
    config_fields,
    parse_config,
)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def LoraSection(**kw) -> LoraConfig:  # noqa: N802 - the trainer's lora section: LoraConfig with its recipe defaults
    return dataclasses.replace(DEFAULT_LORA, **kw)
SPEC_DEFAULTS = {
    "model": {"path": "", "dtype": "auto", "remat": "none", "backend": "auto", "attention": "auto", "loss_chunk": 0,
              "adapter": "", "mlp_tile": 0, "residual_dtype": "compute"},
    "quant": {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "enabled": True},
    "lora": {"rank": 16, "alpha": 32.0, "dropout": 0.05, "use_rslora": False, "targets": ALL, "use_dora": False,
             "fp32_output": False},
    "data": {"train_path": "", "eval_path": "", "eval_fraction": 0.02, "seq_len": 256, "packing": True,
             "max_train_records": 0, "columns": [], "instruction_format": "auto", "streams": 0},
    "optim": {"learning_rate": 1e-3, "schedule": "constant", "warmup_ratio": 0.03, "final_lr_ratio": 0.0,
              "max_grad_norm": 0.3, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "state_bits": 32,
              "offload": False, "offload_per_layer": False, "lora_plus_ratio": 1.0},
    "loop": {"steps": 40, "epochs": 0.0, "batch_size": 4, "grad_accum": 1, "eval_every": 20, "eval_batches": 4,
             "seed": 0, "max_bad_steps": 5, "sample_prompt": "What is the capital of France?", "sample_tokens": 40,
             "objective": "sft", "beta": 0.1, "dpo_loss": "sigmoid", "label_smoothing": 0.0},
    "checkpoint": {"every": 20, "keep": 2, "resume": False},
    "output": {"dir": "runs/default", "log_every": 1, "progress": True, "progress_bar": "auto", "tensorboard": True,
               "wandb": False, "wandb_project": "qlora-jax", "plot": True, "export_peft": True, "export_merged": False,
               "export_gguf": ""},
    "mesh": {"data": -1, "fsdp": 1, "coordinator": "", "num_processes": 0, "process_id": -1, "timeout_s": 300},
}


def test_defaults_are_the_spec():
    config = TrainConfig()
    assert config.to_dict() == SPEC_DEFAULTS
    assert parse_config([]) == config
    assert config.optim == OptimizerConfig(learning_rate=1e-3)
    assert config.lora.targets == tuple(ALL)


def test_cli_overrides():
    config = parse_config(["--lora.rank", "64", "--optim.learning_rate", "2e-4", "--optim.state_bits", "8",
                           "--optim.offload", "true", "--data.train_path", "x.jsonl", "--model.dtype=bfloat16",
                           "--loop.sample_prompt", "Hi there", "--mesh.data", "-1", "--mesh.fsdp", "2"])
    assert config.lora.rank == 64 and config.lora.alpha == 32.0
    assert config.optim == OptimizerConfig(learning_rate=2e-4, state_bits=8, offload=True)
    assert config.data.train_path == "x.jsonl"
    assert config.model.dtype == "bfloat16"
    assert config.loop.sample_prompt == "Hi there"
    assert config.mesh == MeshSection(data=-1, fsdp=2)


def test_argv_none_reads_sys_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--lora.rank", "8"])
    assert parse_config().lora.rank == 8


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("TRUE", True), ("Yes", True), ("1", True),
    ("false", False), ("No", False), ("0", False), ("FaLsE", False),
])
def test_bool_values(text, expected):
    assert parse_config(["--optim.offload", text]).optim.offload is expected
    assert parse_config(["--quant.enabled", text]).quant.enabled is expected


def test_bare_bool_flag_means_true():
    config = parse_config(["--optim.offload", "--lora.use_rslora", "--lora.rank", "4"])
    assert config.optim.offload and config.lora.use_rslora and config.lora.rank == 4


@pytest.mark.parametrize("text, expected", [
    ("q_proj", ("q_proj",)), ("q_proj,v_proj", ("q_proj", "v_proj")), (" q_proj , v_proj, ", ("q_proj", "v_proj")),
])
def test_tuple_values(text, expected):
    assert parse_config(["--lora.targets", text]).lora.targets == expected


@pytest.mark.parametrize("text, expected", [("none", None), ("None", None), ("NULL", None), ("0.5", 0.5), ("1", 1.0)])
def test_optional_float_values(text, expected):
    value = parse_config(["--optim.max_grad_norm", text]).optim.max_grad_norm
    assert value == expected and type(value) is type(expected)


YAML = """
lora:
  rank: 64
  targets: [q_proj, v_proj]
optim:
  learning_rate: 2e-4   # PyYAML reads this as a string; it must still parse
  max_grad_norm: null
  offload: yes
loop:
  epochs: 1.5
  steps: 0
  batch_size: 8
mesh:
"""


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_file(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    path.write_text(YAML)
    config = parse_config(["--config", str(path)])
    assert config.lora == LoraSection(rank=64, targets=("q_proj", "v_proj"))
    assert config.optim == OptimizerConfig(learning_rate=2e-4, max_grad_norm=None, offload=True)
    assert config.loop == LoopSection(epochs=1.5, steps=0, batch_size=8)
    assert config.mesh == MeshSection() and config.model == ModelSection()


def test_json_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"lora": {"rank": 8, "alpha": 16, "targets": "q_proj,k_proj"},
                                "optim": {"max_grad_norm": None, "state_bits": 8}, "checkpoint": {"resume": True}}))
    config = parse_config(["--config", str(path)])
    assert config.lora == LoraSection(rank=8, alpha=16.0, targets=("q_proj", "k_proj"))
    assert type(config.lora.alpha) is float
    assert config.optim == OptimizerConfig(learning_rate=1e-3, max_grad_norm=None, state_bits=8)
    assert config.checkpoint.resume is True


def test_precedence_defaults_file_cli(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora: {rank: 64, alpha: 8}\nloop: {seed: 3}\n")
    config = parse_config(["--lora.rank", "4", "--config", str(path), "--output.dir", "out"])
    assert config.lora.rank == 4  # CLI over file, whatever the order of the flags
    assert config.lora.alpha == 8.0  # file over default
    assert config.loop.seed == 3 and config.output.dir == "out"
    assert config.lora.dropout == 0.05  # default


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert parse_config(["--config", str(path)]) == TrainConfig()


def test_round_trip():
    config = parse_config(["--lora.rank", "64", "--lora.targets", "q_proj,o_proj", "--optim.max_grad_norm", "none",
                           "--optim.schedule", "cosine", "--loop.epochs", "2.5", "--loop.steps", "0",
                           "--model.path", "m.gguf", "--mesh.fsdp", "2", "--output.export_merged"])
    for c in (TrainConfig(), config):
        d = c.to_dict()
        assert json.loads(json.dumps(d)) == d  # plain JSON values
        assert TrainConfig.from_dict(d) == c
        assert TrainConfig.from_dict(json.loads(json.dumps(d))) == c
    assert TrainConfig().diff(config) == {
        "model.path": ("", "m.gguf"), "lora.rank": (16, 64), "lora.targets": (ALL, ["q_proj", "o_proj"]),
        "optim.schedule": ("constant", "cosine"), "optim.max_grad_norm": (0.3, None), "loop.steps": (40, 0),
        "loop.epochs": (0.0, 2.5), "output.export_merged": (False, True), "mesh.fsdp": (1, 2)}
    assert config.diff(config) == {}


def test_config_json_from_a_run_loads_as_a_config_file(tmp_path):
    config = parse_config(["--lora.rank", "32", "--loop.epochs", "1"])  # steps left at its default
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert parse_config(["--config", str(path)]) == config


BAD = [  # (flags, the dotted path the message must name)
    ({"model.dtype": "fp16"}, "model.dtype"),
    ({"model.remat": "some"}, "model.remat"),
    ({"model.backend": "cuda"}, "model.backend"),
    ({"quant.enabled": "maybe"}, "quant.enabled"),
    ({"quant.quant_type": "nf8"}, "quant.quant_type"),
    ({"quant.blocksize": "100"}, "quant.blocksize"),
    ({"quant.blocksize": "16"}, "quant.blocksize"),
    ({"quant.blocksize": "64.0"}, "quant.blocksize"),
    ({"lora.rank": "-1"}, "lora.rank=-1 must be >= 0"),
    ({"lora.rank": "x"}, "lora.rank"),
    ({"lora.alpha": "0"}, "lora.alpha"),
    ({"lora.dropout": "1.0"}, "lora.dropout"),
    ({"lora.targets": ""}, "lora.targets"),
    ({"lora.targets": "q_proj,lm_head"}, "lora.targets"),
    ({"lora.targets": "q_proj,q_proj"}, "lora.targets"),
    ({"data.eval_fraction": "1.0"}, "data.eval_fraction"),
    ({"data.eval_fraction": "-0.1"}, "data.eval_fraction"),
    ({"lora.use_dora": "true", "lora.rank": "0"}, "lora.use_dora"),
    ({"lora.use_dora": "sometimes"}, "lora.use_dora"),
    ({"model.residual_dtype": "bfloat16"}, "model.residual_dtype"),
    ({"lora.fp32_output": "maybe"}, "lora.fp32_output"),
    ({"data.seq_len": "1"}, "data.seq_len"),
    ({"data.packing": "2"}, "data.packing"),
    ({"data.max_train_records": "-1"}, "data.max_train_records"),
    ({"optim.learning_rate": "0"}, "optim.learning_rate"),
    ({"optim.learning_rate": "fast"}, "optim.learning_rate"),
    ({"optim.schedule": "step"}, "optim.schedule"),
    ({"optim.warmup_ratio": "1.0"}, "optim.warmup_ratio"),
    ({"optim.final_lr_ratio": "2"}, "optim.final_lr_ratio"),
    ({"optim.max_grad_norm": "0"}, "optim.max_grad_norm"),
    ({"optim.weight_decay": "-1"}, "optim.weight_decay"),
    ({"optim.state_bits": "4"}, "optim.state_bits"),
    ({"optim.offload_per_layer": "true"}, "optim.offload_per_layer"),
    ({"optim.lora_plus_ratio": "0"}, "optim.lora_plus_ratio"),
    ({"loop.steps": "-1"}, "loop.steps"),
    ({"loop.steps": "0"}, "loop.steps"),
    ({"loop.steps": "100", "loop.epochs": "1"}, "loop.steps"),
    ({"loop.epochs": "-1"}, "loop.epochs"),
    ({"loop.epochs": "inf", "loop.steps": "0"}, "loop.epochs"),
    ({"loop.batch_size": "0"}, "loop.batch_size"),
    ({"loop.grad_accum": "0"}, "loop.grad_accum"),
    ({"loop.eval_every": "-1"}, "loop.eval_every"),
    ({"loop.eval_batches": "0"}, "loop.eval_batches"),
    ({"loop.seed": "-1"}, "loop.seed"),
    ({"loop.max_bad_steps": "0"}, "loop.max_bad_steps"),
    ({"loop.sample_tokens": "-1"}, "loop.sample_tokens"),
    ({"data.eval_fraction": "0"}, "loop.eval_every"),  # evaluation without eval data
    ({"checkpoint.every": "-1"}, "checkpoint.every"),
    ({"checkpoint.keep": "0"}, "checkpoint.keep"),
    ({"checkpoint.resume": "maybe"}, "checkpoint.resume"),
    ({"output.dir": ""}, "output.dir"),
    ({"output.log_every": "0"}, "output.log_every"),
    ({"mesh.data": "0"}, "mesh.data"),
    ({"mesh.data": "-2"}, "mesh.data"),
    ({"mesh.fsdp": "0"}, "mesh.fsdp"),
    ({"mesh.num_processes": "-1"}, "mesh.num_processes"),
    ({"mesh.num_processes": "2", "mesh.process_id": "2"}, "mesh.process_id"),
    ({"mesh.process_id": "-2"}, "mesh.process_id"),
    ({"mesh.timeout_s": "0"}, "mesh.timeout_s"),
    ({"data.streams": "-1"}, "data.streams"),
    ({"loop.objective": "kto"}, "loop.objective"),
    ({"loop.beta": "0"}, "loop.beta"),
    ({"loop.dpo_loss": "hinge"}, "loop.dpo_loss"),
    ({"loop.label_smoothing": "0.5"}, "loop.label_smoothing"),
]


@pytest.mark.parametrize("flags, path", BAD, ids=[" ".join(f"{k}={v}" for k, v in f.items()) for f, _ in BAD])
def test_bad_values_name_the_dotted_field(flags, path):
    argv = [a for k, v in flags.items() for a in (f"--{k}", v)]
    with pytest.raises(ValueError, match=re.escape(path)):
        parse_config(argv)
    tree = {}
    for key, value in flags.items():
        section, field = key.split(".")
        tree.setdefault(section, {})[field] = value
    with pytest.raises(ValueError, match=re.escape(path)):
        TrainConfig.from_dict(tree)


def test_sections_validate_when_built_directly():
    with pytest.raises(ValueError, match=r"^lora\.rank=-1 must be >= 0$"):
        LoraSection(rank=-1)
    with pytest.raises(ValueError, match=r"lora\.rank='16' must be an int"):
        LoraSection(rank="16")  # no string parsing outside the parser
    with pytest.raises(ValueError, match=r"quant\.enabled=1 must be a bool"):
        QuantSection(enabled=1)
    with pytest.raises(ValueError, match=r"loop\.steps=True is not a valid int"):
        LoopSection(steps=True)
    with pytest.raises(ValueError, match="optim must be a OptimizerConfig"):
        TrainConfig(optim={"learning_rate": 1e-3})
    section = LoraSection(alpha=8, targets=["q_proj"])  # normalized: int -> float, list -> tuple
    assert section.alpha == 8.0 and type(section.alpha) is float and section.targets == ("q_proj",)
    assert hash(section) == hash(LoraSection(alpha=8.0, targets=("q_proj",)))


@pytest.mark.parametrize("argv, message", [
    (["--lora.rnk", "3"],
     "unknown key lora.rnk; valid keys of lora: rank, alpha, dropout, use_rslora, targets, use_dora, fp32_output"),
    (["--lora.rnk=3"], "unknown key lora.rnk; valid keys of lora"),
    (["--optim.lr", "3"], "valid keys of optim: learning_rate, schedule"),
    (["--lra.rank", "3"], "sections model, quant, lora, data, optim, loop, checkpoint, output, mesh"),
    (["--lora.ran", "3"], "unknown key lora.ran"),  # no prefix abbreviations
    (["stray"], "unexpected argument 'stray'"),
    (["--lora.rank"], "--lora.rank: expected one argument"),
])
def test_unknown_cli_flags(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_config(argv)


@pytest.mark.parametrize("text, message", [
    ("lora: {rnk: 3}", "unknown key lora.rnk; valid keys of lora: rank, alpha, dropout, use_rslora, targets, use_dora, fp32_output"),
    ("checkpoint: {evry: 3}", "valid keys of checkpoint: every, keep, resume"),
    ("lra: {rank: 3}", "unknown section 'lra'; valid sections: model, quant, lora, data, optim"),
    ("lora: 3", "section lora must be a mapping"),
    ("[1, 2]", "must hold a mapping of sections"),
    ("lora: {rank: [1}", "not valid YAML"),
    ("lora: {targets: [q_proj, 3]}", "lora.targets[1]"),
    ("lora: {rank: 16.0}", "lora.rank"),
    ("output: {dir: null}", "output.dir"),
])
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_config(["--config", str(path)])


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="--config .*nope.yaml"):
        parse_config(["--config", str(tmp_path / "nope.yaml")])


def test_exit_on_error_prints_usage_and_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(["--lora.rank", "-1"], exit_on_error=True)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "lora.rank=-1 must be >= 0" in err


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--config FILE" in text
    docs = config_fields()
    assert len(docs) == sum(len(s) for s in SPEC_DEFAULTS.values())
    for doc in docs:
        assert doc.help, f"{doc.path} has no help"
        start = text.index(f"--{doc.path} ")
        default = text.index("(default: ", start)
        assert text.startswith(f"{doc.help} (default: {format_value(doc.default)})",
                               default - len(doc.help) - 1), doc.path
    assert "--optim.learning_rate FLOAT peak learning rate after warmup (default: 0.001)" in text
    assert "(default: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)" in text
    assert set(OPTIM_HELP) == {f.name for f in dataclasses.fields(OptimizerConfig)}


@pytest.mark.parametrize("data, fsdp, n, shape", [
    (-1, 1, 1, (1, 1)), (-1, 1, 8, (8, 1)), (-1, 2, 8, (4, 2)), (-1, 8, 8, (1, 8)),
    (2, 2, 8, (2, 2)), (1, 1, 8, (1, 1)), (4, 2, 8, (4, 2)),
])
def test_mesh_shape(data, fsdp, n, shape):
    assert MeshSection(data=data, fsdp=fsdp).mesh_shape(n) == shape


@pytest.mark.parametrize("data, fsdp, n, message", [
    (-1, 3, 8, "mesh.fsdp=3 does not divide the 8 devices"),
    (3, 1, 8, "mesh.data=3 x mesh.fsdp=1 = 3 devices does not divide the 8 devices"),
    (4, 4, 8, "mesh.data=4 x mesh.fsdp=4 = 16 devices"),
    (-1, 1, 0, "n_devices=0"),
])
def test_mesh_shape_errors(data, fsdp, n, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MeshSection(data=data, fsdp=fsdp).mesh_shape(n)


def test_steps_from_epochs():
    assert LoopSection().num_steps(1000) == 40
    loop = LoopSection(epochs=2.0, batch_size=4, grad_accum=2)
    assert loop.sequences_per_step == 8 and loop.num_steps(100) == 25
    assert LoopSection(epochs=0.5, steps=0, batch_size=4).num_steps(10) == 1  # at least one step
    with pytest.raises(ValueError, match="loop.epochs"):
        loop.num_steps(0)


def test_conversions():
    assert QuantSection().to_quant_config() == QuantConfig()
    assert QuantSection(quant_type="fp4", blocksize=128, double_quant=False).to_quant_config() == QuantConfig(
        quant_type="fp4", blocksize=128, double_quant=False)
    assert QuantSection(enabled=False).to_quant_config() is None
    assert TrainConfig().lora == LoraConfig(rank=16, alpha=32.0, dropout=0.05)  # the trainer's recipe
    assert ModelSection().compute_dtype("cpu") == "float32"
    assert ModelSection().compute_dtype("gpu") == "bfloat16"
    assert ModelSection(dtype="bfloat16").compute_dtype("cpu") == "bfloat16"
    assert ModelSection(residual_dtype="compute").residual("gpu") == "bfloat16"
    assert ModelSection(residual_dtype="float32").residual("gpu") == "float32"
    assert parse_config(["--lora.fp32_output", "true"]).lora.fp32_output


def test_precision_options_reach_the_model(tmp_path, monkeypatch):
    """``--model.residual_dtype`` and ``--lora.fp32_output``: what ``run`` hands the loader, resolved per platform."""
    from qlora_jax.train import loop

    seen = {}

    class Stop(Exception):
        pass

    def fake(path, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(loop, "from_pretrained", fake)
    for argv, residual in (([], "float32"), (["--model.dtype", "bfloat16"], "bfloat16"),
                           (["--model.dtype", "bfloat16", "--model.residual_dtype", "float32",
                             "--lora.fp32_output", "true"], "float32")):
        with pytest.raises(Stop):
            loop.run(parse_config(argv + ["--output.dir", str(tmp_path / "out")]))
        assert seen["residual_dtype"] == np.dtype(residual) and seen["lora"].fp32_output == ("--lora.fp32_output" in argv)
