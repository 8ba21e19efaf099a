"""The fused kernel on a GPU for every head dim it supports, bf16 against float64 (needs CUDA).

Every multiple of 8 from 8 to 256 (the padded ones run on tiles of the next power of two), with
grouped-query attention, positions with gaps and lengths that are not multiples of the tiles.
Tolerances: relative L2 error <= 1e-2 for out, dq, dk, dv (inputs and P are rounded to bf16;
benchmarks/attention.py measures 2e-3 to 3e-3 at D = 64 and 128); |lse - ref| <= 1e-2 (fp32
accumulation of the same bf16 inputs, approximate exp2 / log2 / sqrt).
"""
import warnings

import pytest
import torch

from scaleinv_dist import attention_backend
from scaleinv_dist import attention_reference as ref
from scaleinv_dist.attention import scale_invariant_attention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TAU = 10.0
TOL, LSE_TOL = 1e-2, 1e-2
HEAD_DIMS = list(range(8, 257, 8))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_every_head_dim_bf16(d):
    from scaleinv_dist.kernels import flash_si

    g = torch.Generator(device="cuda").manual_seed(d)
    nq, nk = 200, 300
    q, do = (torch.randn(1, 4, nq, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    k, v = (torch.randn(1, 2, nk, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    k_pos = torch.randint(1, 4, (1, nk), device="cuda", generator=g).cumsum(1)
    q_pos = k_pos[:, nk - nq:] + 1  # gaps, queries after a prefix of keys
    assert attention_backend.resolve("auto", q, k, v) == "triton"
    opts = dict(scale=d ** -0.5, tau=TAU, causal=True, transform="scale_invariant",
                alibi_slopes=None)
    out, lse = flash_si.forward(q, k, v, q_pos, k_pos, **opts)
    grads = flash_si.backward(do, q, k, v, out, lse, q_pos, k_pos, **opts)
    q64, k64, v64 = q.double(), k.double(), v.double()
    r_out, r_lse = ref.forward(q64, k64, v64, q_pos, k_pos, **opts)
    r_grads = ref.backward(do.double(), q64, k64, v64, r_out, r_lse, q_pos, k_pos, **opts)
    assert rel(out, r_out) <= TOL
    assert (lse.double() - r_lse).abs().max().item() <= LSE_TOL
    for got, want in zip(grads, r_grads):
        assert got.shape == want.shape and torch.isfinite(got).all()
        assert rel(got, want) <= TOL, (d, rel(got, want))


@pytest.mark.parametrize("d, fallback", [(12, "reference"), (20, "flex"), (264, "flex")])
def test_auto_falls_back_once_for_unsupported_head_dim(d, fallback):
    """Head dims the kernel cannot run: auto warns once and runs FlexAttention (head dim >= 16)
    or the reference backend; out and the gradients still match float64."""
    g = torch.Generator(device="cuda").manual_seed(d)
    q, k, v, do = (torch.randn(1, 2, 64, d, device="cuda", generator=g).bfloat16()
                   for _ in range(4))
    pos = torch.arange(64, device="cuda")
    attention_backend._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert attention_backend.resolve("auto", q, k, v) == fallback
        assert attention_backend.resolve("auto", q, k, v) == fallback
    assert len([w for w in caught if "'triton' skipped" in str(w.message)]) == 1
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = scale_invariant_attention(*leaves, pos, pos)
    out.backward(do)
    opts = dict(scale=d ** -0.5, tau=TAU, causal=True, transform="scale_invariant")
    x64 = [x.double() for x in (q, k, v)]
    r_out, r_lse = ref.forward(*x64, pos[None], pos[None], **opts)
    r_grads = ref.backward(do.double(), *x64, r_out, r_lse, pos[None], pos[None], **opts)
    assert rel(out, r_out) <= TOL
    for x, want in zip(leaves, r_grads):
        assert rel(x.grad, want) <= TOL
