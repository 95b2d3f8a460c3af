"""The config of every model stage: what a recipe in `configs/`, a flow's parameters and a verb's flags are
validated into. PyTorch-free, so the command line validates a config (and writes `--help`) before torch is
imported; the methods that need torch import it when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, PositiveFloat, model_validator

from edge.runtime import CLASSIFIER
from gptflow.errors import GptflowError
from gptflow.prompts import Style
from gptflow.ranks import process_ranks
from gptflow.strict import StrictConfig
from model.config import GPT2_VOCAB_SIZE, GPTConfig, Preset
from model.init import INIT_HELP, InitSpec

if TYPE_CHECKING:
    from model.device import Runtime
    from model.gpt import GPTModel

# --- field types: a stage config may change a default (`lr: LearningRate = 2e-3`) without restating them ----

LearningRate = Annotated[float, Field(gt=0, description="peak learning rate")]
MinLrRatio = Annotated[
    float, Field(ge=0, le=1, description="final LR / peak LR of the cosine schedule (1.0: constant after warmup)")
]
WarmupSteps = Annotated[int, Field(ge=0, description="linear LR warmup steps")]
GradClip = Annotated[float | None, Field(gt=0, description="clip the gradient norm to this (None: no clipping)")]
Betas = Annotated[tuple[float, float], Field(description="AdamW betas")]
EvalEvery = Annotated[
    int | None, Field(gt=0, description="evaluate every N steps (None: once per epoch, or only at the end)")
]


def check_device_spec(spec: str) -> str:
    """The spec, if it names a kind of device (whether this machine has it is model.device's question)."""
    kind, _, index = spec.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"{spec!r} is not a device; expected auto, cpu, cuda, cuda:N or mps")
    return spec


DeviceSpec = Annotated[
    str,
    AfterValidator(check_device_spec),
    Field(description="auto | cpu | cuda | cuda:N | mps (auto: CUDA, then MPS, then the CPU)"),
]
Precision = Annotated[
    Literal["auto", "fp32", "bf16", "fp16"],
    Field(description="autocast precision: auto (bf16 where supported and faster, fp16 on older GPUs, else fp32)"),
]

OptimizerName = Literal["adamw", "muon"]
# A classifier's head: which hidden state it reads, which weights train, which weights it keeps.
Pooling = Literal["last_real", "last_position", "mean"]
Trainable = Literal["head", "last_k", "all", "lora"]
Keep = Literal["best_val", "last"]
# LoRA targets in every family's terms (litgpt's names): single layers, then the sets `attention` and `all`.
LoraTarget = Literal["query", "key", "value", "projection", "mlp", "head", "attention", "all"]


# --- training --------------------------------------------------------------------------------------------


class LoraConfigError(GptflowError, ValueError):
    """LoRA asked of a model that has no trained weights to adapt."""


class LoraSpec(StrictConfig):
    """The adapters of a LoRA fine-tune (model.lora): rank, alpha (the update is scaled by alpha / rank, as in peft
    and litgpt), dropout on the adapters' input, and the layers adapted."""

    rank: int = Field(default=8, gt=0)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    targets: tuple[LoraTarget, ...] = Field(default=("query", "value"), min_length=1)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraFields(StrictConfig):
    """The LoRA knobs of a stage that can train adapters instead of weights (`trainable: lora`); flat fields, so
    that each is a flag of the verb as well as a key of its recipe."""

    lora_rank: int = Field(default=8, gt=0, description="LoRA rank (trainable=lora)")
    lora_alpha: float = Field(default=16.0, gt=0, description="LoRA alpha: the update is scaled by alpha / rank")
    lora_dropout: float = Field(default=0.05, ge=0, lt=1, description="dropout on the LoRA adapters' input")
    lora_targets: tuple[LoraTarget, ...] = Field(
        default=("query", "value"),
        min_length=1,
        description="layers given adapters: query key value projection mlp head, or the sets attention "
        "(q, k, v, projection) and all (every linear layer); a classifier's new head always trains fully",
    )

    def lora_spec(self) -> LoraSpec | None:
        """The adapters to train, or None when `trainable` is not lora."""
        if getattr(self, "trainable", None) != "lora":
            return None
        return LoraSpec(
            rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=self.lora_targets
        )

    def check_lora_base(self, init: Any, has_base: bool = False, field: str = "trainable") -> None:
        """LoRA adapts a trained model: a random one has no weights worth keeping frozen (and no file to refer to).
        Checked when a stage is declared (and by the verbs before any flow), not when the config is read: the
        pipeline's recipe names no init, which the pipeline sets to the model it pretrained or imported."""
        if getattr(self, "trainable", None) == "lora" and getattr(init, "kind", None) == "random" and not has_base:
            raise LoraConfigError(
                f"{field} lora adapts a trained model: set init to gpt2:<preset>, checkpoint:<path> or "
                "hf:<repo-or-folder> (a random model has no weights to keep frozen)"
            )


