"""eval.introspection renders an inspection report (what model.introspect.inspect_model returns) as files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from eval.introspection import render_inspection, table_rows

N_LAYERS, N_HEADS = 2, 2
# Odd pieces on purpose: a pipe and a newline (markdown table), mathtext that would not parse, a special token.
PIECES = ["The", " cat|\n", " sat", "$_$", "<|endoftext|>"]
T = len(PIECES)
# How each piece must read in the markdown source: visible spaces and newlines, markdown characters escaped.
PIECES_IN_MARKDOWN = ["The", r"␣cat\|\\n", "␣sat", r"\$\_\$", r"\<\|endoftext\|\>"]
CLASSES = ["negative", "neutral", "positive"]


def causal_attention(rng: np.random.Generator) -> np.ndarray:
    """Softmax weights over keys 0..i for each query i: rows sum to 1, zero above the diagonal."""
    scores = np.where(np.tril(np.ones((T, T), bool)), np.exp(rng.normal(size=(N_LAYERS, N_HEADS, T, T))), 0.0)
    return (scores / scores.sum(-1, keepdims=True)).astype(np.float32)


def head_stats(attention: np.ndarray) -> list[dict]:
    rows = []
    for layer, head in np.ndindex(N_LAYERS, N_HEADS):
        w = attention[layer, head].astype(float)
        queries = range(1, T)
        entropy = -np.sum(w * np.log(np.where(w > 0, w, 1.0)), axis=-1)
        rows.append(
            {
                "layer": layer,
                "head": head,
                "previous_token": float(np.mean([w[i, i - 1] for i in queries])),
                "first_token": float(np.mean([w[i, 0] for i in queries])),
                "self": float(np.mean([w[i, i] for i in queries])),
                "entropy": float(entropy.mean()),
            }
        )
    return rows


def make_report(kind: str) -> dict:
    rng = np.random.default_rng(0)
    attention = causal_attention(rng)
    layers = ["embeddings"] + [f"block {i}" for i in range(N_LAYERS)]
    classifier = kind == "classifier"
    columns = 1 if classifier else T
    top1 = [[CLASSES[(r + c) % 3] if classifier else PIECES[(r + c) % T] for c in range(columns)] for r in range(3)]
    xy = rng.normal(size=(T, 2))
    order = [2, 0, 4, 1, 3]
    position_xy = rng.normal(scale=0.5, size=(T, 2))
    report = {
        "checkpoint": "/tmp/run_1/model.pt",
        "kind": kind,
        "text": "The cat|\n sat $_$<|endoftext|>",
        "style": "alpaca" if not classifier else None,
        "model": {
            "n_layers": N_LAYERS,
            "n_heads": N_HEADS,
            "emb_dim": 8,
            "context_length": 16,
            "vocab_size": 50257,
            "params": 123456,
        },
        "tokens": [
            {"position": i, "id": 100 + i, "piece": p, "special": p == "<|endoftext|>"} for i, p in enumerate(PIECES)
        ],
        "trace": [
            {
                "part": "embeddings",
                "step": "token embedding",
                "module": "tok_emb",
                "shape": [1, T, 8],
                "mean": 0.123456789,
                "std": 1.0,
                "values": [0.1, -0.25, 3.14159265, 0.0, 1e-05, 2.0],
            },
            {
                "part": "block 0",
                "step": "attention weights",
                "module": "blocks.0.attn",
                "shape": [1, N_HEADS, T, T],
                "mean": 0.2,
                "std": 0.31,
                "values": [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            },
            {
                "part": "output",
                "step": "logits",
                "module": "out_head",
                "shape": [1, T, 50257],
                "mean": -1.5,
                "std": 2.75,
                "values": [-1.0, 2.0, 0.5, 0.25, -3.0, 1.0],
            },
        ],
        "attention": attention,
        "heads": head_stats(attention),
        "focus": {"layer": 1, "head": 0},
        "logit_lens": {
            "layers": layers,
            "pieces": PIECES,
            "top1_piece": top1,
            "top1_prob": [[round(0.2 + 0.3 * r + 0.02 * c, 3) for c in range(columns)] for r in range(3)],
            "final_prob": [0.1, 0.4, 0.9],
            "top_k_last": [
                [{"piece": label, "probability": p} for label, p in zip(CLASSES, (0.2, 0.3, 0.5))]
                if classifier
                else [{"piece": " mat", "probability": 0.5}, {"piece": "\n", "probability": 0.25}]
                for _ in layers
            ],
        },
        "embeddings": {
            "words": {
                "labels": ["king", "queen", " man", "woman"],
                "xy": rng.normal(size=(4, 2)).tolist(),
                "explained_variance": [0.31, 0.17],
            },
            "positions": {
                "sentence": "The cat| sat",
                "pieces": PIECES,
                "order": order,
                "without": {"original": xy.tolist(), "shuffled": xy[order].tolist()},
                "with": {"original": (xy + position_xy).tolist(), "shuffled": (xy[order] + position_xy).tolist()},
                "shift_without": 0.0,
                "shift_with": float(np.linalg.norm(position_xy - position_xy[np.argsort(order)], axis=1).mean()),
            },
        },
    }
    if classifier:
        report["classes"] = [
            {"label": label, "probability": p, "logit": logit}
            for label, p, logit in zip(CLASSES, (0.2, 0.3, 0.5), (-0.4, 0.0, 0.51))
        ]
    else:
        report["next_token"] = [
            {"rank": 1, "id": 2603, "piece": " mat", "probability": 0.5, "logit": 7.25},
            {"rank": 2, "id": 198, "piece": "\n", "probability": 0.25, "logit": 6.5},
            {"rank": 3, "id": 91, "piece": "|", "probability": 0.125, "logit": 5.8},
        ]
        report["sampling"] = {
            "ids": [2603, 198, 91, 11],
            "pieces": [" mat", "\n", "|", ","],
            "settings": [
                {
                    "name": "greedy",
                    "temperature": 0.0,
                    "top_k": None,
                    "top_p": None,
                    "probs": [1.0, 0.0, 0.0, 0.0],
                    "entropy": 0.0,
                    "support": 1,
                },
                {
                    "name": "T=1",
                    "temperature": 1.0,
                    "top_k": None,
                    "top_p": None,
                    "probs": [0.5, 0.25, 0.125, 0.0625],
                    "entropy": 2.123456,
                    "support": 50257,
                },
                {
                    "name": "top-k 2",
                    "temperature": 1.0,
                    "top_k": 2,
                    "top_p": None,
                    "probs": [0.6667, 0.3333, 0.0, 0.0],
                    "entropy": 0.6365,
                    "support": 2,
                },
            ],
        }
    return report


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


def plain(value) -> bool:
    """Only JSON's own Python types (no numpy scalars, which json.dumps might also accept)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return value is None or type(value) in (bool, int, float, str)


