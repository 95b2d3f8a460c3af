"""Load public GPT-2 weights (Hugging Face `model.safetensors`) into `GPTModel`, and name them for the way back out
(`hf_config`, `hf_state_dict`, which `model.hf_export` writes for every family).

Only safetensors: a JSON header plus raw little-endian tensors, so nothing is unpickled. The model is built
on the meta device and given uninitialised storage; each tensor is then read from the file straight into
its parameter (or through a one-tensor buffer where a Conv1D weight must be transposed). Peak memory is the
model plus its largest tensor, not two full copies (a memory map would keep the whole file resident).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from gptflow.download import fetch
from gptflow.settings import Settings, get_settings
from gptflow.stage import Built, Decision, Stage
from gptflow.storage import sha256_file
from gptflow.tokenizer import EOT_ID
from model.checkpoint import check_finite_weights, save_model
from model.config import HF_NAMES, PRESETS, GPTConfig
from model.files import WEIGHTS_FILE, WeightsError, preset_name, read_safetensors_header, weights_file
from model.gpt import GPTModel

HF_URL = "https://huggingface.co/openai-community/{name}/resolve/main/model.safetensors"
WEIGHTS_NAME = WEIGHTS_FILE

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# Hugging Face buffers that are not weights: the causal mask and its fill value in older GPT-2 files.
_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


class SafetensorsReader:
    """Reads single tensors of a `.safetensors` file by offset, without mapping the whole file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")
        try:
            self.entries, self._data_start = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> tuple[dict[str, dict[str, Any]], int]:
        return read_safetensors_header(self._file, self.path)

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name]["shape"])

    def read_into(self, name: str, dest: torch.Tensor, *, transpose: bool = False) -> None:
        entry = self.entries[name]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise WeightsError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        shape = entry["shape"]
        direct = not transpose and dtype == dest.dtype and dest.is_contiguous() and dest.device.type == "cpu"
        buf = dest if direct else torch.empty(shape, dtype=dtype)
        raw = buf.reshape(-1).view(torch.uint8).numpy()
        if end - begin != raw.nbytes:
            raise WeightsError(f"{self.path}: tensor {name} holds {end - begin} bytes, its shape needs {raw.nbytes}")
        self._file.seek(self._data_start + begin)
        if self._file.readinto(memoryview(raw)) != raw.nbytes:
            raise WeightsError(f"{self.path} is truncated (tensor {name})")
        if not direct:
            with torch.no_grad():
                dest.copy_(buf.t() if transpose else buf)


def hf_name_map(cfg: GPTConfig) -> dict[str, tuple[str, bool]]:
    """Our parameter name -> (Hugging Face tensor name, stored as Conv1D [in, out] so transpose)."""
    names = {
        "tok_emb.weight": ("wte.weight", False),
        "pos_emb.weight": ("wpe.weight", False),
        "final_norm.weight": ("ln_f.weight", False),
        "final_norm.bias": ("ln_f.bias", False),
    }
    if not cfg.tie_weights:
        names["out_head.weight"] = ("lm_head.weight", False)
    layer = {
        "norm1": ("ln_1", False),
        "attn.qkv": ("attn.c_attn", True),
        "attn.proj": ("attn.c_proj", True),
        "norm2": ("ln_2", False),
        "mlp.fc": ("mlp.c_fc", True),
        "mlp.proj": ("mlp.c_proj", True),
    }
    for i in range(cfg.n_layers):
        for ours, (theirs, conv1d) in layer.items():
            names[f"blocks.{i}.{ours}.weight"] = (f"h.{i}.{theirs}.weight", conv1d)
            if ours != "attn.qkv" or cfg.qkv_bias:
                names[f"blocks.{i}.{ours}.bias"] = (f"h.{i}.{theirs}.bias", False)
    return names


def _strip(name: str) -> str:
    return name.removeprefix("transformer.")


def resolve_weights(name_or_path: str | Path, settings: Settings | None = None) -> tuple[Path, str | None]:
    """(local safetensors file, preset name if one was named) for a preset/HF name, a file or a folder."""
    name = str(name_or_path)
    preset = preset_name(name)
    if preset is not None:
        return fetch(HF_URL.format(name=HF_NAMES[preset]), settings=settings), preset
    return weights_file(name_or_path), None


