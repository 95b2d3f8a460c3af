"""Load public GPT-2 weights (Hugging Face `model.safetensors`) into `GPTModel`.

Only safetensors: a JSON header plus raw little-endian tensors, so nothing is unpickled. The model is built
on the meta device and given uninitialised storage; each tensor is then read from the file straight into
its parameter (or through a one-tensor buffer where a Conv1D weight must be transposed). Peak memory is the
model plus its largest tensor, not two full copies (a memory map would keep the whole file resident).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import torch

from gptflow.download import fetch
from gptflow.errors import GptflowError
from gptflow.settings import Settings, get_settings
from gptflow.stage import Stage
from gptflow.storage import sha256_file
from model.checkpoint import save_model
from model.config import HF_NAMES, PRESETS, GPTConfig
from model.gpt import GPTModel

CODE = (__name__, "model.gpt", "model.checkpoint")

HF_URL = "https://huggingface.co/openai-community/{name}/resolve/main/model.safetensors"
WEIGHTS_NAME = "model.safetensors"

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# Hugging Face buffers that are not weights: the causal mask and its fill value in older GPT-2 files.
_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


class WeightsError(GptflowError, ValueError):
    """A weights file is missing, not safetensors, or does not fit the model shape."""


class SafetensorsReader:
    """Reads single tensors of a `.safetensors` file by offset, without mapping the whole file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")
        try:
            (header_len,) = struct.unpack("<Q", self._file.read(8))
            if header_len > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(self._file.read(header_len))
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            self._file.close()
            raise WeightsError(f"{path} is not a safetensors file ({exc})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self.entries: dict[str, dict[str, Any]] = header

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
    preset = next((p for p, hf in HF_NAMES.items() if name in (p, hf, f"openai-community/{hf}")), None)
    if preset is not None:
        return fetch(HF_URL.format(name=HF_NAMES[preset]), settings=settings), preset
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise WeightsError(
            f"{name_or_path!s} is neither a GPT-2 preset ({', '.join(HF_NAMES)}) nor a {WEIGHTS_NAME} file "
            f"or a folder holding one (looked for {path})"
        )
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: only .safetensors weights are loaded (never pickled .bin/.pt files)")
    return path, None


def config_from_hf_json(path: Path) -> GPTConfig:
    data = json.loads(path.read_text())
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
        if named or preset:
            cfg = GPTConfig.from_preset(named or preset)
        elif (path.parent / "config.json").is_file():
            cfg = config_from_hf_json(path.parent / "config.json")
        else:
            cfg = infer_config(reader)
        cfg = cfg.model_copy(update={"dropout": dropout})
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
        code=CODE,
        folder=settings.stage_dir("models") / name,
    )
    with stage.lock():
        if stage.plan().reused:
            return stage.dir / "model.pt", True
        model, cfg = load_gpt2(path, settings, preset=named)
        save_model(stage.dir / "model.pt", model, source=str(name_or_path))
        stage.complete(["model.pt"], {"params": model.num_params(), "model": cfg.to_dict()})
    return stage.dir / "model.pt", False
