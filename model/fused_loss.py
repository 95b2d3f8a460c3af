"""Cross-entropy of a linear output layer, fused: `F.cross_entropy(hidden @ weight.T, targets)` and its gradient
without the (tokens x vocab) fp32 logits tensor.

On CPU the 50257-wide GPT-2 head dominates a small model's training step, and most of that time is not the
matmuls but memory: autocast's path writes bf16 logits, copies them to fp32, runs log-softmax and its backward
over the full (N, V) array (hundreds of MB, far beyond the caches) and allocates each intermediate afresh. Here
the logits are one bf16 matmul; the softmax runs in fp32 on row chunks small enough to stay in cache and is
turned into the logits' gradient in place; the input and weight gradients are two more matmuls, computed in
the forward pass (the gradient of a mean loss does not depend on anything that comes later) and scaled by the
incoming gradient in backward. Numerics match autocast's: bf16 matmul inputs, fp32 softmax and loss.
"""

from __future__ import annotations

import threading

import torch

IGNORE_INDEX = -100  # targets with this value add nothing to the loss (F.cross_entropy's default)
CHUNK_ROWS = 64  # rows of fp32 softmax per chunk: 64 x 50257 x 4 B = 12.9 MB, inside the L3 cache


_local = threading.local()  # one buffer per thread: tasks training in parallel threads never share one


def _workspace(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (rows, cols) view of this thread's reusable buffer for `dtype` on `device`, grown when too small."""
    buffers = _local.__dict__.setdefault("buffers", {})
    numel = shape[0] * shape[1]
    buffer = buffers.get((dtype, device))
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        compute_dtype: torch.dtype,
        chunk_rows: int,
        needs_grad: bool,
    ) -> torch.Tensor:
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        keep = targets != IGNORE_INDEX
        n_kept = int(keep.sum())
        safe_targets = torch.where(keep, targets, 0)
        # (N, V) logits, which become the loss's gradient w.r.t. the logits in place. The buffer is reused
        # across calls: a fresh 100+ MB allocation costs as much as the matmul in page faults.
        logits = torch.mm(h, w.T, out=_workspace((len(h), w.shape[0]), compute_dtype, hidden.device))
        softmax_dtype = torch.promote_types(compute_dtype, torch.float32)  # bf16 logits -> fp32 softmax
        target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1).to(softmax_dtype)
        lse = torch.empty(len(h), dtype=softmax_dtype, device=h.device)
        scratch = (
            None
            if compute_dtype == softmax_dtype
            else torch.empty(chunk_rows, w.shape[0], dtype=softmax_dtype, device=h.device)
        )
        for start in range(0, len(h), chunk_rows):
            end = min(start + chunk_rows, len(h))
            rows = logits[start:end] if scratch is None else scratch[: end - start].copy_(logits[start:end])
            row_max = rows.amax(dim=1, keepdim=True)
            rows.sub_(row_max).exp_()
            row_sum = rows.sum(dim=1, keepdim=True)
            lse[start:end] = (row_sum.log() + row_max).squeeze(1)
            if needs_grad:  # softmax / n_kept: d(mean loss)/d(logits) before the -1 at each target
                rows.mul_(1.0 / (row_sum * max(n_kept, 1)))
                if scratch is not None:
                    logits[start:end].copy_(rows)
        loss = ((lse - target_logits) * keep).sum() / max(n_kept, 1)
        if needs_grad:
            kept_rows = keep.nonzero().squeeze(1)
            logits[kept_rows, targets[kept_rows]] -= 1.0 / max(n_kept, 1)
            if n_kept < len(h):
                logits[~keep] = 0
            grad_hidden = torch.mm(logits, w).to(hidden.dtype) if ctx.needs_input_grad[0] else None
            grad_weight = torch.mm(logits.T, h).to(weight.dtype) if ctx.needs_input_grad[1] else None
            ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_loss,
            None if grad_weight is None else grad_weight * grad_loss,
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk_rows: int = CHUNK_ROWS
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (hidden (N, E), weight (V, E), targets (N,)) over the targets
    that are not `IGNORE_INDEX` (0 when there are none). Under CPU/CUDA bf16 autocast the matmuls run in bf16,
    as `F.linear` would; otherwise in `hidden`'s dtype."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be (N, E) and targets (N,); got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    device_type = hidden.device.type
    autocast_on = torch.is_autocast_enabled(device_type)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast_on else hidden.dtype
    # Inside forward grad mode is always off, so whether gradients will be wanted is decided here: under
    # no_grad (evaluation) the two gradient matmuls are skipped.
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, compute_dtype, chunk_rows, needs_grad)
