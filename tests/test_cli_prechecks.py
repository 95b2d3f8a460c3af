"""Answers before Prefect starts (cli/prechecks.py): a bad input gets its one line before any flow, Prefect or
PyTorch is imported; the checks themselves."""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT, command_env

from cli import prechecks
from data.instructions import check_instructions
from data.tabular import check_header
from gptflow.errors import GptflowError
from model.files import check_torch_archive

GPTFLOW = REPO_ROOT / ".venv" / "bin" / "gptflow"
BOUND_S = 10  # generous: about 1 s each on 2 busy cores; a temporary Prefect server alone takes some 20 s
ENTRY = {"instruction": "Name a colour.", "input": "", "output": "Red."}


def _zip(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name in names:
            archive.writestr(name, b"")
    return path


def _safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.fixture
def inputs(tmp_path):
    """Bad inputs a user might pass, by name."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "dict.json").write_text(json.dumps({"instruction": "x", "output": "y"}))
    (d / "no-output.json").write_text(json.dumps([ENTRY, {"instruction": "x"}]))
    (d / "columns.csv").write_text("message,category\nhello,a\n")
    (d / "config.yaml").write_text("seed: many\n")
    (d / "optimizer.yaml").write_text("optimizer: sgd\n")
    (d / "junk.pt").write_text("not a zip\n")
    (d / "short.safetensors").write_bytes(b"\x01\x02")
    (d / "empty-folder").mkdir()
    (d / "a-file").write_text("")
    return d


# ------------------------------------------------------------------------------------ real commands


CASES = {
    "instructions not a list": (
        ["data", "instructions", "{d}/dict.json"],
        "gptflow data: error: {d}/dict.json: expected a non-empty JSON list (or JSON Lines) of {{instruction, input, "
        "output}} objects, got dict",
    ),
    "instructions entry without output": (
        ["data", "instructions", "{d}/no-output.json"],
        "gptflow data: error: {d}/no-output.json: 1 of 2 entries are not {{instruction: str, input: str (optional), "
        "output: str}} objects: indices 1 (entry 1 has no 'output')",
    ),
    "csv without the columns": (
        ["data", "csv", "{d}/columns.csv", "--text-column", "text", "--label-column", "label"],
        "gptflow data: error: {d}/columns.csv: no column 'text' or 'label' in the header; the columns found "
        "(comma-separated) are ['message', 'category']",
    ),
    "config field": (
        ["data", "spam", "--config", "{d}/config.yaml"],
        "gptflow data: error: {d}/config.yaml: seed: Input should be a valid integer",
    ),
    "model config field": (
        ["pretrain", "--corpus", "tinyshakespeare", "--config", "{d}/optimizer.yaml"],
        "gptflow pretrain: error: {d}/optimizer.yaml: optimizer: Input should be 'adamw' or 'muon'",
    ),
    "export not a checkpoint": (
        ["export", "{d}/junk.pt", "--int8"],
        "gptflow export: error: {d}/junk.pt is not a PyTorch checkpoint (expected the zip archive torch.save writes)",
    ),
    "classify folder without best.pt": (
        ["classify", "hello", "--model", "{d}/empty-folder"],
        "gptflow classify: error: checkpoint {d}/empty-folder/best.pt does not exist",
    ),
    "generate safetensors header": (
        ["generate", "hello", "--model", "{d}/short.safetensors"],
        "gptflow generate: error: {d}/short.safetensors is not a safetensors file (2 bytes, too short for the 8-byte "
        "header length that starts one)",
    ),
    "out folder not writable": (
        ["finetune-instructions", "--preset", "tiny", "--out", "{d}/a-file/run"],
        "gptflow finetune-instructions: error: --out: {d}/a-file/run is not a folder ({d}/a-file is a file)",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_line_before_prefect_starts(case, inputs, tmp_path, mirror):
    argv, message = CASES[case]
    env = command_env(tmp_path, mirror)  # no PREFECT_API_URL: a flow would start a temporary server
    started = time.monotonic()
    proc = subprocess.run(
        [str(GPTFLOW), *(a.format(d=inputs) for a in argv)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    print(f"{case}: {elapsed:.2f} s")  # shown with pytest -s
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout == ""
    assert proc.stderr.startswith(message.format(d=inputs)) and proc.stderr.count("\n") == 1, proc.stderr
    assert "temporary server" not in proc.stderr
    assert not (Path(env["PREFECT_HOME"]) / "prefect.db").exists()  # no Prefect server ever ran
    assert elapsed < BOUND_S, f"{case}: {elapsed:.1f} s"


def test_the_checks_import_neither_prefect_nor_torch(inputs):
    """Every verb's bad input, in one process: each is answered (exit 2) and nothing heavy was imported. A stage
    config's bad field too: the configs are PyTorch-free (model.configs)."""
    d = inputs
    commands = [
        ["data", "instructions", f"{d}/dict.json"],
        ["data", "csv", f"{d}/columns.csv", "--text-column", "text", "--label-column", "label"],
        ["data", "corpus", f"{d}/missing.txt"],
        ["data", "spam", "--config", f"{d}/config.yaml"],
        ["pipeline", "--config", f"{d}/junk.pt"],
        ["pretrain", "--corpus", f"{d}/missing.txt", "--preset", "tiny"],
        ["pretrain", "--config", f"{d}/junk.pt"],
        ["pretrain", "--config", f"{d}/optimizer.yaml"],
        ["pretrain", "--preset", "tiny", "--steps", "0"],
        ["finetune-classifier", "--last-k", "0"],
        ["finetune-instructions", "--init", "gpt3"],
        ["load-gpt2", f"{d}/empty-folder"],
        ["generate", "hi", "--model", f"{d}/junk.pt"],
        ["classify", "hi", "--model", f"{d}/junk.pt"],
        ["export", f"{d}/empty-folder", "--max-int8-drop", "2"],
        ["inspect", f"{d}/short.safetensors", "hi", "--layer", "0"],
        ["finetune-classifier", "--data", f"{d}/columns.csv", "--text-column", "text", "--label-column", "label"],
        ["sweep-classifier", "--data", f"{d}/missing.csv", "--grid", "seed=1,2"],
        ["finetune-instructions", "--data", f"{d}/no-output.json", "--epochs", "1"],
        ["finetune-instructions", "--data", f"{d}/empty-folder"],
        ["evaluate", f"{d}/missing.json"],
    ]
    code = (
        "import json, sys\nfrom cli import main\n"
        f"codes = [main(argv) for argv in {commands!r}]\n"
        "heavy = ('torch', 'prefect', 'flows', 'tasks', 'matplotlib')\n"
        "print(json.dumps([codes, sorted(m for m in heavy if m in sys.modules)]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes, imported = json.loads(proc.stdout.splitlines()[-1])
    errors = proc.stderr.splitlines()
    assert codes == [2] * len(commands) and len(errors) == len(commands), proc.stderr
    assert imported == [], imported
    assert all(line.startswith("gptflow ") and ": error: " in line for line in errors), errors


# --------------------------------------------------------------------------------------- the checks


def test_a_torch_checkpoint_is_judged_by_its_zip_directory_only(tmp_path):
    import torch

    good = tmp_path / "model.pt"
    torch.save({"format": "x", "weights": torch.zeros(3)}, good)
    check_torch_archive(good)
    prechecks.export_checkpoint(str(tmp_path))  # a folder holding model.pt
    for path, message in [
        (tmp_path / "none.pt", f"checkpoint {tmp_path}/none.pt does not exist"),
        (tmp_path, f"checkpoint {tmp_path} does not exist"),
        (_zip(tmp_path / "other.zip", ["a.txt"]), "is not a PyTorch checkpoint (expected the zip archive torch.save"),
    ]:
        with pytest.raises(GptflowError, match=message.replace("(", r"\(")):
            check_torch_archive(path)
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(GptflowError, match="text.pt is not a PyTorch checkpoint"):
        check_torch_archive(tmp_path / "text.pt")


def test_safetensors_header(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    good = tmp_path / "model.safetensors"
    save_file({"wte.weight": np.zeros((2, 2), dtype=np.float32)}, str(good))
    prechecks.gpt2_weights(str(good))
    prechecks.gpt2_weights(str(tmp_path))  # a folder holding model.safetensors
    prechecks.gpt2_weights("gpt2-small")  # a preset: fetched by the stage, not here
    prechecks.gpt2_weights("openai-community/gpt2-medium")
    past = tmp_path / "past.safetensors"
    past.write_bytes(struct.pack("<Q", 1000) + b"{}")
    for path, message in [
        (past, "its header length 1000 runs past the end of the file, 10 bytes"),
        (_safetensors(tmp_path / "list.safetensors", b"[1, 2]"), "the safetensors header is a JSON list"),
        (_safetensors(tmp_path / "text.safetensors", b"hello"), "is not a safetensors file"),
    ]:
        with pytest.raises(GptflowError, match=message):
            prechecks.gpt2_weights(str(path))
    with pytest.raises(GptflowError, match=r"is neither a GPT-2 preset \(gpt2-small, .*\) nor a model.safetensors"):
        prechecks.gpt2_weights(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(GptflowError, match=r"only .safetensors weights are loaded"):
        prechecks.gpt2_weights(str(tmp_path / "weights.bin"))


def test_which_file_a_model_folder_names(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "model.onnx").write_bytes(b"")
    prechecks.classifier(str(tmp_path))  # an exported bundle: the edge runtime checks it
    folder = tmp_path / "run"
    folder.mkdir()
    for check, name in [
        (prechecks.classifier, "best.pt"),
        (prechecks.export_checkpoint, "best.pt"),
        (prechecks.language_model, "model.safetensors"),
        (prechecks.any_model, "model.safetensors"),
    ]:
        with pytest.raises(GptflowError, match=f"{folder}/{name}"):
            check(str(folder))
    _zip(folder / "best.pt", ["best/data.pkl"])
    prechecks.any_model(str(folder))
    prechecks.export_checkpoint(str(folder))


def test_csv_header_check_reads_what_the_stage_reads(tmp_path, caplog):
    path = tmp_path / "m.csv"
    path.write_bytes(b"label;text\nham;caf\xe9\n")  # cp1252, semicolons
    with caplog.at_level(logging.WARNING):
        assert check_header(path, "text", "label") == ["label", "text"]
    assert caplog.records == []  # the stage warns of cp1252 when it reads the rows, once
    for data, message in [
        (b"text,text,label\n", "the header names column 'text' 2 times"),
        (b"  \n", "the file holds no text, only 3 whitespace characters"),
        (b"a\x00b", "looks binary"),
        (
            b"txt,label\n",
            r"no column 'text' in the header; the columns found \(comma-separated\) are \['txt', 'label'\]",
        ),
    ]:
        path.write_bytes(data)
        with pytest.raises(GptflowError, match=message):
            check_header(path, "text", "label")
    with pytest.raises(GptflowError, match="is a folder, not a file"):
        check_header(tmp_path, "text", "label")
    path.write_text("message,category\n")
    with pytest.raises(GptflowError, match=r"^--data: .*m.csv: no column"):
        prechecks.csv_columns("--data", str(path), "text", "label")


def test_instruction_check_is_the_stage_validator(tmp_path):
    from data.config import InstructionDataConfig

    path = tmp_path / "i.json"
    path.write_text(json.dumps([{**ENTRY, "output": f"{i}"} for i in range(20)]))
    check_instructions(path)
    path.write_text(json.dumps([ENTRY, ENTRY, {**ENTRY, "output": "Blue."}]))  # 2 entries after cleaning
    with pytest.raises(GptflowError, match="2 entries after cleaning are too few for a train/validation/test split"):
        check_instructions(path, InstructionDataConfig())
    path.write_text("[1, 2")
    with pytest.raises(GptflowError, match=r"^--data: .*i.json: not valid JSON"):
        prechecks.instructions("--data", str(path))


def test_corpus_and_config_checks(tmp_path):
    prechecks.corpus("--corpus", "the-verdict")  # a registered corpus: fetched by the stage
    (tmp_path / "train.bin").write_bytes(b"")
    with pytest.raises(GptflowError, match=r"^--corpus: .*: a folder without val.bin"):
        prechecks.corpus("--corpus", str(tmp_path), token_folder=True)
    (tmp_path / "val.bin").write_bytes(b"")
    prechecks.corpus("--corpus", str(tmp_path), token_folder=True)
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(GptflowError, match="not UTF-16 text|the file is empty"):
        prechecks.corpus(None, str(tmp_path / "c.txt"))
    (tmp_path / "l.yaml").write_text("- 1\n")
    with pytest.raises(GptflowError, match=r"^--config: .*l.yaml holds a list, not a mapping"):
        prechecks.config_file("--config", str(tmp_path / "l.yaml"))


def test_an_abbreviated_flag_is_checked_as_the_full_parser_reads_it(tmp_path, settings, capsys):
    from cli import main

    missing = tmp_path / "missing.csv"
    assert main(["finetune-classifier", "--dat", str(missing)]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"gptflow finetune-classifier: error: --data: {missing} is neither 'spam' nor an existing CSV/TSV file\n"
    )
