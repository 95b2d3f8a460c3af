"""Instruction fine-tuning: prompts, the book's collate, training, exact resume, resumable responses, the
flow through the CLI and bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import tiny_config

from cli import main
from eval.plots import plot_loss_curve
from gptflow.prompts import clean_response, extract_response, format_example, format_prompt
from model.checkpoint import load_checkpoint
from model.files import CHECKPOINT_LMS
from model.gpt import GPTModel
from model.instruct import (
    collate,
    encode_entries,
    finetune,
    generate_responses,
    respond,
)
from model.opener import open_model
from model.pretrain import lm_loss

ENTRY = {"instruction": "Rewrite the sentence.", "input": "The cat sat.", "output": "The cat was sitting."}
NO_INPUT = {"instruction": "Name a primary color.", "input": "", "output": "Red."}
ENTRIES = [
    {
        "instruction": f"What is {i} plus one?",
        "input": "" if i % 2 else f"Number: {i}",
        "output": f"The answer is {i + 1}.",
    }
    for i in range(20)
]
TINY = dict(batch_size=2, log_every=1, eval_every=4, eval_batches=1, checkpoint_every=4, max_new_tokens=6)


class Interrupted(Exception):
    pass


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, part in {"train": ENTRIES[:8], "validation": ENTRIES[8:12], "test": ENTRIES[12:17]}.items():
        (folder / f"{name}.json").write_text(json.dumps(part))
    return folder


def test_alpaca_prompt_is_the_books():
    preamble = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    )
    assert format_prompt(ENTRY) == (
        f"{preamble}\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nThe cat sat.\n\n### Response:\n"
    )
    assert format_example(ENTRY) == format_prompt(ENTRY) + "The cat was sitting."
    assert format_example(NO_INPUT) == (f"{preamble}\n\n### Instruction:\nName a primary color.\n\n### Response:\nRed.")


def test_phi3_prompt():
    assert format_example(ENTRY, "phi3") == (
        "<|user|>\nRewrite the sentence.\nThe cat sat.\n<|assistant|>:\nThe cat was sitting."
    )
    assert format_example(NO_INPUT, "phi3") == "<|user|>\nName a primary color.\n<|assistant|>:\nRed."


def test_prompt_tokens_are_a_prefix_of_the_example(tokenizer):
    (ids, n_prompt), (ids2, n_prompt2) = encode_entries([ENTRY, NO_INPUT], tokenizer, "phi3")
    assert n_prompt == len(tokenizer.encode(format_prompt(ENTRY, "phi3"))) == 24
    assert ids[:n_prompt] == tokenizer.encode(format_prompt(ENTRY, "phi3"))
    assert tokenizer.decode(ids[n_prompt:]) == "The cat was sitting."
    assert tokenizer.decode(ids2[n_prompt2:]) == "Red."
    # A literal end-of-text marker in the data stays text.
    ((ids3, _),) = encode_entries([{**NO_INPUT, "output": "<|endoftext|>"}], tokenizer, "alpaca")
    assert 50256 not in ids3


def test_extract_response():
    assert extract_response(format_prompt(ENTRY) + "  The cat was sitting.\n") == "The cat was sitting."
    assert extract_response(format_prompt(ENTRY, "phi3") + "Yes.\n", "phi3") == "Yes."
    assert extract_response("no marker here \n") == "no marker here"
    assert extract_response("### Response:\nA\n### Response:\nB") == "A\n### Response:\nB"
    assert extract_response(format_prompt(NO_INPUT) + "### Response:\n### Response: Red.") == "Red."  # echoed
    assert clean_response("  <|assistant|>:\nBlue.\n", "phi3") == "Blue."


BATCH = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]


def test_collate_is_the_books():
    inputs, targets = collate(BATCH)
    assert torch.equal(inputs, torch.tensor([[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]))
    assert torch.equal(
        targets, torch.tensor([[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]])
    )


def test_collate_masks_prompt_and_truncates():
    inputs, targets = collate(BATCH, [3, 1, 2])
    assert torch.equal(
        targets, torch.tensor([[-100, -100, 3, 4, 50256], [6, 50256, -100, -100, -100], [-100, 9, 50256, -100, -100]])
    )
    inputs, targets = collate(BATCH, [3, 1, 2], max_length=3)
    assert torch.equal(inputs, torch.tensor([[0, 1, 2], [5, 6, 50256], [7, 8, 9]]))
    assert torch.equal(targets, torch.tensor([[-100, -100, 3], [6, 50256, -100], [-100, 9, 50256]]))
    # A genuine 50256 inside a text is a target; only padding after the end of text is ignored.
    _, targets = collate([[1, 50256, 2], [3]])
    assert torch.equal(targets, torch.tensor([[50256, 2, 50256], [50256, -100, -100]]))


def test_loss_ignores_masked_targets():
    torch.manual_seed(0)
    model = GPTModel(tiny_config("gpt", vocab_size=60)).eval()
    x, y = torch.randint(0, 60, (2, 4)), torch.tensor([[2, -100, -100, 7], [-100, -100, 5, -100]])
    log_probs = torch.log_softmax(model(x), -1)
    expected = -(log_probs[0, 0, 2] + log_probs[0, 3, 7] + log_probs[1, 2, 5]) / 3  # the three kept targets
    hidden, head = model.features(x), model.out_head.weight
    assert lm_loss(hidden, head, y).item() == pytest.approx(expected.item(), rel=1e-5)
    assert lm_loss(hidden, head, torch.full_like(y, -100)).item() == 0.0  # not NaN


@pytest.mark.slow
def test_training_reduces_loss(data_dir, tmp_path, tokenizer):
    config = tiny_config("instruct", **{**TINY, "lr": 5e-3, "epochs": 4, "eval_every": 100, "batch_size": 4})
    result = finetune(data_dir, tmp_path / "run", config, tokenizer=tokenizer)
    losses = [h["loss"] for h in result.history if h["kind"] == "train"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 2.0  # nats per token
    assert result.metrics["val_loss"] < losses[0]
    assert (
        plot_loss_curve(result.history, tmp_path / "loss.png", "fine-tuning").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    )
    assert load_checkpoint(result.model_path)["style"] == "alpaca"
    again = finetune(data_dir, tmp_path / "run", config, tokenizer=tokenizer)
    assert again.reused and again.metrics == result.metrics


@pytest.mark.slow
def test_resume_gives_identical_params(data_dir, tmp_path, tokenizer):
    config = tiny_config("instruct", **TINY, style="phi3", mask_prompt=True, lr=1e-3, max_steps=6)  # 4 steps/epoch
    full = finetune(data_dir, tmp_path / "full", config, tokenizer=tokenizer)

    def stop_at_6(m):
        if m["kind"] == "train" and m["step"] == 6:
            raise Interrupted

    with pytest.raises(Interrupted):
        finetune(data_dir, tmp_path / "split", config, tokenizer=tokenizer, on_log=stop_at_6)
    assert load_checkpoint(tmp_path / "split" / "last.pt")["train_state"]["step"] == 4
    seen = []
    resumed = finetune(data_dir, tmp_path / "split", config, tokenizer=tokenizer, on_log=seen.append)
    assert [m["step"] for m in seen if m["kind"] == "train"] == [5, 6]  # the second epoch
    a, b = (
        open_model(full.model_path, CHECKPOINT_LMS).language_model().state_dict(),
        open_model(resumed.model_path, CHECKPOINT_LMS).language_model().state_dict(),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["val_loss"] == full.metrics["val_loss"]
    assert load_checkpoint(full.model_path)["style"] == "phi3"


@pytest.mark.slow
def test_responses_resume_after_interrupt(data_dir, tmp_path, tokenizer):
    config = tiny_config("instruct", **{**TINY, "style": "phi3", "max_steps": 2})
    model_path = finetune(data_dir, tmp_path / "run", config, tokenizer=tokenizer).model_path
    test = data_dir / "test.json"
    whole = generate_responses(model_path, test, tmp_path / "whole", config, tokenizer=tokenizer)
    assert (whole.n_entries, whole.n_generated) == (5, 5)
    written = json.loads(whole.path.read_text())
    assert [{k: e[k] for k in ("instruction", "input", "output")} for e in written] == ENTRIES[12:17]

    opened = open_model(model_path, ("instruct",))
    model, style = opened.language_model(), opened.style  # the style recorded at training is the one used
    assert style == "phi3" and written[0]["model_response"] == respond(model, tokenizer, ENTRIES[12], style, config)

    def stop_after_2(index, entry):
        if index == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        generate_responses(model_path, test, tmp_path / "split", config, tokenizer=tokenizer, on_response=stop_after_2)
    progress = tmp_path / "split" / "progress.jsonl"
    assert len(progress.read_text().splitlines()) == 3  # key line + 2 responses
    with open(progress, "a") as handle:
        handle.write('{"index": 2, "model_resp')  # a line cut short by a crash
    seen = []
    resumed = generate_responses(
        model_path, test, tmp_path / "split", config, tokenizer=tokenizer, on_response=lambda i, e: seen.append(i)
    )
    assert seen == [2, 3, 4] and resumed.n_generated == 3
    assert resumed.path.read_bytes() == whole.path.read_bytes()
    assert not progress.exists()
    assert generate_responses(model_path, test, tmp_path / "split", config, tokenizer=tokenizer).reused


def test_flow_through_cli(prefect_harness, settings, tmp_path, capsys):
    data = tmp_path / "mine.json"
    data.write_text(json.dumps(ENTRIES))
    args = [
        "finetune-instructions",
        "--data",
        str(data),
        "--preset",
        "tiny",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "4",
        "--style",
        "phi3",
        "--mask-prompt",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.match(r"trained tiny \(phi3\): 4 steps, train loss \d+\.\d+, val loss \d+\.\d+", out)
    responses = re.search(r"^responses: (.+) \(2 test entries\)$", out, re.M).group(1)
    assert responses.startswith(str(settings.home / "instruct"))
    entries = json.loads(open(responses).read())
    assert len(entries) == 2 and all(isinstance(e["model_response"], str) for e in entries)
    assert load_checkpoint(re.search(r"^model: (.+)$", out, re.M).group(1))["style"] == "phi3"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("reused tiny (phi3): 4 steps") and "(2 test entries, reused)" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "nope"], "--preset: unknown model preset 'nope'"),
        (
            ["--init", "bogus"],
            "--init: Value error, expected random | gpt2:<preset-or-safetensors> | checkpoint:<path>",
        ),
        (["--init", "checkpoint:/no/such.pt"], "init checkpoint:/no/such.pt: no such checkpoint"),
        (["--init", "hf:/no/such/folder"], "init hf:/no/such/folder: /no/such/folder: neither a model folder nor"),
        (["--data", "/no/such.json"], "--data /no/such.json: no such file or folder"),
        (["--epochs", "0"], "--epochs: Input should be greater than 0"),
    ],
)
def test_bad_input_is_one_line(settings, capsys, argv, message):
    assert main(["finetune-instructions", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
