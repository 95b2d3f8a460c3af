"""What the verbs share: options generated from a stage's pydantic config, the config they build, one table printer."""

from __future__ import annotations

import argparse
import importlib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from gptflow.errors import GptflowError, dotted, validation_message
from gptflow.storage import read_config_file


@dataclass(frozen=True)
class VerbConfig:
    """The pydantic config class ("module:Class") a verb's options come from, imported only for the verb being
    run, and the verb's own defaults for some of its fields."""

    config: str
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> type[BaseModel]:
        module, _, name = self.config.partition(":")
        return getattr(importlib.import_module(module), name)


def add_stage_options(parser: argparse.ArgumentParser, stage: VerbConfig) -> None:
    """`--config FILE` and a `--field-name` flag per field of the stage's config, typed from its annotation, with
    the field's description and default as help. A field no flag can give (a nested model) is set in the file."""
    model = stage.model
    parser.add_argument(
        "--config", metavar="FILE", help=f"YAML or JSON with any {model.__name__} fields; the flags below override it"
    )
    for name, info in model.model_fields.items():
        if (kwargs := _argparse_type(info.annotation)) is not None:
            default = stage.defaults.get(name, info.default)  # undefined: required, or made by a default_factory
            shown = "" if default in (None, PydanticUndefined) else f" (default: {_shown(default)})"
            text = (info.description or "") + (" (required)" if info.is_required() else shown)
            parser.add_argument(
                "--" + name.replace("_", "-"),
                dest=name,
                default=argparse.SUPPRESS,
                help=text.strip().replace("%", "%%"),
                **kwargs,
            )
    parser.set_defaults(stage=stage)


def add_folder_options(parser: argparse.ArgumentParser, default: str, resumable: bool = True) -> None:
    """`--out`, `--force` (and `--no-resume` for a training stage); `default` is the folder the stage contract
    names."""
    parser.add_argument(
        "--out",
        help=f"output folder (default GPTFLOW_HOME/{default}, named by the stage contract); a folder you choose "
        "must be new, empty or this stage's own: one holding other files is refused (see --force), and so is "
        "another stage's folder or a checkpoint of other inputs or config",
    )
    add_force_option(parser, "--out")
    if resumable:
        parser.add_argument(
            "--no-resume",
            dest="resume",
            action="store_false",
            help="start over instead of resuming or reusing the stage folder (the same stage's only: another "
            "stage's folder is never written)",
        )


def add_force_option(parser: argparse.ArgumentParser, out: str) -> None:
    """`--force`: the folder given by `out` may hold files gptflow did not write (they may be overwritten)."""
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"write into an {out} folder that holds files gptflow did not write (files of the same names are "
        "overwritten); never into another stage's folder",
    )


def _argparse_type(annotation: Any) -> dict[str, Any] | None:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:  # constraints (PositiveFloat) are pydantic's to check, naming the flag
        return _argparse_type(args[0])
    if origin in (Union, types.UnionType):  # X | None: a flag gives X
        rest = [a for a in args if a is not type(None)]
        return _argparse_type(rest[0]) if len(rest) == 1 else None
    if origin is Literal:
        return {"choices": args, "type": type(args[0])}
    if origin is tuple and args and (item := _argparse_type(args[0])):
        return {**item, "nargs": "+" if args[-1] is Ellipsis else len(args)}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if isinstance(annotation, type):  # the builtin, not a subclass (InitSpec): pydantic parses it, naming the flag
        return next(
            (
                {"type": t, "metavar": t.__name__.upper() if t in (int, float) else None}
                for t in (int, float, str, Path)
                if issubclass(annotation, t)
            ),
            None,
        )
    return None


def _shown(default: Any) -> str:
    if isinstance(default, tuple):
        return " ".join(map(str, default))
    return repr(default) if isinstance(default, str) and not default.isprintable() else str(default)


def stage_config(args: argparse.Namespace) -> Any:
    """The verb's stage config: the config's defaults, the verb's, the --config file, then the flags given, on a
    device this machine has. A bad value is one line naming its flag, or the file and the field."""
    config = validated_stage_config(args)
    check_device(config)
    return config


def validated_stage_config(args: argparse.Namespace) -> Any:
    """`stage_config` without the device check: PyTorch-free (model.configs), so `cli.main` runs it before the
    verb imports torch or Prefect."""
    stage: VerbConfig = args.stage
    model = stage.model
    flags = {name: value for name, value in vars(args).items() if name in model.model_fields}
    try:
        data = read_config_file(args.config) if args.config else {}
    except GptflowError as exc:
        raise GptflowError(f"--config: {exc}") from None
    if unknown := [key for key in data if key not in model.model_fields]:
        raise GptflowError(
            f"{args.config}: {unknown[0]}: not a {model.__name__} field; fields: {', '.join(model.model_fields)}"
        )
    try:
        config = model.model_validate({**stage.defaults, **data, **flags})
    except ValidationError as exc:

        def where(loc: tuple) -> str:
            from_file = loc[0] in data and loc[0] not in flags
            return f"{args.config}: {dotted(loc)}" if from_file else "--" + str(loc[0]).replace("_", "-")

        raise GptflowError(validation_message(exc, where, args.config or "options")) from None
    return config


def check_device(config: BaseModel) -> None:
    """A device or precision this machine lacks: one line before any flow starts."""
    fields = type(config).model_fields
    if "device" in fields:
        from model.device import resolve_device, runtime

        if "precision" in fields:
            runtime(config.device, config.precision)
        else:
            resolve_device(config.device)


def check_init(init: Any) -> None:
    """A missing init checkpoint or a bad Hugging Face model (an `InitSpec`): one line before any flow starts. GPT-2
    weights and hub models are not fetched here but by the stage."""
    if init.kind == "checkpoint":
        init.file()
    elif init.kind == "hf":
        from cli.prechecks import hf_model

        try:
            hf_model(init.ref)
        except GptflowError as exc:
            raise GptflowError(f"init {init}: {exc}") from None


def table(rows: list[dict]) -> str:
    """Rows as an aligned plain-text table: columns in first-seen order, blanks for gaps and None, numbers
    right-aligned."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [["" if row.get(c) is None else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += [
        "  ".join(v.rjust(w) if v.replace(".", "").isdigit() else v.ljust(w) for v, w in zip(r, widths)) for r in cells
    ]
    return "\n".join(line.rstrip() for line in lines)
