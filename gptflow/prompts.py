"""Instruction prompt formats (the book's Alpaca prompt and a Phi-3 style), shared by fine-tuning and the judge.

Torch-free base layer: `model.instruct` trains and generates with these, `eval.judge` quotes the instruction
part to the judge exactly as the book does.
"""

from __future__ import annotations

from typing import Literal

from gptflow.errors import GptflowError

Style = Literal["alpaca", "phi3"]

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
# Text that introduces the response in each style; the response is the text after it.
RESPONSE_MARKERS: dict[str, str] = {"alpaca": "### Response:", "phi3": "<|assistant|>:"}


class PromptStyleError(GptflowError, ValueError):
    """An unknown prompt style."""


def format_instruction(entry: dict[str, str]) -> str:
    """The Alpaca prompt without its response marker (the book's `format_input`, what the judge is shown)."""
    prompt = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    text = entry.get("input") or ""
    return prompt + (f"\n\n### Input:\n{text}" if text else "")


def format_prompt(entry: dict[str, str], style: Style = "alpaca") -> str:
    """The prompt up to and including the response marker line; the training text is this + the output.

    alpaca (the book): preamble, `### Instruction:`, `### Input:` only when the input is non-empty, then
    `### Response:`. phi3 (the book's exercise 7.1): `<|user|>`, instruction, input, `<|assistant|>:`.
    """
    if style == "alpaca":
        return format_instruction(entry) + f"\n\n{RESPONSE_MARKERS['alpaca']}\n"
    instruction, text = entry["instruction"], entry.get("input") or ""
    if style == "phi3":
        prompt = f"<|user|>\n{instruction}"
        if text:
            prompt += f"\n{text}"
        return prompt + f"\n{RESPONSE_MARKERS['phi3']}\n"
    raise PromptStyleError(f"unknown prompt style {style!r}; styles: {', '.join(RESPONSE_MARKERS)}")


def format_example(entry: dict[str, str], style: Style = "alpaca") -> str:
    """Prompt plus the reference output: the text the model is trained on."""
    return format_prompt(entry, style) + entry["output"]


def extract_response(text: str, style: Style = "alpaca") -> str:
    """The text after the first response marker (all of `text` if there is none): see `clean_response`."""
    _, found, after = text.partition(RESPONSE_MARKERS[style])
    return clean_response(after if found else text, style)


def clean_response(generated: str, style: Style = "alpaca") -> str:
    """Generated text stripped, without response markers the model echoed at its start."""
    marker, response = RESPONSE_MARKERS[style], generated.strip()
    while response.startswith(marker):
        response = response[len(marker) :].strip()
    return response
