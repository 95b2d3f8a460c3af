"""`gptflow inspect` on every family: tiny random-weight Hugging Face models (SmolLM-like Llama, Llama 3.2 with its
rotary scaling and a begin-of-text token, Qwen3 with q/k norm and a head wider than emb/heads, GPT-2's architecture
with another vocabulary), written by transformers, converted with `convert_hf`, then inspected. The numbers are
checked against transformers itself: token ids, pieces and special tokens against its tokenizer, attention weights
against its eager attention (grouped-query heads included), the logit lens's last layer against its logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_fixtures import write_tokenizer

from cli import main
from eval.introspection import render_inspection, table_rows
from gptflow.settings import load_settings
from model.configs import InspectConfig
from model.hf_models import convert_hf
from model.introspect import InspectError, inspect_model, load_subject, open_subject

FAMILIES = ("smollm", "llama32", "qwen3", "gpt2-vocab")
STYLES = {"smollm": "chatml", "llama32": "llama3", "qwen3": "qwen3", "gpt2-vocab": "chatml"}
# A special token of two of the vocabularies (the third adds its begin-of-text), a non-ASCII word, digits.
PROBE = "Every effort moves you<|im_end|> to the café in 2024"
ROPE = ("smollm", "llama32", "qwen3")


def _hf_model(name: str, vocab_size: int):
    """A tiny model of the family, with eager attention so that transformers returns its attention weights."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(sum(map(ord, name)))
    eager = {"attn_implementation": "eager"}
    if name == "smollm":  # SmolLM's 3 query heads per key/value head
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=256, rope_theta=100000.0, tie_word_embeddings=True, **eager,
        )  # fmt: skip
        return LlamaForCausalLM(config)
    if name == "llama32":  # Llama 3.2's rotary scaling, one key/value head for four query heads, an untied head
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
            intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16, "rope_theta": 500000.0}, **eager,
        )  # fmt: skip
        return LlamaForCausalLM(config)
    if name == "qwen3":  # q/k norm, a head of 32 on a 64-wide model with 4 heads
        config = Qwen3Config(
            vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True, **eager,
        )  # fmt: skip
        return Qwen3ForCausalLM(config)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64, **eager)
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def families(tmp_path_factory, mirror) -> dict[str, dict]:
    """Per family: the converted checkpoint, transformers' model and tokenizer, and the inspection report."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("families")
    settings = load_settings(home=root / "home", mirror=mirror)
    out = {}
    for name in FAMILIES:
        folder = root / name
        vocab = write_tokenizer(folder, STYLES[name]).vocab_size
        theirs = _hf_model(name, vocab).eval()
        theirs.save_pretrained(folder)
        write_tokenizer(folder, STYLES[name])  # the tokenizer's generation_config.json, as a real repo has
        checkpoint, _ = convert_hf(folder, settings)
        opened = open_subject(checkpoint)
        report = inspect_model(load_subject(opened), PROBE, InspectConfig(top_k=5), opened.tokenizer())
        out[name] = {
            "checkpoint": checkpoint,
            "theirs": theirs,
            "tokenizer": AutoTokenizer.from_pretrained(folder),
            "report": report,
            "config": opened.config,
        }
    return out


@pytest.fixture(scope="module")
def transformers_pass(families) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
    """Per family: transformers' attention weights (layers, heads, T, T) and logits (T, V) on the probe's ids."""
    out = {}
    for name, family in families.items():
        ids = torch.tensor([[t["id"] for t in family["report"]["tokens"]]])
        with torch.no_grad():
            result = family["theirs"](ids, output_attentions=True)
        out[name] = (torch.stack([a[0] for a in result.attentions]).numpy(), result.logits[0])
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_tokens_are_the_models_own(families, name):
    family = families[name]
    hf, report = family["tokenizer"], family["report"]
    ids = [t["id"] for t in report["tokens"]]
    assert ids == hf(PROBE).input_ids  # as transformers' tokenizer reads plain text, its special tokens added
    assert [t["piece"] for t in report["tokens"]] == [hf.decode([i]) for i in ids]
    assert [t["token"] for t in report["tokens"]] == hf.convert_ids_to_tokens(ids)
    special = set(hf.all_special_ids)
    assert [t["special"] for t in report["tokens"]] == [i in special for i in ids]
    if name == "llama32":
        assert ids[0] == hf.bos_token_id and report["tokens"][0]["piece"] == "<|begin_of_text|>"
        assert report["tokens"][0]["special"] and not any(t["special"] for t in report["tokens"][1:])
    else:  # `<|im_end|>` is one special token of these vocabularies
        im_end = hf.convert_tokens_to_ids("<|im_end|>")
        assert [t["special"] for t in report["tokens"]].count(True) == 1 and im_end in ids
        assert report["tokens"][ids.index(im_end)]["special"]
    assert " café" in [t["piece"] for t in report["tokens"]] or any("é" in t["piece"] for t in report["tokens"])
    rows = table_rows(report)["tokens"]
    assert "vocabulary entry" in rows[0] and any(r["vocabulary entry"].startswith("Ġ") for r in rows)


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_per_query_head_equals_transformers(families, transformers_pass, name):
    report, cfg = families[name]["report"], families[name]["config"]
    attention = report["attention"]
    T = len(report["tokens"])
    assert attention.shape == (cfg.n_layers, cfg.n_heads, T, T) and attention.dtype == np.float32
    np.testing.assert_allclose(attention.sum(axis=-1), 1.0, atol=1e-5)
    above = np.triu_indices(T, k=1)
    assert np.all(attention[..., above[0], above[1]] == 0)
    theirs, _ = transformers_pass[name]
    np.testing.assert_allclose(attention, theirs, atol=2e-5, rtol=0)
    group = cfg.n_heads // cfg.kv_heads
    assert [h["kv_head"] for h in report["heads"]] == [
        h // group for _ in range(cfg.n_layers) for h in range(cfg.n_heads)
    ]
    assert report["model"]["n_kv_heads"] == cfg.kv_heads and report["model"]["family"] == cfg.family
    if name != "gpt2-vocab":
        assert cfg.kv_heads < cfg.n_heads  # grouped-query layers
        assert "kv_head" in table_rows(report)["heads"][0]


@pytest.mark.parametrize("name", FAMILIES)
def test_trace_names_the_familys_parts(families, name):
    report, cfg = families[name]["report"], families[name]["config"]
    T, H, KV, D = len(report["tokens"]), cfg.n_heads, cfg.kv_heads, cfg.head_dim
    last = f"block {cfg.n_layers - 1}"
    steps = [(r["part"], r["step"]) for r in report["trace"]]
    shapes = {(r["part"], r["step"]): r["shape"] for r in report["trace"]}
    modules = {(r["part"], r["step"]): r["module"] for r in report["trace"]}
    assert {part for part, _ in steps} == {"embeddings", "block 0", last, "output"}
    assert shapes["block 0", "Q"] == [1, H, T, D] and shapes[last, "Q"] == [1, H, T, D]
    assert shapes["block 0", "K"] == shapes["block 0", "V"] == [1, KV, T, D]
    assert shapes["block 0", "attention weights"] == [1, H, T, T]
    assert shapes["block 0", "attention output (heads merged)"] == [1, T, H * D]
    assert steps[-1] == ("output", "logits") and shapes[steps[-1]] == [1, T, cfg.vocab_size]
    if name in ROPE:
        norm = "RMSNorm"
        assert [s for p, s in steps if p == "embeddings"] == ["token embedding"]  # no position embedding to trace
        assert not any("pos_emb" in m for m in modules.values())
        assert shapes["block 0", "Q rotated (RoPE)"] == [1, H, T, D]
        assert shapes["block 0", "K rotated (RoPE)"] == [1, KV, T, D]
        assert shapes["block 0", "MLP gate (fc, first half)"] == shapes["block 0", "MLP up (fc, second half)"]
        assert shapes["block 0", "SwiGLU: silu(gate) * up"] == [1, T, cfg.hidden_dim]
        assert "GELU" not in [s for _, s in steps]
    else:
        norm = "LayerNorm"
        assert [s for p, s in steps if p == "embeddings"] == [
            "token embedding",
            "position embedding",
            "token + position",
        ]
        assert shapes["block 0", "MLP hidden (fc)"] == [1, T, 4 * cfg.emb_dim] and ("block 0", "GELU") in steps
        assert not any("rotated" in s for _, s in steps)
    assert {"block 0", last} == {p for p, s in steps if s == f"{norm} 1"} == {p for p, s in steps if s == f"{norm} 2"}
    assert ("output", f"final {norm}") in steps
    qk_norm = [(s, modules[p, s]) for p, s in steps if p == "block 0" and "norm (" in s]
    if name == "qwen3":
        assert qk_norm == [
            ("Q after q_norm (RMSNorm per head)", "blocks.0.attn.q_norm"),
            ("K after k_norm (RMSNorm per head)", "blocks.0.attn.k_norm"),
        ]
        order = [s for p, s in steps if p == "block 0"]
        assert order.index("K after k_norm (RMSNorm per head)") < order.index("Q rotated (RoPE)")  # norm, then rotate
    else:
        assert qk_norm == []


@pytest.mark.parametrize("name", FAMILIES)
def test_logit_lens_last_layer_equals_the_models_logits(families, transformers_pass, name):
    family = families[name]
    report = family["report"]
    ids = torch.tensor([[t["id"] for t in report["tokens"]]])
    model = load_subject(open_subject(family["checkpoint"])).model
    with torch.no_grad():
        ours = model(ids)[0]
    _, theirs = transformers_pass[name]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    lens = report["logit_lens"]
    assert lens["layers"] == ["embeddings"] + [f"block {i}" for i in range(family["config"].n_layers)]
    probs = ours.softmax(-1)
    assert lens["top1_prob"][-1] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-6)
    assert lens["final_prob"][-1] == pytest.approx(float(probs[-1].max()), abs=1e-6)
    assert [row["id"] for row in report["next_token"]] == theirs[-1].topk(5).indices.tolist()
    hf = family["tokenizer"]
    assert [row["piece"] for row in report["next_token"]] == [hf.decode([row["id"]]) for row in report["next_token"]]
    assert lens["top1_piece"][-1] == [hf.decode([i]) for i in probs.argmax(-1).tolist()]
    assert report["sampling"]["pieces"] == [hf.decode([i]) for i in report["sampling"]["ids"]]


@pytest.mark.slow  # renders the figures
@pytest.mark.parametrize("name", FAMILIES)
def test_positions_without_position_embeddings(families, name, tmp_path):
    """Rotary models have no position embeddings: the positions panel shows block 0's keys without and with the
    rotation, and the report says so; a learned-position model keeps its embeddings."""
    report = families[name]["report"]
    positions = report["embeddings"]["positions"]
    assert positions["kind"] == ("rotary" if name in ROPE else "learned")
    assert positions["shift_without"] == 0.0 and positions["shift_with"] > 0.01
    words = report["embeddings"]["words"]
    assert len(words["xy"]) == len(InspectConfig().words)

    files = render_inspection(report, tmp_path)
    markdown = Path(files["report"]).read_text(encoding="utf-8")
    assert all(Path(p).is_file() for p in files["figures"].values())
    if name in ROPE:
        assert "This model has no position embeddings: its positions are rotary (RoPE)" in markdown
        assert "rotary positions (RoPE)" in markdown
    else:
        assert "with positional embeddings added" in markdown
        assert "Blocks: LayerNorm, a GELU MLP, learned position embeddings." in markdown
    if name == "smollm":
        assert "Grouped-query attention: 6 query heads share 2 key/value heads, 3 query heads each" in markdown
    if name == "qwen3":
        assert "RMSNorm on each head's queries and keys (`q_norm`, `k_norm`)" in markdown


def test_another_models_tokenizer_is_refused_in_one_line(families, tokenizer):
    """GPT-2's vocabulary on a model of 1,100 tokens: ids outside its embedding, refused before any forward pass."""
    family = families["qwen3"]
    subject = load_subject(open_subject(family["checkpoint"]))
    with pytest.raises(InspectError) as caught:
        inspect_model(subject, "Every effort moves you", InspectConfig(), tokenizer)
    message = str(caught.value)
    assert "outside the model's vocabulary of" in message and "the tokenizer is not the model's" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["llama32", "qwen3"])
