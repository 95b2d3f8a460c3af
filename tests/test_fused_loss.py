"""The fused LM head + cross-entropy equals `F.cross_entropy(hidden @ weight.T, targets)` and its gradients."""

import threading

import pytest
import torch
import torch.nn.functional as F

from model.fused_loss import IGNORE_INDEX, linear_cross_entropy


def _inputs(n=150, e=24, v=1000, dtype=torch.float64, ignore_every=None):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, e, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, e, generator=gen, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=gen)
    if ignore_every:
        targets[::ignore_every] = IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize("ignore_every", [None, 3])
def test_loss_and_gradients_match_cross_entropy_in_fp64(ignore_every):
    hidden, weight, targets = _inputs(ignore_every=ignore_every)
    expected = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX)
    exp_h, exp_w = torch.autograd.grad(expected * 2.5, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, targets, chunk_rows=64)  # 150 rows: a partial last chunk
    got_h, got_w = torch.autograd.grad(got * 2.5, (hidden, weight))  # the incoming gradient scales both
    # Relative 1e-9: in isolation the two agree to the last bit, but two full fresh-clone suite runs showed up to
    # 2.3e-11 absolute (5e-10 relative) on the input gradient and 1.5e-13 relative on the loss; the cause was not
    # found (not reproducible alone or under load). A wrong formula, or bf16/fp32 anywhere, is off by >= 1e-7.
    assert got.item() == pytest.approx(expected.item(), rel=1e-9, abs=0)
    for got_grad, exp_grad in ((got_h, exp_h), (got_w, exp_w)):
        assert (got_grad - exp_grad).abs().max().item() <= 1e-9 * exp_grad.abs().max().item()


def test_bf16_autocast_matches_autocast_cross_entropy():
    hidden, weight, targets = _inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy((hidden @ weight.T).float(), targets)
        got = linear_cross_entropy(hidden, weight, targets)
    exp_h, exp_w = torch.autograd.grad(expected, (hidden, weight))
    got_h, got_w = torch.autograd.grad(got, (hidden, weight))
    assert got.dtype == torch.float32 and got_h.dtype == got_w.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # both round the matmul inputs to bf16; the fp32 softmax differs only in summation order
    assert ((got_h - exp_h).norm() / exp_h.norm()).item() < 5e-3
    assert ((got_w - exp_w).norm() / exp_w.norm()).item() < 5e-3


def test_tied_weight_gets_both_gradients():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8)
    ids, targets = torch.randint(0, 50, (12,)), torch.randint(0, 50, (12,))
    F.cross_entropy(emb(ids) @ emb.weight.T, targets).backward()
    expected = emb.weight.grad.clone()
    emb.weight.grad = None
    linear_cross_entropy(emb(ids), emb.weight, targets).backward()
    assert torch.allclose(emb.weight.grad, expected, atol=1e-6)


def test_no_grad_and_all_ignored():
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets)
    assert loss.item() == pytest.approx(F.cross_entropy(hidden @ weight.T, targets).item(), abs=1e-12)
    assert linear_cross_entropy(hidden, weight, torch.full_like(targets, IGNORE_INDEX)).item() == 0.0


def test_shape_error_names_the_shapes():
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match=r"hidden must be \(N, E\) and targets \(N,\); got \(150, 24\) and \(149,\)"):
        linear_cross_entropy(hidden, weight, targets[:-1])


def test_each_thread_has_its_own_logits_buffer():
    """The reused logits buffer is per thread: two trainings in parallel threads must not overwrite each other."""
    from model.fused_loss import _workspace

    cpu = torch.device("cpu")
    other = []
    thread = threading.Thread(target=lambda: other.append(_workspace((4, 8), torch.float32, cpu)))
    thread.start()
    thread.join()
    mine = _workspace((4, 8), torch.float32, cpu)
    assert mine.data_ptr() == _workspace((2, 8), torch.float32, cpu).data_ptr()  # reused within a thread
    assert other[0].data_ptr() != mine.data_ptr()


@pytest.mark.parametrize("ignore_every", [None, 3, 1])
def test_lm_loss_plain_path_matches_the_fused_one(monkeypatch, ignore_every):
    """`lm_loss` runs the fused kernel on the devices listed in FUSED_LOSS_DEVICES and the plain head +
    cross-entropy elsewhere (GPUs): both give the same loss and gradients, and 0 (not NaN) when every target is
    ignored."""
    from model import pretrain

    hidden, weight, targets = _inputs(n=40, ignore_every=ignore_every)
    features, targets = hidden.view(4, 10, -1), targets.view(4, 10)
    fused = pretrain.lm_loss(features, weight, targets)
    fused_grads = torch.autograd.grad(fused, (hidden, weight))
    monkeypatch.setattr(pretrain, "FUSED_LOSS_DEVICES", frozenset())
    plain = pretrain.lm_loss(features, weight, targets)
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    assert plain.item() == pytest.approx(fused.item(), rel=1e-12, abs=1e-12)
    if ignore_every == 1:
        assert plain.item() == 0.0
    for a, b in zip(plain_grads, fused_grads):
        assert (a - b).abs().max().item() <= 1e-12 + 1e-9 * b.abs().max().item()