@pytest.fixture(scope="module", params=["lm", "classifier"])
def rendered(request, tmp_path_factory) -> tuple[dict, dict, Path]:
    """One render per kind, shared by the tests (rendering is what takes the time)."""
    report = make_report(request.param)
    out = tmp_path_factory.mktemp(request.param) / "inspect"
    return report, render_inspection(report, out), out


def test_render_writes_every_file(rendered):
    report, result, out = rendered
    kind = report["kind"]

    last = "classes" if kind == "classifier" else "sampling"
    expected = {
        "attention-layer-0": "attention_layer00.png",
        "attention-layer-1": "attention_layer01.png",
        "attention-focus": "attention_layer01_head00.png",
        "logit-lens": "logit_lens.png",
        "embeddings-words": "embeddings_words.png",
        "embeddings-positions": "embeddings_positions.png",
        last: f"{last}.png",
    }
    assert {name: Path(path).name for name, path in result["figures"].items()} == expected
    assert all(isinstance(path, str) for path in [result["report"], result["json"], result["attention"]])
    # nothing else in the folder: no temporary file left behind by the atomic writes
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*expected.values(), "report.md", "report.json", "attention.npy"]
    )

    for name, path in result["figures"].items():
        width, height = png_size(Path(path))
        assert width >= 300 and height >= 250, (name, width, height)
        if name == "attention-focus":
            assert 0.8 < width / height < 1.3, (name, width, height)  # a square map plus its colour bar
        else:
            assert width > height, (name, width, height)  # 2 heads side by side, panels side by side, bars

    saved = json.loads(Path(result["json"]).read_text(encoding="utf-8"))
    assert "attention" not in saved
    assert saved == json.loads(json.dumps({k: v for k, v in report.items() if k != "attention"}))

    attention = np.load(result["attention"])
    assert attention.dtype == np.float32 and np.array_equal(attention, report["attention"])


def test_markdown_report(rendered):
    report, result, _ = rendered
    kind = report["kind"]
    markdown = Path(result["report"]).read_text(encoding="utf-8")

    assert markdown.startswith(rf"# Inspection of /tmp/run\_1/model.pt ({kind})")
    for piece in PIECES_IN_MARKDOWN:
        assert piece in markdown
    assert r"| 1 | 101 | ␣cat\|\\n | no |" in markdown  # the pipe cannot split the row, the newline is visible
    assert "cat|\n" not in markdown.replace("```\nThe cat|\n sat", "")  # raw only inside the probe's code fence
    for path in result["figures"].values():
        assert f"]({Path(path).name})" in markdown

    previous = max(report["heads"], key=lambda h: h["previous_token"])
    first = max(report["heads"], key=lambda h: h["first_token"])
    assert f"Layer {previous['layer']} head {previous['head']} attends most to the previous token" in markdown
    assert f"layer {first['layer']} head {first['head']} attends most to the first token" in markdown
    assert "| token embedding | tok\\_emb | 1×5×8 | 0.1235 | 1 | 0.1, -0.25, 3.142, 0, 1e-05, 2 |" in markdown
    if kind == "lm":
        assert "| 1 | 2603 | ␣mat | 0.5 | 7.25 |" in markdown
        assert "| T=1 | 1 |  |  | 2.123 | 50257 |" in markdown
        assert "## Sampling" in markdown and "## Classes" not in markdown
    else:
        assert "| positive | 0.5 | 0.51 |" in markdown
        assert "## Classes" in markdown and "## Sampling" not in markdown


