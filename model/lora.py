"""LoRA: low-rank adapters trained on a frozen model's linear layers instead of its weights (Hu et al., 2021).

A `LoRALinear` is the nn.Linear it replaces (the same weight and bias tensors, under the same names, frozen) plus,
for each adapted slice of its output rows, A (rank x in) and B (rows x rank): those rows get
`scale * dropout(x) A^T B^T` added, with scale = alpha / rank as in peft and litgpt (the book's appendix E scales
by alpha alone). Our query/key/value rows are one fused matrix and Llama's gate/up rows another, so adapters sit on
row slices: a query-and-value LoRA is two adapters on `attn.qkv`, exactly peft's adapters on q_proj and v_proj.
B starts at zero, so training starts from the base model itself.

Targets, in every family's terms (litgpt's names): query, key, value, projection (attention output), mlp (GPT-2's
fc and proj; Llama's gate, up and down), head (the LM head), and the sets attention and all. A classifier's new
head trains fully: it is no target.

A LoRA model's checkpoint holds its trainable tensors only (the adapters, and a classifier's head), with `lora` (the
spec and the adapted slices) and `base` (the file it adapts: init spec, path, sha256). `restore` rebuilds the model
from them (the base checked by sha256, found again by its spec if it moved) and `merge` folds the adapters into
plain weights, which is what every reader of a checkpoint gets (`model.opener`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from model.config import GPTConfig
from model.configs import LoraSpec
from model.files import CheckpointError

LAYERS = ("query", "key", "value", "projection", "mlp", "head")
SETS = {"attention": ("query", "key", "value", "projection"), "all": LAYERS}
Slices = dict[str, tuple[int, int]]  # adapter name -> [start, end) of the output rows it updates


class LoRALinear(nn.Linear):
    """nn.Linear with LoRA adapters on row slices of its output (`slices`), its own weight and bias frozen."""

    def __init__(self, linear: nn.Linear, slices: Slices, spec: LoraSpec) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same tensors: a tied head stays tied
        self.slices = dict(sorted(slices.items(), key=lambda item: item[1][0]))
        self.scale = spec.scale
        device, dtype = linear.weight.device, linear.weight.dtype
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (start, end) in self.slices.items():
            a = torch.empty(spec.rank, self.in_features, device=device, dtype=dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft's and litgpt's init: B = 0 keeps the base's output
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(end - start, spec.rank, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        self.train(linear.training)  # a model in eval mode stays so: no adapter dropout at inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base's output with each slice's update added in place: the scale multiplies the rank-wide
        intermediate, and nothing as wide as the output is allocated besides the output itself (the linear's
        backward needs its input, not its output, so writing into the output is safe for autograd)."""
        y = F.linear(x, self.weight, self.bias)
        h = self.lora_dropout(x)
        for name, (start, end) in self.slices.items():
            update = F.linear(F.linear(h, self.lora_A[name]) * self.scale, self.lora_B[name])
            y[..., start:end] += update
        return y

    def delta_weight(self) -> torch.Tensor:
        """The adapters' update of the weight, (out, in): scale x B @ A on each slice's rows."""
        delta = torch.zeros_like(self.weight)
        for name, (start, end) in self.slices.items():
            delta[start:end] = self.lora_B[name] @ self.lora_A[name] * self.scale
        return delta

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass applies (for losses that read the head's matrix, model.fused_loss)."""
        return self.weight + self.delta_weight()

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the adapters folded into a new weight tensor (the base's is left as it is)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            linear.weight = nn.Parameter(self.effective_weight().detach(), requires_grad=False)
            if self.bias is not None:
                linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        rank = next(iter(self.lora_A.values())).shape[0]
        return f"{super().extra_repr()}, lora rank={rank}, scale={self.scale:g}, slices={self.slices}"


# --- which layers ----------------------------------------------------------------------------------------


def targeted_layers(targets: tuple[str, ...]) -> set[str]:
    """The single layers `targets` names, the sets expanded."""
    return {layer for target in targets for layer in SETS.get(target, (target,))}


def backbone_of(model: nn.Module) -> tuple[nn.Module, str]:
    """The GPT inside `model` (a classifier's `backbone`, or the model itself) and its name prefix."""
    return (model.backbone, "backbone.") if hasattr(model, "backbone") else (model, "")


def plan(model: nn.Module, targets: tuple[str, ...]) -> dict[str, Slices]:
    """Module name -> the adapters it gets, for `targets` on `model` (a GPTModel or a classifier around one). A
    target the model lacks (mlp's gate on GPT-2 is simply absent; `head` on a classifier, whose head trains fully)
    adapts nothing; targets that adapt nothing at all are an error."""
    gpt, prefix = backbone_of(model)
    cfg, layers = gpt.cfg, targeted_layers(targets)
    q, kv, hidden = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    qkv = {"query": (0, q), "key": (q, q + kv), "value": (q + kv, q + 2 * kv)}
    fc = {"gate": (0, hidden), "up": (hidden, 2 * hidden)} if cfg.mlp == "swiglu" else {"up": (0, hidden)}
    modules: dict[str, Slices] = {}
    for i in range(cfg.n_layers):
        block = f"{prefix}blocks.{i}."
        modules[block + "attn.qkv"] = {name: rows for name, rows in qkv.items() if name in layers}
        if "projection" in layers:
            modules[block + "attn.proj"] = {"projection": (0, cfg.emb_dim)}
        if "mlp" in layers:
            modules[block + "mlp.fc"] = fc
            modules[block + "mlp.proj"] = {"down": (0, cfg.emb_dim)}
    if "head" in layers and hasattr(gpt, "out_head"):
        modules[prefix + "out_head"] = {"head": (0, cfg.vocab_size)}
    modules = {name: slices for name, slices in modules.items() if slices}
    if not modules:
        raise CheckpointError(f"LoRA targets {list(targets)} adapt no layer of this model")
    return modules


# --- applying, merging ------------------------------------------------------------------------------------


def apply_lora(
    model: nn.Module, spec: LoraSpec, base: dict[str, Any] | None = None, modules: dict[str, Slices] | None = None
) -> int:
    """Freeze `model` and give the layers `spec.targets` names adapters (`modules`: the slices a checkpoint
    recorded); a classifier's head stays trainable. `base` (init, path, sha256 of the file the model was read from)
    is kept for the checkpoint. Returns the number of trainable parameters."""
    modules = modules if modules is not None else plan(model, spec.targets)
    for p in model.parameters():
        p.requires_grad = False
    for name, slices in modules.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, attr)
        if not isinstance(linear, nn.Linear) or isinstance(linear, LoRALinear):
            raise CheckpointError(f"LoRA: {name} is not a plain linear layer of this model")
        setattr(parent, attr, LoRALinear(linear, {k: tuple(v) for k, v in slices.items()}, spec))
    if hasattr(model, "head"):
        model.head.requires_grad_(True)
    model.lora = {"spec": spec, "modules": modules, "base": base}
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def summary(model: nn.Module) -> dict[str, Any]:
    """Rank, alpha and targets of a LoRA model's adapters, for metrics and reports."""
    spec = model.lora["spec"]
    return {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets)}


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear))


