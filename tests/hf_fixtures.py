"""Small, realistic Hugging Face tokenizer folders for tests, written by transformers itself.

Each style copies the shape of a real model family: a byte-level BPE trained here in milliseconds on a fixed
corpus, the family's pre-tokenizer, special tokens, post-processor and a chat template in its style, saved with
`save_pretrained` (so the folder is exactly what transformers writes: tokenizer.json, tokenizer_config.json,
chat_template.jinja) plus a generation_config.json with the eos ids the real models list.

    chatml  SmolLM2-like: specials first in the vocab, digits split one by one, a default system message
    llama3  Llama-3.2-like: specials after the vocab, bos from the post-processor, date and raise_exception
    qwen3   Qwen3-like: NFC, specials after the vocab, non-special <think> tokens, enable_thinking, tools
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

STYLES = ("chatml", "llama3", "qwen3")
VOCAB_SIZE = 1400  # the trained BPE part; added tokens come on top

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# SmolLM2-Instruct's template shape, written over several lines so that trim_blocks/lstrip_blocks matter.
CHATML_TEMPLATE = """{% for message in messages %}
    {% if loop.first and messages[0]['role'] != 'system' %}
        {{- '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}
    {% endif %}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
{%- endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Llama 3.2's template shape, with a role check added so that raise_exception is exercised.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You have access to the following functions.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant', 'ipython', 'tool'] %}
        {{- raise_exception("Unknown role '" + message['role'] + "': use user, assistant, ipython or tool") }}
    {%- endif %}
    {%- if 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + '}<|eot_id|>' }}
    {%- elif message['role'] == 'ipython' or message['role'] == 'tool' %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable and message.content is not string %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Qwen3's template shape: tools as JSON, reasoning kept only after the last user query, enable_thinking.
QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n" }}
    {{- "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within " }}
    {{- "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, " }}
    {{- "\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string
        and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n') %}
                {%- set reasoning_content = reasoning_content.split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') }}
                {{- '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


@dataclass(frozen=True)
class TokenizerFolder:
    """A written tokenizer folder and the numbers a model test sizes itself with."""

    folder: Path
    style: str
    vocab_size: int  # with the added tokens: the embedding needs at least this many rows
    bos_id: int | None
    eos_id: int  # the tokenizer's eos token
    pad_id: int | None  # None where the model has no pad token (Llama 3)
    eos_ids: tuple[int, ...]  # generation_config.json's eos_token_id


def corpus() -> list[str]:
    """A few hundred varied lines, the same on every call: prose, dialogue, numbers, code, other scripts."""
    rng = random.Random(20240601)
    names = ["Alice", "Bob", "Chen", "Dmitri", "Esther", "Farah", "Giulia", "Hiro", "Ines", "Jamal", "Kofi"]
    subjects = ["the model", "a small dog", "my neighbour", "the committee", "every student", "our team", "the river"]
    verbs = ["reads", "writes", "builds", "measured", "explained", "won't stop", "carried", "is learning", "compares"]
    objects = [
        "the tokenizer",
        "a long report",
        "three bridges",
        "the weather data",
        "an old recipe",
        "their homework",
        "fresh bread",
        "the training loss",
        "a quiet melody",
        "the database schema",
    ]
    tails = [
        "before breakfast",
        "in the evening",
        "without any help",
        "because it's raining",
        "after the meeting",
        "with great care",
        "for the third time",
        "near the station",
        "while we're waiting",
        "as they'd planned",
    ]
    openers = ["", "However, ", "Yesterday ", "In 2023, ", "Honestly, ", "Meanwhile ", "Still, "]
    lines = []
    for _ in range(260):
        sentence = (
            f"{rng.choice(openers)}{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}"
        )
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "!", "?", "..."]))
    for _ in range(60):
        a, b = rng.sample(names, 2)
        lines.append(f'{a} said: "I\'ll meet {b} at {rng.randint(1, 12)}:{rng.randint(0, 59):02d}, ok?"')
    for _ in range(60):
        lines.append(
            f"Order #{rng.randint(1000, 99999)} costs ${rng.randint(1, 999)}.{rng.randint(0, 99):02d} "
            f"({rng.randint(1, 100)}% off) on {rng.randint(2000, 2030)}-"
            f"{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        )
    code = [
        "def add(a, b):\n    return a + b\n",
        "for i in range(10):\n\tprint(i, i ** 2)\n",
        'if __name__ == "__main__":\n    main()\n',
        "x = {'key': [1, 2, 3], \"other\": None}\n",
        "SELECT name, COUNT(*) FROM users WHERE age > 21 GROUP BY name;",
        '<div class="note">Hello &amp; welcome</div>\n\n',
        "    indented line\n        deeper line\n",
    ]
    lines += code * 4
    lines += [
        "Le café est très bon, n'est-ce pas ? Où est la gare ?",
        "Grüße aus München: Straße, Mädchen, schön, übermorgen.",
        "El niño comió paella en la playa. ¿Dónde está? ¡Olé!",
        "Привет, мир! Как дела? Всё хорошо, спасибо.",
        "こんにちは世界。今日はいい天気ですね。東京へ行きます。",
        "你好，世界！我们今天学习分词器和语言模型。",
        "안녕하세요 세계. 오늘 날씨가 좋네요.",
        "Emoji: 😀 🎉 👍🏽 ❤️ 🚀 — and math: ∑ x² ≤ π ≈ 3.14159",
        "مرحبا بالعالم، كيف حالك؟",
        "Ελληνικά: καλημέρα κόσμε.",
    ] * 3
    return lines


def _trained_bpe(style: str):
    """The trained BPE with this style's normalizer, pre-tokenizer and decoder (tokenizers only)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
    if style == "chatml":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif style == "llama3":
        split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        tokenizer.normalizer = normalizers.NFC()
        split = pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    first = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>"] if style == "chatml" else []
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=first,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    return tokenizer


def _llama3_tokenizer():
    from tokenizers import processors

    tokenizer = _trained_bpe("llama3")
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    tokenizer.add_special_tokens(specials)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    return tokenizer


def _qwen3_tokenizer():
    from tokenizers import AddedToken, processors

    tokenizer = _trained_bpe("qwen3")
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>"])
    plain = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tokenizer


def write_tokenizer(folder: str | Path, style: str) -> TokenizerFolder:
    """Write a `style` tokenizer folder (see the module docstring) through transformers' save_pretrained."""
    from tokenizers import processors
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    if style not in STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; expected one of {', '.join(STYLES)}")
    folder = Path(folder)
    if style == "chatml":
        backend = _trained_bpe("chatml")
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        tokens = dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>")
        tokens["unk_token"] = "<|endoftext|>"
        template = CHATML_TEMPLATE
    elif style == "llama3":
        backend = _llama3_tokenizer()
        tokens = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
        template = LLAMA3_TEMPLATE
    else:
        backend = _qwen3_tokenizer()
        tokens = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tokens["extra_special_tokens"] = ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>"]
        template = QWEN3_TEMPLATE
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **tokens)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)

    def tid(token: str | None) -> int | None:
        return None if token is None else backend.token_to_id(token)

    eos_ids = {
        "chatml": (tid("<|im_end|>"),),
        "llama3": (tid("<|end_of_text|>"), tid("<|eom_id|>"), tid("<|eot_id|>")),
        "qwen3": (tid("<|im_end|>"), tid("<|endoftext|>")),
    }[style]
    bos_id = tid(tokens.get("bos_token")) if style != "qwen3" else tid("<|endoftext|>")
    generation = {"bos_token_id": bos_id, "eos_token_id": list(eos_ids) if len(eos_ids) > 1 else eos_ids[0]}
    if style == "qwen3":
        generation.update(pad_token_id=tid("<|endoftext|>"), do_sample=True, temperature=0.6, top_p=0.95, top_k=20)
    GenerationConfig(**generation).save_pretrained(folder)
    return TokenizerFolder(
        folder=folder,
        style=style,
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
        bos_id=tid(tokens.get("bos_token")),
        eos_id=tid(tokens["eos_token"]),
        pad_id=tid(tokens.get("pad_token")),
        eos_ids=eos_ids,
    )


def write_all(root: str | Path) -> dict[str, TokenizerFolder]:
    """Every style, each in `root/<style>`."""
    return {style: write_tokenizer(Path(root) / style, style) for style in STYLES}


def write_hub_mirror(root: Path, repo: str, folder: Path) -> None:
    """`folder` laid out as the hub serves it: the listing (with sha256 for the weights, as LFS files get) and
    every file under resolve/main."""
    listing = []
    for file in sorted(folder.iterdir()):
        entry = {"type": "file", "path": file.name, "size": file.stat().st_size}
        if file.suffix == ".safetensors":
            entry["lfs"] = {"oid": hashlib.sha256(file.read_bytes()).hexdigest(), "size": file.stat().st_size}
        listing.append(entry)
        target = root / "huggingface.co" / repo / "resolve/main" / file.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
    api = root / "huggingface.co/api/models" / repo / "tree/main"
    api.parent.mkdir(parents=True, exist_ok=True)
    api.write_text(json.dumps(listing))
