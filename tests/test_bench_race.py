"""The nanoGPT race's own machinery (bench/nanogpt_race.py): the checkpoint watcher and the one evaluator."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from bench.nanogpt_race import val_loss, val_windows, watch
from model.config import GPTConfig
from model.gpt import GPTModel
from model.pretrain import evaluate


def test_watcher_copies_each_completed_write_of_a_file_rewritten_in_place(tmp_path):
    """nanoGPT rewrites ckpt.pt in place: each finished write is copied once, with its write time."""
    path, copies = tmp_path / "ckpt.pt", tmp_path / "copies"
    copies.mkdir()
    done, found = threading.Event(), []
    started = time.time()
    watcher = threading.Thread(target=lambda: found.extend(watch(path, copies, started, done, settle_s=0.1)))
    watcher.start()
    written = []
    for step in (10, 20, 30):
        with path.open("wb") as f:  # in place: same inode, truncated and rewritten
            torch.save({"iter_num": step, "weights": torch.full((1000,), float(step))}, f)
        written.append(path.stat().st_mtime - started)
        time.sleep(0.5)
    done.set()
    watcher.join()
    steps = [torch.load(copy, weights_only=True)["iter_num"] for copy, _ in found]
    assert steps == [10, 20, 30]
    assert [round(s, 6) for _, s in found] == [round(s, 6) for s in written]


def test_the_one_evaluator_matches_pretrainings_own_evaluation():
    """Over every window of the validation tokens, the race's evaluator (logits + cross-entropy) and the loss
    pretraining reports (the fused LM head) agree."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=300, context_length=32, emb_dim=32, n_layers=2, n_heads=2)).eval()
    tokens = np.random.default_rng(0).integers(0, 300, 32 * 20 + 1).astype(np.uint16)
    windows = val_windows(tokens, context=32)
    assert windows.shape == (20, 33) and windows[1, 0] == tokens[32]
    ours = evaluate(model, tokens, 32, batch_size=8, max_batches=100, precision="fp32")
    assert abs(val_loss(model, windows) - ours) < 1e-5
    assert 5.0 < ours < 6.5  # about ln(300) for an untrained model