def config_from_hf_json(path: Path) -> GPTConfig:
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc}); expected a Hugging Face GPT-2 config.json") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: a JSON {type(data).__name__}, expected a Hugging Face GPT-2 config.json object")
    try:
        return GPTConfig(
            vocab_size=data["vocab_size"],
            context_length=data.get("n_positions", data.get("n_ctx")),
            emb_dim=data["n_embd"],
            n_layers=data["n_layer"],
            n_heads=data["n_head"],
            tie_weights=data.get("tie_word_embeddings", True),
        )
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"{path}: not a GPT-2 config.json ({exc})") from None


def infer_config(reader: SafetensorsReader) -> GPTConfig:
    """Shape from the tensors; the head count (not visible in shapes) from the preset of that width/depth."""
    names = {_strip(n) for n in reader.entries}
    if "wte.weight" not in names or "wpe.weight" not in names:
        raise WeightsError(f"{reader.path}: no wte.weight/wpe.weight tensors: not GPT-2 weights")
    prefix = "transformer." if "transformer.wte.weight" in reader.entries else ""
    for name, dims in (("wte.weight", "[vocab, emb]"), ("wpe.weight", "[context, emb]")):
        if len(reader.shape(prefix + name)) != 2:
            raise WeightsError(
                f"{reader.path}: tensor {prefix + name} has shape {reader.shape(prefix + name)}, expected 2 "
                f"dimensions {dims}: not GPT-2 weights"
            )
    vocab, emb = reader.shape(prefix + "wte.weight")
    ctx = reader.shape(prefix + "wpe.weight")[0]
    layers = 1 + max((int(m.group(1)) for n in names if (m := re.match(r"h\.(\d+)\.", n))), default=-1)
    match = [c for c in PRESETS.values() if (c.emb_dim, c.n_layers) == (emb, layers)]
    if not match:
        raise WeightsError(
            f"{reader.path}: emb {emb} x {layers} layers matches no preset, so the number of "
            "heads is unknown; put the Hugging Face config.json beside the weights"
        )
    return GPTConfig(
        vocab_size=vocab,
        context_length=ctx,
        emb_dim=emb,
        n_layers=layers,
        n_heads=match[0].n_heads,
        tie_weights="lm_head.weight" not in reader.entries,
    )


def weights_config(name_or_path: str | Path, settings: Settings | None = None) -> tuple[Path, GPTConfig]:
    """(safetensors file, the config `load_gpt2` builds it with), reading only the file's header."""
    path, named = resolve_weights(name_or_path, settings)
    with SafetensorsReader(path) as reader:
        return path, _weights_config(path, named, reader)


def _weights_config(path: Path, preset: str | None, reader: SafetensorsReader) -> GPTConfig:
    """A named preset's config, else the Hugging Face config.json beside the weights, else the tensor shapes."""
    if preset:
        return GPTConfig.from_preset(preset)
    if (path.parent / "config.json").is_file():
        return config_from_hf_json(path.parent / "config.json")
    return infer_config(reader)


