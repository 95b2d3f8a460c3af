"""Which file a model spec names, and whether its header reads, without importing PyTorch.

A model spec is a file, a folder holding one, or a GPT-2 preset name. Each kind of model has its file name:
a gptflow language model (`lm`, or `instruct` when it records a prompt style) is `model.pt`, a classifier or an
ensemble of them is `best.pt`, GPT-2 weights (`gpt2`) are `model.safetensors` or a preset. The checkpoint opener
(`model.opener`) and the CLI's checks before a flow starts (`cli.prechecks`) both resolve a spec here, so the two
agree on the file and on the words of every refusal.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import IO, Any, Collection, Literal

from gptflow.errors import GptflowError
from gptflow.stage import verify_output

Kind = Literal["lm", "instruct", "classifier", "ensemble", "gpt2"]
LM_FILE = "model.pt"
CLASSIFIER_FILE = "best.pt"
WEIGHTS_FILE = "model.safetensors"
KIND_FILES: dict[str, str] = {
    "lm": LM_FILE,
    "instruct": LM_FILE,
    "classifier": CLASSIFIER_FILE,
    "ensemble": CLASSIFIER_FILE,
    "gpt2": WEIGHTS_FILE,
}
MAX_SAFETENSORS_HEADER = 100_000_000
# `architectures[0]` of a Hugging Face config.json -> the family `gptflow load-hf` reads it as.
HF_ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}

# The kinds each use accepts.
LANGUAGE_MODELS: tuple[Kind, ...] = ("lm", "instruct", "gpt2")
CHECKPOINT_LMS: tuple[Kind, ...] = ("lm", "instruct")
CLASSIFIERS: tuple[Kind, ...] = ("classifier", "ensemble")
EXPORTABLE: tuple[Kind, ...] = ("lm", "instruct", "classifier", "ensemble")
INSPECTABLE: tuple[Kind, ...] = ("lm", "instruct", "classifier", "gpt2")


class CheckpointError(GptflowError, ValueError):
    """A checkpoint file is missing, unreadable, or not in the expected layout."""


class WeightsError(GptflowError, ValueError):
    """A weights file is missing, not safetensors, or does not fit the model shape."""


def model_file(spec: str | Path, kinds: Collection[Kind]) -> Path | None:
    """The file `spec` names for a use that accepts `kinds`; None for a GPT-2 preset name (fetched by the weights
    loader). A folder names the first of its kinds' files it holds, else the last one (whose absence its loader
    reports)."""
    path = Path(spec).expanduser()
    names = list(dict.fromkeys(KIND_FILES[k] for k in kinds))
    if path.is_dir():
        return next((path / name for name in names if (path / name).is_file()), path / names[-1])
    if path.is_file() or "gpt2" not in kinds:
        return path
    return None if preset_name(str(spec)) else path


def preset_name(name: str) -> str | None:
    """The GPT-2 preset a preset or Hugging Face name names (`gpt2-small`, `gpt2`, `openai-community/gpt2`)."""
    from model.config import HF_NAMES  # pydantic only

    return next((preset for preset, hf in HF_NAMES.items() if name in (preset, hf, f"openai-community/{hf}")), None)


def check_model_file(spec: str | Path, kinds: Collection[Kind]) -> None:
    """What can be told of `spec` without PyTorch: its file exists, still matches its stage's manifest, and its
    header reads (a torch zip archive, or a safetensors header). Which kind it holds is for `model.opener`."""
    path = model_file(spec, kinds)
    if path is None:
        return
    if path.is_file():
        verify_output(path)
    if is_weights(path, kinds):
        weights_file(spec)
        with open(path, "rb") as handle:
            read_safetensors_header(handle, path)
    else:
        check_torch_archive(path)


def is_weights(path: Path, kinds: Collection[Kind]) -> bool:
    """Whether the file `model_file` named is read as GPT-2 weights (else as a torch checkpoint)."""
    if "gpt2" not in kinds:
        return False
    return set(kinds) == {"gpt2"} or path.suffix == ".safetensors" or not path.is_file()


def weights_file(spec: str | Path) -> Path:
    """The local .safetensors file a path or folder names (not a preset name)."""
    from model.config import HF_NAMES

    path = Path(spec).expanduser()
    folder = path if path.is_dir() else path.parent
    architecture = _hf_architecture(folder)
    if architecture not in (None, "GPT2LMHeadModel") or (folder / "model.safetensors.index.json").is_file():
        raise WeightsError(
            f"{folder} is a Hugging Face {architecture or 'sharded'} model folder: convert it with "
            f"`gptflow load-hf {folder}` and pass the checkpoint it prints"
        )
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise WeightsError(
            f"{spec!s} is neither a GPT-2 preset ({', '.join(HF_NAMES)}) nor a {WEIGHTS_FILE} file "
            f"or a folder holding one (looked for {path})"
        )
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: only .safetensors weights are loaded (never pickled .bin/.pt files)")
    return path


def _hf_architecture(folder: Path) -> str | None:
    """`architectures[0]` of the folder's Hugging Face config.json, if it has a readable one."""
    try:
        architectures = json.loads((folder / "config.json").read_bytes()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return None
    return architectures[0] if isinstance(architectures, list) and architectures else None


def check_torch_archive(path: Path) -> None:
    """`path` is the zip archive `torch.save` writes (judged by its directory: nothing is unpickled)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    not_torch = f"{path} is not a PyTorch checkpoint (expected the zip archive torch.save writes)"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, ValueError, EOFError, struct.error, NotImplementedError):  # a damaged directory
        raise CheckpointError(not_torch) from None
    except OSError as exc:
        raise CheckpointError(
            f"{path}: cannot read it ({exc.strerror or exc}); expected a PyTorch checkpoint"
        ) from None
    if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        raise CheckpointError(f"{not_torch[:-1]}; this zip archive holds no data.pkl)")


def read_safetensors_header(handle: IO[bytes], path: Path) -> tuple[dict[str, Any], int]:
    """(tensor name -> {dtype, shape, data_offsets}, where the data starts) of an open .safetensors file, each entry
    checked against the file's size so that a truncated file fails here, before any model is built."""
    size = path.stat().st_size
    try:
        if size < 8:
            raise ValueError(f"{size} bytes, too short for the 8-byte header length that starts one")
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if 8 + header_len > size:
            raise ValueError(f"its header length {header_len} runs past the end of the file, {size} bytes")
        if header_len > MAX_SAFETENSORS_HEADER:
            raise ValueError("header too large")
        header = json.loads(handle.read(header_len))
    except (ValueError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path} is not a safetensors file ({exc})") from None
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read it ({exc.strerror or exc}); expected a .safetensors file") from None
    if not isinstance(header, dict):
        raise WeightsError(
            f"{path}: the safetensors header is a JSON {type(header).__name__}, expected an object of "
            "tensor name -> {dtype, shape, data_offsets}"
        )
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    for name, entry in header.items():
        problem = _entry_problem(entry)
        if problem:
            raise WeightsError(f"{path}: header entry {name!r} {problem}")
        if entry["data_offsets"][1] > data_size:
            raise WeightsError(
                f"{path} is truncated: tensor {name} ends at byte {entry['data_offsets'][1]} of the "
                f"data section, which holds {data_size} bytes"
            )
    return header, 8 + header_len


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with one tensor's header entry, or None for {dtype: str, shape: [int >= 0, ...],
    data_offsets: [begin, end] with 0 <= begin <= end}."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        return "is not an object of dtype, shape and data_offsets"
    if not isinstance(entry["dtype"], str):
        return f"has dtype {entry['dtype']!r}, expected a name such as 'F32'"
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return f"has shape {shape!r}, expected a list of sizes"
    if (
        not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets))
        or not 0 <= offsets[0] <= offsets[1]
    ):
        return f"has data_offsets {offsets!r}, expected [begin, end] with 0 <= begin <= end"
    return None