def test_inspect_cli_on_a_converted_checkpoint(prefect_harness, settings, families, tmp_path, capsys, name):
    family = families[name]
    cfg = family["config"]
    out = tmp_path / "look"
    argv = ["inspect", str(family["checkpoint"]), PROBE, "--layer", "1", "--head", str(cfg.n_heads - 1)]
    assert main([*argv, "--top-k", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"inspected {family['checkpoint']} (lm)" in printed
    report = json.loads((out / "report.json").read_text())
    assert [t["id"] for t in report["tokens"]] == family["tokenizer"](PROBE).input_ids
    assert report["model"]["positions"] == "rope" and report["embeddings"]["positions"]["kind"] == "rotary"
    assert np.load(out / "attention.npy").shape == (
        cfg.n_layers,
        cfg.n_heads,
        len(report["tokens"]),
        len(report["tokens"]),
    )
    names = {p.name for p in out.iterdir()}
    assert {f"attention_layer01_head{cfg.n_heads - 1:02d}.png", "embeddings_positions.png", "logit_lens.png"} <= names
    # the probe is measured in the model's own tokens before the flow starts
    assert main(["inspect", str(family["checkpoint"]), PROBE, "--head", str(cfg.n_heads)]) == 2
    assert f"--head {cfg.n_heads}: the model has {cfg.n_heads} heads per layer" in capsys.readouterr().err


def test_a_classifier_on_a_qwen3_backbone_reads_its_own_tokenizer(families, tmp_path):
    """A classifier fine-tuned from a converted Qwen3 keeps its tokenizer; inspect reads the probe with it and shows
    the backbone's rotary, grouped-query layers with class probabilities in place of next tokens."""
    from model.checkpoint import load_checkpoint
    from model.classifier import SequenceClassifier, save_classifier

    family = families["qwen3"]
    backbone = load_subject(open_subject(family["checkpoint"])).model
    torch.manual_seed(0)
    classifier = SequenceClassifier(backbone, 2, pad_id=family["tokenizer"].pad_token_id).eval()
    files = load_checkpoint(family["checkpoint"])["tokenizer"]
    path = save_classifier(tmp_path / "best.pt", classifier, {"ham": 0, "spam": 1}, 32, {"data": "x"}, tokenizer=files)
    opened = open_subject(path)
    report = inspect_model(load_subject(opened), PROBE, InspectConfig(), opened.tokenizer())
    ids = [t["id"] for t in report["tokens"]]
    assert ids == family["tokenizer"](PROBE).input_ids and report["kind"] == "classifier"
    with torch.no_grad():
        expected = classifier(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0].softmax(-1)
    assert [c["probability"] for c in report["classes"]] == pytest.approx(expected.tolist(), abs=1e-6)
    assert report["embeddings"]["positions"]["kind"] == "rotary" and "kv_head" in report["heads"][0]