def load_gpt2(
    name_or_path: str | Path,
    settings: Settings | None = None,
    *,
    preset: str | None = None,
    dropout: float = 0.0,
) -> tuple[GPTModel, GPTConfig]:
    """GPT-2 weights as a `GPTModel` in eval mode.

    `name_or_path`: a preset (`gpt2-small`..`gpt2-xl`, or the HF names `gpt2`, `gpt2-medium`, ...), fetched
    through the mirror-aware download layer; or a local `model.safetensors` / folder holding one, shaped by
    its `config.json`, else by `preset`, else inferred from the tensor shapes.
    """
    path, named = resolve_weights(name_or_path, settings)
    with SafetensorsReader(path) as reader:
        cfg = _weights_config(path, named or preset, reader).model_copy(update={"dropout": dropout})
        stored = {_strip(n): n for n in reader.entries if not _IGNORED.match(_strip(n))}
        if cfg.tie_weights:
            stored.pop("lm_head.weight", None)  # some exports write the tied head out too
        mapping = hf_name_map(cfg)
        with torch.device("meta"):
            model = GPTModel(cfg)
        params = dict(model.named_parameters(remove_duplicate=False))
        for ours, (theirs, conv1d) in mapping.items():  # shapes first: the clearest error for a wrong preset
            want = list(params[ours].shape[::-1]) if conv1d else list(params[ours].shape)
            got = reader.shape(stored[theirs]) if theirs in stored else want
            if got != want:
                raise WeightsError(
                    f"{path}: tensor {theirs} has shape {got}, expected {want} "
                    f"for emb {cfg.emb_dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size}"
                )
        expected = {theirs for theirs, _ in mapping.values()}
        missing, unexpected = sorted(expected - stored.keys()), sorted(stored.keys() - expected)
        if missing or unexpected:
            raise WeightsError(
                f"{path} does not hold GPT-2 weights for {cfg.n_layers} layers: missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''}"
            )
        model = model.to_empty(device="cpu")
        if cfg.tie_weights:
            model.out_head.weight = model.tok_emb.weight
        params = dict(model.named_parameters(remove_duplicate=False))
        for ours, (theirs, conv1d) in mapping.items():
            reader.read_into(stored[theirs], params[ours].data, transpose=conv1d)
    check_finite_weights(model.state_dict(), path)
    return model.eval(), cfg


def convert_gpt2(name_or_path: str | Path, settings: Settings | None = None) -> tuple[Path, bool]:
    """GPT-2 weights -> our checkpoint `<home>/models/<name>/model.pt` (with a manifest); returns (path,
    reused). A folder already converted from the same file is reused."""
    settings = settings or get_settings()
    path, named = resolve_weights(name_or_path, settings)
    name = named or f"{path.parent.name}-{sha256_file(path)[:8]}"
    stage = Stage.declare(
        "load-gpt2",
        inputs={WEIGHTS_NAME: path},
        config={"source": str(name_or_path)},
        code=__name__,
        folder=settings.stage_dir("models") / name,
    )

    def build(decision: Decision) -> Built:
        model, cfg = load_gpt2(path, settings, preset=named)
        save_model(stage.dir / "model.pt", model, source=str(name_or_path))
        return Built(["model.pt"], {"params": model.num_params(), "model": cfg.to_dict()})

    return stage.dir / "model.pt", stage.run(build).reused


def hf_config(cfg: GPTConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The `config.json` of `GPT2LMHeadModel` for our shape: tanh-GELU is HF's `gelu_new`, every dropout is ours.
    bos/eos are `<|endoftext|>` when the vocabulary holds it (a smaller test vocabulary has none)."""
    eot = EOT_ID if cfg.vocab_size > EOT_ID else None
    return {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": cfg.dropout,
        "bos_token_id": eot,
        "dtype": str(dtype).removeprefix("torch."),
        "embd_pdrop": cfg.dropout,
        "eos_token_id": eot,
        "initializer_range": 0.02,
        "layer_norm_epsilon": cfg.norm_eps,
        "model_type": "gpt2",
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_head": cfg.n_heads,
        "n_inner": cfg.mlp_hidden,
        "n_layer": cfg.n_layers,
        "n_positions": cfg.context_length,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": cfg.dropout,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "tie_word_embeddings": cfg.tie_weights,
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }


def hf_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """The inverse of `hf_name_map`, named as `save_pretrained` names them (`transformer.` prefix, `lm_head.weight`
    only when untied): Conv1D weights transposed to [in, out], CPU, contiguous, in the model's dtype. HF GPT-2
    always has a `c_attn.bias`, so a model without q/k/v bias gets zeros (the same function)."""
    cfg = model.cfg
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = {}
    for ours, (theirs, conv1d) in hf_name_map(cfg).items():
        tensor = params[ours].detach().to("cpu")
        tensors[theirs if theirs == "lm_head.weight" else f"transformer.{theirs}"] = (
            tensor.t() if conv1d else tensor
        ).contiguous()
    if not cfg.qkv_bias:
        dtype = params["tok_emb.weight"].dtype
        for i in range(cfg.n_layers):
            tensors[f"transformer.h.{i}.attn.c_attn.bias"] = torch.zeros(3 * cfg.emb_dim, dtype=dtype)
    return tensors
