"""edge.hf_tokenizer against the libraries it replaces: ids equal `tokenizers`' and transformers', chats equal
transformers' `apply_chat_template`, special ids equal what transformers reports, errors name the bad file."""

from __future__ import annotations

import ast
import json
import shutil

import jinja2
import pytest
from conftest import REPO_ROOT
from hf_fixtures import STYLES, write_tokenizer
from tokenizers import Tokenizer
from transformers import AutoTokenizer, GenerationConfig

from edge import BundleError
from gptflow.chat_template import ChatTemplateError, ChatTokenizer

HARD_TEXTS = [
    "",
    "Hello world",
    " leading space",
    "  two leading spaces and trailing   ",
    "tabs\tinside\t\tand\t",
    "lines\n\nand\r\nwindows\n\n\n",
    "\n",
    "    indented code\n        return x + 1\n",
    "digits 1234567890 3.14159 -42 1e10 2024-06-01",
    "unicode: café naïve Grüße Привет ¿Dónde? مرحبا",
    "CJK: 日本語のテキスト 中文句子 안녕하세요",
    "emoji: 😀🎉 👍🏽 ❤️ 🚀👨‍👩‍👧",
    "combining: e\u0301 vs \u00e9, ﬁ ligature, \u200b zero width",
    "don't I'LL we've they'd IT'S",
    "specials inside: <|im_start|>user\nhi<|im_end|> <|endoftext|>",
    "llama specials: <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "qwen tags: <think>\nhmm\n</think>\n\n<tool_call>{}</tool_call>",
    "almost special: <|im_start <im_end|> <|unknown|>",
    "a" * 300,
]

SYSTEM_USER = [
    {"role": "system", "content": "You are terse. Answer in one sentence."},
    {"role": "user", "content": "What is a tokenizer? 🤔"},
]
USER_ONLY = [{"role": "user", "content": "  Hello there!\n"}]
MULTI_TURN = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Translate 'good morning' to Japanese."},
    {"role": "assistant", "content": "おはようございます。"},
    {"role": "user", "content": "And to French?"},
    {"role": "assistant", "content": "Bonjour.", "tool_calls": None},
    {"role": "user", "content": "Thanks!"},
]
CONVERSATIONS = {"system_user": SYSTEM_USER, "user_only": USER_ONLY, "multi_turn": MULTI_TURN}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Température actuelle d'une ville (°C)",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
QWEN3_TOOLS_CHAT = [
    {"role": "system", "content": "You check the weather."},
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning": "The user wants Zürich's weather; call the tool.",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
    },
    {"role": "tool", "content": '{"temp": 21.5, "sky": "clear"}'},
    {"role": "assistant", "content": "<think>\nIt's clear.\n</think>\n\nIt is 21.5 °C and clear."},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tokenizers")
    return {style: write_tokenizer(root / style, style) for style in STYLES}


@pytest.fixture(scope="module")
def loaded(folders):
    """style -> (ours, tokenizers' Tokenizer, transformers' tokenizer), each loaded once."""
    return {
        style: (
            ChatTokenizer.from_folder(f.folder),
            Tokenizer.from_file(str(f.folder / "tokenizer.json")),
            AutoTokenizer.from_pretrained(f.folder),
        )
        for style, f in folders.items()
    }


def both_render(ours, theirs, messages, add_generation_prompt=True, **kwargs):
    """(ours, transformers') rendering of `messages`; each side's exception where it raises."""
    kwargs["add_generation_prompt"] = add_generation_prompt  # transformers' default is False, ours True
    results = []
    for render in (ours.render_chat, lambda m, **kw: theirs.apply_chat_template(m, tokenize=False, **kw)):
        try:
            results.append(render(messages, **kwargs))
        except Exception as exc:  # compared by the caller
            results.append(exc)
    return results


