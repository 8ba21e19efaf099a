"""The fused Triton kernel (scaleinv_dist.kernels.flash_si) against the float64 reference.

Runs on CPU under TRITON_INTERPRET=1 (set before triton is imported), on small shapes. The
interpreter mishandles bf16, so inputs here are fp32 and fp16. Tolerances (relative L2 error of out,
dq, dk, dv against float64 on the same inputs; absolute error of lse):
  fp32, exact transform paths          1e-4  (fp32 accumulation, approximate exp2/log2 are not used
                                              by the interpreter)
  fp32, tiles on the Taylor-polynomial path  3e-4 (also for lse): the truncation bound of
                                              docs/kernel.md at the switch rule, 1.6e-4 + 2.8e-5 |S|
                                              per logit for these tiles (|S| < 4 here); measured
                                              ~1e-5 at the threshold
  fp16                                  5e-3  (P and the output are rounded to fp16)
The same tolerances hold for head dims that are not powers of two (padded tiles, masked loads):
the padding columns are exact zeros and add nothing to any dot product.
"""
import math
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from scaleinv_dist import attention_reference as ref  # noqa: E402
from scaleinv_dist.attention import scale_invariant_attention  # noqa: E402
from scaleinv_dist.kernels import flash_si  # noqa: E402
from scaleinv_dist.transform import alibi_slopes  # noqa: E402

TAU = 10.0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def make(seed, b, hq, hkv, nq, nk, d, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    do = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    return q, k, v, do


def compare(q, k, v, do, q_pos, k_pos, q_seg=None, k_seg=None, *, tol, causal=True,
            transform="scale_invariant", slopes=None, lse_tol=1e-4):
    """Kernel forward and backward against the float64 reference on the same inputs."""
    opts = dict(scale=q.shape[-1] ** -0.5, tau=TAU, causal=causal, transform=transform,
                alibi_slopes=slopes)
    out, lse = flash_si.forward(q, k, v, q_pos, k_pos, q_seg, k_seg, **opts)
    q64, k64, v64 = q.double(), k.double(), v.double()
    r_out, r_lse = ref.forward(q64, k64, v64, q_pos, k_pos, q_seg, k_seg, **opts)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert rel(out, r_out) <= tol
    finite = torch.isfinite(r_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite].double() - r_lse[finite]).abs().max().item() <= lse_tol
    dq, dk, dv = flash_si.backward(do, q, k, v, out, lse, q_pos, k_pos, q_seg, k_seg, **opts)
    r_dq, r_dk, r_dv = ref.backward(do.double(), q64, k64, v64, r_out, r_lse, q_pos, k_pos,
                                    q_seg, k_seg, **opts)
    for got, want, x in ((dq, r_dq, q), (dk, r_dk, k), (dv, r_dv, v)):
        assert got.dtype == x.dtype and got.shape == x.shape
        assert torch.isfinite(got).all()
        assert rel(got, want) <= tol, rel(got, want)
    return out, lse, (dq, dk, dv)


def arange_pos(n, offset=0, b=1):
    return (torch.arange(n) + offset).expand(b, n)


# ----------------------------------------------------------------------------- exact paths
@pytest.mark.parametrize("transform", ["scale_invariant", "none", "alibi"])
@pytest.mark.parametrize("causal", [True, False])
def test_gqa_unaligned_transforms(transform, causal):
    """GQA (4 query heads on 2 kv heads), Nq != Nk, lengths not multiples of the tiles."""
    q, k, v, do = make(1, 1, 4, 2, 100, 77, 32)
    slopes = alibi_slopes(4) if transform == "alibi" else None
    compare(q, k, v, do, arange_pos(100, 30), arange_pos(77), tol=1e-4, causal=causal,
            transform=transform, slopes=slopes)


def test_positions_with_gaps_per_batch():
    """Sorted positions with random gaps, different for each batch element (not broadcast)."""
    g = torch.Generator().manual_seed(2)
    q, k, v, do = make(2, 2, 2, 1, 90, 120, 16)
    k_pos = torch.randint(1, 6, (2, 120), generator=g).cumsum(1)
    q_pos = k_pos[:, 30:] + torch.randint(0, 2, (2, 90), generator=g)
    compare(q, k, v, do, q_pos, k_pos, tol=1e-4)


