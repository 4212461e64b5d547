"""The language-model losses (txlab/policy/loss.py): full and chunked cross-entropy, chosen by name."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from txlab.policy.loss import chunked_loss, full_loss, get_loss

aten = torch.ops.aten
V, C = 2003, 4  # a vocabulary no other dimension shares, so logits are easy to tell from the rest


def inputs(B: int = 2, T: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g, requires_grad=True)
    weight = torch.randn(V, C, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, targets


def value_and_grads(loss_fn, hidden, weight, targets):
    hidden.grad = weight.grad = None
    loss = loss_fn(hidden, weight, targets)
    loss.backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


def test_full_loss_is_cross_entropy_on_the_logits():
    hidden, weight, targets = inputs()
    logits = hidden @ weight.T  # (B, T, V)
    expected = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
    torch.testing.assert_close(full_loss(hidden, weight, targets), expected)
    # the mean over tokens, in nats: each token's -log softmax at its target, by hand
    by_hand = -torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(full_loss(hidden, weight, targets), by_hand)


def test_full_loss_of_bf16_hidden_states_is_scored_in_fp32():
    hidden, weight, targets = inputs()
    loss = full_loss(hidden.bfloat16(), weight.bfloat16(), targets)
    assert loss.dtype == torch.float32
    logits = F.linear(hidden.bfloat16(), weight.bfloat16()).float()
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)))


@pytest.mark.parametrize("chunk", [1, 3, 5, 7, 13, 14, 64])
def test_chunked_loss_equals_full_loss_in_value_and_gradients(chunk):
    """B*T = 14 tokens: chunk 1, ragged last chunks (3, 5, 13), one row per chunk (7), one chunk (14),
    a chunk larger than the whole batch (64)."""
    hidden, weight, targets = inputs()
    ref_loss, ref_dh, ref_dw = value_and_grads(full_loss, hidden, weight, targets)
    loss, dh, dw = value_and_grads(functools.partial(chunked_loss, chunk=chunk), hidden, weight, targets)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(dh, ref_dh)
    torch.testing.assert_close(dw, ref_dw)
    assert dh.abs().sum() > 0 and dw.abs().sum() > 0  # gradients reach both inputs


def test_get_loss_by_name():
    hidden, weight, targets = inputs()
    assert get_loss("full") is full_loss
    chunked = get_loss("chunked", loss_chunk=5)
    assert chunked.keywords == {"chunk": 5}
    torch.testing.assert_close(chunked(hidden, weight, targets), full_loss(hidden, weight, targets))
    assert get_loss("chunked").keywords == {"chunk": 1024}  # the config's default


def test_get_loss_rejects_an_unknown_name_naming_the_known_ones():
    with pytest.raises(ValueError, match="unknown loss 'fused'") as e:
        get_loss("fused")
    assert "full" in str(e.value) and "chunked" in str(e.value)


class LargestTensor(TorchDispatchMode):
    """The largest tensor (in elements) any op returns while the mode is on, forward and backward."""

    def __init__(self):
        super().__init__()
        self.numel = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def largest_tensor(loss_fn, hidden, weight, targets) -> int:
    with LargestTensor() as mode:
        loss = loss_fn(hidden, weight, targets)
        forward_ops = mode.ops
        loss.backward()
    assert mode.ops > forward_ops, "the mode should see the backward pass too"
    return mode.numel


def peak_bytes(loss_fn, hidden, weight, targets) -> int:
    """torch's MemTracker: the peak of live storages created in the forward and backward."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    with tracker:
        loss_fn(hidden, weight, targets).backward()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("chunk", [16, 13])  # 13: the last of 128 tokens' chunks is ragged (11 tokens)
def test_chunked_loss_never_materializes_more_than_a_chunk_of_logits(chunk):
    hidden, weight, targets = inputs(B=2, T=64)
    n = 2 * 64
    # control: the detector sees the full loss's (B*T) x V logits
    assert largest_tensor(full_loss, hidden, weight, targets) == n * V
    assert largest_tensor(functools.partial(chunked_loss, chunk=chunk), hidden, weight, targets) <= chunk * V


def test_chunked_loss_peak_does_not_grow_with_the_tokens():
    """Live memory, not just the largest tensor: a few chunks' worth of logits at most, whatever the
    number of tokens (forward keeps no chunk's logits, only the gradients it made chunk by chunk)."""
    chunk, fp32 = 16, 4
    chunked = functools.partial(chunked_loss, chunk=chunk)
    small = peak_bytes(chunked, *inputs(B=2, T=64))  # 8 chunks
    large = peak_bytes(chunked, *inputs(B=4, T=64))  # 16 chunks
    full = peak_bytes(full_loss, *inputs(B=4, T=64))
    assert full >= 4 * 64 * V * fp32  # control: the full loss holds every token's logits at once
    assert large < 4 * 64 * V * fp32 / 2, (large, full)
    assert large - small < chunk * V * fp32, (small, large)  # twice the tokens: not one more chunk of logits


def _count_projections(loss_fn, hidden, weight, targets) -> int:
    """Matrix products of the (rows x C) x (C x V) shape and its transposes, forward and backward."""

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._overloadpacket in (aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.matmul):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        loss_fn(hidden, weight, targets).backward()
    return Count.n


def test_chunked_loss_projects_each_chunk_three_times_like_the_full_loss():
    """Logits, their gradient into the hidden states, and into the weight: three products per chunk and
    no recomputation (the full loss makes the same three over all tokens at once)."""
    hidden, weight, targets = inputs(B=2, T=64)
    assert _count_projections(full_loss, hidden, weight, targets) == 3
    assert _count_projections(functools.partial(chunked_loss, chunk=16), hidden, weight, targets) == 3 * 8


def test_chunked_loss_scales_by_the_incoming_gradient_and_respects_frozen_inputs():
    hidden, weight, targets = inputs()
    chunked = functools.partial(chunked_loss, chunk=5)
    (2.5 * full_loss(hidden, weight, targets)).backward()
    ref_dh, ref_dw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (2.5 * chunked(hidden, weight, targets)).backward()
    torch.testing.assert_close(hidden.grad, ref_dh)
    torch.testing.assert_close(weight.grad, ref_dw)
    frozen = weight.detach()
    hidden.grad = None
    chunked(hidden, frozen, targets).backward()
    torch.testing.assert_close(hidden.grad, ref_dh / 2.5)
    with torch.no_grad():  # evaluation: the value alone
        torch.testing.assert_close(chunked(hidden, weight, targets), full_loss(hidden, weight, targets))


def test_chunked_loss_under_bf16_autocast_matches_the_full_loss():
    hidden, weight, targets = inputs(B=2, T=32)
    grads = []
    for fn in (full_loss, functools.partial(chunked_loss, chunk=16)):
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(hidden, weight, targets)
        loss.backward()
        assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.float32
        grads.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