@pytest.mark.parametrize("style", STYLES)
def test_ids_equal_tokenizers_and_transformers(loaded, style):
    ours, raw, theirs = loaded[style]
    for add in (False, True):
        expected = [theirs.encode(text, add_special_tokens=add) for text in HARD_TEXTS]
        assert [raw.encode(text, add_special_tokens=add).ids for text in HARD_TEXTS] == expected
        assert [ours.encode(text, add_special_tokens=add) for text in HARD_TEXTS] == expected
        assert ours.encode_batch(HARD_TEXTS, add_special_tokens=add) == expected
    # Only Llama 3's post-processor adds a token (bos); the ChatML models add none.
    assert (ours.encode("hi", add_special_tokens=True)[0] == ours.bos_id) == (style == "llama3")


@pytest.mark.parametrize("style", STYLES)
def test_decode_round_trips_and_equals_transformers(loaded, style):
    ours, _, theirs = loaded[style]
    for text in HARD_TEXTS:
        ids = ours.encode(text, add_special_tokens=True)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
        if style != "qwen3" or "combining" not in text:  # Qwen's NFC normalizer composes e + U+0301
            assert ours.decode(ours.encode(text)) == text
    for token_id in range(0, ours.vocab_size, 37):
        token = ours.id_to_token(token_id)
        assert token == theirs.convert_ids_to_tokens(token_id) and ours.token_to_id(token) == token_id
    assert ours.token_to_id("<|not a token|>") is None and ours.id_to_token(ours.vocab_size) is None
    if style == "qwen3":  # skip_special_tokens drops special tokens, not plain added ones such as <think>
        assert ours.decode(ours.encode("<|im_start|><think>x</think>"), skip_special_tokens=True) == "<think>x</think>"


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_equals_apply_chat_template(loaded, style, name, add_generation_prompt):
    ours, _, theirs = loaded[style]
    kwargs = {"date_string": "05 Jun 2025"} if style == "llama3" else {}
    mine, expected = both_render(
        ours, theirs, CONVERSATIONS[name], add_generation_prompt=add_generation_prompt, **kwargs
    )
    assert isinstance(expected, str) and mine == expected
    ids = ours.chat_ids(CONVERSATIONS[name], add_generation_prompt=add_generation_prompt, **kwargs)
    assert ids == theirs.apply_chat_template(
        CONVERSATIONS[name], add_generation_prompt=add_generation_prompt, return_dict=False, **kwargs
    )


