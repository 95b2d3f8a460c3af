"""Pretraining loop: exact resume after a kill, NaN stop keeping the last good checkpoint, reuse, outputs."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_random_tokens

import model.pretrain as pretrain_mod
from eval.plots import plot_loss_curve
from gptflow.stage import StageError
from model.checkpoint import load_checkpoint
from model.files import CHECKPOINT_LMS
from model.opener import open_model
from model.pretrain import PretrainError, TokenWindows, pretrain
from model.training import NonFiniteLossError

CONFIG = tiny_config(
    "pretrain",
    context_length=16,
    batch_size=4,
    steps=8,
    warmup_steps=2,
    lr=3e-3,
    log_every=1,
    eval_every=4,
    eval_batches=2,
    checkpoint_every=4,
    sample_tokens=5,
)


class Killed(Exception):
    pass


@pytest.fixture
def corpus(tmp_path):
    """A learnable token stream: a repeating 50-token cycle with noise, as the corpus stage writes it."""
    rng = np.random.default_rng(0)
    stream = np.tile(np.arange(1000, 1050), 120) + rng.integers(0, 2, 6000) * 7
    folder = tmp_path / "corpus"
    folder.mkdir()
    stream[:5000].astype(np.uint16).tofile(folder / "train.bin")
    stream[5000:].astype(np.uint16).tofile(folder / "val.bin")
    return folder


def params_of(path):
    return open_model(path, CHECKPOINT_LMS).language_model().state_dict()


@contextlib.contextmanager
def saved_as_on_cuda():
    """Inside the block, `torch.save` tags every CPU storage with location "cuda:0", as a file written from a GPU
    is tagged; loading is left to torch's own deserializers (ours returns None)."""
    entry = (0, lambda storage: "cuda:0" if storage.device.type == "cpu" else None, lambda storage, location: None)
    torch.serialization.register_package(*entry)
    try:
        yield
    finally:
        torch.serialization._package_registry.remove(entry)


