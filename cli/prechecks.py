"""Answers before Prefect starts: what a verb can check of its inputs without a flow, checked before any flow,
Prefect or PyTorch is imported, so that a bad input gets its one line in about a second rather than after a
temporary Prefect server's start-up (some 20 s) or PyTorch's import (some 3 s).

A verb that has such checks names them with `set_defaults(precheck=...)`: a function of the parsed arguments that
raises GptflowError naming the flag or file and what was expected. `cli.main` runs it right after parsing (the
stage configs are PyTorch-free: model.configs), then validates the stage config. Checks that need the stage config
(a CSV's columns, the instruction split) run in the verb, before it imports its flow. The data are read by the data
layer's own validators where they are light (`data.instructions.check_instructions`, `data.tabular.check_header`);
a model file by `model.files`, the checkpoint opener's own resolver (its zip directory or its safetensors header,
no weights read). The flows and stages check everything again when they read the files: a file can change in
between.
"""

from __future__ import annotations

import os
from pathlib import Path

from gptflow.errors import GptflowError

# ---------------------------------------------------------------------------------------------- files


def _read_error(path: Path, exc: OSError, expected: str) -> GptflowError:
    return GptflowError(f"{path}: cannot read it ({exc.strerror or exc}); expected {expected}")


def gpt2_weights(spec: str) -> None:
    """`load-gpt2`: a GPT-2 preset (fetched by the stage), or a .safetensors file or folder whose header reads."""
    from model.files import check_model_file

    check_model_file(spec, ("gpt2",))


def hf_model(spec: str) -> None:
    """`load-hf`: a model folder whose config.json names a supported architecture, or a hub repo name (fetched by
    the stage)."""
    from gptflow.hub import repo_id

    path = Path(spec).expanduser()
    if path.is_dir():
        from model.files import HF_ARCHITECTURES as ARCHITECTURES

        config = path / "config.json"
        if not config.is_file():
            raise GptflowError(f"{path} has no config.json; expected a Hugging Face model folder")
        try:
            import json

            architectures = json.loads(config.read_bytes()).get("architectures") or []
        except (OSError, ValueError, AttributeError) as exc:
            raise GptflowError(f"{config}: cannot read it as a JSON object ({exc})") from None
        if not architectures or architectures[0] not in ARCHITECTURES:
            raise GptflowError(
                f"{config}: architectures {architectures} is not supported; supported: {', '.join(ARCHITECTURES)}"
            )
    elif path.exists() or repo_id(spec) is None:
        raise GptflowError(
            f"{spec}: neither a model folder nor a Hugging Face repo name (owner/name, or distilgpt2, gpt2, ...)"
        )


def language_model(spec: str) -> None:
    """`generate --model`: a language-model checkpoint (zip directory) or GPT-2 weights (`model.files`)."""
    from model.files import LANGUAGE_MODELS, check_model_file

    check_model_file(spec, LANGUAGE_MODELS)


def any_model(spec: str) -> None:
    """`inspect MODEL`: a language-model or classifier checkpoint, or GPT-2 weights."""
    from model.files import INSPECTABLE, check_model_file

    check_model_file(spec, INSPECTABLE)


def export_checkpoint(spec: str) -> None:
    """`export CHECKPOINT`: a language-model checkpoint (model.pt), else a classifier's (best.pt)."""
    from model.files import EXPORTABLE, check_model_file

    check_model_file(spec, EXPORTABLE)


def classifier(spec: str) -> None:
    """`classify --model`: an exported bundle (a folder with manifest.json and model.onnx; the edge runtime reads
    it without PyTorch), else a classifier checkpoint (a file, or a folder holding best.pt)."""
    from model.files import CLASSIFIERS, check_model_file

    path = Path(spec)
    if (path / "manifest.json").is_file() and (path / "model.onnx").is_file():
        return
    check_model_file(spec, CLASSIFIERS)


def csv_columns(flag: str | None, path: str, text_column: str, label_column: str) -> None:
    """A labelled CSV/TSV exists, decodes and its header names both columns (`data.tabular.check_header`)."""
    from data.tabular import check_header

    _in_flag(flag, lambda: check_header(Path(path), text_column, label_column))


def instructions(flag: str | None, path: str, config=None) -> None:
    """An instruction file exists, parses and holds enough valid entries to split
    (`data.instructions.check_instructions`)."""
    from data.instructions import check_instructions

    _in_flag(flag, lambda: check_instructions(path, config))


def corpus(flag: str | None, name_or_path: str, token_folder: bool = False) -> None:
    """A corpus as `data.corpus` resolves and reads it: a registered name (fetched by the stage, not here), or a UTF-8
    text file that is not empty; with `token_folder`, also a folder already holding train.bin and val.bin."""
    from data.corpus import NAMED, read_text, resolve_corpus
    from gptflow.settings import get_settings

    if name_or_path in NAMED:
        return
    path = Path(name_or_path)
    if token_folder and path.is_dir():
        missing = [name for name in ("train.bin", "val.bin") if not (path / name).is_file()]
        if missing:
            raise GptflowError(
                f"{_where(flag)}{path}: a folder without {' and '.join(missing)}; expected a corpus name "
                f"({', '.join(NAMED)}), a UTF-8 text file, or a folder with train.bin and val.bin"
            )
        return
    _in_flag(flag, lambda: read_text(resolve_corpus(name_or_path, get_settings())[1]))


def config_file(flag: str, path: str) -> None:
    """A --config file reads as a YAML/JSON mapping (`gptflow.storage.read_config_file`); its fields are checked
    against the pydantic config by `cli.common.stage_config`."""
    from gptflow.storage import read_config_file

    try:
        read_config_file(path)
    except GptflowError as exc:
        raise GptflowError(f"{flag}: {exc}") from None


def _where(flag: str | None) -> str:
    return f"{flag}: " if flag else ""


def _in_flag(flag: str | None, check) -> None:
    """Run `check`; its error names `flag` first, and a file that cannot be read is one line too."""
    try:
        check()
    except GptflowError as exc:
        if flag is None:
            raise
        raise GptflowError(f"{flag}: {exc}") from None
    except OSError as exc:
        name = exc.filename if exc.filename is not None else ""
        raise GptflowError(f"{_where(flag)}cannot read {os.fsdecode(name)} ({exc.strerror or exc})") from None
