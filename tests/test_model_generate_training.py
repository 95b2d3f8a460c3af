"""Generation (greedy parity with/without KV cache, sampling controls, EOS), checkpoints and training helpers."""

from __future__ import annotations

import copy
import math
import pickle
import random

import numpy as np
import pytest
import torch
from conftest import tiny_config

from model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_model,
    set_rng_state,
)
from model.files import CHECKPOINT_LMS
from model.generate import generate, sample_next, trim_at_eos
from model.gpt import GPTModel
from model.opener import open_model
from model.optim import MuonAdamW, build_optimizer, build_scheduler, warmup_cosine
from model.training import NonFiniteLossError, TrainingCheckpoint, TrainState, check_finite

CFG = tiny_config("gpt", context_length=32)


@pytest.fixture(scope="module")
def model() -> GPTModel:
    torch.manual_seed(1)
    return GPTModel(CFG).eval()


@pytest.mark.slow
def test_greedy_with_and_without_cache_is_identical(model):
    prompt = torch.randint(0, CFG.vocab_size, (2, 7))
    cached = generate(model, prompt, 20, use_cache=True)
    plain = generate(model, prompt, 20, use_cache=False)
    assert cached.shape == (2, 27)
    assert torch.equal(cached, plain)
    assert torch.equal(cached[:, :7], prompt)
    # Past the context length (32) both crop the window and still agree.
    long_c, long_p = generate(model, prompt, 40, use_cache=True), generate(model, prompt, 40, use_cache=False)
    assert long_c.shape == (2, 47) and torch.equal(long_c, long_p)


def test_greedy_is_argmax_of_forward(model):
    prompt = torch.randint(0, CFG.vocab_size, (1, 5))
    out = generate(model, prompt, 1)
    assert out[0, -1].item() == model(prompt)[0, -1].argmax().item()


@pytest.mark.slow
def test_left_padded_batch_matches_single(model):
    a = torch.randint(0, CFG.vocab_size, (1, 6))
    b = torch.randint(0, CFG.vocab_size, (1, 4))
    # Left padding shifts positions, so compare cached vs uncached on the same padded batch instead.
    batch = torch.cat([a, torch.cat([torch.full((1, 2), 50256), b], 1)])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    cached = generate(model, batch, 8, attention_mask=mask)
    plain = generate(model, batch, 8, attention_mask=mask, use_cache=False)
    assert torch.equal(cached, plain)
    assert torch.equal(cached[0], generate(model, a, 8)[0])


def test_eos_stops_and_pads(model):
    prompt = torch.randint(0, CFG.vocab_size, (1, 5))
    first = generate(model, prompt, 1)[0, -1].item()
    out = generate(model, prompt, 10, eos_id=first)
    assert out.shape == (1, 6) and out[0, -1].item() == first
    assert trim_at_eos(out[0, 5:].tolist(), first) == []
    assert trim_at_eos([1, 2, 3], 9) == [1, 2, 3]


@pytest.mark.slow
def test_sampling_seeded_topk_topp(model):
    prompt = torch.randint(0, CFG.vocab_size, (1, 5))
    a = generate(model, prompt, 10, temperature=1.0, top_k=50, seed=3)
    b = generate(model, prompt, 10, temperature=1.0, top_k=50, seed=3)
    c = generate(model, prompt, 10, temperature=1.0, top_k=50, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    assert {
        sample_next(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(s)).item()
        for s in range(40)
    } == {1, 2}
    # top_p=0.5: token 1 alone holds > 50% of the mass.
    assert {
        sample_next(logits, temperature=1.0, top_p=0.5, generator=torch.Generator().manual_seed(s)).item()
        for s in range(20)
    } == {1}
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, temperature=1.0, top_p=0.0)


def test_checkpoint_roundtrip_atomic_and_weights_only(tmp_path, model):
    path = save_model(tmp_path / "m.pt", model)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left
    opened = open_model(path, CHECKPOINT_LMS)
    loaded, cfg = opened.language_model(), opened.config
    assert cfg == CFG and opened.kind == "lm"
    ids = torch.randint(0, CFG.vocab_size, (1, 4))
    assert torch.equal(loaded.eval()(ids), model(ids))
    assert loaded.out_head.weight.data_ptr() == loaded.tok_emb.weight.data_ptr()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "evil.pkl")
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path / "evil.pt")
    message = str(caught.value)
    assert "with weights_only=True" in message and "Unsupported global" in message
    assert "weights_only` set to `False`" not in message and "\n" not in message  # never PyTorch's unsafe advice
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    save_checkpoint(tmp_path / "other.pt", format="x", model={})
    with pytest.raises(
        CheckpointError, match="other.pt is not a gptflow checkpoint \\(format 'x'\\); expected a language"
    ):
        open_model(tmp_path / "other.pt", CHECKPOINT_LMS)


