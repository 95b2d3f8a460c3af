"""Instruction prompt formats (the book's Alpaca prompt, a Phi-3 style, and a model's own chat template), shared by
fine-tuning, generation and the judge.

Torch-free base layer: `model.instruct` trains and generates with these, `eval.judge` quotes the instruction
part to the judge exactly as the book does (whatever the style the model was tuned in).

A model whose tokenizer has a chat template (SmolLM2's ChatML, Llama 3's, Qwen3's) is tuned and asked in it: the
entry is one user turn (the instruction, then the input after a blank line) and the assistant's turn is the output,
rendered by the template as transformers renders it (`edge.hf_tokenizer.HFTokenizer.render_chat`). Its style is
"chat". The prompt is the render of the user turn with the generation prompt; the rest of the full render (the
output and the end-of-turn token) is the part the model learns. Qwen3's template writes an empty
`<think>\n\n</think>\n\n` block into the last assistant turn; it is rendered with `enable_thinking=False` (the
non-thinking mode), whose generation prompt ends with that same block, so the prompt stays a prefix of the full
render and the loss covers the answer alone. Templates ignore the keyword they do not use.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from gptflow.errors import GptflowError

Style = Literal["alpaca", "phi3"]  # the text formats of models without a chat template
CHAT = "chat"  # the style of a model tuned in its own chat template
CHAT_KWARGS: dict[str, Any] = {"enable_thinking": False}  # Qwen3: no reasoning block to learn or to generate

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
# Text that introduces the response in each style; the response is the text after it. A chat template writes its
# own (the assistant turn's header), so "chat" has none.
RESPONSE_MARKERS: dict[str, str] = {"alpaca": "### Response:", "phi3": "<|assistant|>:", CHAT: ""}


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
    if style == CHAT:
        raise PromptStyleError(
            "the chat style is rendered by the model's own template: use chat_prompt(tokenizer, entry)"
        )
    raise PromptStyleError(f"unknown prompt style {style!r}; styles: alpaca, phi3, {CHAT}")


def format_example(entry: dict[str, str], style: Style = "alpaca") -> str:
    """Prompt plus the reference output: the text the model is trained on."""
    return format_prompt(entry, style) + entry["output"]


def extract_response(text: str, style: str = "alpaca") -> str:
    """The text after the first response marker (all of `text` if there is none): see `clean_response`."""
    marker = RESPONSE_MARKERS[style]
    _, found, after = text.partition(marker) if marker else ("", "", text)
    return clean_response(after if found else text, style)


def clean_response(generated: str, style: str = "alpaca") -> str:
    """Generated text stripped, without response markers the model echoed at its start; in the chat style without
    a reasoning block (`<think>...</think>`) before the answer."""
    marker, response = RESPONSE_MARKERS[style], generated.strip()
    while marker and response.startswith(marker):
        response = response[len(marker) :].strip()
    if style == CHAT and response.startswith("<think>") and "</think>" in response:
        response = response.split("</think>", 1)[1].strip()
    return response


# --- chat templates ------------------------------------------------------------------------------------


def tuning_style(style: str, chat_template: str | None) -> str:
    """The style a model is tuned and asked in: "chat" when its tokenizer has a chat template, else `style`."""
    return CHAT if chat_template else style


def chat_messages(entry: dict[str, str], *, with_output: bool = False) -> list[dict[str, str]]:
    """The entry as a conversation: one user turn (instruction, then the input after a blank line, as `gptflow
    generate --input` joins them), and with `with_output` the assistant's turn (the reference output)."""
    text = entry.get("input") or ""
    messages = [{"role": "user", "content": entry["instruction"] + (f"\n\n{text}" if text else "")}]
    if with_output:
        messages.append({"role": "assistant", "content": entry["output"]})
    return messages


def chat_prompt(tokenizer: Any, entry: dict[str, str]) -> str:
    """The chat prompt of an entry: its user turn and the generation prompt, in the model's template."""
    return tokenizer.render_chat(chat_messages(entry), add_generation_prompt=True, **CHAT_KWARGS)


def chat_example(tokenizer: Any, entry: dict[str, str]) -> tuple[str, str]:
    """(prompt, response) texts of an entry in the model's template: the prompt is `chat_prompt`, the response the
    rest of the whole conversation's render (the output, the end-of-turn token and what the template writes after
    it). A template whose prompt is not a prefix of the whole render cannot be trained on the assistant's turn
    alone: a PromptStyleError says so."""
    prompt = chat_prompt(tokenizer, entry)
    full = tokenizer.render_chat(chat_messages(entry, with_output=True), add_generation_prompt=False, **CHAT_KWARGS)
    if not full.startswith(prompt):
        at = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
        raise PromptStyleError(
            "the model's chat template renders the user turn with its generation prompt differently from the same "
            f"turn followed by the answer (they differ at character {at}: {prompt[at : at + 30]!r} vs "
            f"{full[at : at + 30]!r}), so the answer cannot be told from the prompt; fine-tune it with a model "
            "whose template keeps the prompt a prefix"
        )
    return prompt, full[len(prompt) :]


# --- the prompt format as a frame, for runtimes without our code ------------------------------------------------

_MESSAGE, _ANSWER = "\x00message\x00", "\x00answer\x00"  # placeholders no text holds


def prompt_frame(tokenizer: Any, style: str | None) -> tuple[str, str, str] | None:
    """(before, after, end): what the model's prompt format writes around one user message, and what closes the
    model's answer (its end token; a chat template's end of turn). For runtimes that frame prompts themselves: an
    Ollama template, a GGUF's chat template. None for a model with no prompt format (a base model)."""
    if style in RESPONSE_MARKERS and style != CHAT:
        before, after = format_prompt({"instruction": _MESSAGE, "input": ""}, style).split(_MESSAGE)
        return before, after, tokenizer.eos_token
    if tokenizer.chat_template is None:
        return None
    kwargs = CHAT_KWARGS if style == CHAT else {}
    before, after = tokenizer.chat_frame(**kwargs)  # the frame an ONNX bundle keeps, too
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _ANSWER}]
    full = tokenizer.render_chat(messages, add_generation_prompt=False, **kwargs)
    prompt = before + "x" + after
    end = full.split(_ANSWER, 1)[1] if full.startswith(prompt) and full.count(_ANSWER) == 1 else ""
    return before, after, end


def frame_chat_template(before: str, after: str, end: str) -> str:
    """A Jinja chat template (as transformers and llama.cpp render them) that writes each user message in the
    frame and each assistant message followed by `end`: a text prompt format (Alpaca, Phi-3) as a chat template."""
    literal = lambda text: "{{ " + json.dumps(text, ensure_ascii=False) + " }}"  # noqa: E731
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        + literal(before)
        + "{{ message['content'] }}"
        + literal(after)
        + "{%- elif message['role'] == 'assistant' -%}{{ message['content'] }}"
        + literal(end)
        + "{%- endif -%}{%- endfor -%}"
    )
