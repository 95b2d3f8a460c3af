"""The command line generated from the stage configs: flags, --config files, one-line errors, the table printer."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Literal, get_args

import pytest
from conftest import REPO_ROOT
from pydantic import BaseModel, Field

from cli import build_parser, main
from cli.common import VerbConfig, add_stage_options, stage_config, table
from gptflow.errors import GptflowError


class Inner(BaseModel):
    depth: int = 1


class Demo(BaseModel):
    lr: float = Field(default=5e-5, gt=0, description="peak learning rate")
    steps: int = Field(default=10, gt=0)
    limit: int | None = Field(default=None, gt=0, description="stop early (default: never)")
    style: Literal["alpaca", "phi3"] = "alpaca"
    bf16: bool = Field(default=True, description="bf16 autocast at 100% speed")
    betas: tuple[float, float] = (0.9, 0.95)
    out: Path | None = None
    name: str = Field(min_length=1, description="a required field")
    inner: Inner = Inner()


def parse(argv: list[str], stage: VerbConfig = VerbConfig(f"{__name__}:Demo")) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_stage_options(parser, stage)
    return parser.parse_args(argv)


def test_a_flag_per_field_typed_from_its_annotation():
    parser = argparse.ArgumentParser()
    add_stage_options(parser, VerbConfig(f"{__name__}:Demo"))
    flags = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    assert sorted(flags) == sorted(set(Demo.model_fields) - {"inner"})  # a nested model is set in the file only
    assert flags["lr"].type is float and flags["steps"].type is int and flags["limit"].type is int
    assert flags["out"].type is Path and flags["name"].type is str
    assert flags["style"].choices == ("alpaca", "phi3")
    assert flags["bf16"].option_strings == ["--bf16", "--no-bf16"] and flags["betas"].nargs == 2
    assert all(a.default is argparse.SUPPRESS for a in flags.values())
    assert flags["lr"].help == "peak learning rate (default: 5e-05)"
    assert flags["steps"].help == "(default: 10)" and flags["betas"].help == "(default: 0.9 0.95)"
    assert flags["limit"].help == "stop early (default: never)"  # a None default is not shown
    assert flags["name"].help == "a required field (required)"
    assert flags["bf16"].help == "bf16 autocast at 100%% speed (default: True)"  # argparse formats help with %
    assert flags["style"].option_strings == ["--style"] and "--no-bf16" in parser.format_help()


def test_every_field_of_every_stage_config_has_a_flag():
    for verb in ("pretrain", "finetune-classifier", "finetune-instructions", "export", "evaluate"):
        verbs = next(a for a in build_parser([verb])._actions if isinstance(a, argparse._SubParsersAction))
        parser = verbs.choices[verb]
        model = parser.get_default("stage").model
        options = {s for a in parser._actions for s in a.option_strings}
        scalar = [  # a nested model, optional or not, is set in the --config file
            n
            for n, f in model.model_fields.items()
            if not any(
                isinstance(t, type) and issubclass(t, BaseModel) for t in (f.annotation, *get_args(f.annotation))
            )
        ]
        assert "--config" in options and {"--" + n.replace("_", "-") for n in scalar} <= options, verb


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("name: run\nsteps: 7\nlr: 0.1\nbetas: [0.8, 0.9]\ninner: {depth: 3}\n")
    config = stage_config(parse(["--config", str(path), "--lr", "0.5", "--no-bf16", "--style", "phi3"]))
    assert config == Demo(name="run", steps=7, lr=0.5, betas=(0.8, 0.9), inner=Inner(depth=3), bf16=False, style="phi3")
    path.write_text(json.dumps({"name": "j"}))
    assert stage_config(parse(["--config", str(path), "--betas", "0.5", "0.6"])) == Demo(name="j", betas=(0.5, 0.6))
    assert stage_config(parse(["--name", "x"], VerbConfig(f"{__name__}:Demo", {"steps": 3}))).steps == 3  # verb default


@pytest.mark.parametrize(
    "argv, file, message",
    [
        (["--name", "x", "--lr", "-1"], None, "--lr: Input should be greater than 0"),
        ([], None, "--name: Field required"),
        (["--name", "x"], "steps: 0\n", "{path}: steps: Input should be greater than 0"),
        (["--name", "x", "--steps", "2"], "steps: 0\nlimit: 0\n", "{path}: limit: Input should be greater than 0"),
        (["--name", "x"], "inner: {depth: deep}\n", "{path}: inner.depth: Input should be a valid integer"),
        (["--name", "x"], "stpes: 3\n", "{path}: stpes: not a Demo field; fields: lr, steps,"),
        (["--name", "x"], "[1, 2]\n", "--config: {path} holds a list, not a mapping of config fields"),
        (["--name", "x"], "a: [\n", "--config: {path} is not valid YAML/JSON: "),
    ],
)
def test_bad_values_are_one_line_naming_the_flag_or_the_file_and_field(tmp_path, argv, file, message):
    path = tmp_path / "bad.yaml"
    if file is not None:
        path.write_text(file)
        argv = [*argv, "--config", str(path)]
    with pytest.raises(GptflowError) as info:
        stage_config(parse(argv))
    assert str(info.value).startswith(message.format(path=path)) and "\n" not in str(info.value)


def test_verbs_exit_2_with_one_line(settings, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 2\nbogus: 1\n")
    checkpoint = tmp_path / "x.pt"  # a zip with the data.pkl torch.save writes: the checks before the flow pass
    with zipfile.ZipFile(checkpoint, "w") as archive:
        archive.writestr("x/data.pkl", b"")
    for argv, message in [
        (["finetune-classifier", "--config", str(path)], f"gptflow finetune-classifier: error: {path}: bogus: "),
        (["export", str(checkpoint), "--max-int8-drop", "-1"], "gptflow export: error: --max-int8-drop: Input should "),
        (["pretrain", "--config", str(tmp_path / "none.yaml")], "gptflow pretrain: error: --config: cannot read "),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as info:  # argparse's own errors are one line too
        main(["pretrain", "--steps", "many"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "gptflow pretrain: error: argument --steps: invalid int value: 'many' (see gptflow pretrain --help)\n"
    )


def test_help_imports_no_config_torch_or_prefect():
    code = (
        "import sys\nfrom cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'prefect', 'model', 'flows') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert proc.stdout.splitlines()[-1] == "[]" and "finetune-classifier" in proc.stdout


def test_table():
    assert table([{"split": "train", "n": 1045}, {"split": "test", "n": 300, "auc": "0.97"}]).splitlines() == [
        "split  n     auc",
        "train  1045",
        "test    300  0.97",
    ]