def test_chat_template_specifics(loaded):
    chatml, _, chatml_hf = loaded["chatml"]
    mine, expected = both_render(chatml, chatml_hf, USER_ONLY)
    assert mine == expected and "named SmolLM" in mine  # the default system message
    assert chatml.render_chat(USER_ONLY) == mine and mine.endswith("<|im_start|>assistant\n")  # default: True

    llama, _, llama_hf = loaded["llama3"]
    mine, expected = both_render(llama, llama_hf, SYSTEM_USER)  # today's date from strftime_now
    assert mine == expected and mine.startswith("<|begin_of_text|>") and "Today Date: " in mine
    mine, expected = both_render(llama, llama_hf, SYSTEM_USER, tools=[WEATHER_TOOL], date_string="1 Jan 2025")
    assert mine == expected and "Environment: ipython" in mine and "Température" in mine  # tojson(indent=4)
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
    tool_chat = [*SYSTEM_USER, {"role": "assistant", "tool_calls": [call]}, {"role": "ipython", "content": {"t": 21}}]
    mine, expected = both_render(llama, llama_hf, tool_chat, date_string="1 Jan 2025")
    assert mine == expected and '"parameters": {"city": "Zürich"}' in mine
    mine, expected = both_render(llama, llama_hf, [*SYSTEM_USER, {"role": "assistant", "tool_calls": [call, call]}])
    assert isinstance(mine, ChatTemplateError) and "single tool-calls" in str(mine) and str(expected) in str(mine)

    qwen, _, qwen_hf = loaded["qwen3"]
    for kwargs in ({"enable_thinking": False}, {"enable_thinking": True}, {}):
        mine, expected = both_render(qwen, qwen_hf, SYSTEM_USER, **kwargs)
        assert mine == expected
    assert mine.endswith("<|im_start|>assistant\n")
    assert qwen.render_chat(SYSTEM_USER, enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    for add in (True, False):
        mine, expected = both_render(qwen, qwen_hf, QWEN3_TOOLS_CHAT, tools=[WEATHER_TOOL], add_generation_prompt=add)
        assert mine == expected
    assert '"Zürich"' in mine and "°C" in mine  # tojson keeps non-ASCII, as transformers' filter does
    assert "call the tool" in mine  # the `reasoning` key reaches the template as reasoning_content
    assert qwen.chat_ids(QWEN3_TOOLS_CHAT, tools=[WEATHER_TOOL]) == qwen_hf.apply_chat_template(
        QWEN3_TOOLS_CHAT, tools=[WEATHER_TOOL], add_generation_prompt=True, return_dict=False
    )


def test_template_errors_raise_on_both_sides(loaded):
    llama, _, llama_hf = loaded["llama3"]
    bad_role = [{"role": "moderator", "content": "I decide."}, {"role": "user", "content": "hi"}]
    mine, theirs = both_render(llama, llama_hf, bad_role)
    assert isinstance(theirs, jinja2.exceptions.TemplateError)
    assert isinstance(mine, ChatTemplateError) and isinstance(mine, BundleError)
    assert "Unknown role 'moderator'" in str(mine) and str(theirs) in str(mine)

    mine, theirs = both_render(llama, llama_hf, [])
    assert isinstance(mine, ValueError) and isinstance(theirs, ValueError)


@pytest.mark.parametrize("style", STYLES)
def test_special_ids_equal_transformers(folders, loaded, style):
    ours, _, theirs = loaded[style]
    generation = GenerationConfig.from_pretrained(folders[style].folder).eos_token_id
    generation = generation if isinstance(generation, list) else [generation]
    assert ours.eos_ids == list(dict.fromkeys(generation + [theirs.eos_token_id]))
    assert ours.eos_id == generation[0]
    assert ours.bos_id == theirs.bos_token_id
    assert ours.pad_id == (theirs.pad_token_id if theirs.pad_token_id is not None else ours.eos_id)
    assert ours.vocab_size == len(theirs) == folders[style].vocab_size
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, name) == getattr(theirs, name)
    assert ours.special_tokens == theirs.special_tokens_map
    fixture = folders[style]
    assert (fixture.bos_id, fixture.eos_id, tuple(generation)) == (ours.bos_id, theirs.eos_token_id, fixture.eos_ids)
    if style == "llama3":  # Llama 3 has no pad token: padding uses the first eos id
        assert theirs.pad_token_id is None and ours.pad_id == ours.eos_id


@pytest.mark.parametrize("style", STYLES)
def test_from_files_rebuilds_the_same_tokenizer(loaded, style):
    ours, _, _ = loaded[style]
    files = ours.files
    assert set(files) == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"}
    again = ChatTokenizer.from_files(json.loads(json.dumps(files)))  # survives being stored as JSON
    assert again.encode_batch(HARD_TEXTS, add_special_tokens=True) == ours.encode_batch(
        HARD_TEXTS, add_special_tokens=True
    )
    assert again.render_chat(MULTI_TURN, date_string="1 Jan 2025") == ours.render_chat(
        MULTI_TURN, date_string="1 Jan 2025"
    )
    assert (again.eos_ids, again.pad_id, again.bos_id, again.vocab_size) == (
        ours.eos_ids,
        ours.pad_id,
        ours.bos_id,
        ours.vocab_size,
    )
    files["chat_template.jinja"] = "changed"
    assert ours.files["chat_template.jinja"] != "changed"  # `.files` is a copy


def variant(folders, tmp_path, edit):
    """A copy of the qwen3 folder changed by `edit(folder)`, loaded by us and by transformers."""
    folder = tmp_path / "variant"
    shutil.copytree(folders["qwen3"].folder, folder)
    edit(folder)
    return ChatTokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)