class Launcher(StrictConfig):
    """How a stage's training runs: in the task's own process, or in `nproc_per_node` processes per node
    started by torchrun (on `nnodes` nodes meeting at `rdzv_endpoint`)."""

    kind: Literal["local", "torchrun"] = "local"
    nproc_per_node: int = Field(default=1, gt=0)
    nnodes: int = Field(default=1, gt=0)
    rdzv_endpoint: str | None = Field(default=None, description="host:port of the rendezvous (several nodes)")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes if self.kind == "torchrun" else 1


class TrainConfig(StrictConfig):
    """Fields every training stage shares. `RUN_ONLY` names the fields that may change between a run and its
    resume (they do not define the product); `identity()` is the rest, plus the number of training
    processes: the config part of the stage key."""

    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"device", "launcher", "threads", "log_every", "checkpoint_every"})

    preset: Preset = Field(default="mini", description="model preset for a model built from scratch")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    lr: LearningRate = 5e-5
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW weight decay (matrices and embeddings)")
    betas: Betas = (0.9, 0.95)
    optimizer: OptimizerName = Field(
        default="adamw",
        description="adamw, or muon: Muon for the blocks' matrices and AdamW for embeddings, head, norms and biases",
    )
    warmup_steps: WarmupSteps = 0
    min_lr_ratio: MinLrRatio = 1.0
    grad_clip: GradClip = 1.0
    batch_size: int = Field(default=8, gt=0, description="sequences per micro-batch")
    grad_accum: int = Field(default=1, gt=0, description="micro-batches per optimizer step")
    seed: int = Field(default=123, description="seed of the initial weights, data order and dropout")
    device: DeviceSpec = "auto"
    precision: Precision = "auto"
    launcher: Launcher = Field(default_factory=Launcher, description="run training in this process or under torchrun")
    threads: int | None = Field(default=None, gt=0, description="torch intra-op threads (None: torch's default)")
    log_every: int = Field(default=10, gt=0, description="log training loss every N steps")
    eval_every: EvalEvery = 50
    checkpoint_every: int = Field(default=100, gt=0, description="write the resumable checkpoint every N steps")

    def identity(self) -> dict[str, Any]:
        """The fields that define the product, and `world_size`: with more processes each step sees more batches
        (the global batch is batch_size x grad_accum x world_size). The model is keyed on its resolved shape, not
        on the preset's name: a preset whose shape changes is another model."""
        fields = {k: v for k, v in self.model_dump(mode="json").items() if k not in self.RUN_ONLY | {"preset"}}
        if isinstance(self, LoraFields) and self.lora_spec() is None:  # LoRA knobs shape nothing without adapters
            fields = {k: v for k, v in fields.items() if k not in LoraFields.model_fields}
        return {**fields, "model": self.model_shape(), "world_size": self.world_size}

    def model_shape(self) -> dict[str, Any] | None:
        """The shape of the model built from scratch (None when the stage starts from weights, which its inputs
        key by hash)."""
        return GPTConfig.from_preset(self.preset).to_dict()

    @property
    def world_size(self) -> int:
        """The training processes: this torchrun job's, else the ones `launcher` will start."""
        ranks = process_ranks()
        return ranks.world_size if ranks.distributed else self.launcher.world_size

    def runtime(self) -> Runtime:
        """The device and precision this config resolves to on this machine (decided once per process)."""
        from model.device import runtime

        return runtime(self.device, self.precision)

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> "TrainConfig":
        """A validated copy (pydantic's own `model_copy` does not validate `update`)."""
        return self.model_validate({**self.model_dump(), **(update or {})})