def test_zigzag_permuted_positions():
    """A zigzag shard: queries hold chunks 0 and 3 of 4; keys are all chunks, permuted."""
    n, c = 160, 40
    chunks = torch.arange(n).view(4, c)
    q_pos = torch.cat([chunks[0], chunks[3]])[None]
    k_pos = torch.cat([chunks[2], chunks[0], chunks[3], chunks[1]])[None]
    q, k, v, do = make(3, 1, 2, 2, 2 * c, n, 32)
    compare(q, k, v, do, q_pos, k_pos, tol=1e-4)


def test_documents_and_empty_rows():
    """Packed documents; some queries see no key at all (first document absent from the keys)."""
    nq, nk = 96, 70
    q_pos = arange_pos(nq)
    k_pos = arange_pos(nk, 26)
    q_seg = (torch.arange(nq) // 24)[None]  # documents of 24 tokens
    k_seg = ((torch.arange(nk) + 26) // 24)[None]
    q, k, v, do = make(4, 1, 2, 1, nq, nk, 32)
    out, lse, grads = compare(q, k, v, do, q_pos, k_pos, q_seg, k_seg, tol=1e-4)
    empty = torch.zeros(nq, dtype=torch.bool)
    empty[:26] = True  # queries 0..25 precede every key
    assert torch.isneginf(lse[0, :, empty]).all() and torch.isfinite(lse[0, :, ~empty]).all()
    assert (out[0, :, empty] == 0).all()
    assert (grads[0][0, :, empty] == 0).all()


def test_no_visible_key_anywhere():
    q, k, v, do = make(5, 1, 2, 2, 40, 50, 16)
    out, lse = flash_si.forward(q, k, v, arange_pos(40), arange_pos(50, 100), scale=0.25,
                                tau=TAU, causal=True, transform="scale_invariant")
    assert (out == 0).all() and torch.isneginf(lse).all()
    grads = flash_si.backward(do, q, k, v, out, lse, arange_pos(40), arange_pos(50, 100),
                              scale=0.25, tau=TAU, causal=True, transform="scale_invariant")
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("d", [16, 64])
def test_head_dims_noncontiguous_inputs(d):
    """Strided q, k, v views (heads and tokens transposed in memory)."""
    q, k, v, do = make(6, 1, 2, 2, 70, 70, d)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q.is_contiguous()
    compare(q, k, v, do, arange_pos(70), arange_pos(70), tol=1e-4)


def test_fp16():
    q, k, v, do = make(7, 1, 2, 1, 144, 150, 32, torch.float16)
    compare(q, k, v, do, arange_pos(144, 6), arange_pos(150), tol=5e-3, lse_tol=5e-3)


# ----------------------------------------------------------------------------- polynomial path
def tile_classes(q_pos, k_pos, rblock, cblock, causal=True):
    """(n_poly, n_full, n_partial) summed over query tiles, as the kernel's pre-pass sorts them."""
    plan = flash_si._Plan(q_pos, k_pos, None, None, q_pos.shape[0], q_pos.device)
    rb, _ = plan.bounds(True, rblock)
    cb, _ = plan.bounds(False, cblock)
    lt, _ = plan.lists(True, rblock, cblock, causal, True, TAU)
    n_row, n_col = rb.shape[1], cb.shape[1]
    return tuple(lt[0, n_row * n_col:].view(n_row, 4)[:, :3].sum(0).tolist())


def test_far_tiles_use_polynomial():
    """Queries 5000 tokens after the keys: every tile pair is on the polynomial path."""
    bm, bn = flash_si.FWD_CONFIG_F32[:2]
    nq, nk = 128, 96
    q_pos, k_pos = arange_pos(nq, 5000), arange_pos(nk)
    assert tile_classes(q_pos, k_pos, bm, bn) == (nq // bm * nk // bn, 0, 0)
    q, k, v, do = make(8, 1, 2, 1, nq, nk, 32)
    compare(q, k, v, do, q_pos, k_pos, tol=3e-4, lse_tol=3e-4)
    compare(q, k, v, do, arange_pos(nq), arange_pos(nk, 5000), tol=3e-4, lse_tol=3e-4,
            causal=False)  # keys after the queries


def test_switch_threshold_tiles():
    """Queries placed so that the nearest key tile misses the switch rule by one token (exact
    path) while the two others pass it (polynomial path); output and gradients still match."""
    bm, bn = flash_si.FWD_CONFIG_F32[:2]
    ratio = flash_si.POLY_RATIO[flash_si.POLY_DEGREE]
    span = (bm - 1) + (bn - 1)
    t_poly = math.floor(span / ratio - TAU) + 1  # smallest t_min with span < ratio (t_min + tau)
    assert span < ratio * (t_poly + TAU) and not span < ratio * (t_poly - 1 + TAU)
    nk = 3 * bn
    q_pos, k_pos = arange_pos(bm, (nk - 1) + t_poly - 1), arange_pos(nk)
    assert tile_classes(q_pos, k_pos, bm, bn) == (2, 1, 0)
    q, k, v, do = make(9, 1, 2, 2, bm, nk, 32)
    compare(q, k, v, do, q_pos, k_pos, tol=3e-4, lse_tol=3e-4)


def exact_logits(scores, row_pos, col_pos, scale, causal, rows_are_q):
    qp, kp = (row_pos[:, None], col_pos[None, :]) if rows_are_q else (col_pos[None, :],
                                                                        row_pos[:, None])
    t = (qp - kp).double()
    t = t if causal else t.abs()
    g = torch.log1p(t / TAU)
    return torch.sqrt(1 + 2 * g) * scores.double() * scale - 2 * g


@pytest.mark.parametrize("rows_are_q", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_polynomial_error_bound(rows_are_q, causal):
    """Adversarial tiles at the switch threshold (the worst case the rule admits), with large
    scores, in both tile orientations: |L_poly - L| stays under poly_error_bound(), and the
    exact path agrees with float64 to fp32 rounding."""
    g = torch.Generator().manual_seed(10)
    ratio = flash_si.POLY_RATIO[flash_si.POLY_DEGREE]
    for bm, bn, stride in ((64, 32, 1), (32, 64, 1), (64, 64, 3), (16, 128, 1)):
        span = stride * (bm - 1 + bn - 1)
        t_min = int(span / ratio - TAU) + 1  # just inside the rule
        assert span < ratio * (t_min + TAU)
        far = (bn - 1) * stride + t_min
        rows = torch.arange(bm) * stride + far
        cols = torch.arange(bn) * stride
        if not causal:  # keys after the queries
            rows, cols = cols, rows
        if not rows_are_q:
            rows, cols = cols, rows
        scale = 0.125
        s_max = 30.0
        scores = (torch.rand(len(rows), len(cols), generator=g) * 2 - 1) * s_max / scale
        want = exact_logits(scores, rows, cols, scale, causal, rows_are_q)
        kw = dict(scale=scale, tau=TAU, causal=causal, rows_are_q=rows_are_q)
        got = flash_si.transform_logits(scores, rows, cols, poly=True, **kw)
        bound = flash_si.poly_error_bound(span, t_min, TAU, s_max)
        err = (got.double() - want).abs().max().item()
        fp32 = 4e-7 * want.abs().max().item()
        assert err <= bound + fp32, (bm, bn, stride, err, bound)
        exact = flash_si.transform_logits(scores, rows, cols, poly=False, **kw)
        assert (exact.double() - want).abs().max().item() <= fp32 * 4


def test_error_bound_is_small_at_threshold():
    """The documented worst case at the switch rule, contiguous tiles of the 16-bit config."""
    bm, bn = flash_si.FWD_CONFIGS[128][:2]
    span = bm - 1 + bn - 1
    t_min = span / flash_si.POLY_RATIO[flash_si.POLY_DEGREE] - TAU
    assert flash_si.poly_error_bound(span, t_min, TAU, 0.0) < 2e-4
    assert flash_si.poly_error_bound(span, t_min, TAU, 10.0) < 6e-4


# ----------------------------------------------------------------------------- ring-style backward
def test_backward_with_external_out_lse():
    """backward() given the global out/lse of a longer key set returns this block's share."""
    q, k, v, do = make(11, 1, 4, 2, 64, 150, 32)
    q_pos, k_pos = arange_pos(64, 100), arange_pos(150)
    opts = dict(scale=32 ** -0.5, tau=TAU, causal=True, transform="scale_invariant")
    g_out, g_lse = ref.forward(q.double(), k.double(), v.double(), q_pos, k_pos, **opts)
    blk = slice(40, 110)
    kb, vb, kpb = k[:, :, blk], v[:, :, blk], k_pos[:, blk]
    got = flash_si.backward(do, q, kb, vb, g_out.float(), g_lse.float(), q_pos, kpb, **opts)
    want = ref.backward(do.double(), q.double(), kb.double(), vb.double(), g_out, g_lse, q_pos,
                        kpb, **opts)
    for a, b in zip(got, want):
        assert rel(a, b) <= 1e-4


# ----------------------------------------------------------------------------- public API, errors
def test_public_api_autograd():
    q, k, v, do = make(12, 2, 2, 1, 80, 80, 32)
    pos = torch.arange(80) + 7  # (N,): broadcast over the batch
    grads = {}
    for backend in ("triton", "reference"):
        qs, ks, vs = (x.clone().requires_grad_(True) for x in (q, k, v))
        out, lse = scale_invariant_attention(qs, ks, vs, pos, pos, backend=backend,
                                             return_lse=True)
        out.backward(do)
        grads[backend] = (out.detach(), lse, qs.grad, ks.grad, vs.grad)
    for a, b in zip(grads["triton"], grads["reference"]):
        assert rel(a, b) <= 1e-4


# ----------------------------------------------------------------------------- padded head dims
@pytest.mark.parametrize("d", [8, 24, 48, 80, 96, 136, 192, 256])
def test_padded_head_dims_gqa_gaps(d):
    """Head dims on padded tiles (BLOCK_D = next power of two, at least 16), with GQA, gapped
    positions and lengths that are not multiples of the tiles; fp32 against float64."""
    g = torch.Generator().manual_seed(d)
    q, k, v, do = make(20 + d, 1, 4, 2, 37, 45, d)
    k_pos = torch.randint(1, 4, (1, 45), generator=g).cumsum(1)
    q_pos = k_pos[:, 8:] + 1
    compare(q, k, v, do, q_pos, k_pos, tol=1e-4)


def test_padded_head_dim_fp16_strided_documents():
    """D = 48 in fp16 with strided (non-contiguous) q, k, documents and a bidirectional mask."""
    q, k, v, do = make(21, 1, 2, 1, 50, 60, 48, torch.float16)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)
    seg_q = (torch.arange(50) // 20)[None]
    seg_k = (torch.arange(60) // 24)[None]
    compare(q, k, v, do, arange_pos(50), arange_pos(60), seg_q, seg_k, tol=5e-3, lse_tol=5e-3,
            causal=False)


def test_padding_columns_are_never_written():
    """A padded head dim reads and writes only its own D columns: dO as a view into a wider
    buffer (row stride 32, D = 24) gives the same result and leaves the other columns alone."""
    q, k, v, do = make(22, 1, 2, 2, 33, 33, 24)
    pos = arange_pos(33)
    opts = dict(scale=24 ** -0.5, tau=TAU, causal=True, transform="scale_invariant")
    out, lse = flash_si.forward(q, k, v, pos, pos, **opts)
    big = torch.full((1, 2, 33, 32), 1e4)
    do_view = big[..., :24]
    do_view.copy_(do)
    grads = flash_si.backward(do_view, q, k, v, out, lse, pos, pos, **opts)
    want = flash_si.backward(do, q, k, v, out, lse, pos, pos, **opts)
    assert (big[..., 24:] == 1e4).all()
    for a, b in zip(grads, want):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- errors, auto
def test_errors():
    """A named backend that cannot run the inputs says why in one line (attention_backend)."""
    q, k, v, _ = make(13, 1, 2, 2, 16, 16, 32)
    pos = torch.arange(16)

    def run(q, k, v, **kw):
        return scale_invariant_attention(q, k, v, pos, pos, backend="triton", **kw)

    with pytest.raises(ValueError, match="float16, bfloat16 and float32"):
        run(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="one dtype"):
        run(q, k.half(), v)
    for d in (12, 264):
        qd, kd, vd, _ = make(13, 1, 2, 2, 16, 16, d)
        with pytest.raises(ValueError, match="head dims that are multiples of 8 up to 256"):
            run(qd, kd, vd)
    with pytest.raises(ValueError, match="alibi_slopes"):
        run(q, k, v, transform="alibi")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with pytest.raises(ValueError, match="CUDA"):
            run(q, k, v)
    finally:
        os.environ["TRITON_INTERPRET"] = "1"


def test_supported_head_dims():
    """supports() accepts exactly the multiples of 8 from 8 to 256; the registry's "triton"
    entry is this module."""
    from scaleinv_dist import attention_backend

    assert attention_backend.contract_ops("triton") is flash_si
    for d in range(1, 300):
        x = torch.empty(1, 1, 1, d)
        ok = flash_si.supports(x, x, x, "scale_invariant") is None
        assert ok == (d % 8 == 0 and d <= 256), d
