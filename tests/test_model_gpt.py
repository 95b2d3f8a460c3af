"""GPTConfig presets and GPTModel behaviour: shapes, init, causality, padding masks, KV cache, export."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config

from model.config import PRESETS, GPTConfig, ModelConfigError
from model.gpt import GPTModel

TINY = tiny_config("gpt")


@pytest.fixture(scope="module")
def tiny_model() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(TINY).eval()


def test_presets_have_gpt2_shapes():
    shapes = {n: (c.emb_dim, c.n_layers, c.n_heads, c.context_length, c.vocab_size) for n, c in PRESETS.items()}
    assert shapes["gpt2-small"] == (768, 12, 12, 1024, 50257)
    assert shapes["gpt2-medium"] == (1024, 24, 16, 1024, 50257)
    assert shapes["gpt2-large"] == (1280, 36, 20, 1024, 50257)
    assert shapes["gpt2-xl"] == (1600, 48, 25, 1024, 50257)
    assert PRESETS["gpt2-xl"].head_dim == 64
    assert all(c.qkv_bias and c.tie_weights for c in PRESETS.values() if c.family == "gpt2")


def test_from_preset_overrides_and_errors():
    cfg = GPTConfig.from_preset("gpt2-small", context_length=256, dropout=0.1)
    assert (cfg.context_length, cfg.dropout, cfg.emb_dim) == (256, 0.1, 768)
    with pytest.raises(ModelConfigError, match=r"unknown model preset 'gpt3'.*gpt2-small.*tiny.*mini"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ModelConfigError, match="not divisible by n_heads"):
        tiny_config("gpt", n_heads=3)
    with pytest.raises(ModelConfigError, match="emb_di"):
        GPTConfig.from_dict({"emb_di": 4, "n_layers": 1, "n_heads": 1})
    with pytest.raises(Exception):
        cfg.emb_dim = 3  # frozen


def test_gpt2_small_parameter_count():
    assert PRESETS["gpt2-small"].n_params() == 124_439_808  # the published 124M
    for tie in (True, False):
        cfg = tiny_config("gpt", tie_weights=tie, qkv_bias=not tie)
        assert GPTModel(cfg).num_params() == cfg.n_params()


def test_forward_shapes_tying_and_init(tiny_model):
    ids = torch.randint(0, TINY.vocab_size, (3, 17))
    assert tiny_model(ids).shape == (3, 17, TINY.vocab_size)
    assert tiny_model.features(ids).shape == (3, 17, TINY.emb_dim)
    assert tiny_model.out_head.weight.data_ptr() == tiny_model.tok_emb.weight.data_ptr()
    untied = GPTModel(tiny_config("gpt", tie_weights=False))
    assert untied.out_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    torch.manual_seed(0)
    big = GPTModel(GPTConfig(vocab_size=512, context_length=64, emb_dim=256, n_layers=8, n_heads=4))
    assert big.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert big.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.02)
    assert big.blocks[0].attn.qkv.bias.abs().sum().item() == 0.0


def test_causality(tiny_model):
    ids = torch.randint(0, TINY.vocab_size, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % TINY.vocab_size
    a, b = tiny_model(ids), tiny_model(changed)
    assert torch.equal(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_right_padding_matches_unpadded(tiny_model):
    short = torch.randint(0, TINY.vocab_size, (1, 5))
    long = torch.randint(0, TINY.vocab_size, (1, 9))
    batch = torch.full((2, 9), 50256)
    batch[0, :5], batch[1] = short[0], long[0]
    mask = torch.zeros(2, 9, dtype=torch.long)
    mask[0, :5], mask[1] = 1, 1
    out = tiny_model(batch, attention_mask=mask)
    torch.testing.assert_close(out[0, :5], tiny_model(short)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], tiny_model(long)[0], atol=1e-5, rtol=1e-5)


def test_left_padding_is_finite_and_masks_pad_keys(tiny_model):
    ids = torch.randint(0, TINY.vocab_size, (2, 6))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = tiny_model(ids, attention_mask=mask)
    assert torch.isfinite(out).all()
    other = ids.clone()
    other[0, :3] = 7  # padding content must not leak into real positions
    torch.testing.assert_close(tiny_model(other, attention_mask=mask)[0, 3:], out[0, 3:], atol=1e-6, rtol=0)


def test_kv_cache_matches_full_forward(tiny_model):
    ids = torch.randint(0, TINY.vocab_size, (2, 10))
    full = tiny_model(ids)
    cache = tiny_model.new_kv_cache(2)
    steps = [tiny_model(ids[:, :6], kv_cache=cache)]  # prefill, then a 3-token chunk, then one token
    steps.append(tiny_model(ids[:, 6:9], kv_cache=cache))
    steps.append(tiny_model(ids[:, 9:], kv_cache=cache))
    assert cache.pos == 10
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_with_padding_mask(tiny_model):
    ids = torch.randint(0, TINY.vocab_size, (2, 8))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    full = tiny_model(ids, attention_mask=mask)
    cache = tiny_model.new_kv_cache(2)
    first = tiny_model(ids[:, :5], attention_mask=mask[:, :5], kv_cache=cache)
    rest = tiny_model(ids[:, 5:], attention_mask=mask, kv_cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], 1)[:, 2:], full[:, 2:], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_traceable_with_dynamic_batch_and_sequence(tiny_model):
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=TINY.context_length)
    ids = torch.randint(0, TINY.vocab_size, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    exported = torch.export.export(
        tiny_model, (ids, mask), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), strict=False
    )
    other, other_mask = torch.randint(0, TINY.vocab_size, (3, 5)), torch.ones(3, 5, dtype=torch.long)
    other_mask[0, 3:] = 0
    torch.testing.assert_close(exported.module()(other, other_mask), tiny_model(other, other_mask))