class PretrainConfig(TrainConfig):
    """Every knob of a pretraining run (also the flow's parameters and the stage's config)."""

    RUN_ONLY: ClassVar[frozenset[str]] = TrainConfig.RUN_ONLY | {
        "eval_every",
        "eval_batches",
        "sample_prompt",
        "sample_tokens",
        "compile",
    }

    context_length: int | None = Field(default=None, gt=1, description="override the preset's context")
    steps: int = Field(default=300, gt=0, description="optimizer steps")
    lr: LearningRate = 2e-3
    min_lr_ratio: MinLrRatio = 0.1
    warmup_steps: WarmupSteps = 50
    sampling: Literal["random", "strided"] = Field(
        default="random", description="random: seeded random windows; strided: consecutive windows, wrapping"
    )
    compile: bool = Field(default=False, description="torch.compile the model (slow start, small gain on CPU)")
    eval_every: EvalEvery = 50
    eval_batches: int = Field(default=10, gt=0, description="validation batches per evaluation (at most)")
    sample_prompt: str = Field(default="\n", description="prompt of the text sample at each evaluation")
    sample_tokens: int = Field(default=40, ge=0, description="length of that sample (0: none)")

    def model_config_for(self, vocab_size: int | None = None) -> GPTConfig:
        """The preset's shape with GPT-2's vocabulary, which the corpus is tokenized with: `--preset smollm2-135m`
        pretrains SmolLM2's architecture on GPT-2's BPE."""
        overrides: dict[str, Any] = {"dropout": self.dropout, "vocab_size": vocab_size or GPT2_VOCAB_SIZE}
        if self.context_length is not None:
            overrides["context_length"] = self.context_length
        return GPTConfig.from_preset(self.preset, **overrides)

    def model_shape(self) -> dict[str, Any]:
        return self.model_config_for().to_dict()


class DomainTrainConfig(LoraFields, PretrainConfig):
    """The training config of a domain-adaptive pretraining run: pretraining's, from the classifier's starting model,
    training its weights or (`trainable: lora`) adapters on them."""

    trainable: Literal["all", "lora"] = Field(default="all", description="all weights, or LoRA adapters")


