"""Hugging Face model folders -> `GPTModel`: the GPT-2 family, the Llama family (SmolLM, SmolLM2, Llama 3.2) and
Qwen3, from `config.json` and `model.safetensors` or the shards of `model.safetensors.index.json`.

The model is built on the meta device and each of our parameters is read straight from the files: Llama's
separate q, k, v (and gate, up) matrices are read into row slices of our fused ones, so peak memory stays the
model plus its largest tensor. bf16 files load into fp32 unless the caller keeps their dtype.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from edge.hf_tokenizer import HFTokenizer
from gptflow.settings import Settings, get_settings
from gptflow.stage import Built, Decision, Stage
from gptflow.tokenizer import EOT_ID, VOCAB_SIZE
from model.checkpoint import check_finite_weights, save_model
from model.config import GPTConfig, ModelConfigError
from model.files import HF_ARCHITECTURES as ARCHITECTURES
from model.files import WEIGHTS_FILE, WeightsError
from model.gpt import GPTModel
from model.weights import SafetensorsReader, hf_name_map

INDEX_FILE = "model.safetensors.index.json"
# The tokenizer's files a checkpoint keeps (their texts), so that it rebuilds the same tokenizer anywhere.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "special_tokens_map.json",
)
# Token ids only GPT-2's BPE gives: "Hello, world" and " the" (tiktoken's gpt2 encoding).
_GPT2_PROBES = {"Hello, world": [15496, 11, 995], " the": [262]}
# A tensor of ours is one or more of theirs stacked along rows; `transpose` marks GPT-2's Conv1D [in, out] layout.
Parts = list[tuple[str, bool]]
# Buffers some files carry that are not weights (GPT-2's causal mask, old Llama's rotary frequencies).
_IGNORED = re.compile(r"(^|\.)(attn\.(bias|masked_bias)|rotary_emb\.inv_freq)$")


class WeightFiles:
    """The safetensors file, or every shard an index names, read as one: tensor name -> (reader, entry)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / INDEX_FILE
        if index.is_file():
            weight_map = _read_json(index, "a safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise WeightsError(f"{index}: no 'weight_map' object; expected tensor name -> shard file")
            files = sorted(set(weight_map.values()))
        elif (folder / WEIGHTS_FILE).is_file():
            files = [WEIGHTS_FILE]
        else:
            raise WeightsError(
                f"{folder} holds neither {WEIGHTS_FILE} nor {INDEX_FILE}; only safetensors weights are read"
            )
        self.readers: list[SafetensorsReader] = []
        self.owner: dict[str, SafetensorsReader] = {}
        try:
            for name in files:
                if not (folder / name).is_file():
                    raise WeightsError(f"{index}: shard {name} is missing from {folder}")
                reader = SafetensorsReader(folder / name)
                self.readers.append(reader)
                self.owner.update(dict.fromkeys(reader.entries, reader))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for reader in self.readers:
            reader.__exit__()

    def __enter__(self) -> "WeightFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def names(self) -> set[str]:
        return {name for name in self.owner if not _IGNORED.search(name)}

    def shape(self, name: str) -> list[int]:
        return self.owner[name].shape(name)

    def read_into(self, name: str, dest: torch.Tensor, *, transpose: bool = False) -> None:
        self.owner[name].read_into(name, dest, transpose=transpose)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path}: cannot read it as JSON ({exc}); expected {what}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: a JSON {type(data).__name__}, expected {what} object")
    return data


