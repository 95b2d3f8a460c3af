"""The model verbs end to end through their Prefect flows: pretrain -> generate, load-gpt2, bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from cli import main
from model.files import CHECKPOINT_LMS
from model.opener import open_model
from tasks.artifacts import artifact_key


def _path(out: str, label: str) -> str:
    return re.search(rf"^{label}: (.+)$", out, re.M).group(1)


def test_pretrain_then_generate(prefect_harness, settings, capsys):
    args = [
        "pretrain",
        "--corpus",
        "the-verdict",
        "--preset",
        "tiny",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--context-length",
        "32",
        "--eval-every",
        "2",
        "--checkpoint-every",
        "2",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    model_path = _path(out, "model")
    assert model_path.startswith(str(settings.home / "pretrain" / "the-verdict-tiny"))
    assert (settings.home / "data" / "corpus" / "the-verdict" / "train.bin").is_file()  # data stage ran first
    model = open_model(model_path, CHECKPOINT_LMS).language_model()
    cfg = model.cfg
    assert cfg.context_length == 32 and cfg.emb_dim == 64
    # the progress artifact is keyed on the stage folder, which the training loop's first record names
    key = artifact_key("pretrain", Path(model_path).parent.name, "progress")
    with get_client(sync_client=True) as client:
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert [(a.type, float(a.data)) for a in progress] == [("progress", 100.0)]
    assert main(args) == 0 and capsys.readouterr().out.startswith("reused tiny: 4 steps")

    assert main(["generate", "Every effort moves you", "--model", model_path, "--max-new-tokens", "6"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Every effort moves you") and len(text) > len("Every effort moves you\n")
    with pytest.raises(SystemExit) as exit_info:  # argparse's one line, before the model is loaded
        main(["generate", "Hi", "--model", model_path, "--temperature", "-1"])
    assert exit_info.value.code == 2
    assert "argument --temperature: expected a number >= 0.0, got '-1'" in capsys.readouterr().err


def test_load_gpt2_converts_safetensors(prefect_harness, settings, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    ).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["load-gpt2", str(tmp_path / "hf")]) == 0
    model_path = _path(capsys.readouterr().out, "model")
    model = open_model(model_path, CHECKPOINT_LMS).language_model()
    ids = torch.tensor([[15496, 11, 995]])
    with torch.no_grad():
        assert (model(ids) - hf(input_ids=ids).logits).abs().max().item() <= 1e-4
    assert main(["generate", "Hello", "--model", str(tmp_path / "hf"), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Hello")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pretrain", "--preset", "nope"], "--preset: unknown model preset 'nope'"),
        (["pretrain", "--steps", "0"], "--steps: Input should be greater than 0"),
        (["load-gpt2", "/no/such/folder"], "neither a GPT-2 preset"),
        (["generate", "x", "--model", "/no/such.pt"], "neither a GPT-2 preset"),
        (["pretrain", "--device", "cuda:1"], "device cuda:1 is not available on this machine; available: cpu"),
        (["pretrain", "--device", "gpu"], "--device: Value error, 'gpu' is not a device"),
        (["pretrain", "--precision", "fp16", "--device", "cpu"], "precision fp16 is not supported on the CPU"),
        (["generate", "x", "--model", "gpt2-small", "--device", "mps"], "device mps is not available"),
    ],
)
def test_bad_input_is_one_line(settings, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_half_set_torchrun_variables_are_refused(settings, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["pretrain", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE is set but RANK is not" in err and err.count("\n") == 1
