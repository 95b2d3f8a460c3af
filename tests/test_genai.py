"""onnxruntime-genai runs our exported decoder: greedy tokens equal our PyTorch generation, its tokenizer equals
tiktoken on our tokenizer.json. One random tiny model is exported once for the module (about 10 s)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime_genai as og
import pytest
import torch
from conftest import tiny_config

from gptflow.settings import load_settings
from gptflow.storage import write_json_atomic
from gptflow.tokenizer import EOT_ID, encode, tokenizer_files
from model.genai import GENAI_CONFIG, genai_config, genai_files
from model.generate import generate
from model.gpt import GPTModel
from model.lm_export import export_decoder

PROMPTS = [[15496, 11, 995], [464, 2068, 7586, 21831, 18045, 625, 262], [42]]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, mirror):
    """(folder, PyTorch model): the decoder exported as model.onnx beside the genai files."""
    torch.manual_seed(0)
    cfg = tiny_config("gpt")
    model = GPTModel(cfg).eval()
    with torch.no_grad():  # sharper than GPT-2's init, so that greedy tokens change with context and position
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    folder = tmp_path_factory.mktemp("genai")
    export_decoder(model, folder / "model.onnx", {"preset": "tiny"})
    files = genai_files(cfg, tokenizer_files(load_settings(mirror=mirror)))
    assert list(files) == [GENAI_CONFIG, "tokenizer.json", "tokenizer_config.json"]
    for name, content in files.items():
        write_json_atomic(folder / name, content)
    return folder, model


@pytest.fixture(scope="module")
def genai_model(bundle):
    return og.Model(str(bundle[0]))


def until_eos(ids: list[int]) -> list[int]:
    """genai stops a row at eos_token_id (kept); our reference runs on, so compare up to the first EOS."""
    return ids[: ids.index(EOT_ID) + 1] if EOT_ID in ids else ids


def genai_greedy(model: og.Model, rows: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuation of equal-length prompts, one list of new tokens per row."""
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(rows[0]) + new_tokens, batch_size=len(rows))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(rows, dtype=np.int32))
    steps = []
    while not generator.is_done():
        generator.generate_next_token()
        steps.append(generator.get_next_tokens().tolist())
    return [until_eos([step[row] for step in steps]) for row in range(len(rows))]


def torch_greedy(model: GPTModel, rows: list[list[int]], new_tokens: int, **kwargs) -> list[list[int]]:
    out = generate(model, torch.tensor(rows), new_tokens, eos_id=None, **kwargs)
    return [until_eos(row[len(rows[0]) :]) for row in out.tolist()]


@pytest.mark.slow
def test_config_names_the_graph_inputs_and_outputs(bundle):
    folder, model = bundle
    config = json.loads((folder / GENAI_CONFIG).read_text())
    assert config == genai_config(model.cfg)
    decoder = config["model"]["decoder"]
    graph = onnx.load(str(folder / decoder["filename"]), load_external_data=False).graph
    layers = range(decoder["num_hidden_layers"])
    inputs, outputs = decoder["inputs"], decoder["outputs"]
    expected_in = [inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]]
    expected_in += [inputs[f"past_{kind}_names"] % i for i in layers for kind in ("key", "value")]
    expected_out = [outputs["logits"]] + [
        outputs[f"present_{kind}_names"] % i for i in layers for kind in ("key", "value")
    ]
    assert sorted(i.name for i in graph.input) == sorted(expected_in)
    assert sorted(o.name for o in graph.output) == sorted(expected_out)


@pytest.mark.parametrize("prompt", PROMPTS, ids=["hello", "seven", "one"])
@pytest.mark.slow
def test_greedy_tokens_equal_pytorch(bundle, genai_model, prompt):
    _, model = bundle
    got = genai_greedy(genai_model, [prompt], NEW_TOKENS)
    assert got == torch_greedy(model, [prompt], NEW_TOKENS)
    assert len(set(got[0])) > 1  # the model is sharp enough for the comparison to mean something


@pytest.mark.slow
def test_batch_of_equal_length_prompts(bundle, genai_model):
    _, model = bundle
    rows = [PROMPTS[1], [50, 51, 52, 53, 54, 55, 56]]
    got = genai_greedy(genai_model, rows, NEW_TOKENS)
    assert got == torch_greedy(model, rows, NEW_TOKENS)
    assert got[0] != got[1]


@pytest.mark.slow
def test_genai_does_not_mask_left_padding(bundle, genai_model):
    """onnxruntime-genai 0.18 feeds an all-ones attention mask and positions 0..n-1 to every row, so a left-padded
    row is read with its pad tokens as real ones (see model/genai.py). If this fails, genai has started to honour
    padding: batch different-length prompts through it and compare with `generate(..., attention_mask=...)`."""
    _, model = bundle
    short, long = PROMPTS[0], PROMPTS[1]
    rows = [[EOT_ID] * (len(long) - len(short)) + short, long]
    got = genai_greedy(genai_model, rows, NEW_TOKENS)
    assert got == torch_greedy(model, rows, NEW_TOKENS)  # no attention_mask: pads attended, positions from 0
    mask = torch.tensor([[0 if i < len(long) - len(short) else 1 for i in range(len(long))], [1] * len(long)])
    assert got[0] != torch_greedy(model, rows, NEW_TOKENS, attention_mask=mask)[0]


TEXTS = [
    "Hello, world",
    " leading space",
    "two  spaces\n\nnew lines\ttab\r\n",
    "I'm sure they'll pay 12345 or 3.14",
    "no clean-up : it 's spaced , as typed .",
    "héllo wörld — 日本語 🙂",
    "end<|endoftext|>start",
]


@pytest.mark.slow
def test_tokenizer_equals_tiktoken(genai_model, tokenizer):
    tok = og.Tokenizer(genai_model)
    assert tok.encode("Hello, world").tolist() == [15496, 11, 995]
    for text in TEXTS:
        ids = tok.encode(text).tolist()
        assert ids == encode(tokenizer, text), text
        if "<|endoftext|>" not in text:
            assert tok.decode(ids) == text
    # The special token encodes as one id; decoding skips it, as Hugging Face's skip_special_tokens does.
    assert tok.encode("end<|endoftext|>start").tolist() == [437, EOT_ID, 9688]
    assert tok.decode([437, EOT_ID, 9688]) == "endstart"
