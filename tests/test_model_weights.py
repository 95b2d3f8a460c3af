"""GPT-2 weight loading: logits parity with Hugging Face `GPT2LMHeadModel` on files written by its own
`save_pretrained` (the public format), preset table vs GPT2Config, and the error paths."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from cli import main  # noqa: E402
from gptflow.download import DownloadError  # noqa: E402
from gptflow.settings import load_settings  # noqa: E402
from model.config import PRESETS, GPTConfig  # noqa: E402
from model.weights import HF_URL, WeightsError, load_gpt2  # noqa: E402

# The published Hugging Face configs of openai-community/gpt2, -medium, -large, -xl.
HF_CONFIGS = {
    "gpt2-small": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
}


def hf_model(seed: int, **config) -> GPT2LMHeadModel:
    """A GPT2LMHeadModel whose every parameter (biases and LayerNorms too) is random."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.02 if p.ndim > 1 else 0.1)
    return model


def hf_logits(model: GPT2LMHeadModel, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_presets_match_transformers_configs(name):
    hf = GPT2Config(**HF_CONFIGS[name], n_positions=1024, vocab_size=50257)
    ours = PRESETS[name]
    assert (ours.emb_dim, ours.n_layers, ours.n_heads, ours.context_length, ours.vocab_size) == (
        hf.n_embd,
        hf.n_layer,
        hf.n_head,
        hf.n_positions,
        hf.vocab_size,
    )
    assert hf.activation_function == "gelu_new" and hf.layer_norm_epsilon == 1e-5 and hf.tie_word_embeddings


def test_tiny_parity_with_padding_mask(tmp_path):
    hf = hf_model(0, vocab_size=300, n_positions=64, n_embd=48, n_layer=3, n_head=4)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model, cfg = load_gpt2(tmp_path)
    assert cfg == GPTConfig(vocab_size=300, context_length=64, emb_dim=48, n_layers=3, n_heads=4)
    assert model.out_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    ids = torch.randint(0, 300, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 13:] = 0
    ours = model(ids, attention_mask=mask)
    theirs = hf_logits(hf, ids, mask)
    assert (ours[0] - theirs[0]).abs().max().item() <= 1e-4
    assert (ours[1, :13] - theirs[1, :13]).abs().max().item() <= 1e-4
    # The same file, given as a file path, and with its config.json gone: an unknown width needs a config.
    (tmp_path / "config.json").unlink()
    with pytest.raises(WeightsError, match="number of\\s+heads is unknown"):
        load_gpt2(tmp_path / "model.safetensors")


def test_untied_head_parity(tmp_path):
    hf = hf_model(1, vocab_size=200, n_positions=32, n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    model, cfg = load_gpt2(tmp_path)
    assert not cfg.tie_weights
    ids = torch.randint(0, 200, (1, 10))
    assert (model(ids) - hf_logits(hf, ids)).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_gpt2_small_shapes_parity_via_mirror(tmp_path):
    hf = hf_model(2, **HF_CONFIGS["gpt2-small"])
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    ids = torch.randint(0, 50257, (1, 8))
    expected = hf_logits(hf, ids)
    del hf
    model, cfg = load_gpt2(folder)
    assert cfg == PRESETS["gpt2-small"]
    assert (model(ids) - expected).abs().max().item() <= 1e-4
    # A preset name fetches openai-community/gpt2 through the (mirror-aware) download layer.
    mirror = tmp_path / "mirror"
    target = mirror / HF_URL.format(name="gpt2").removeprefix("https://")
    target.parent.mkdir(parents=True)
    target.symlink_to(folder / "model.safetensors")
    by_name, _ = load_gpt2("gpt2-small", load_settings(mirror=mirror, home=tmp_path / "home"))
    assert torch.equal(by_name(ids), model(ids))
    # Weights of one preset validated against another: the error names the tensor and both shapes.
    with pytest.raises(WeightsError, match=r"wte.weight has shape \[50257, 768\], expected \[50257, 1024\]"):
        load_gpt2(folder, preset="gpt2-medium")


def test_bad_inputs(tmp_path):
    with pytest.raises(WeightsError, match="neither a GPT-2 preset"):
        load_gpt2(tmp_path / "nothing")
    (tmp_path / "model.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(WeightsError, match="only .safetensors"):
        load_gpt2(tmp_path / "model.bin")
    (tmp_path / "model.safetensors").write_bytes(b"garbage!" * 3)
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_gpt2(tmp_path)
    header = json.dumps({"foo": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(WeightsError, match="not GPT-2 weights"):
        load_gpt2(tmp_path)
    empty_mirror = tmp_path / "mirror"
    empty_mirror.mkdir()
    with pytest.raises(DownloadError, match="not in the mirror"):
        load_gpt2("gpt2-medium", load_settings(mirror=empty_mirror, home=tmp_path / "home"))


def write_safetensors(path, header, data=b""):
    """A hand-made safetensors file: 8-byte little-endian header length, the JSON header, the data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def f32(shape, begin, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    "header, data, message",
    [
        (
            [1, 2],
            b"",
            ": the safetensors header is a JSON list, expected an object of tensor name -> "
            "{dtype, shape, data_offsets}",
        ),
        (
            {"wte.weight": f32([4], 0, 16), "wpe.weight": f32([2, 2], 16, 32)},
            b"\0" * 32,
            ": tensor wte.weight has shape [4], expected 2 dimensions [vocab, emb]: not GPT-2 weights",
        ),
        (
            {"transformer.wte.weight": f32([4, 2], 0, 32), "transformer.wpe.weight": f32([], 32, 36)},
            b"\0" * 36,
            ": tensor transformer.wpe.weight has shape [], expected 2 dimensions [context, emb]: not GPT-2 weights",
        ),
        (
            {"wte.weight": f32([4, 2], 0, 32)},
            b"\0" * 10,
            " is truncated: tensor wte.weight ends at byte 32 of the data section, which holds 10 bytes",
        ),
        ({"wte.weight": "F32"}, b"", ": header entry 'wte.weight' is not an object of dtype, shape and data_offsets"),
        (
            {"wte.weight": f32([4, -2], 0, 0)},
            b"",
            ": header entry 'wte.weight' has shape [4, -2], expected a list of sizes",
        ),
        (
            {"wte.weight": f32([4, 2], 32, 0)},
            b"\0" * 32,
            ": header entry 'wte.weight' has data_offsets [32, 0], expected [begin, end] with 0 <= begin <= end",
        ),
        (
            b"\xff[",
            b"",
            " is not a safetensors file ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte)",
        ),
    ],
    ids=[
        "header-list",
        "wte-1d",
        "wpe-0d",
        "truncated-data",
        "entry-not-object",
        "negative-size",
        "offsets-reversed",
        "header-not-utf8",
    ],
)
def test_malformed_safetensors(tmp_path, header, data, message):
    path = write_safetensors(tmp_path / "model.safetensors", header, data)
    with pytest.raises(WeightsError) as info:
        load_gpt2(path)
    assert str(info.value) == f"{path}{message}"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", " is not a safetensors file (0 bytes, too short for the 8-byte header length that starts one)"),
        (
            (1000).to_bytes(8, "little") + b"{}",
            " is not a safetensors file (its header length 1000 runs past the end of the file, 10 bytes)",
        ),
    ],
    ids=["empty", "header-length-past-end"],
)
def test_short_safetensors(tmp_path, content, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as info:
        load_gpt2(path)
    assert str(info.value) == f"{path}{message}"


@pytest.mark.parametrize(
    "config, message",
    [
        ("[1]", ": a JSON list, expected a Hugging Face GPT-2 config.json object"),
        (
            "{oops",
            ": not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); "
            "expected a Hugging Face GPT-2 config.json",
        ),
    ],
    ids=["list", "not-json"],
)
def test_bad_config_beside_weights(tmp_path, config, message):
    write_safetensors(tmp_path / "model.safetensors", {"wte.weight": f32([4, 2], 0, 32)}, b"\0" * 32)
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(WeightsError) as info:
        load_gpt2(tmp_path)
    assert str(info.value) == f"{tmp_path / 'config.json'}{message}"


def test_cli_load_gpt2_bad_header(prefect_harness, settings, tmp_path, capsys):
    path = write_safetensors(tmp_path / "model.safetensors", [1, 2])
    assert main(["load-gpt2", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the line may end with where the traceback went
    assert err.startswith(
        f"gptflow load-gpt2: error: {path}: the safetensors header is a JSON list, expected an object of tensor "
        "name -> {dtype, shape, data_offsets}"
    ), err