def read_hf_config(folder: Path) -> GPTConfig:
    """Our config for the model folder's `config.json`; an architecture we do not read is one line naming it."""
    path = folder / "config.json"
    if not path.is_file():
        raise WeightsError(f"{folder} has no config.json; expected a Hugging Face model folder")
    data = _read_json(path, "a Hugging Face config.json")
    architectures = data.get("architectures") or []
    family = ARCHITECTURES.get(architectures[0]) if architectures else None
    if family is None:
        raise WeightsError(
            f"{path}: architectures {architectures} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    try:
        return GPTConfig.from_dict(_gpt2_fields(data) if family == "gpt2" else _llama_fields(data, family))
    except KeyError as exc:
        raise WeightsError(f"{path}: field {exc} is missing ({architectures[0]} needs it)") from None
    except ModelConfigError as exc:
        raise WeightsError(f"{path}: {exc}") from None


def _gpt2_fields(data: dict[str, Any]) -> dict[str, Any]:
    activation = data.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise WeightsError(f"config.json: activation_function {activation!r}; GPT-2 models here use tanh GELU")
    return {
        "vocab_size": data["vocab_size"],
        "context_length": data.get("n_positions", data.get("n_ctx")),
        "emb_dim": data["n_embd"],
        "n_layers": data["n_layer"],
        "n_heads": data["n_head"],
        "mlp_hidden": data.get("n_inner"),
        "norm_eps": data.get("layer_norm_epsilon", 1e-5),
        "tie_weights": data.get("tie_word_embeddings", True),
    }


def _llama_fields(data: dict[str, Any], family: str) -> dict[str, Any]:
    if data.get("hidden_act", "silu") != "silu":
        raise WeightsError(f"config.json: hidden_act {data['hidden_act']!r}; the Llama family uses silu")
    # transformers 5 writes `rope_parameters` (theta inside); the public files have `rope_theta` + `rope_scaling`.
    rope = {**(data.get("rope_scaling") or {}), **(data.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise WeightsError(f"config.json: rope type {rope_type!r} is not supported (default, llama3)")
    scaling = None
    if rope_type == "llama3":
        scaling = {
            "factor": rope["factor"],
            "low_freq_factor": rope["low_freq_factor"],
            "high_freq_factor": rope["high_freq_factor"],
            "original_context_length": rope["original_max_position_embeddings"],
        }
    heads = data["num_attention_heads"]
    head_dim = data.get("head_dim")
    return {
        "vocab_size": data["vocab_size"],
        "context_length": data["max_position_embeddings"],
        "emb_dim": data["hidden_size"],
        "n_layers": data["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": data.get("num_key_value_heads") or heads,
        "head_size": head_dim if head_dim and head_dim != data["hidden_size"] // heads else None,
        "mlp_hidden": data["intermediate_size"],
        "qkv_bias": bool(data.get("attention_bias", False)),
        "bias": bool(data.get("mlp_bias", False)),
        "tie_weights": data.get("tie_word_embeddings", family == "qwen3"),
        "norm": "rmsnorm",
        "norm_eps": data.get("rms_norm_eps", 1e-6),
        "mlp": "swiglu",
        "positions": "rope",
        "rope_theta": rope.get("rope_theta", data.get("rope_theta", 10000.0)),
        "rope_scaling": scaling,
        "qk_norm": family == "qwen3",
    }


def tensor_map(cfg: GPTConfig) -> dict[str, Parts]:
    """Our parameter name -> the Hugging Face tensors it is made of, in row order."""
    if cfg.family == "gpt2":
        return {
            ours: [("transformer." + theirs if theirs != "lm_head.weight" else theirs, t)]
            for ours, (theirs, t) in hf_name_map(cfg).items()
        }
    names: dict[str, Parts] = {
        "tok_emb.weight": [("model.embed_tokens.weight", False)],
        "final_norm.weight": [("model.norm.weight", False)],
    }
    if not cfg.tie_weights:
        names["out_head.weight"] = [("lm_head.weight", False)]
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        attn = theirs + "self_attn."
        names[ours + "norm1.weight"] = [(theirs + "input_layernorm.weight", False)]
        names[ours + "norm2.weight"] = [(theirs + "post_attention_layernorm.weight", False)]
        names[ours + "attn.qkv.weight"] = [(attn + f"{p}_proj.weight", False) for p in "qkv"]
        names[ours + "attn.proj.weight"] = [(attn + "o_proj.weight", False)]
        names[ours + "mlp.fc.weight"] = [(theirs + f"mlp.{p}_proj.weight", False) for p in ("gate", "up")]
        names[ours + "mlp.proj.weight"] = [(theirs + "mlp.down_proj.weight", False)]
        if cfg.qkv_bias:
            names[ours + "attn.qkv.bias"] = [(attn + f"{p}_proj.bias", False) for p in "qkv"]
        if cfg.bias:
            names[ours + "attn.proj.bias"] = [(attn + "o_proj.bias", False)]
            names[ours + "mlp.fc.bias"] = [(theirs + f"mlp.{p}_proj.bias", False) for p in ("gate", "up")]
            names[ours + "mlp.proj.bias"] = [(theirs + "mlp.down_proj.bias", False)]
        if cfg.qk_norm:
            names[ours + "attn.q_norm.weight"] = [(attn + "q_norm.weight", False)]
            names[ours + "attn.k_norm.weight"] = [(attn + "k_norm.weight", False)]
    return names


def part_rows(cfg: GPTConfig, n_parts: int, rows: int) -> list[int]:
    """The rows of each Hugging Face tensor fused into one of ours of `rows` rows and `n_parts` parts (`tensor_map`):
    q, k, v (query and key/value heads), gate and up, or the one tensor itself."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return {3: [q, kv, kv], 2: [cfg.hidden_dim, cfg.hidden_dim], 1: [rows]}[n_parts]


def load_hf_model(
    folder: str | Path, *, dtype: torch.dtype = torch.float32, dropout: float = 0.0
) -> tuple[GPTModel, GPTConfig]:
    """The model of a Hugging Face folder, in eval mode on the CPU, in `dtype` (None: the files' own)."""
    folder = Path(folder)
    cfg = read_hf_config(folder).model_copy(update={"dropout": dropout})
    with WeightFiles(folder) as files:
        mapping = tensor_map(cfg)
        if cfg.family == "gpt2" and "transformer.wte.weight" not in files.names():  # the hub's own gpt2 files
            mapping = {ours: [(t.removeprefix("transformer."), c) for t, c in parts] for ours, parts in mapping.items()}
        return fill_model(cfg, files, mapping, folder, dtype), cfg


def fill_model(
    cfg: GPTConfig, files: WeightFiles, mapping: dict[str, Parts], where: Path, dtype: torch.dtype | None
) -> GPTModel:
    """Build `GPTModel(cfg)` without initialising it and read every parameter from `files` per `mapping`: shapes are
    checked first (the clearest error for a wrong shape), then missing and unexpected tensors, then data is read."""
    stored = files.names()
    if cfg.tie_weights:
        stored.discard("lm_head.weight")  # some exports write the tied head out too
    expected = {theirs for parts in mapping.values() for theirs, _ in parts}
    missing, unexpected = sorted(expected - stored), sorted(stored - expected)
    if missing or unexpected:
        raise WeightsError(
            f"{where} does not hold {cfg.family} weights for {cfg.n_layers} layers: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}"
        )
    if dtype is None:
        dtype = files.owner[mapping["tok_emb.weight"][0][0]].entries[mapping["tok_emb.weight"][0][0]]["dtype"]
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)
    with torch.device("meta"):
        model = GPTModel(cfg)
    params = dict(model.named_parameters(remove_duplicate=False))
    for ours, parts in mapping.items():
        want = list(params[ours].shape)
        got = [files.shape(theirs)[::-1] if t else files.shape(theirs) for theirs, t in parts]
        rows = sum(shape[0] for shape in got) if all(len(s) == len(want) for s in got) else -1
        if rows != want[0] or any(shape[1:] != want[1:] for shape in got):
            raise WeightsError(
                f"{where}: tensor {parts[0][0]} has shape {got[0]}, which does not fit {ours} {want} "
                f"(emb {cfg.emb_dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size})"
            )
    model = model.to(dtype).to_empty(device="cpu")  # a dtype change on the meta device costs nothing
    if cfg.tie_weights:
        model.out_head.weight = model.tok_emb.weight
    params = dict(model.named_parameters(remove_duplicate=False))
    for ours, parts in mapping.items():
        row = 0
        for theirs, transpose in parts:
            n = files.shape(theirs)[1 if transpose else 0]
            files.read_into(theirs, params[ours].data[row : row + n], transpose=transpose)
            row += n
    check_finite_weights(model.state_dict(), where)
    return model.eval()


def _few(names: list[str]) -> str:
    return f"{names[:5]}{' ...' if len(names) > 5 else ''}"


def read_tokenizer_files(folder: Path, cfg: GPTConfig) -> dict[str, str] | None:
    """The texts of the folder's tokenizer files, or None where the vocabulary is GPT-2's (tiktoken reads it: the
    same ids, faster). A model with another vocabulary and no `tokenizer.json` cannot be read."""
    files = {}
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            try:
                files[name] = (folder / name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise WeightsError(f"{folder / name}: cannot read it as UTF-8 text ({exc})") from None
    if "tokenizer.json" not in files:
        if cfg.family == "gpt2" and cfg.vocab_size == VOCAB_SIZE:
            return None
        raise WeightsError(f"{folder} has no tokenizer.json; a model whose vocabulary is not GPT-2's needs its own")
    tokenizer = HFTokenizer.from_files(files)
    if tokenizer.vocab_size != cfg.vocab_size and tokenizer.vocab_size > cfg.vocab_size:
        raise WeightsError(
            f"{folder / 'tokenizer.json'}: {tokenizer.vocab_size} tokens, more than the model's vocab_size "
            f"{cfg.vocab_size}"
        )
    gpt2 = cfg.vocab_size == VOCAB_SIZE and tokenizer.token_to_id("<|endoftext|>") == EOT_ID
    if gpt2 and all(tokenizer.encode(text) == ids for text, ids in _GPT2_PROBES.items()):
        return None
    return files


def resolve_hf_folder(name_or_folder: str | Path, settings: Settings | None = None) -> Path:
    """A local Hugging Face model folder, or the folder a hub name is fetched to (mirror rule, hashes, retries)."""
    from gptflow.hub import fetch_model_repo, repo_id

    path = Path(name_or_folder).expanduser()
    if path.is_dir():
        return path
    repo = repo_id(str(name_or_folder))
    if repo is None or path.exists():
        raise WeightsError(
            f"{name_or_folder}: neither a model folder nor a Hugging Face repo name (owner/name, or distilgpt2, gpt2, "
            "gpt2-medium, gpt2-large, gpt2-xl)"
        )
    return fetch_model_repo(repo, settings)


def convert_hf(
    name_or_folder: str | Path, settings: Settings | None = None, *, keep_dtype: bool = False
) -> tuple[Path, bool]:
    """A Hugging Face model -> our checkpoint `<home>/models/<name>/model.pt`, with its tokenizer's files inside;
    returns (path, reused). The same files converted the same way are reused."""
    settings = settings or get_settings()
    folder = resolve_hf_folder(name_or_folder, settings)
    cfg = read_hf_config(folder)
    with WeightFiles(folder) as files:
        weights = [reader.path for reader in files.readers]
    inputs = {p.name: p for p in [folder / "config.json", *weights] + [folder / n for n in TOKENIZER_FILES]}
    inputs = {name: path for name, path in inputs.items() if path.is_file()}
    source = str(name_or_folder)
    name = source.rstrip("/").replace("/", "--") if not Path(source).expanduser().is_dir() else folder.name
    stage = Stage.declare(
        "load-hf",
        inputs=inputs,
        config={"source": source, "keep_dtype": keep_dtype},
        code=__name__,
        folder=settings.stage_dir("models") / name,
    )

    def build(decision: Decision) -> Built:
        tokenizer = read_tokenizer_files(folder, cfg)
        model, _ = load_hf_model(folder, dtype=None if keep_dtype else torch.float32)
        extra = {"tokenizer": tokenizer} if tokenizer is not None else {}
        save_model(stage.dir / "model.pt", model, source=source, **extra)
        metrics = {"params": model.num_params(), "family": cfg.family, "model": cfg.to_dict()}
        return Built(["model.pt"], metrics | {"tokenizer": "gpt2" if tokenizer is None else "tokenizer.json"})

    return stage.dir / "model.pt", stage.run(build).reused