def edit_json(path, change):
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def test_template_in_tokenizer_config_and_legacy_special_tokens_map(folders, tmp_path):
    """Older Hub folders: the template inside tokenizer_config.json (a list with a default), AddedToken dicts, and
    special tokens only in special_tokens_map.json."""
    template = (folders["qwen3"].folder / "chat_template.jinja").read_text(encoding="utf-8")

    def older(folder):
        (folder / "chat_template.jinja").unlink()

        def change(config):
            config["chat_template"] = [
                {"name": "default", "template": template},
                {"name": "tool_use", "template": "TOOLS{{ tools | tojson }}{{ eos_token }}"},
            ]
            config["eos_token"] = {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "special": True}
            del config["pad_token"]

        edit_json(folder / "tokenizer_config.json", change)
        legacy = {"pad_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False}}
        (folder / "special_tokens_map.json").write_text(json.dumps(legacy), encoding="utf-8")

    ours, theirs = variant(folders, tmp_path, older)
    assert ours.chat_template == template and set(ours.chat_templates) == {"default", "tool_use"}
    assert (ours.eos_token, ours.pad_token, ours.pad_id) == (theirs.eos_token, theirs.pad_token, theirs.pad_token_id)
    for kwargs in ({}, {"tools": [WEATHER_TOOL]}):
        mine, expected = both_render(ours, theirs, MULTI_TURN, **kwargs)
        assert mine == expected
    assert mine.startswith("TOOLS[") and mine.endswith("<|im_end|>")


def test_special_token_missing_from_tokenizer_json_is_added_like_transformers(folders, tmp_path):
    def new_pad(folder):
        edit_json(folder / "tokenizer_config.json", lambda config: config.update(pad_token="<|pad|>"))

    ours, theirs = variant(folders, tmp_path, new_pad)
    assert ours.vocab_size == len(theirs) == folders["qwen3"].vocab_size + 1
    assert ours.pad_id == theirs.pad_token_id == folders["qwen3"].vocab_size
    text = "x<|pad|>y"
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == theirs.decode(
        ours.encode(text), skip_special_tokens=True
    )


def test_errors_name_the_file(folders, tmp_path):
    with pytest.raises(BundleError, match=r"tokenizer\.json is missing"):
        ChatTokenizer.from_folder(tmp_path)
    with pytest.raises(BundleError, match="not a folder"):
        ChatTokenizer.from_folder(tmp_path / "absent")

    files = ChatTokenizer.from_folder(folders["chatml"].folder).files
    broken = {**files, "tokenizer_config.json": '{"eos_token": "<|im_end|>",'}
    with pytest.raises(BundleError, match=r"tokenizer_config\.json is not valid JSON") as raised:
        ChatTokenizer.from_files(broken, origin="model")
    assert str(raised.value).startswith("model/tokenizer_config.json") and "\n" not in str(raised.value)
    with pytest.raises(BundleError, match=r"generation_config\.json holds a JSON list"):
        ChatTokenizer.from_files({**files, "generation_config.json": "[1, 2]"})
    with pytest.raises(BundleError, match=r"generation_config\.json has eos_token_id"):
        ChatTokenizer.from_files({**files, "generation_config.json": '{"eos_token_id": "</s>"}'})
    with pytest.raises(BundleError, match=r"tokenizer\.json is not a tokenizers serialization"):
        ChatTokenizer.from_files({**files, "tokenizer.json": '{"model": 3}'})
    with pytest.raises(BundleError, match="unknown tokenizer files vocab.txt"):
        ChatTokenizer.from_files({**files, "vocab.txt": ""})

    plain = ChatTokenizer.from_files({"tokenizer.json": files["tokenizer.json"]})
    assert plain.chat_template is None and plain.eos_ids == [] and plain.bos_token is None
    with pytest.raises(BundleError, match="no chat template"):
        plain.render_chat(USER_ONLY)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTokenizer.from_files({**files, "chat_template.jinja": "{% for m in messages %}"}).render_chat(USER_ONLY)


def test_edge_module_never_imports_jinja2():
    """The edge tokenizer never imports jinja2 (bundles keep their chat frame rendered), nor transformers or torch."""
    source = (REPO_ROOT / "edge" / "hf_tokenizer.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    top_level = {
        alias.name.partition(".")[0] if isinstance(node, ast.Import) else (node.module or "").partition(".")[0]
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    everywhere = {
        alias.name.partition(".")[0] if isinstance(node, ast.Import) else (node.module or "").partition(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert "jinja2" not in everywhere and "tokenizers" in top_level
    assert not everywhere & {"transformers", "torch", "gptflow", "model", "huggingface_hub"}