@pytest.mark.parametrize("kind", ["lm", "classifier"])
def test_table_rows(kind):
    report = make_report(kind)
    rows = table_rows(report)

    if kind == "lm":
        assert list(rows) == ["tokens", "trace", "heads", "next-token", "logit-lens", "sampling"]
        assert len(rows["next-token"]) == 3 and len(rows["sampling"]) == 3
        assert rows["next-token"][1]["piece"] == r"\n"
        assert rows["sampling"][1] == {
            "name": "T=1",
            "temperature": 1.0,
            "top_k": None,
            "top_p": None,
            "entropy": 2.123,
            "support": 50257,
        }
        lens_row = rows["logit-lens"][1]
        assert list(lens_row) == ["layer", "0 The", r"1 ␣cat|\n", "2 ␣sat", "3 $_$", "4 <|endoftex"]
        assert lens_row["layer"] == "block 0" and lens_row["0 The"] == "␣cat|\\n (0.5)"
    else:
        assert list(rows) == ["tokens", "trace", "heads", "classes", "logit-lens"]
        assert rows["classes"][2] == {"label": "positive", "probability": 0.5, "logit": 0.51}
        assert rows["logit-lens"][0] == {
            "layer": "embeddings",
            "top class": "negative (0.2)",
            "p negative": 0.2,
            "p neutral": 0.3,
            "p positive": 0.5,
        }
    assert len(rows["tokens"]) == T
    assert rows["tokens"][1] == {"position": 1, "id": 101, "piece": "␣cat|\\n", "special": False}
    assert rows["tokens"][4]["special"] is True
    assert len(rows["trace"]) == len(report["trace"])
    assert rows["trace"][0]["mean"] == 0.1235 and rows["trace"][0]["shape"] == "1×5×8"
    assert len(rows["heads"]) == N_LAYERS * N_HEADS
    previous = [row["previous_token"] for row in rows["heads"]]
    assert previous == sorted(previous, reverse=True)
    assert len(rows["logit-lens"]) == N_LAYERS + 1
    assert plain(rows)
    json.dumps(rows)


def test_heads_without_statistics_sort_last():
    """A one-token probe has no previous token: its head statistics are None, and a table still sorts them."""
    report = make_report("lm")
    report["heads"][1].update(previous_token=None, first_token=None, self=None)
    heads = table_rows(report)["heads"]
    assert heads[-1] == {
        "layer": 0,
        "head": 1,
        "previous_token": None,
        "first_token": None,
        "self": None,
        "entropy": float(f"{report['heads'][1]['entropy']:.4g}"),
    }
    assert [h["previous_token"] for h in heads[:-1]] == sorted((h["previous_token"] for h in heads[:-1]), reverse=True)


def test_a_rotary_grouped_query_report(tmp_path):
    """A Llama-family report: its shape and switches in the model section, the vocabulary's own spelling beside each
    piece, the key/value head of each query head, and positions that are rotary (no position embeddings)."""
    report = make_report("lm")
    report["model"] |= {
        "family": "llama",
        "n_kv_heads": 1,
        "head_dim": 4,
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "positions": "rope",
        "qk_norm": False,
    }
    for token in report["tokens"]:
        token["token"] = token["piece"].replace(" ", "Ġ")
    for head in report["heads"]:
        head["kv_head"] = 0
    report["embeddings"]["positions"]["kind"] = "rotary"
    rows = table_rows(report)
    assert rows["tokens"][1] == {
        "position": 1,
        "id": 101,
        "piece": "␣cat|\\n",
        "vocabulary entry": "Ġcat|\\n",
        "special": False,
    }
    assert list(rows["heads"][0]) == ["layer", "head", "kv_head", "previous_token", "first_token", "self", "entropy"]

    result = render_inspection(report, tmp_path)
    markdown = Path(result["report"]).read_text(encoding="utf-8")
    assert "| Llama | 2 | 2 | 1 | 4 | 8 | 16 | 50257 | 123,456 |" in markdown
    assert "Blocks: RMSNorm, a SwiGLU MLP (`silu(gate) * up`), rotary positions (RoPE)." in markdown
    assert "Grouped-query attention: 2 query heads share 1 key/value head, 2 query heads each" in markdown
    assert "This model has no position embeddings: its positions are rotary (RoPE)" in markdown
    assert "with positional embeddings added" not in markdown
    width, height = png_size(Path(result["figures"]["embeddings-positions"]))
    assert width > height