class DaptConfig(LoraFields):
    """The knobs of domain-adaptive pretraining; the run settings (device, precision, threads, seed, optimizer
    betas, weight decay, clipping) are the classifier's."""

    trainable: Literal["all", "lora"] = Field(default="all", description="all weights, or LoRA adapters (lora_*)")

    steps: int = Field(default=800, gt=0, description="optimizer steps")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    window: int = Field(default=64, gt=1, description="tokens per training window (random windows of the corpus)")
    batch_size: int = Field(default=32, gt=0, description="windows per step")
    lr: LearningRate = 2e-3
    warmup_steps: WarmupSteps = 40
    min_lr_ratio: MinLrRatio = 0.05

    def train_config(self, run: TrainConfig) -> DomainTrainConfig:
        """The training config of a DAPT run for the classifier config `run`: its run settings and seed."""
        shared = ("weight_decay", "betas", "grad_clip", "grad_accum", "seed", "device", "precision")
        return DomainTrainConfig(
            **{name: getattr(run, name) for name in (*shared, "launcher", "threads")},
            **{name: getattr(self, name) for name in ("trainable", *LoraFields.model_fields)},
            dropout=self.dropout,
            context_length=self.window,
            steps=self.steps,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            min_lr_ratio=self.min_lr_ratio,
            batch_size=self.batch_size,
            eval_every=None,
            sample_tokens=0,
            log_every=max(1, self.steps // 20),
            checkpoint_every=max(1, self.steps // 8),
        )


class InstructConfig(LoraFields, TrainConfig):
    """Every knob of an instruction fine-tune and its test responses (also the flow's parameters)."""

    RUN_ONLY: ClassVar[frozenset[str]] = TrainConfig.RUN_ONLY | {
        "eval_every",
        "eval_batches",
        "max_new_tokens",
        "temperature",
        "top_k",
        "max_test_entries",
        "sample_rows",
    }

    init: InitSpec = Field(default=InitSpec("random"), description=INIT_HELP)
    trainable: Literal["all", "lora"] = Field(
        default="all", description="all: every weight; lora: LoRA adapters on the frozen model (lora_*)"
    )
    context_length: int | None = Field(default=None, gt=1, description="override the preset's (random init)")
    style: Style = Field(
        default="alpaca",
        description="prompt format of a model without a chat template: alpaca (the book) or phi3 (a model with "
        "one, such as SmolLM2, Llama 3 or Qwen3, is tuned in its template)",
    )
    mask_prompt: bool = Field(
        default=False, description="loss on the response tokens only (always so in a model's chat template)"
    )
    max_length: int | None = Field(default=None, gt=1, description="truncate examples (default: model context)")
    epochs: int = Field(default=2, gt=0)
    max_steps: int | None = Field(default=None, gt=0, description="stop after this many steps (quick runs)")
    betas: Betas = (0.9, 0.999)
    grad_clip: GradClip = None
    log_every: int = Field(default=5, gt=0, description="log training loss every N steps")
    eval_batches: int | None = Field(default=5, gt=0, description="validation batches per evaluation (None: all)")
    max_new_tokens: int = Field(default=256, ge=1, description="response length limit")
    temperature: float = Field(default=0.0, ge=0, description="0: greedy (the book)")
    top_k: int | None = Field(default=None, gt=0)
    max_test_entries: int | None = Field(default=None, gt=0, description="answer only the first N test entries")
    sample_rows: int = Field(default=5, ge=0, description="sample responses shown in the artifacts")

    def model_shape(self) -> dict[str, Any] | None:
        if self.init.kind != "random":
            return None
        overrides = {} if self.context_length is None else {"context_length": self.context_length}
        return GPTConfig.from_preset(self.preset, **overrides).to_dict()

    def check_lora(self) -> None:
        self.check_lora_base(self.init)

    def generation_key(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("max_new_tokens", "temperature", "top_k", "max_test_entries", "seed")}


class ClassifierConfig(LoraFields, TrainConfig):
    """Every knob of a fine-tuning run (also the flow's parameters and the stage's config)."""

    RUN_ONLY: ClassVar[frozenset[str]] = TrainConfig.RUN_ONLY | {"eval_batch_size"}

    init: InitSpec = Field(default=InitSpec("random"), description=INIT_HELP)
    shape: GPTConfig | None = Field(
        default=None, description="the shape of a model built from scratch (init random) instead of the preset's"
    )
    dapt: DaptConfig | None = Field(
        default=None,
        description="domain-adaptive pretraining on the training texts before fine-tuning (model/dapt.py)",
    )
    ensemble: tuple[int, ...] = Field(
        default=(),
        description="seeds of an ensemble's members: each member pretrains (with dapt) and fine-tunes with its "
        "seed, and the ensemble averages their class probabilities; empty: one classifier of `seed`",
    )
    pooling: Pooling = Field(default="last_real", description="which hidden state the head reads")
    trainable: Trainable = Field(
        default="last_k",
        description="head | last_k (last k blocks + final norm + head) | all | lora (LoRA adapters (lora_*) + head)",
    )
    last_k: int = Field(default=1, ge=1, description="blocks trained with trainable=last_k")
    max_length: int | None = Field(default=None, gt=0, description="truncate texts (default: context length)")
    epochs: int = Field(default=5, gt=0)
    eval_every: EvalEvery = None
    patience: int | None = Field(default=3, gt=0, description="stop after N evaluations without improvement")
    keep: Keep = Field(
        default="best_val",
        description="best_val: the weights at the best validation accuracy "
        "(early stopping); last: the weights at the end of the schedule, for a validation split too "
        "small to pick a step by (no early stopping)",
    )
    eval_batch_size: int = Field(default=32, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _keep_last_runs_the_schedule(cls, values: Any) -> Any:
        """keep="last" trains the whole schedule: no early stopping unless asked for (then it is an error)."""
        if isinstance(values, dict) and values.get("keep") == "last":
            if values.get("patience") is not None:
                raise ValueError("keep='last' trains the whole schedule: patience (early stopping) must be None")
            values = {**values, "patience": None}
        return values

    @model_validator(mode="after")
    def _shape_and_ensemble(self) -> "ClassifierConfig":
        if self.shape is not None and self.init.kind != "random":
            raise ValueError(f"shape builds the model from scratch: init must be random, not {self.init}")
        if len(self.ensemble) == 1 or len(set(self.ensemble)) != len(self.ensemble):
            raise ValueError(f"ensemble: expected 2 or more different seeds, got {list(self.ensemble)}")
        return self

    def check_lora(self) -> None:
        """Adapters need a trained model under them: the init's, or the domain-pretrained one."""
        self.check_lora_base(self.init, has_base=self.dapt is not None)
        if self.dapt is not None:
            self.dapt.check_lora_base(self.init, field="dapt.trainable")

    def members(self) -> list["ClassifierConfig"]:
        """The configs of the classifiers to train: one per ensemble seed, or this one."""
        return [self.model_copy(update={"seed": seed, "ensemble": ()}) for seed in self.ensemble] or [self]

    def model_label(self) -> str:
        """Short name of the starting model, for folder names."""
        shape = self.shape
        return self.init.label(self.preset if shape is None else f"{shape.n_layers}x{shape.emb_dim}")

    def model_shape(self) -> dict[str, Any] | None:
        if self.init.kind != "random":
            return None
        return (self.shape or GPTConfig.from_preset(self.preset)).to_dict()

    def start_model(self, dropout: float, settings=None) -> GPTModel:
        """The model fine-tuning (or domain pretraining) starts from, seeded with `seed` when built from scratch."""
        return self.init.build(self.preset, shape=self.shape, dropout=dropout, seed=self.seed, settings=settings)

    def after_dapt(self, model_path: str | Path) -> "ClassifierConfig":
        """This config, fine-tuning from the result of its domain-adaptive pretraining."""
        return self.model_copy(update={"init": f"checkpoint:{model_path}", "dapt": None, "shape": None})

    def start_input(self, settings=None) -> Path | str:
        """What a stage built on the starting model is keyed on: the weights file, or the random model's shape."""
        if self.init.kind == "random" and self.shape is not None:
            return "random:" + ",".join(f"{k}={v}" for k, v in self.shape.to_dict().items())
        return self.init.stage_input(settings)


# --- inspection and export -------------------------------------------------------------------------------


WORDS = (
    "king", "queen", "man", "woman", "boy", "girl",
    "cat", "dog", "horse", "bird",
    "one", "two", "three", "four",
    "red", "green", "blue",
    "Paris", "London", "Rome",
    "happy", "sad", "good", "bad",
)  # fmt: skip


class InspectConfig(StrictConfig):
    """What `gptflow inspect` and the pipeline's inspect stage draw; the probe text is given beside it."""

    layer: int | None = Field(default=None, ge=0, description="layer of the large attention map (default: the last)")
    head: int = Field(default=0, ge=0, description="head of the large attention map")
    top_k: int = Field(default=10, ge=1, le=100, description="next-token candidates listed, and read out by the lens")
    words: tuple[str, ...] = Field(default=WORDS, min_length=3, description="words whose embeddings are drawn in 2-D")
    shuffle_seed: int = Field(default=0, description="seed of the shuffled probe in the positions figure")
    temperatures: tuple[PositiveFloat, ...] = Field(
        default=(0.5, 1.0, 2.0), min_length=1, description="temperatures compared (> 0)"
    )
    sampling_top_k: int = Field(default=5, ge=1, description="the top-k setting compared in the sampling figure")
    sampling_top_p: float = Field(default=0.9, gt=0, le=1, description="the top-p setting compared")
    device: DeviceSpec = Field(default="auto", description="auto | cpu | cuda | cuda:N | mps")

    def identity(self) -> dict[str, Any]:
        """What defines the report (the device does not)."""
        return self.model_dump(mode="json", exclude={"device"})


DEFAULT_ONNX_OPS = ("MatMul", "Gather")  # the op types the classifier's ONNX int8 quantizes


class ExportConfig(StrictConfig):
    """Knobs of the export stage (also the flow's parameters and the manifest's config)."""

    int8: bool = Field(default=True, description="also quantize (torch and ONNX dynamic int8) and gate")
    max_int8_drop: float = Field(
        default=1.0, ge=0, description="largest int8 loss vs fp32: test accuracy in points, predictions changed in %"
    )
    onnx_int8_ops: tuple[str, ...] = Field(default=DEFAULT_ONNX_OPS, description="ONNX op types quantized")
    batch_size: int = Field(default=32, gt=0)
    device: DeviceSpec = Field(
        default="cpu", description="device of the PyTorch reference pass (the ONNX graph is always traced on the CPU)"
    )
    format: Literal["onnx", "hf", "gguf", "peft"] = Field(
        default="onnx",
        description="onnx: the edge bundle; hf: a Hugging Face folder of the model's family; gguf: a GGUF bundle "
        "for llama.cpp and Ollama (language models); peft: a LoRA checkpoint's adapters as peft loads them",
    )
    quant: Literal["f16", "q8_0", "q4_0"] = Field(
        default="q8_0", description="GGUF weight type (--format gguf): f16, q8_0 or q4_0"
    )
    # Language models (the LM bundle).
    max_ppl_increase: float = Field(
        default=3.0, ge=0, description="largest allowed int8 perplexity increase over fp32, percent"
    )
    int8_block_size: int = Field(default=128, ge=16, description="int8 weight block size (a power of two)")
    agreement_tokens: int = Field(default=32, gt=0, description="greedy tokens per test prompt compared fp32 vs int8")
    max_eval_rows: int | None = Field(
        default=128, gt=0, description="validation rows for perplexity and test prompts for agreement (None: all)"
    )
    lm_parity_atol: float = Field(default=1e-4, gt=0, description="largest fp32 ONNX vs PyTorch logit difference")

    def identity(self, kind: str) -> dict[str, Any]:
        """The stage key's config for a `kind` bundle: the fields that shape it. Not the device, the output format
        (a Hugging Face folder and a GGUF are stages of their own, the GGUF keyed by its quant) or the other kind's
        fields, so that changing the LM gate does not re-export the classifier."""
        other = _LM_FIELDS if kind == CLASSIFIER else _CLASSIFIER_FIELDS
        return self.model_dump(mode="json", exclude={"device", "format", "quant", *other})


_CLASSIFIER_FIELDS = {"max_int8_drop", "onnx_int8_ops", "batch_size"}
_LM_FIELDS = {"max_ppl_increase", "int8_block_size", "agreement_tokens", "max_eval_rows", "lm_parity_atol"}