@pytest.mark.slow
def test_resume_after_kill_is_exact(corpus, tmp_path, tokenizer):
    """Killed at step 6, resumed from the step-4 checkpoint: the weights of the run never killed. The checkpoint is
    written as a GPU writes it (its storages tagged cuda:0): the resume on the CPU restores the optimizer there."""
    config = CONFIG.model_copy(update={"device": "cpu", "precision": "fp32"})
    full = pretrain(corpus, tmp_path / "full", config, tokenizer=tokenizer, progress=False)

    def kill_at_step_6(metrics):
        if metrics["kind"] == "train" and metrics["step"] == 6:
            raise Killed

    checkpoint = tmp_path / "split" / "last.pt"
    with saved_as_on_cuda(), pytest.raises(Killed):
        pretrain(corpus, tmp_path / "split", config, on_log=kill_at_step_6, progress=False)
    assert all(e[0] != 0 for e in torch.serialization._package_registry)
    assert not (tmp_path / "split" / "model.pt").exists()
    if not torch.cuda.is_available():  # as on any CPU-only machine, the file cannot be loaded as it is
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(checkpoint, weights_only=True)
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["train_state"]["step"] == 4
    assert load_checkpoint(checkpoint)["train_state"]["step"] == 4

    seen = []
    resumed = pretrain(corpus, tmp_path / "split", config, on_log=seen.append, progress=False)
    assert [m["step"] for m in seen if m["kind"] == "resume"] == [4]
    # the record that names the stage folder (a task keys its progress artifact on it) follows the resume
    assert seen[1] == {"kind": "start", "step": 4, "folder": str(tmp_path / "split")}
    assert [m["step"] for m in seen if m["kind"] == "train"] == [5, 6, 7, 8]
    assert not resumed.reused and resumed.metrics["steps"] == 8 == full.metrics["steps"]
    assert resumed.metrics["device"] == "cpu" and resumed.metrics["precision"] == "fp32"
    # The resumed run's own checkpoint holds CPU tensors only: the optimizer state was restored to the CPU.
    final = torch.load(checkpoint, weights_only=True)
    assert final["train_state"]["step"] == 8
    moments = [t for s in final["optimizer"]["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert moments and all(t.device.type == "cpu" for t in moments)
    a, b = params_of(full.model_path), params_of(resumed.model_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["val_loss"] == full.metrics["val_loss"]

    # Outputs: a PNG loss curve, finite decreasing validation loss, text samples, a reusable manifest.
    plot = plot_loss_curve(full.history, tmp_path / "loss.png", "pretraining")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evals = [h for h in full.history if h["kind"] == "eval"]
    assert [e["step"] for e in evals] == [4, 8] and isinstance(evals[0]["sample"], str)
    assert evals[-1]["val_loss"] < math.log(50257) - 1
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    again = pretrain(corpus, tmp_path / "full", config, progress=False)
    assert again.reused and again.metrics == full.metrics


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = pretrain_mod.lm_loss

    def poisoned(*args):
        loss = real_loss(*args)
        if torch.is_grad_enabled():  # training micro-batches only
            calls["n"] += 1
            if calls["n"] >= 6:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(pretrain_mod, "lm_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"last good checkpoint: .*last.pt.*loss is nan at step 6"):
        pretrain(corpus, tmp_path / "run", CONFIG, progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["train_state"]["step"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert not (tmp_path / "run" / "model.pt").exists()


def test_grad_accumulation_and_changed_config(corpus, tmp_path):
    cfg = CONFIG.model_copy(
        update={"steps": 2, "grad_accum": 2, "batch_size": 2, "checkpoint_every": 1, "sampling": "strided"}
    )
    result = pretrain(corpus, tmp_path / "run", cfg, progress=False)
    assert result.metrics["tokens_seen"] == 2 * 2 * 2 * 16
    (tmp_path / "run" / "manifest.json").unlink()  # unfinished-looking folder, then a different config
    with pytest.raises(StageError, match=r"different config \(config lr 0.003 -> 0.0001\)"):
        pretrain(corpus, tmp_path / "run", cfg.model_copy(update={"lr": 1e-4}), progress=False)


def test_token_windows_and_bad_inputs(tmp_path):
    tokens = np.arange(50, dtype=np.uint16)
    strided = TokenWindows(tokens, 10, 3, "strided", seed=0)
    x, y = strided.batch(0)
    assert x[:, 0].tolist() == [0, 10, 20] and torch.equal(y, x + 1)
    assert strided.batch(1)[0][:, 0].tolist() == [30, 0, 10]  # 4 windows, wraps around
    rand = TokenWindows(tokens, 10, 4, "random", seed=1)
    first = rand.batch(5)[0]
    assert torch.equal(rand.batch(5)[0], first) and not torch.equal(rand.batch(6)[0], first)
    assert not torch.equal(TokenWindows(tokens, 10, 4, "random", seed=2).batch(5)[0], first)
    with pytest.raises(PretrainError, match="fewer than one window"):
        TokenWindows(tokens[:5], 10, 1, "random", seed=0)
    with pytest.raises(PretrainError, match="run `gptflow data corpus NAME` first"):
        pretrain(tmp_path / "missing", tmp_path / "out", CONFIG, progress=False)
    short = write_random_tokens(tmp_path / "short", 10, 1000, seed=0)
    window = CONFIG.model_config_for().context_length + 1
    with pytest.raises(PretrainError, match=f"{short / 'train.bin'}: the training split holds 10 tokens, fewer than"):
        pretrain(short, tmp_path / "out", CONFIG, progress=False)
    short_val = write_random_tokens(tmp_path / "short-val", 1000, 10, seed=0)
    with pytest.raises(PretrainError) as caught:  # before: found after training, naming neither file nor split
        pretrain(short_val, tmp_path / "out-val", CONFIG, progress=False)
    assert str(caught.value) == (
        f"{short_val / 'val.bin'}: the validation split holds 10 tokens, fewer than one window of {window} "
        f"(--context-length {window - 1} + 1); use a longer corpus or a smaller --context-length"
    )
    assert not (tmp_path / "out-val").exists()


def test_a_context_too_long_for_the_memory_is_refused_before_training(tmp_path, monkeypatch):
    """Before: `--context-length 100000` trained for 7 minutes, then failed allocating 160 GB."""
    import model.device

    monkeypatch.setattr(model.device, "memory_bytes", lambda device: 24 * 2**30)  # this machine's, on any machine
    corpus = write_random_tokens(tmp_path / "corpus", 100_001, 100_001, seed=0)
    config = tiny_config("pretrain", preset="mini", context_length=100_000, batch_size=8, precision="fp32")
    with pytest.raises(
        model.device.TooBigError,
        match=r"pretraining mini: a training step of 8 x 100000 tokens .* "
        r"needs at least 52\.5 GiB, more than the 24\.0 GiB of cpu",
    ):
        pretrain(corpus, tmp_path / "out", config, progress=False)
    assert not (tmp_path / "out").exists()