def is_lora(model: nn.Module) -> bool:
    return getattr(model, "lora", None) is not None


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight, in place: a plain model with the same outputs (a tied head that
    was adapted is untied). Returns `model`."""
    gpt, _ = backbone_of(model)  # a classifier's head is no adapter: only an LM's config can change
    gpt.cfg = GPTConfig.from_dict(merged_config(gpt.cfg.to_dict(), model.lora))
    for name, layer in list(lora_layers(model)):
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer.merged())
    model.lora = None
    return model


def merged_config(config: dict[str, Any], lora: dict[str, Any]) -> dict[str, Any]:
    """The model config a LoRA checkpoint's model has once merged: an adapted tied head is untied."""
    if any(name.endswith("out_head") for name in lora["modules"]) and config.get("tie_weights", True):
        return {**config, "tie_weights": False}
    return config


# --- checkpoints ----------------------------------------------------------------------------------------


def weights_fields(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint stores of `model`: its whole state dict, or for a LoRA model its trainable tensors (the
    adapters, a classifier's head) with `lora` and `base`: megabytes instead of the whole model."""
    if not is_lora(model):
        return {"model": saved_tensors(model)}
    lora = model.lora
    return {
        "model": saved_tensors(model),
        "lora": {
            **lora["spec"].model_dump(mode="json"),
            "modules": {name: {k: list(v) for k, v in slices.items()} for name, slices in lora["modules"].items()},
        },
        "base": lora["base"],
    }


def saved_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of `model` keeps: its state dict, or a LoRA model's trainable tensors."""
    return trainable_state(model) if is_lora(model) else model.state_dict()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load what `weights_fields` stored: every tensor for a plain model, the trainable ones for a LoRA model."""
    if not is_lora(model):
        model.load_state_dict(state)
        return
    expected = set(trainable_state(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the LoRA tensors do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.load_state_dict(state, strict=False)


def spec_of(lora: dict[str, Any]) -> LoraSpec:
    return LoraSpec(**{k: v for k, v in lora.items() if k in LoraSpec.model_fields})


def base_record(init: Any, sha256: str, settings=None) -> dict[str, str]:
    """Where a LoRA model's frozen weights come from: the init spec (an `InitSpec`), its file and the sha256 the stage
    keyed it by."""
    return {"init": str(init), "path": str(init.file(settings).resolve()), "sha256": sha256}


def base_file(state: dict[str, Any], path: str | Path, settings=None) -> Path:
    """The base file a LoRA checkpoint names, with the sha256 it records: at its path, or found again by its init
    spec (GPT-2 weights fetched or mirrored, a Hugging Face model converted). Anything else is one line saying
    what is missing and how to keep the model without it (`gptflow merge`)."""
    from gptflow.stage import file_digest
    from model.init import InitSpec

    base = state.get("base")
    if not isinstance(base, dict) or not {"path", "sha256"} <= base.keys():
        raise CheckpointError(f"{path}: a LoRA checkpoint without its base record (path and sha256)")
    file = Path(base["path"])
    if not file.is_file() and base.get("init", "").partition(":")[0] in ("gpt2", "hf"):
        try:
            file = InitSpec(base["init"]).file(settings) or file
        except Exception:  # noqa: BLE001 - not found again: the message below says what is missing
            pass
    if not file.is_file():
        raise CheckpointError(
            f"{path} is a LoRA checkpoint of base {base['path']} (sha256 {base['sha256'][:12]}), which is missing: "
            "restore that file (or `gptflow merge` the checkpoint where it exists)"
        )
    if file_digest(file) != base["sha256"]:
        raise CheckpointError(
            f"{path} is a LoRA checkpoint of base {file} with sha256 {base['sha256'][:12]}, but that file has changed "
            f"(sha256 {file_digest(file)[:12]}): its adapters only fit the weights they were trained on"
        )
    return file


def base_language_model(state: dict[str, Any], path: str | Path, settings=None):
    """The frozen language model a LoRA checkpoint adapts (itself merged, if it was a LoRA model too)."""
    from model.files import LANGUAGE_MODELS
    from model.opener import open_model  # the opener reads LoRA checkpoints through this module

    return open_model(base_file(state, path, settings), LANGUAGE_MODELS, settings=settings).language_model(settings)


def restore(model: nn.Module, state: dict[str, Any], path: str | Path) -> nn.Module:
    """`model` (built from the base) with the adapters (and head) of the LoRA checkpoint `state` loaded."""
    lora = state["lora"]
    modules = {name: {k: tuple(v) for k, v in slices.items()} for name, slices in lora["modules"].items()}
    apply_lora(model, spec_of(lora), state.get("base"), modules)
    load_weights(model, state["model"], path)
    return model