def test_rng_state_roundtrip_under_weights_only(tmp_path):
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    save_checkpoint(tmp_path / "rng.pt", rng=rng_state())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_optimizer_groups_and_schedule(model):
    model.blocks[0].requires_grad_(False)
    try:
        opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    finally:
        model.requires_grad_(True)
    decay, no_decay = opt.param_groups
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n_trainable = sum(1 for n, p in model.named_parameters() if not n.startswith("blocks.0."))
    assert len(decay["params"]) + len(no_decay["params"]) == n_trainable
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, min_ratio=0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, min_ratio=0.1) == pytest.approx(0.1)
    sched = build_scheduler(opt, 10, 100)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    opt.step(), sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4)


def test_muon_takes_the_blocks_matrices_adamw_the_rest_and_resumes_exactly():
    torch.manual_seed(0)
    m = GPTModel(CFG)
    opt = build_optimizer(m, lr=1e-3, weight_decay=0.1, kind="muon")
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in m.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert muon == {n for n, p in m.named_parameters() if n.startswith("blocks.") and p.ndim == 2}
    assert len(muon) == 4 * CFG.n_layers and muon.isdisjoint(adamw) and muon | adamw == set(names.values())
    assert {"tok_emb.weight", "pos_emb.weight", "final_norm.weight", "blocks.0.attn.qkv.bias"} <= adamw
    sched = build_scheduler(opt, 10, 100)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4] * len(opt.param_groups))  # both scheduled
    ids = torch.randint(0, CFG.vocab_size, (2, 8))

    def steps(model, optimizer, scheduler, n):
        for _ in range(n):
            model(ids).logsumexp(-1).mean().backward()
            optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)

    steps(m, opt, sched, 2)
    saved = copy.deepcopy((m.state_dict(), opt.state_dict(), sched.state_dict()))  # state tensors change in place
    steps(m, opt, sched, 2)
    m2 = GPTModel(CFG)
    m2.load_state_dict(saved[0])
    opt2 = build_optimizer(m2, lr=1e-3, weight_decay=0.1, kind="muon")
    sched2 = build_scheduler(opt2, 10, 100)
    opt2.load_state_dict(saved[1]), sched2.load_state_dict(saved[2])
    steps(m2, opt2, sched2, 2)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    assert not torch.equal(m.blocks[0].attn.qkv.weight, GPTModel(CFG).blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="not the state of a Muon"):
        opt2.load_state_dict(build_optimizer(m2, lr=1e-3).state_dict())


@pytest.mark.slow
def test_training_checkpoint_resume_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = GPTModel(CFG)
    opt = build_optimizer(m, lr=1e-3)
    sched = build_scheduler(opt, 2, 10)
    ids = torch.randint(0, CFG.vocab_size, (2, 8))
    m(ids).mean().backward()
    opt.step(), sched.step()
    key = {"stage": "pretrain", "inputs": {}, "config": {}, "code": {}}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    # two ranks' RNG states: each rank resumes with its own
    rngs = [rng_state(), {**rng_state(), "torch": torch.Generator().manual_seed(7).get_state()}]
    TrainingCheckpoint(tmp_path / "c.pt").save(m, opt, sched, scaler, TrainState(step=1, tokens_seen=16), key, rngs)
    m2 = GPTModel(CFG)
    opt2 = build_optimizer(m2, lr=1e-3)
    sched2 = build_scheduler(opt2, 2, 10)
    ckpt = TrainingCheckpoint(tmp_path / "c.pt")
    assert ckpt.stage_key() == key and len(ckpt.load()["rng_ranks"]) == 2
    state = ckpt.restore(m2, opt2, sched2, scaler, rank=1)
    assert torch.equal(torch.get_rng_state(), rngs[1]["torch"])
    assert state.step == 1 and state.tokens_seen == 16
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    assert sched2.last_epoch == 1 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert open_model(tmp_path / "c.pt", CHECKPOINT_LMS).config == CFG


def test_check_finite():
    check_finite(torch.tensor(1.0), 3)
    with pytest.raises(NonFiniteLossError, match="nan at step 7"):
        check_finite(torch.tensor(math.nan), 7)
