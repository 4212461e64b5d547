"""Attention kernels against the materialized reference, and the chunked kernel's memory bound."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from txlab.model.attention import (
    chunked_attention,
    chunked_tile_body,
    get_attention,
    math_attention,
    sdpa_attention,
)


def qkv(B=2, H=4, Hkv=2, T=37, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, h, T, D, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(H), mk(Hkv), mk(Hkv)


@pytest.mark.parametrize("body", ["fused", "ops"])
@pytest.mark.parametrize("Hkv", [4, 2, 1])
@pytest.mark.parametrize("chunks", [(8, 8), (5, 11), (37, 37), (1, 64), (16, 3), (3, 16)])
def test_chunked_matches_math_forward_and_backward(Hkv, chunks, body):
    q, k, v = qkv(Hkv=Hkv)
    ref = math_attention(q, k, v)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    out = chunked_attention(q, k, v, *[min(c, 37) for c in chunks], body=body)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # grads are O(1); exact zeros (query 0) come out ~1e-6


def test_sdpa_matches_math_with_gqa():
    q, k, v = qkv(Hkv=1)
    torch.testing.assert_close(sdpa_attention(q, k, v), math_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_first_position_sees_only_itself():
    q, k, v = qkv(T=8)
    for name in ("math", "sdpa", "chunked"):
        out = get_attention(name, 4, 4)(q, k, v)
        groups = q.shape[1] // k.shape[1]
        torch.testing.assert_close(out[:, :, 0], v.repeat_interleave(groups, 1)[:, :, 0])


def _largest_saved_and_live(fn, T):
    """Largest single tensor created in forward + backward (numel), via a dispatch-level count."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    q, k, v = qkv(B=1, H=2, Hkv=2, T=T, D=8)
    with Largest():
        fn(q, k, v).sum().backward()
    return Largest.biggest


def test_chunked_never_materializes_T_by_T():
    T, chunk = 256, 32
    biggest_math = _largest_saved_and_live(math_attention, T)
    biggest_chunked = _largest_saved_and_live(lambda q, k, v: chunked_attention(q, k, v, chunk, chunk), T)
    assert biggest_math >= 2 * T * T  # (B, H, T, T) scores
    assert biggest_chunked <= 2 * T * 8  # nothing beyond (B, H, T, D) tensors: tiles are chunk x chunk
    assert biggest_chunked < biggest_math / 16


def test_chunked_flops_match_causal_work():
    """The tile loop skips key tiles past the diagonal: forward FLOPs stay close to math's."""
    q, k, v = qkv(B=1, H=2, Hkv=2, T=128, D=16)
    with FlopCounterMode(display=False) as fc_math:
        math_attention(q, k, v)
    with FlopCounterMode(display=False) as fc_chunk:
        chunked_attention(q, k, v, 16, 16)
    assert fc_chunk.get_total_flops() <= fc_math.get_total_flops() * 0.6  # about half: the upper triangle is skipped


def test_tile_body_auto_is_fused_on_cpu_and_selectable():
    """`auto` computes CPU tiles with torch's fused kernel; the context selects the PyTorch-ops body (what
    the estimator models for CUDA), and both give the same numbers."""
    import txlab.model.attention as attention

    q, k, v = qkv(T=40)
    assert attention._resolve_body("auto", q) == "fused"
    with chunked_tile_body("ops"):
        assert attention._resolve_body("auto", q) == "ops"
        ops = chunked_attention(q, k, v, 16, 8)
    assert attention._resolve_body("auto", q) == "fused"
    torch.testing.assert_close(chunked_attention(q, k, v, 16, 8), ops, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown tile body"):
        with chunked_tile_body("flash"):
            pass


def test_fused_pieces_cover_the_causal_triangle_once():
    """Every (query, key <= query) pair of a sequence lies in exactly one piece, for ragged tiles."""
    import txlab.model.attention as attention

    for T, qc in [(37, 8), (37, 5), (37, 16), (37, 1), (40, 40)]:
        seen = torch.zeros(T, T, dtype=torch.int64)
        for q0, q1, pieces in attention._fused_tiles(T, qc, fake=False):
            for r0, a, b, causal in pieces:
                assert q0 <= r0 < q1 and a < b and (not causal or a == r0)
                for i in range(r0, q1):
                    hi = min(b, a + (i - r0) + 1) if causal else b
                    assert hi > a  # no row without a key: every subtile's log-sum-exp is finite
                    seen[i, a:hi] += 1
        assert torch.equal(seen, torch.ones(T, T, dtype=torch.int64).tril()), (T, qc)


@pytest.mark.parametrize("Hkv", [4, 1])
def test_fused_body_takes_the_models_layouts(Hkv):
    """q, k, v as the model makes them (heads split from one projection: (B, T, H, D) memory seen as
    (B, H, T, D)) and an output gradient in the same layout: the same numbers as contiguous inputs."""
    B, H, T, D = 2, 4, 29, 8
    g = torch.Generator().manual_seed(3)
    proj = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g, requires_grad=True)
    q, k, v = (t.unflatten(-1, (-1, D)).transpose(1, 2) for t in proj.split([H * D, Hkv * D, Hkv * D], dim=-1))
    grad = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    out = chunked_attention(q, k, v, 8, 8, body="fused")
    assert out.transpose(1, 2).is_contiguous()  # the output projection reads it without a copy
    got = torch.autograd.grad(out, proj, grad)[0]
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    ref = math_attention(qc, kc, vc)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    ref_grads = torch.autograd.grad(ref, (qc, kc, vc), grad.contiguous())
    want = torch.cat([r.transpose(1, 2).flatten(-2) for r in ref_grads], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fused_body_bf16_close_to_reference():
    q, k, v = (t.detach().to(torch.bfloat16).requires_grad_() for t in qkv(Hkv=2, T=64))
    ref = math_attention(*(t.float() for t in (q, k, v)))
    out = chunked_attention(q, k, v, 16, 16, body="fused")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))
