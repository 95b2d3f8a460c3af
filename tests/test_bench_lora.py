"""bench/lora_finetune.py as a command, on tiny shapes (--quick): the cost of each method in a process of its own and
the accuracy of each from one DAPT base, checked against parameter counts worked out here (the real run, at
gpt2-small's and SmolLM2-135M's shapes, takes many minutes and lives in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, command_env

from bench.lora_cost import shape_config
from bench.lora_finetune import BASE_SHAPE


def lora_params(cfg, rank: int, layers: set[str]) -> int:
    """Adapters of `rank` on `layers` of every block, worked out by hand: rank x (in + out) per adapted slice, plus
    the classifier's 2-class head (emb x 2 + 2)."""
    e, q, kv, h = cfg.emb_dim, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    rows = {"query": q, "key": kv, "value": kv}
    per_block = sum(rank * (e + rows[name]) for name in ("query", "key", "value") if name in layers)
    if "projection" in layers:
        per_block += rank * (q + e)
    if "mlp" in layers:
        ups = 2 if cfg.mlp == "swiglu" else 1  # Llama's gate and up, GPT-2's fc
        per_block += ups * rank * (e + h) + rank * (h + e)
    return cfg.n_layers * per_block + 2 * e + 2


def classifier_params(cfg) -> tuple[int, int]:
    """(every parameter, the last block's + final norm's + head's) of the 2-class classifier on `cfg`."""
    from model.classifier import SequenceClassifier
    from model.gpt import GPTModel

    model = SequenceClassifier(GPTModel(cfg), 2)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    last = count(model.backbone.blocks[-1]) + count(model.backbone.final_norm) + count(model.head)
    return count(model), last


@pytest.mark.slow
def test_the_quick_run(tmp_path, mirror):
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "bench.lora_finetune", "--quick", "--precision", "fp32", "--out", str(out)],
        cwd=REPO_ROOT,
        env=command_env(tmp_path, mirror),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| shape | method | trainable params | vs full | s/step |" in done.stdout
    record = json.loads((out / "lora_finetune.json").read_text())
    assert record["quick"] and record["machine"]["cpu"] and record["machine"]["date"]
    assert record["cost"]["precisions"] == record["accuracy"]["precisions"] == ["fp32"]  # auto measures: not here

    all_layers = {"query", "key", "value", "projection", "mlp"}
    for name in ("tiny", "smollm2-tiny"):
        cfg = shape_config(name)
        shape = record["cost"]["shapes"][name]
        assert shape["config"] == cfg.to_dict()
        got = {method: m["trainable_params"] for method, m in shape["methods"].items()}
        full, last = classifier_params(cfg)
        assert got == {
            "full": full,
            "last-block": last,
            "lora-r8": lora_params(cfg, 8, {"query", "value"}),
            "lora-r16-all": lora_params(cfg, 16, all_layers),
        }
        assert got["full"] > got["last-block"] > got["lora-r8"]
        for method, m in shape["methods"].items():
            assert m["steps"] == 2 and len(m["step_s"]) == 2 and m["s_per_step"] == m["step_s"][1] > 0, method
            assert m["device"] == "cpu" and all(t > 0 for t in m["tokens_per_step"])
            assert m["peak_gib"] > m["rss_after_imports_gib"] > 0.05  # a process of its own: python and torch
            if sys.platform == "linux":
                assert 0 < m["training_peak_gib"] <= m["peak_gib"]
    # the same batches for every method: the same tokens per step
    assert len({tuple(m["tokens_per_step"]) for m in record["cost"]["shapes"]["tiny"]["methods"].values()}) == 1

    accuracy = record["accuracy"]
    assert accuracy["base"]["init"] == "dapt" and accuracy["base"]["metrics"]["steps"] == 4
    base = shape_config("tiny").model_copy(update={**BASE_SHAPE, "emb_dim": 64, "n_layers": 2})
    methods = accuracy["methods"]
    assert list(methods) == ["full", "last-block", "lora-r8", "lora-r16", "lora-r16-all"]
    assert methods["lora-r8"]["trainable_params"] == lora_params(base, 8, {"query", "value"})
    assert methods["lora-r16"]["trainable_params"] == lora_params(base, 16, {"query", "value"})
    assert methods["lora-r16-all"]["trainable_params"] == lora_params(base, 16, all_layers)
    assert methods["full"]["trainable_params"] > methods["last-block"]["trainable_params"]
    for method, m in methods.items():
        assert m["test"]["n"] == 16 and 0 <= m["test"]["accuracy"] <= 1, method
        assert [t["lr"] for t in m["tries"]] == [m["lr"]]  # quick: one learning rate each, the grid's middle
    assert (methods["full"]["lr"], methods["last-block"]["lr"], methods["lora-r8"]["lr"]) == (1e-4, 3e-4, 1e-3)
