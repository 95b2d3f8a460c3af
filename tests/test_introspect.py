"""model.introspect: what `gptflow inspect` measures, checked against the model's own forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from model.checkpoint import CheckpointError, save_model
from model.classifier import SequenceClassifier, save_classifier
from model.config import GPTConfig
from model.configs import InspectConfig
from model.generate import next_token_distribution
from model.gpt import GPTModel, mask_positions
from model.hf_export import save_hf_model
from model.introspect import InspectError, Subject, inspect_model, load_subject, open_subject

PROBE = "Every effort moves you"
PROBE_IDS = [6109, 3626, 6100, 345]
BLOCK_STEPS = [
    "LayerNorm 1",
    "Q",
    "K",
    "V",
    "attention weights",
    "attention output (heads merged)",
    "attention projection",
    "residual 1 (x + attention)",
    "LayerNorm 2",
    "MLP hidden (fc)",
    "GELU",
    "MLP output",
    "residual 2 (block output)",
]


def tiny_model(seed: int = 0, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(tiny_config("gpt", **overrides)).eval()


@pytest.fixture(scope="module")
def lm_report(tokenizer):
    model = tiny_model(n_layers=3)
    report = inspect_model(Subject(None, model), PROBE, InspectConfig(layer=1, head=1, top_k=5), tokenizer)
    with torch.no_grad():
        logits = model(torch.tensor([PROBE_IDS]))[0]
    return report, logits


def test_tokens_shapes_and_trace_steps(lm_report):
    report, logits = lm_report
    assert [t["id"] for t in report["tokens"]] == PROBE_IDS
    assert [t["piece"] for t in report["tokens"]] == ["Every", " effort", " moves", " you"]
    assert [t["token"] for t in report["tokens"]] == ["Every", "Ġeffort", "Ġmoves", "Ġyou"]  # encoder.json's spelling
    assert not any(t["special"] for t in report["tokens"])
    assert report["model"] == {
        "n_layers": 3,
        "n_heads": 2,
        "emb_dim": 64,
        "context_length": 128,
        "vocab_size": 50257,
        "family": "gpt2",
        "n_kv_heads": 2,
        "head_dim": 32,
        "norm": "layernorm",
        "mlp": "gelu",
        "positions": "learned",
        "qk_norm": False,
        "params": tiny_model(n_layers=3).num_params(),
    }
    steps = [(row["part"], row["step"]) for row in report["trace"]]
    assert steps == [
        ("embeddings", "token embedding"),
        ("embeddings", "position embedding"),
        ("embeddings", "token + position"),
        *[("block 0", s) for s in BLOCK_STEPS],
        *[("block 2", s) for s in BLOCK_STEPS],  # block 0 and the last block
        ("output", "final LayerNorm"),
        ("output", "logits"),
    ]
    shapes = {(row["part"], row["step"]): row["shape"] for row in report["trace"]}
    assert shapes["block 0", "Q"] == [1, 2, 4, 32]
    assert shapes["block 2", "attention weights"] == [1, 2, 4, 4]
    assert shapes["block 0", "MLP hidden (fc)"] == [1, 4, 256]
    assert shapes["embeddings", "position embedding"] == [4, 64]
    last = report["trace"][-1]
    assert last["shape"] == [1, 4, 50257]
    assert last["values"] == pytest.approx(logits[-1, :6].tolist(), abs=1e-6)  # the trace's logits are the model's


def test_attention_rows_sum_to_one_and_are_causal(lm_report):
    report, _ = lm_report
    attention = report["attention"]
    assert attention.shape == (3, 2, 4, 4) and attention.dtype == np.float32
    np.testing.assert_allclose(attention.sum(axis=-1), 1.0, atol=1e-6)
    assert np.all(attention[..., np.triu_indices(4, k=1)[0], np.triu_indices(4, k=1)[1]] == 0)
    assert attention[:, :, 0, 0] == pytest.approx(1.0)  # the first token sees only itself
    assert len(report["heads"]) == 6 and report["focus"] == {"layer": 1, "head": 1}
    head = report["heads"][3]  # layer 1, head 1
    a = attention[1, 1]
    assert head["previous_token"] == pytest.approx(np.mean([a[1, 0], a[2, 1], a[3, 2]]), abs=1e-6)
    assert head["first_token"] == pytest.approx(np.mean([a[1, 0], a[2, 0], a[3, 0]]), abs=1e-6)


def test_recorded_attention_computes_what_the_fused_kernel_does():
    model = tiny_model()
    ids = torch.tensor([[5, 6, 7, 8, 9], [50256, 50256, 11, 12, 13]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        fused = model(ids, attention_mask=mask, position_ids=mask_positions(mask))
        plain = model(ids)
        with model.recording_attention() as weights:
            recorded = model(ids, attention_mask=mask, position_ids=mask_positions(mask))
            recorded_plain = model(ids)
    torch.testing.assert_close(recorded, fused, atol=1e-5, rtol=0)
    torch.testing.assert_close(recorded_plain, plain, atol=1e-5, rtol=0)
    assert len(weights) == 4 and weights[0].shape == (2, 2, 5, 5)
    assert torch.all(weights[0][1, :, 2:, :2] == 0)  # left padding is never attended to
    assert model.blocks[0].attn.recorded is None  # recording ends with the block


def test_logit_lens_last_block_equals_the_model_logits(lm_report):
    report, logits = lm_report
    lens = report["logit_lens"]
    assert lens["layers"] == ["embeddings", "block 0", "block 1", "block 2"]
    probs = logits.softmax(-1)
    assert lens["top1_prob"][-1] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-6)
    top1 = probs.argmax(-1).tolist()
    assert lens["final_prob"][-1] == pytest.approx(float(probs[-1].max()), abs=1e-6)
    assert [row["id"] for row in report["next_token"]] == probs[-1].topk(5).indices.tolist()
    assert report["next_token"][0]["id"] == top1[-1]
    assert lens["top1_piece"][-1][-1] == report["next_token"][0]["piece"]
    assert [p["probability"] for p in lens["top_k_last"][-1]] == pytest.approx(probs[-1].topk(5).values.tolist())


def test_sampling_effects_follow_the_generation_distribution(lm_report):
    report, logits = lm_report
    settings = {s["name"]: s for s in report["sampling"]["settings"]}
    assert list(settings) == ["greedy", "T=0.5", "T=1", "T=2", "top-k 5", "top-p 0.9"]
    assert settings["greedy"]["support"] == 1 and settings["greedy"]["entropy"] == 0.0
    assert settings["greedy"]["probs"][0] == 1.0
    assert settings["top-k 5"]["support"] == 5
    assert settings["T=0.5"]["entropy"] < settings["T=1"]["entropy"] < settings["T=2"]["entropy"]
    expected = next_token_distribution(logits[-1:], temperature=2.0)[0]
    ids = report["sampling"]["ids"]
    assert settings["T=2"]["probs"] == pytest.approx(expected[ids].tolist(), abs=1e-7)
    assert settings["top-p 0.9"]["support"] <= 50257


def test_positions_separate_a_shuffled_probe_only_with_positional_embeddings(lm_report):
    positions = lm_report[0]["embeddings"]["positions"]
    order = positions["order"]
    assert sorted(order) == [0, 1, 2, 3] and order != [0, 1, 2, 3]
    assert positions["shift_without"] == 0.0 and positions["shift_with"] > 0.01
    without = positions["without"]
    np.testing.assert_allclose(np.array(without["original"])[order], without["shuffled"], atol=1e-9)
    words = lm_report[0]["embeddings"]["words"]
    assert len(words["xy"]) == len(words["labels"]) == len(InspectConfig().words)
    assert 0 < words["explained_variance"][1] <= words["explained_variance"][0] < 1


def test_classifier_shows_its_backbone_and_class_probabilities(tmp_path, tokenizer):
    classifier = SequenceClassifier(tiny_model(), 3).eval()
    path = save_classifier(tmp_path / "best.pt", classifier, {"ham": 0, "spam": 1, "promo": 2}, 32, {"data": "x"})
    subject = load_subject(open_subject(tmp_path))
    assert subject.kind == "classifier" and subject.labels == ["ham", "spam", "promo"]
    report = inspect_model(subject, PROBE, InspectConfig(), tokenizer)
    with torch.no_grad():
        expected = subject.classifier(torch.tensor([PROBE_IDS]), torch.ones(1, 4, dtype=torch.long))[0].softmax(-1)
    assert [c["label"] for c in report["classes"]] == ["ham", "spam", "promo"]
    assert [c["probability"] for c in report["classes"]] == pytest.approx(expected.tolist(), abs=1e-6)
    lens = report["logit_lens"]
    assert [p["probability"] for p in lens["top_k_last"][-1]] == pytest.approx(expected.tolist(), abs=1e-6)
    assert report["trace"][-1]["step"] == "class logits (pooled)" and report["trace"][-1]["shape"] == [1, 3]
    assert "next_token" not in report and "sampling" not in report
    assert report["checkpoint"] == str(path)


def test_gpt2_format_and_gptflow_checkpoints_load_for_inspection(tmp_path, tokenizer):
    model = tiny_model(seed=3)
    save_hf_model(model, tmp_path / "hf")
    save_model(tmp_path / "lm" / "model.pt", model, style="alpaca")
    ids = torch.tensor([PROBE_IDS])
    for spec, style in ((tmp_path / "hf", None), (tmp_path / "lm", "alpaca")):
        subject = load_subject(open_subject(spec))
        assert subject.kind == "lm" and subject.style == style
        with torch.no_grad():
            torch.testing.assert_close(subject.model.eval()(ids), model(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("text", "config", "message"),
    [
        ("", InspectConfig(), "the probe text is empty"),
        ("  \n", InspectConfig(), "the probe text is empty"),
        ("word" + " word" * 199, InspectConfig(), "the probe text is 200 tokens; the model reads at most 128"),
        (PROBE, InspectConfig(layer=2), "--layer 2: the model has 2 layers (0-1)"),
        (PROBE, InspectConfig(head=5), "--head 5: the model has 2 heads per layer (0-1)"),
    ],
)
def test_bad_probe_or_layer_is_one_line(tokenizer, text, config, message):
    with pytest.raises(InspectError) as caught:
        inspect_model(Subject(None, tiny_model()), text, config, tokenizer)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_file_that_is_not_a_model_is_refused_in_one_line(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    for path in (text, png):
        with pytest.raises(CheckpointError) as caught:
            load_subject(open_subject(path))
        assert str(caught.value) == f"{path} is not a PyTorch checkpoint (expected the zip archive torch.save writes)"
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else", "weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError) as caught:
        open_subject(other)
    assert str(caught.value) == (
        f"{other} is not a gptflow checkpoint (format 'something-else'); expected a language-model checkpoint or a "
        "classifier checkpoint or GPT-2 weights"
    )


def test_gpt2_special_tokens_and_vocabulary_spelling(tokenizer):
    """GPT-2's `<|endoftext|>` written in the probe is its special token; pieces are text, entries encoder.json's."""
    report = inspect_model(Subject(None, tiny_model()), "Hi\n<|endoftext|> you", InspectConfig(), tokenizer)
    tokens = report["tokens"]
    assert [t["id"] for t in tokens] == [17250, 198, 50256, 345]
    assert [t["piece"] for t in tokens] == ["Hi", "\n", "<|endoftext|>", " you"]
    assert [t["token"] for t in tokens] == ["Hi", "Ċ", "<|endoftext|>", "Ġyou"]
    assert [t["special"] for t in tokens] == [False, False, True, False]
    assert report["embeddings"]["positions"]["kind"] == "learned"
    assert {h["kv_head"] for h in report["heads"]} == {0, 1}  # one key/value head per query head


def test_rotary_grouped_query_model_without_position_embeddings(tokenizer):
    """`llama-mini`'s switches at a tiny width (GPT-2's BPE, rotary positions, 2 query heads per key/value head):
    no position-embedding step, K/V with the key/value heads, and positions shown on block 0's rotated keys."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("llama-mini", context_length=32, emb_dim=32, n_layers=2, n_heads=4, mlp_hidden=48)
    model = GPTModel(cfg).eval()
    report = inspect_model(Subject(None, model), PROBE, InspectConfig(), tokenizer)
    steps = [(row["part"], row["step"]) for row in report["trace"]]
    shapes = {(row["part"], row["step"]): row["shape"] for row in report["trace"]}
    assert steps[0] == ("embeddings", "token embedding") and steps[1] == ("block 0", "RMSNorm 1")
    assert shapes["block 0", "Q"] == [1, 4, 4, 8] and shapes["block 0", "K"] == shapes["block 0", "V"] == [1, 2, 4, 8]
    assert shapes["block 0", "K rotated (RoPE)"] == [1, 2, 4, 8]
    assert steps[-2] == ("output", "final RMSNorm")
    attention = report["attention"]
    assert attention.shape == (2, 4, 4, 4)
    np.testing.assert_allclose(attention.sum(axis=-1), 1.0, atol=1e-6)
    assert [h["kv_head"] for h in report["heads"][:4]] == [0, 0, 1, 1]
    positions = report["embeddings"]["positions"]
    assert positions["kind"] == "rotary"
    assert positions["shift_without"] == 0.0 and positions["shift_with"] > 0.01
    with torch.no_grad():
        logits = model(torch.tensor([PROBE_IDS]))[0]
    assert report["logit_lens"]["top1_prob"][-1] == pytest.approx(logits.softmax(-1).max(-1).values.tolist(), abs=1e-6)
