"""Fused Triton attention with the scale-invariant logit transform: backend "triton".

Implements the backend contract `scaleinv_dist.attention_backend.AttentionBackend` (forward ->
out, lse; backward given an external out, lse). Inputs are checked once by that module's
`validate` before they reach this module; `supports` says which valid inputs the kernel cannot
run: fp16 / bf16 / fp32 only, head dims that are multiples of 8 from 8 to 256, CUDA tensors (CPU
under TRITON_INTERPRET=1). Positions must be below 2**24. With t = q_pos - k_pos (|.| if not
causal) and S = scale * q.k the logit is L = a(t) S + m(t), a = sqrt(1 + 2 log(1 + t/tau)),
m = -2 log(1 + t/tau).

How it works (docs/kernel.md has the details and the error bound):
- A pre-pass reduces positions and document ids to per-tile min/max and sorts every (row tile,
  column tile) pair into four classes: skipped (fully masked), POLY (fully visible and far from
  the diagonal: a(t), m(t) from a Taylor polynomial around the tile pair's centre distance),
  FULL (fully visible: exact transform, no mask), PARTIAL (exact transform and element mask).
  The main kernels run one homogeneous loop per class over compacted tile lists.
- The pre-pass results form a plan, cached (`plan_cache`) on the identity and version of the
  position / document-id tensors: the backward and every further call with the same tensors
  (the layers of one step, each ring step's block) reuse it instead of launching the pre-pass.
- Everything is in the exp2 domain (logits times log2(e)); per-query terms are folded into the
  running max / log-sum-exp so that they cost nothing per score element.
- Backward: one launch; programs [0, n_kv_tiles) compute dk, dv for one key tile (looping over
  the query heads of its GQA group), the others compute dq for one (query head, query tile).
- Head dims that are not a power of two run on tiles of the next power of two (BLOCK_D, at
  least 16 for tl.dot); loads and stores are masked on the head-dim axis, so the padding columns
  are zeros in registers and never touch memory.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

TRANSFORM_IDS = {"none": 0, "scale_invariant": 1, "alibi": 2}
HEAD_DIM_STEP, MAX_HEAD_DIM = 8, 256  # head dims: multiples of 8 (16-byte bf16 rows) up to 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Taylor degree of the far-from-diagonal path and the switch rule: a tile pair uses the polynomial
# when span / (t_min + tau) < POLY_RATIO[POLY_DEGREE] (span = position range of the query tile plus
# that of the key tile, t_min = smallest distance in the pair). poly_error_bound() gives the error.
POLY_DEGREE = 2
POLY_RATIO = {1: 1.0 / 32.0, 2: 1.0 / 8.0, 3: 1.0 / 4.0}

# Hand-picked tiles for an H100, keyed by BLOCK_D (the head dim rounded up to a power of two),
# 16-bit inputs; fp32 inputs use the small ones.
# forward: (BLOCK_M, BLOCK_N, num_warps, num_stages)
# backward: (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages); the dk/dv programs
# hold BLOCK_N1 keys and walk BLOCK_M1 queries, the dq programs hold BLOCK_M2 queries.
# Picked by `benchmarks/attention.py --sweep` at N = 16k on an H100 (benchmarks/RESULTS.md); the
# BLOCK_D = 256 tiles are sized to fit the 228 KB of shared memory of an H100 SM.
FWD_CONFIGS = {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 4, 3), 128: (128, 128, 8, 3),
               256: (64, 64, 8, 2)}
BWD_CONFIGS = {16: (64, 128, 128, 64, 8, 3), 32: (64, 128, 128, 64, 8, 3),
               64: (64, 64, 64, 64, 4, 3), 128: (64, 128, 128, 64, 8, 3),
               256: (32, 32, 64, 32, 8, 2)}
FWD_CONFIG_F32 = (64, 32, 4, 2)
BWD_CONFIG_F32 = (32, 64, 64, 32, 4, 1)
F32_CONFIGS_256 = ((32, 32, 4, 1), (32, 32, 32, 32, 4, 1))  # fp32 forward, backward at BLOCK_D 256
_LIST_CHUNK = 256


# ============================================================================ elementwise helpers
@triton.jit
def _exp2(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _log2(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _sqrt(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("sqrt.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.sqrt(x)


@triton.jit
def _row_coeffs(P0, P1, P2, P3, r, DEG: tl.constexpr):
    """b_m(r) with P(r - w) = sum_m b_m(r) w^m for P(z) = sum_n P_n z^n of degree DEG (<= 3)."""
    if DEG == 1:
        return P0 + P1 * r, -P1, 0.0, 0.0
    elif DEG == 2:
        return P0 + r * (P1 + r * P2), -(P1 + 2.0 * P2 * r), P2, 0.0
    else:
        return (P0 + r * (P1 + r * (P2 + r * P3)), -(P1 + r * (2.0 * P2 + 3.0 * P3 * r)),
                P2 + 3.0 * P3 * r, -P3)


@triton.jit
def _horner(b0, b1, b2, b3, w, DEG: tl.constexpr, WITH_B0: tl.constexpr):
    """sum_m b_m w^m (m >= 1 only unless WITH_B0): DEG FMAs per element with row-vector b_m."""
    if DEG == 1:
        acc = b1 * w
    elif DEG == 2:
        acc = (b2 * w + b1) * w
    else:
        acc = ((b3 * w + b2) * w + b1) * w
    if WITH_B0:
        acc = acc + b0
    return acc


@triton.jit
def _si_poly(s, r, w, t0, st, c, tau, log2tau, DEG: tl.constexpr, FOLD_ROW: tl.constexpr,
             FAST: tl.constexpr):
    """Taylor-polynomial transform of a fully visible tile pair.

    r (rows, 1), w (1, cols): row / column positions minus their tile centres; t0 >= 0: distance of
    the centres; the distance of element (i, j) is t0 + st (r_i - w_j) with st = +-1.
    Returns (L, A, R): exp2-domain logit minus 2 log2(tau) is L + R, R per row (0 unless FOLD_ROW);
    A = dL/ds. Coefficients are exact derivatives at t0 (scalar code, once per tile pair).
    """
    u = t0 + tau
    iu = 1.0 / u
    iu2 = iu * iu
    lu = _log2(u, FAST)
    z = 1.0 + 2.0 * 0.6931471805599453 * (lu - log2tau)  # a(t0)^2
    ia = tl.math.rsqrt(z)
    ia2 = ia * ia
    # Taylor coefficients in r - w of c a(t) and of log2(e) m(t) - 2 log2(tau)
    A0 = c * z * ia
    A1 = c * iu * ia * st
    A2 = -0.5 * c * iu2 * ia * (1.0 + ia2)
    A3 = c * iu2 * iu * ia * (2.0 + 3.0 * ia2 * (1.0 + ia2)) * (1.0 / 6.0) * st
    M0 = -2.0 * lu
    M1 = -2.0 * 1.4426950408889634 * iu * st
    M2 = 1.4426950408889634 * iu2
    M3 = -(2.0 / 3.0) * 1.4426950408889634 * iu2 * iu * st
    a_0, a_1, a_2, a_3 = _row_coeffs(A0, A1, A2, A3, r, DEG)
    m_0, m_1, m_2, m_3 = _row_coeffs(M0, M1, M2, M3, r, DEG)
    A = _horner(a_0, a_1, a_2, a_3, w, DEG, True)
    if FOLD_ROW:
        return A * s + _horner(m_0, m_1, m_2, m_3, w, DEG, False), A, m_0
    else:
        return A * s + _horner(m_0, m_1, m_2, m_3, w, DEG, True), A, 0.0


@triton.jit
def _logits(s, rf, cf, rlo, rhi, clo, chi, c, tau, log2tau, K1, K0, slope,
            TRANSFORM: tl.constexpr, CAUSAL: tl.constexpr, MODE: tl.constexpr, DEG: tl.constexpr,
            FAST: tl.constexpr, ROWS_ARE_Q: tl.constexpr):
    """(L, A, Rq) for one score tile s = q.k (rows x cols; rows are queries iff ROWS_ARE_Q).

    rf (rows, 1), cf (1, cols): float positions; rlo..chi: float position bounds of the two tiles.
    log2tau = log2(tau).
    exp2-domain logit = L + Rq (+ 2 log2(tau) for scale_invariant), Rq along the query axis;
    A = dL/ds. For "none" L = s (the caller scales by c). MODE 0: Taylor polynomial (fully visible
    pairs only), 1: exact, fully visible, 2: exact with masked elements (kept finite).
    """
    if TRANSFORM == 0:
        return s, c, 0.0
    elif TRANSFORM == 2:
        if CAUSAL:  # t = q - k on visible elements: a per-query term plus a per-key term
            if ROWS_ARE_Q:
                return s * c + slope * cf, c, -slope * rf
            else:
                return s * c + slope * rf, c, -slope * cf
        else:
            return s * c - slope * tl.abs(rf - cf), c, 0.0
    else:
        if MODE == 0:
            rc = 0.5 * (rlo + rhi)
            cc = 0.5 * (clo + chi)
            if ROWS_ARE_Q:
                d0 = rc - cc
                orient = 1.0
            else:
                d0 = cc - rc
                orient = -1.0
            if CAUSAL:
                sgn = 1.0
            else:
                sgn = tl.where(d0 > 0, 1.0, -1.0)
            return _si_poly(s, rf - rc, cf - cc, sgn * d0, sgn * orient, c, tau, log2tau, DEG,
                            ROWS_ARE_Q, FAST)
        else:
            if CAUSAL:
                if ROWS_ARE_Q:
                    y = (rf + tau) - cf
                else:
                    y = cf - (rf - tau)
                if MODE == 2:
                    y = tl.maximum(y, tau)
            else:
                y = tl.abs(rf - cf) + tau
            lg = _log2(y, FAST)
            A = _sqrt(lg * K1 + K0, FAST)
            return A * s - 2.0 * lg, A, 0.0


@triton.jit
def _load_tile(ptrs, rows_ok, offs_d, MASK_ROWS: tl.constexpr, HEAD_D: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """A (rows, BLOCK_D) tile: zeros in masked rows (MASK_ROWS) and in the padding columns
    d >= HEAD_D (head dims that are not a power of two); unmasked loads otherwise."""
    if HEAD_D < BLOCK_D:
        if MASK_ROWS:
            return tl.load(ptrs, mask=rows_ok[:, None] & (offs_d < HEAD_D)[None, :], other=0.0)
        else:
            return tl.load(ptrs, mask=(offs_d < HEAD_D)[None, :], other=0.0)
    else:
        if MASK_ROWS:
            return tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _tile_mask(rows_ok, offs_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store mask of a (rows, BLOCK_D) tile: valid rows, real head-dim columns."""
    if HEAD_D < BLOCK_D:
        return rows_ok[:, None] & (offs_d < HEAD_D)[None, :]
    else:
        return rows_ok[:, None]


@triton.jit
def _visible(qf, kf, qseg, kseg, ok, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr):
    vis = ok
    if CAUSAL:
        vis = vis & (kf <= qf)
    if HAS_SEG:
        vis = vis & (qseg == kseg)
    return vis


# ============================================================================ pre-pass
@triton.jit
def _bounds_kernel(POS, SEG, BND, N, n_blocks, s_pos, s_seg,
                   BLOCK: tl.constexpr, HAS_SEG: tl.constexpr):
    """BND[b, blk] = (min pos, max pos, min seg, max seg) over one tile of BLOCK tokens."""
    blk = tl.program_id(0)
    b = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    pos = tl.load(POS + b * s_pos + offs, mask=ok, other=0)
    out = BND + (b * n_blocks + blk) * 4
    tl.store(out, tl.min(tl.where(ok, pos, 2147483647), 0))
    tl.store(out + 1, tl.max(tl.where(ok, pos, -2147483647), 0))
    if HAS_SEG:
        seg = tl.load(SEG + b * s_seg + offs, mask=ok, other=0)
        tl.store(out + 2, tl.min(tl.where(ok, seg, 2147483647), 0))
        tl.store(out + 3, tl.max(tl.where(ok, seg, -2147483647), 0))


@triton.jit
def _classify(cols, CB, n_col, Ncol, rmin, rmax, rsmin, rsmax, r_full, tau, ratio,
              CBLOCK: tl.constexpr, ROW_IS_Q: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_SEG: tl.constexpr, POLY: tl.constexpr):
    """Class of each column tile against one row tile: 0 POLY, 1 FULL, 2 PARTIAL, 3 skip."""
    ok = cols < n_col
    cmin = tl.load(CB + cols * 4, mask=ok, other=0)
    cmax = tl.load(CB + cols * 4 + 1, mask=ok, other=0)
    if ROW_IS_Q:
        qmin = rmin
        qmax = rmax
        kmin = cmin
        kmax = cmax
    else:
        qmin = cmin
        qmax = cmax
        kmin = rmin
        kmax = rmax
    any_vis = ok
    all_vis = r_full & ((cols + 1) * CBLOCK <= Ncol)
    if CAUSAL:
        any_vis = any_vis & (kmin <= qmax)
        all_vis = all_vis & (kmax <= qmin)
    if HAS_SEG:
        csmin = tl.load(CB + cols * 4 + 2, mask=ok, other=0)
        csmax = tl.load(CB + cols * 4 + 3, mask=ok, other=0)
        any_vis = any_vis & (csmin <= rsmax) & (csmax >= rsmin)
        all_vis = all_vis & (csmin == csmax) & (rsmin == rsmax) & (csmin == rsmin)
    cls = tl.where(all_vis, 1, 2)
    if POLY:
        span = ((qmax - qmin) + (kmax - kmin)).to(tl.float32)
        if CAUSAL:
            tmin = qmin - kmax
        else:
            tmin = tl.where(kmax <= qmin, qmin - kmax, tl.where(kmin >= qmax, kmin - qmax, -1))
        far = (tmin >= 0) & (span < ratio * (tmin.to(tl.float32) + tau))
        cls = tl.where(all_vis & far, 0, cls)
    return tl.where(any_vis, cls, 3)


@triton.jit
def _lists_kernel(RB, CB, LT, n_row, n_col, Nrow, Ncol, s_lt, tau, ratio,
                  RBLOCK: tl.constexpr, CBLOCK: tl.constexpr, CHUNK: tl.constexpr,
                  ROW_IS_Q: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
                  POLY: tl.constexpr):
    """For one row tile: the column tiles grouped by class (POLY, FULL, PARTIAL) and the counts.

    LT[b] holds n_row lists of n_col int32 entries, then n_row records
    (n_poly, n_full, n_partial, 0).
    """
    r = tl.program_id(0)
    b = tl.program_id(1)
    rb = RB + (b * n_row + r) * 4
    rmin = tl.load(rb)
    rmax = tl.load(rb + 1)
    rsmin = rmin
    rsmax = rmax
    if HAS_SEG:
        rsmin = tl.load(rb + 2)
        rsmax = tl.load(rb + 3)
    r_full = (r + 1) * RBLOCK <= Nrow
    cb = CB + b * n_col * 4
    n0 = r * 0
    n1 = r * 0
    n2 = r * 0
    for c0 in range(0, n_col, CHUNK):
        cls = _classify(c0 + tl.arange(0, CHUNK), cb, n_col, Ncol, rmin, rmax, rsmin, rsmax,
                        r_full, tau, ratio, CBLOCK, ROW_IS_Q, CAUSAL, HAS_SEG, POLY)
        n0 += tl.sum((cls == 0).to(tl.int32), 0)
        n1 += tl.sum((cls == 1).to(tl.int32), 0)
        n2 += tl.sum((cls == 2).to(tl.int32), 0)
    cnt = LT + b * s_lt + n_row * n_col + r * 4
    tl.store(cnt, n0)
    tl.store(cnt + 1, n1)
    tl.store(cnt + 2, n2)
    tl.store(cnt + 3, r * 0)
    out = LT + b * s_lt + r * n_col
    o0 = r * 0
    o1 = n0
    o2 = n0 + n1
    for c0 in range(0, n_col, CHUNK):
        cols = c0 + tl.arange(0, CHUNK)
        cls = _classify(cols, cb, n_col, Ncol, rmin, rmax, rsmin, rsmax,
                        r_full, tau, ratio, CBLOCK, ROW_IS_Q, CAUSAL, HAS_SEG, POLY)
        sel = (cls == 0).to(tl.int32)
        tl.store(out + o0 + tl.cumsum(sel, 0) - 1, cols, mask=sel > 0)
        o0 += tl.sum(sel, 0)
        sel = (cls == 1).to(tl.int32)
        tl.store(out + o1 + tl.cumsum(sel, 0) - 1, cols, mask=sel > 0)
        o1 += tl.sum(sel, 0)
        sel = (cls == 2).to(tl.int32)
        tl.store(out + o2 + tl.cumsum(sel, 0) - 1, cols, mask=sel > 0)
        o2 += tl.sum(sel, 0)


# ============================================================================ forward
@triton.jit
def _key_tile_logits(q, qf, qseg, q_ok, qlo, qhi, Kh, KPF, KS, KB, j, sk_n, sk_d, Nk,
                     c, tau, log2tau, K1, K0, slope,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D: tl.constexpr,
                     TRANSFORM: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, MODE: tl.constexpr,
                     DEG: tl.constexpr, FAST: tl.constexpr, F32: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    """Key tile j against query rows q (forward and dq programs).

    Returns (k, L, A, R, visible, offs_n, k_ok): the loaded key tile, the logits of _logits
    (rows are queries), the element mask (MODE 2 only; else k_ok), the key offsets and their bounds.
    """
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_n < Nk
    k_ptrs = Kh + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d
    k = _load_tile(k_ptrs, k_ok, offs_d, MODE == 2, HEAD_D, BLOCK_D)
    if F32:
        k = k.to(tl.float32)
    kf = tl.load(KPF + offs_n, mask=k_ok, other=0.0)[None, :]
    klo = 0.0
    khi = 0.0
    if MODE == 0:
        klo = tl.load(KB + j * 4).to(tl.float32)
        khi = tl.load(KB + j * 4 + 1).to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    L, A, R = _logits(s, qf, kf, qlo, qhi, klo, khi, c, tau, log2tau, K1, K0, slope,
                      TRANSFORM, CAUSAL, MODE, DEG, FAST, True)
    visible = k_ok[None, :]
    if MODE == 2:
        kseg = kf
        if HAS_SEG:
            kseg = tl.load(KS + offs_n, mask=k_ok, other=0)[None, :]
        visible = _visible(qf, kf, qseg, kseg, q_ok & k_ok[None, :], CAUSAL, HAS_SEG)
    return k, L, A, R, visible, offs_n, k_ok


@triton.jit
def _fwd_loop(acc, l_i, m_i, q, qf, qseg, q_ok, qlo, qhi, Kh, Vh, KPF, KS, KB, lst, start, end,
              sk_n, sk_d, sv_n, sv_d, Nk, c, tau, log2tau, K1, K0, slope,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D: tl.constexpr,
              TRANSFORM: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, MODE: tl.constexpr,
              DEG: tl.constexpr, FAST: tl.constexpr, F32: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over the key tiles lst[start:end], all of class MODE."""
    offs_d = tl.arange(0, BLOCK_D)
    for it in range(start, end):
        k, L, A, R, visible, offs_n, k_ok = _key_tile_logits(
            q, qf, qseg, q_ok, qlo, qhi, Kh, KPF, KS, KB, tl.load(lst + it), sk_n, sk_d, Nk,
            c, tau, log2tau, K1, K0, slope, BLOCK_N, BLOCK_D, HEAD_D, TRANSFORM, CAUSAL, HAS_SEG,
            MODE, DEG, FAST, F32, DOT_PREC)
        if MODE == 2:
            L = tl.where(visible, L, float("-inf"))
        if TRANSFORM == 0:
            m_new = tl.maximum(m_i, tl.max(L, 1, keep_dims=True) * c)
        else:
            m_new = tl.maximum(m_i, tl.max(L, 1, keep_dims=True) + R)
        if MODE == 2:  # a row may have seen nothing yet
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        if TRANSFORM == 0:
            p = _exp2(L * c - m_use, FAST)
        else:
            p = _exp2(L - (m_use - R), FAST)
        alpha = _exp2(m_i - m_use, FAST)
        l_i = l_i * alpha + tl.sum(p, 1, keep_dims=True)
        v_ptrs = Vh + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d
        v = _load_tile(v_ptrs, k_ok, offs_d, MODE == 2, HEAD_D, BLOCK_D)
        if F32:
            v = v.to(tl.float32)
        acc = acc * alpha + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, QPF, KPF, QS, KS, SLOPES, QB, KB, LT, OUT, LSE,
    sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_m, so_d, sp_q, sp_k, sb_q, sb_k, s_lt,
    Nq, Nk, Hq, G, n_qb, n_kb, c, tau, log2tau, K1, K0, lse_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D: tl.constexpr,
    TRANSFORM: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
    DEG: tl.constexpr, FAST: tl.constexpr, F32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program: one query tile of one head. Grid (n_qb, B * Hq), late (heavy) tiles first."""
    qt = n_qb - 1 - tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Nq
    q = _load_tile(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d,
                   m_ok, offs_d, True, HEAD_D, BLOCK_D)
    if F32:
        q = q.to(tl.float32)
    qf = tl.load(QPF + b * sp_q + offs_m, mask=m_ok, other=0.0)[:, None]
    qseg = qf
    if HAS_SEG:
        qseg = tl.load(QS + b * sp_q + offs_m, mask=m_ok, other=0)[:, None]
    qlo = tl.load(QB + b * sb_q + qt * 4).to(tl.float32)
    qhi = tl.load(QB + b * sb_q + qt * 4 + 1).to(tl.float32)
    slope = 0.0
    if TRANSFORM == 2:
        slope = tl.load(SLOPES + h) * 1.4426950408889634
    Kh = K + b * sk_b + hk * sk_h
    Vh = V + b * sv_b + hk * sv_h
    KPFb = KPF + b * sp_k
    KSb = KS + b * sp_k
    KBb = KB + b * sb_k
    lst = LT + b * s_lt + qt * n_kb
    cnt = LT + b * s_lt + n_qb * n_kb + qt * 4
    e0 = tl.load(cnt)
    e1 = e0 + tl.load(cnt + 1)
    e2 = e1 + tl.load(cnt + 2)
    m_i = tl.full([BLOCK_M, 1], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M, 1], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if TRANSFORM == 1:
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, qf, qseg, m_ok[:, None], qlo, qhi, Kh, Vh,
                                  KPFb, KSb, KBb, lst, 0, e0, sk_n, sk_d, sv_n, sv_d, Nk,
                                  c, tau, log2tau, K1, K0, slope, BLOCK_N, BLOCK_D, HEAD_D,
                                  TRANSFORM, CAUSAL, HAS_SEG, 0, DEG, FAST, F32, DOT_PREC)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, qf, qseg, m_ok[:, None], qlo, qhi, Kh, Vh,
                              KPFb, KSb, KBb, lst, e0, e1, sk_n, sk_d, sv_n, sv_d, Nk,
                              c, tau, log2tau, K1, K0, slope, BLOCK_N, BLOCK_D, HEAD_D, TRANSFORM,
                              CAUSAL, HAS_SEG, 1, DEG, FAST, F32, DOT_PREC)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, qf, qseg, m_ok[:, None], qlo, qhi, Kh, Vh,
                              KPFb, KSb, KBb, lst, e1, e2, sk_n, sk_d, sv_n, sv_d, Nk,
                              c, tau, log2tau, K1, K0, slope, BLOCK_N, BLOCK_D, HEAD_D, TRANSFORM,
                              CAUSAL, HAS_SEG, 2, DEG, FAST, F32, DOT_PREC)
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    tl.store(OUT + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :] * so_d,
             (acc / l_safe).to(OUT.dtype.element_ty),
             mask=_tile_mask(m_ok, offs_d, HEAD_D, BLOCK_D))
    lse = tl.where(seen, (m_i + tl.log2(l_safe) + lse_offset) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + bh * Nq + offs_m[:, None], lse, mask=m_ok[:, None])


# ============================================================================ backward
@triton.jit
def _bwd_pre_kernel(OUT, DO, LSE, DELTA, LSE2, so_b, so_h, so_m, so_d, sd_b, sd_h, sd_m, sd_d,
                    sl_b, sl_h, sl_m, Nq, Hq, lse_offset, BLOCK: tl.constexpr,
                    BLOCK_D: tl.constexpr, HEAD_D: tl.constexpr):
    """DELTA = rowsum(dO * O) fp32; LSE2 = log2(e) lse - lse_offset (+inf where lse = -inf)."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    ok = offs_m < Nq
    o = _load_tile(OUT + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :] * so_d,
                   ok, offs_d, True, HEAD_D, BLOCK_D).to(tl.float32)
    do = _load_tile(DO + b * sd_b + h * sd_h + offs_m[:, None] * sd_m + offs_d[None, :] * sd_d,
                    ok, offs_d, True, HEAD_D, BLOCK_D).to(tl.float32)
    tl.store(DELTA + bh * Nq + offs_m, tl.sum(o * do, 1), mask=ok)
    lse = tl.load(LSE + b * sl_b + h * sl_h + offs_m * sl_m, mask=ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634 - lse_offset)
    tl.store(LSE2 + bh * Nq + offs_m, lse2, mask=ok)


@triton.jit
def _bwd_dkdv_loop(dk, dv, k, v, kf, kseg, klo, khi, Qh, DOh, LSE2h, DELTAh, QPF, QS, QB,
                   lst, start, end, sq_m, sq_d, sd_m, sd_d, Nq, c, tau, log2tau, K1, K0, slope,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D: tl.constexpr,
                   TRANSFORM: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
                   MODE: tl.constexpr, DEG: tl.constexpr, FAST: tl.constexpr,
                   F32: tl.constexpr, DOT_PREC: tl.constexpr):
    """Transposed tiles: rows are this program's keys, columns BLOCK_M queries of lst[start:end]."""
    offs_d = tl.arange(0, BLOCK_D)
    for it in range(start, end):
        i = tl.load(lst + it)
        offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Nq
        q_ptrs = Qh + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d
        do_ptrs = DOh + offs_m[:, None] * sd_m + offs_d[None, :] * sd_d
        q = _load_tile(q_ptrs, m_ok, offs_d, MODE == 2, HEAD_D, BLOCK_D)
        if F32:
            q = q.to(tl.float32)
        qf = tl.load(QPF + offs_m, mask=m_ok, other=0.0)[None, :]
        lse2 = tl.load(LSE2h + offs_m, mask=m_ok, other=float("inf"))[None, :]
        qlo = 0.0
        qhi = 0.0
        if MODE == 0:
            qlo = tl.load(QB + i * 4).to(tl.float32)
            qhi = tl.load(QB + i * 4 + 1).to(tl.float32)
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
        L, A, R = _logits(sT, kf, qf, klo, khi, qlo, qhi, c, tau, log2tau, K1, K0, slope,
                          TRANSFORM, CAUSAL, MODE, DEG, FAST, False)
        if TRANSFORM == 0:
            pT = _exp2(L * c - lse2, FAST)
        else:
            pT = _exp2(L - (lse2 - R), FAST)
        if MODE == 2:
            qseg = qf
            if HAS_SEG:
                qseg = tl.load(QS + offs_m, mask=m_ok, other=0)[None, :]
            pT = tl.where(_visible(qf, kf, qseg, kseg, m_ok[None, :], CAUSAL, HAS_SEG), pT, 0.0)
        if TRANSFORM == 1:
            pA = pT * A  # dL/ds folded in now so that A dies early (register pressure)
        else:
            pA = pT
        do = _load_tile(do_ptrs, m_ok, offs_d, MODE == 2, HEAD_D, BLOCK_D)
        if F32:
            do = do.to(tl.float32)
        delta = tl.load(DELTAh + offs_m, mask=m_ok, other=0.0)[None, :]
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dk += tl.dot((pA * (dpT - delta)).to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dq_loop(dq, q, do, lse2, delta, qf, qseg, q_ok, qlo, qhi, Kh, Vh, KPF, KS, KB,
                 lst, start, end, sk_n, sk_d, sv_n, sv_d, Nk, c, tau, log2tau, K1, K0, slope,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D: tl.constexpr,
                 TRANSFORM: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, MODE: tl.constexpr,
                 DEG: tl.constexpr, FAST: tl.constexpr, F32: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for it in range(start, end):
        k, L, A, R, visible, offs_n, k_ok = _key_tile_logits(
            q, qf, qseg, q_ok, qlo, qhi, Kh, KPF, KS, KB, tl.load(lst + it), sk_n, sk_d, Nk,
            c, tau, log2tau, K1, K0, slope, BLOCK_N, BLOCK_D, HEAD_D, TRANSFORM, CAUSAL, HAS_SEG,
            MODE, DEG, FAST, F32, DOT_PREC)
        if TRANSFORM == 0:
            p = _exp2(L * c - lse2, FAST)
        else:
            p = _exp2(L - (lse2 - R), FAST)
        if MODE == 2:
            p = tl.where(visible, p, 0.0)
        if TRANSFORM == 1:
            p = p * A
        v_ptrs = Vh + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d
        v = _load_tile(v_ptrs, k_ok, offs_d, MODE == 2, HEAD_D, BLOCK_D)
        if F32:
            v = v.to(tl.float32)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        dq += tl.dot((p * (dp - delta)).to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE2, DELTA, QPF, KPF, QS, KS, SLOPES,
    QB1, KB1, LT1, QB2, KB2, LT2,
    sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    sd_b, sd_h, sd_m, sd_d, sp_q, sp_k, sb_q1, sb_k1, sl_1, sb_q2, sb_k2, sl_2,
    Nq, Nk, Hq, Hkv, G, n_kb1, n_qb1, n_qb2, n_kb2, c, tau, log2tau, K1, K0, grad_scale,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr,
    BLOCK_N2: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D: tl.constexpr,
    TRANSFORM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, DEG: tl.constexpr, FAST: tl.constexpr,
    F32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid (n_kb1 + G * n_qb2, B * Hkv): dk/dv programs (one key tile, all G query heads of the
    group) first, then dq programs (one query tile of one head), late query tiles first.

    DQ, DK, DV are contiguous like q, k, v; LSE2 and DELTA are (B, Hq, Nq) fp32.
    """
    pid = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // Hkv
    hk = bhk % Hkv
    offs_d = tl.arange(0, BLOCK_D)
    QPFb = QPF + b * sp_q
    QSb = QS + b * sp_q
    KPFb = KPF + b * sp_k
    KSb = KS + b * sp_k
    if pid < n_kb1:
        kt = pid
        offs_n = kt * BLOCK_N1 + tl.arange(0, BLOCK_N1)
        n_ok = offs_n < Nk
        k = _load_tile(K + b * sk_b + hk * sk_h + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d,
                       n_ok, offs_d, True, HEAD_D, BLOCK_D)
        v = _load_tile(V + b * sv_b + hk * sv_h + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d,
                       n_ok, offs_d, True, HEAD_D, BLOCK_D)
        if F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        kf = tl.load(KPFb + offs_n, mask=n_ok, other=0.0)[:, None]
        kseg = kf
        if HAS_SEG:
            kseg = tl.load(KSb + offs_n, mask=n_ok, other=0)[:, None]
        klo = tl.load(KB1 + b * sb_k1 + kt * 4).to(tl.float32)
        khi = tl.load(KB1 + b * sb_k1 + kt * 4 + 1).to(tl.float32)
        lst = LT1 + b * sl_1 + kt * n_qb1
        cnt = LT1 + b * sl_1 + n_kb1 * n_qb1 + kt * 4
        e0 = tl.load(cnt)
        e1 = e0 + tl.load(cnt + 1)
        e2 = e1 + tl.load(cnt + 2)
        dk = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
        for g in range(0, G):
            h = hk * G + g
            Qh = Q + b * sq_b + h * sq_h
            DOh = DO + b * sd_b + h * sd_h
            LSE2h = LSE2 + (b * Hq + h) * Nq
            DELTAh = DELTA + (b * Hq + h) * Nq
            slope = 0.0
            if TRANSFORM == 2:
                slope = tl.load(SLOPES + h) * 1.4426950408889634
            if TRANSFORM == 1:
                dk, dv = _bwd_dkdv_loop(dk, dv, k, v, kf, kseg, klo, khi, Qh, DOh, LSE2h, DELTAh,
                                        QPFb, QSb, QB1 + b * sb_q1, lst, 0, e0, sq_m, sq_d, sd_m,
                                        sd_d, Nq, c, tau, log2tau, K1, K0, slope, BLOCK_M1,
                                        BLOCK_D, HEAD_D, TRANSFORM, CAUSAL, HAS_SEG, 0, DEG, FAST,
                                        F32, DOT_PREC)
            dk, dv = _bwd_dkdv_loop(dk, dv, k, v, kf, kseg, klo, khi, Qh, DOh, LSE2h, DELTAh,
                                    QPFb, QSb, QB1 + b * sb_q1, lst, e0, e1, sq_m, sq_d, sd_m,
                                    sd_d, Nq, c, tau, log2tau, K1, K0, slope, BLOCK_M1, BLOCK_D,
                                    HEAD_D, TRANSFORM, CAUSAL, HAS_SEG, 1, DEG, FAST, F32,
                                    DOT_PREC)
            dk, dv = _bwd_dkdv_loop(dk, dv, k, v, kf, kseg, klo, khi, Qh, DOh, LSE2h, DELTAh,
                                    QPFb, QSb, QB1 + b * sb_q1, lst, e1, e2, sq_m, sq_d, sd_m,
                                    sd_d, Nq, c, tau, log2tau, K1, K0, slope, BLOCK_M1, BLOCK_D,
                                    HEAD_D, TRANSFORM, CAUSAL, HAS_SEG, 2, DEG, FAST, F32,
                                    DOT_PREC)
        kv_off = (bhk * Nk + offs_n[:, None]) * HEAD_D + offs_d[None, :]
        kv_mask = _tile_mask(n_ok, offs_d, HEAD_D, BLOCK_D)
        tl.store(DK + kv_off, (dk * grad_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)
    else:
        off = pid - n_kb1
        g = off // n_qb2
        qt = n_qb2 - 1 - off % n_qb2
        h = hk * G + g
        offs_m = qt * BLOCK_M2 + tl.arange(0, BLOCK_M2)
        m_ok = offs_m < Nq
        q = _load_tile(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d,
                       m_ok, offs_d, True, HEAD_D, BLOCK_D)
        do = _load_tile(DO + b * sd_b + h * sd_h + offs_m[:, None] * sd_m + offs_d[None, :] * sd_d,
                        m_ok, offs_d, True, HEAD_D, BLOCK_D)
        if F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(LSE2 + (b * Hq + h) * Nq + offs_m, mask=m_ok, other=float("inf"))[:, None]
        delta = tl.load(DELTA + (b * Hq + h) * Nq + offs_m, mask=m_ok, other=0.0)[:, None]
        qf = tl.load(QPFb + offs_m, mask=m_ok, other=0.0)[:, None]
        qseg = qf
        if HAS_SEG:
            qseg = tl.load(QSb + offs_m, mask=m_ok, other=0)[:, None]
        qlo = tl.load(QB2 + b * sb_q2 + qt * 4).to(tl.float32)
        qhi = tl.load(QB2 + b * sb_q2 + qt * 4 + 1).to(tl.float32)
        slope = 0.0
        if TRANSFORM == 2:
            slope = tl.load(SLOPES + h) * 1.4426950408889634
        Kh = K + b * sk_b + hk * sk_h
        Vh = V + b * sv_b + hk * sv_h
        lst = LT2 + b * sl_2 + qt * n_kb2
        cnt = LT2 + b * sl_2 + n_qb2 * n_kb2 + qt * 4
        e0 = tl.load(cnt)
        e1 = e0 + tl.load(cnt + 1)
        e2 = e1 + tl.load(cnt + 2)
        dq = tl.zeros([BLOCK_M2, BLOCK_D], tl.float32)
        if TRANSFORM == 1:
            dq = _bwd_dq_loop(dq, q, do, lse2, delta, qf, qseg, m_ok[:, None], qlo, qhi, Kh, Vh,
                              KPFb, KSb, KB2 + b * sb_k2, lst, 0, e0, sk_n, sk_d, sv_n, sv_d, Nk,
                              c, tau, log2tau, K1, K0, slope, BLOCK_N2, BLOCK_D, HEAD_D,
                              TRANSFORM, CAUSAL, HAS_SEG, 0, DEG, FAST, F32, DOT_PREC)
        dq = _bwd_dq_loop(dq, q, do, lse2, delta, qf, qseg, m_ok[:, None], qlo, qhi, Kh, Vh,
                          KPFb, KSb, KB2 + b * sb_k2, lst, e0, e1, sk_n, sk_d, sv_n, sv_d, Nk,
                          c, tau, log2tau, K1, K0, slope, BLOCK_N2, BLOCK_D, HEAD_D, TRANSFORM,
                          CAUSAL, HAS_SEG, 1, DEG, FAST, F32, DOT_PREC)
        dq = _bwd_dq_loop(dq, q, do, lse2, delta, qf, qseg, m_ok[:, None], qlo, qhi, Kh, Vh,
                          KPFb, KSb, KB2 + b * sb_k2, lst, e1, e2, sk_n, sk_d, sv_n, sv_d, Nk,
                          c, tau, log2tau, K1, K0, slope, BLOCK_N2, BLOCK_D, HEAD_D, TRANSFORM,
                          CAUSAL, HAS_SEG, 2, DEG, FAST, F32, DOT_PREC)
        q_off = ((b * Hq + h) * Nq + offs_m[:, None]) * HEAD_D + offs_d[None, :]
        tl.store(DQ + q_off, (dq * grad_scale).to(DQ.dtype.element_ty),
                 mask=_tile_mask(m_ok, offs_d, HEAD_D, BLOCK_D))


# ============================================================================ test probe
@triton.jit
def _probe_kernel(S, QP, KP, OUT, c, tau, log2tau, K1, K0, lse_offset,
                  BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, MODE: tl.constexpr,
                  DEG: tl.constexpr, ROWS_ARE_Q: tl.constexpr):
    """OUT = natural-log logits of one (BM x BN) tile as the attention kernels compute them."""
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    s = tl.load(S + offs_m[:, None] * BN + offs_n[None, :])
    rp = tl.load(QP + offs_m)
    cp = tl.load(KP + offs_n)
    L, A, R = _logits(s, rp.to(tl.float32)[:, None], cp.to(tl.float32)[None, :],
                      tl.min(rp, 0).to(tl.float32), tl.max(rp, 0).to(tl.float32),
                      tl.min(cp, 0).to(tl.float32), tl.max(cp, 0).to(tl.float32),
                      c, tau, log2tau, K1, K0, 0.0, 1, CAUSAL, MODE, DEG, False, ROWS_ARE_Q)
    tl.store(OUT + offs_m[:, None] * BN + offs_n[None, :],
             (L + R + lse_offset) * 0.6931471805599453)


# ============================================================================ host side
def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(q, k, v, transform, **layout) -> str | None:
    """Why the kernel cannot run these validated inputs (attention_backend.validate), or None."""
    if q.dtype not in DTYPES:
        return f"triton attention supports float16, bfloat16 and float32 inputs; q is {q.dtype}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"triton attention needs q, k, v in one dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
    d = q.shape[-1]
    if d % HEAD_DIM_STEP or not 0 < d <= MAX_HEAD_DIM or v.shape[-1] != d:
        return (f"triton attention supports head dims that are multiples of {HEAD_DIM_STEP} up to "
                f"{MAX_HEAD_DIM}, the same for q, k, v; got {d} (v: {v.shape[-1]})")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and _interpret()):
        return (f"triton attention needs CUDA tensors (CPU only under TRITON_INTERPRET=1); "
                f"got device {q.device}")
    return None


def block_d(d: int) -> int:
    """The tile width of head dim d: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(d))


def _tiles(dtype: torch.dtype, bd: int) -> tuple[tuple, tuple]:
    """(forward, backward) tile configs for input dtype and tile width bd."""
    if dtype == torch.float32:
        return F32_CONFIGS_256 if bd > 128 else (FWD_CONFIG_F32, BWD_CONFIG_F32)
    return FWD_CONFIGS[bd], BWD_CONFIGS[bd]


class _Plan:
    """What the kernels need from one set of positions / document ids, built once and reused.

    Holds the positions (int32 and float32) and document ids as (rows, N) views of one buffer
    (rows = 1 when all are shared across the batch: a stride-0 or size-1 batch dim, else B), and,
    filled on first use, the per-tile bounds for each tile size and the tile lists for each
    (tile sizes, causal, polynomial, tau). The forward, its backward (other tile sizes: same
    bounds where the block sizes coincide) and every layer that passes the same position tensors
    share one plan (`PlanCache`).
    """

    def __init__(self, q_pos, k_pos, q_seg, k_seg, batch, device):
        items = [q_pos, k_pos] + ([] if q_seg is None else [q_seg, k_seg])
        self.inputs = tuple(items)  # held: keeps their memory (and so the cache key) theirs
        shared = all(x.shape[0] == 1 or x.stride(0) == 0 for x in items)
        self.rows = 1 if shared else batch
        parts = [(x[:1] if shared else x.expand(batch, -1)).reshape(-1) for x in items]
        sizes = [x.numel() for x in parts]
        # one int32 buffer for all (one cat) and one float copy of the positions: 2 launches
        flat = torch.empty(sum(sizes), dtype=torch.int32, device=device)
        if all(x.device == flat.device for x in parts):
            torch.cat(parts, out=flat)
        else:
            flat.copy_(torch.cat(parts))
        views = [x.view(self.rows, -1) for x in flat.split(sizes)]
        self.qp, self.kp = views[0], views[1]
        n_pos = sizes[0] + sizes[1]
        self.qpf, self.kpf = (x.view(self.rows, -1) for x in
                              flat[:n_pos].float().split(sizes[:2]))  # exact below 2**24
        self.has_seg = q_seg is not None
        self.qs, self.ks = (views[2], views[3]) if self.has_seg else (self.qp, self.kp)
        self.nq, self.nk = self.qp.shape[1], self.kp.shape[1]
        self.sq = 0 if shared else self.nq  # batch strides seen by the main kernels
        self.sk = 0 if shared else self.nk
        self._base_bytes = 8 * (sizes[0] + sizes[1]) + 4 * (sum(sizes) - n_pos)
        self._bounds: dict = {}
        self._lists: dict = {}

    @property
    def nbytes(self) -> int:
        """Device memory held by the plan (positions, bounds, lists), in bytes."""
        held = [x for x, _ in self._bounds.values()] + [x for x, _ in self._lists.values()]
        return self._base_bytes + sum(x.numel() * x.element_size() for x in held)

    def bounds(self, query: bool, block: int) -> tuple[torch.Tensor, int]:
        """(rows, n_tiles, 4) int32 per-tile (min, max) of positions and of document ids, and
        the batch stride."""
        key = (query, block)
        if key not in self._bounds:
            pos, seg = (self.qp, self.qs) if query else (self.kp, self.ks)
            n = pos.shape[1]
            n_tiles = triton.cdiv(n, block)
            bnd = torch.empty((self.rows, n_tiles, 4), dtype=torch.int32, device=pos.device)
            _bounds_kernel[(n_tiles, self.rows)](pos, seg, bnd, n, n_tiles, n, n, BLOCK=block,
                                                 HAS_SEG=self.has_seg)
            self._bounds[key] = (bnd, 0 if self.rows == 1 else n_tiles * 4)
        return self._bounds[key]

    def lists(self, row_is_q: bool, rblock: int, cblock: int, causal: bool, poly: bool,
              tau: float) -> tuple[torch.Tensor, int]:
        """Tile lists by class for row tiles of rblock tokens (queries if row_is_q, else keys)
        against column tiles of cblock tokens; returns (buffer, batch stride)."""
        ratio = POLY_RATIO[POLY_DEGREE]  # read per call: benchmarks sweep POLY_DEGREE
        key = (row_is_q, rblock, cblock, bool(causal), (float(tau), ratio) if poly else None)
        if key not in self._lists:
            rb, _ = self.bounds(row_is_q, rblock)
            cb, _ = self.bounds(not row_is_q, cblock)
            n_rowtok, n_coltok = (self.nq, self.nk) if row_is_q else (self.nk, self.nq)
            n_row, n_col = rb.shape[1], cb.shape[1]
            size = n_row * (n_col + 4)
            lt = torch.empty((self.rows, size), dtype=torch.int32, device=rb.device)
            _lists_kernel[(n_row, self.rows)](
                rb, cb, lt, n_row, n_col, n_rowtok, n_coltok, size, float(tau), ratio,
                RBLOCK=rblock, CBLOCK=cblock, CHUNK=_LIST_CHUNK,
                ROW_IS_Q=row_is_q, CAUSAL=bool(causal), HAS_SEG=self.has_seg, POLY=bool(poly))
            self._lists[key] = (lt, 0 if self.rows == 1 else size)
        return self._lists[key]


def _tensor_key(x):
    if x is None:
        return None
    return (x.data_ptr(), x._version, tuple(x.shape), x.stride(), x.dtype, x.device)


class PlanCache:
    """LRU of `_Plan`s keyed on (data_ptr, version, shape, stride, dtype, device) of the position
    and document-id tensors, the batch size and the device.

    A plan holds its input tensors, so their memory cannot be handed to another tensor while the
    entry lives: a hit means the same memory, unmodified since (an in-place write bumps the
    version and misses). Writes that bypass the version counter (through `.data`, by custom
    kernels or collectives into the same buffer) are not seen: call `clear()` after them.
    Inference-mode tensors have no version counter and are never cached. Bounded by max_entries
    and by max_bytes of device memory (least recently used first out); max_entries = 0 turns it
    off.
    """

    def __init__(self, max_entries: int = 32, max_bytes: int = 1 << 30):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.entries: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def get(self, q_pos, k_pos, q_seg, k_seg, batch, device) -> _Plan:
        items = (q_pos, k_pos, q_seg, k_seg)
        if self.max_entries <= 0 or any(x is not None and x.is_inference() for x in items):
            self.misses += 1
            return _Plan(q_pos, k_pos, q_seg, k_seg, batch, device)
        key = (batch, torch.device(device), *map(_tensor_key, items))
        plan = self.entries.get(key)
        if plan is not None:
            self.hits += 1
            self.entries.move_to_end(key)
            return plan
        self.misses += 1
        plan = _Plan(q_pos, k_pos, q_seg, k_seg, batch, device)
        self.entries[key] = plan
        self.trim()
        return plan

    def trim(self) -> None:
        """Drop least recently used plans until both bounds hold (a plan still in use by the
        caller stays valid: dropping only forgets it)."""
        while self.entries and (len(self.entries) > self.max_entries or
                                sum(p.nbytes for p in self.entries.values()) > self.max_bytes):
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()
        self.hits = self.misses = 0


plan_cache = PlanCache()


def _constants(scale: float, tau: float) -> dict:
    """exp2-domain constants: c = scale log2(e); c a(t) = sqrt(K1 log2(t + tau) + K0)."""
    c = scale * LOG2E
    return dict(c=c, tau=float(tau), log2tau=math.log2(tau), K1=2.0 * LN2 * c * c,
                K0=c * c * (1.0 - 2.0 * math.log(tau)))


def _lse_offset(transform: str, tau: float) -> float:
    """The kernels' scale_invariant logits omit the constant 2 log2(tau) (added back to lse)."""
    return 2.0 * math.log2(tau) if transform == "scale_invariant" else 0.0


def _flags(q):
    interp = _interpret()
    f32 = q.dtype == torch.float32
    return dict(FAST=not interp, F32=interp, DOT_PREC="ieee" if f32 else "tf32")


def _slopes(alibi_slopes, q, transform, fallback):
    if transform != "alibi":
        return fallback
    return alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous()


def forward(q, k, v, q_pos, k_pos, q_seg=None, k_seg=None, *, scale, tau, causal, transform,
            alibi_slopes=None):
    """out (B, Hq, Nq, D) in q.dtype and lse (B, Hq, Nq) float32 (natural log; -inf: no key)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    tok = plan_cache.get(q_pos, k_pos, q_seg, k_seg, b, q.device)
    bd = block_d(d)
    bm, bn, warps, stages = _tiles(q.dtype, bd)[0]
    tid = TRANSFORM_IDS[transform]
    qb, sb_q = tok.bounds(True, bm)
    kb, sb_k = tok.bounds(False, bn)
    lt, s_lt = tok.lists(True, bm, bn, causal, tid == 1, tau)
    plan_cache.trim()
    out = torch.empty((b, hq, nq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
    n_qb, n_kb = qb.shape[1], kb.shape[1]
    _fwd_kernel[(n_qb, b * hq)](
        q, k, v, tok.qpf, tok.kpf, tok.qs, tok.ks, _slopes(alibi_slopes, q, transform, lse),
        qb, kb, lt, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        tok.sq, tok.sk, sb_q, sb_k, s_lt, nq, nk, hq, hq // hkv, n_qb, n_kb,
        **_constants(scale, tau), lse_offset=_lse_offset(transform, tau), BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_D=bd, HEAD_D=d, TRANSFORM=tid,
        CAUSAL=bool(causal), HAS_SEG=tok.has_seg, DEG=POLY_DEGREE, **_flags(q),
        num_warps=warps, num_stages=stages)
    return out, lse


def backward(do, q, k, v, out, lse, q_pos, k_pos, q_seg=None, k_seg=None, *, scale, tau, causal,
             transform, alibi_slopes=None):
    """dq, dk, dv (dtypes of q, k, v) of this block, given the (possibly global) out and lse."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    do = do.to(q.dtype)
    lse = lse.to(device=q.device, dtype=torch.float32)
    tok = plan_cache.get(q_pos, k_pos, q_seg, k_seg, b, q.device)
    bd = block_d(d)
    bm1, bn1, bm2, bn2, warps, stages = _tiles(q.dtype, bd)[1]
    tid = TRANSFORM_IDS[transform]
    delta = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    _bwd_pre_kernel[(triton.cdiv(nq, 64), b * hq)](
        out, do, lse, delta, lse2, *out.stride(), *do.stride(), *lse.stride(), nq, hq,
        _lse_offset(transform, tau), BLOCK=64, BLOCK_D=bd, HEAD_D=d)
    qb1, sb_q1 = tok.bounds(True, bm1)
    kb1, sb_k1 = tok.bounds(False, bn1)
    qb2, sb_q2 = tok.bounds(True, bm2)
    kb2, sb_k2 = tok.bounds(False, bn2)
    lt1, s_lt1 = tok.lists(False, bn1, bm1, causal, tid == 1, tau)
    lt2, s_lt2 = tok.lists(True, bm2, bn2, causal, tid == 1, tau)
    plan_cache.trim()
    dq = torch.empty((b, hq, nq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, hkv, nk, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, hkv, nk, d), dtype=v.dtype, device=q.device)
    n_kb1, n_qb1, n_qb2, n_kb2 = kb1.shape[1], qb1.shape[1], qb2.shape[1], kb2.shape[1]
    _bwd_kernel[(n_kb1 + g * n_qb2, b * hkv)](
        q, k, v, do, dq, dk, dv, lse2, delta, tok.qpf, tok.kpf, tok.qs, tok.ks,
        _slopes(alibi_slopes, q, transform, delta), qb1, kb1, lt1, qb2, kb2, lt2,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), tok.sq, tok.sk,
        sb_q1, sb_k1, s_lt1, sb_q2, sb_k2, s_lt2, nq, nk, hq, hkv, g, n_kb1, n_qb1, n_qb2, n_kb2,
        **_constants(scale, tau), grad_scale=LN2 if tid == 1 else float(scale),
        BLOCK_M1=bm1, BLOCK_N1=bn1, BLOCK_M2=bm2, BLOCK_N2=bn2, BLOCK_D=bd, HEAD_D=d,
        TRANSFORM=tid,
        CAUSAL=bool(causal), HAS_SEG=tok.has_seg, DEG=POLY_DEGREE, **_flags(q),
        num_warps=warps, num_stages=stages)
    return dq, dk, dv


# ============================================================================ error bound, probe
def poly_error_bound(span: float, t_min: float, tau: float, score_max: float,
                     degree: int | None = None) -> float:
    """Worst-case |L_poly - L| (natural-log units) on a tile pair evaluated by the polynomial.

    span: query position range plus key position range of the pair; t_min >= 0: its smallest
    distance; score_max: bound on |S| = |scale q.k|. Lagrange remainder of the Taylor expansion
    around the centre distance t_min + span/2 with |x| <= span/2 (docs/kernel.md). degree
    defaults to POLY_DEGREE.
    """
    degree = POLY_DEGREE if degree is None else degree
    rho = span / (2.0 * (t_min + tau))
    ia = 1.0 / math.sqrt(1.0 + 2.0 * math.log1p(t_min / tau))
    k_next = {2: ia + ia**3,
              3: 2 * ia + 3 * ia**3 + 3 * ia**5,
              4: 6 * ia + 11 * ia**3 + 18 * ia**5 + 15 * ia**7}[degree + 1]
    a_term = k_next / math.factorial(degree + 1) * score_max
    return rho ** (degree + 1) * (2.0 / (degree + 1) + a_term)


def transform_logits(scores, row_pos, col_pos, *, scale, tau, causal, poly, rows_are_q=True):
    """Logits a(t) S + m(t) (natural log) of one tile as the kernels compute them (for tests).

    scores (BM, BN) = q.k; row_pos (BM,), col_pos (BN,) integer positions of the rows and columns;
    BM, BN powers of two. Rows are queries if rows_are_q (forward and dq programs), else keys (dk/dv
    programs). poly=True takes the Taylor path (every pair must be visible), else the exact one.
    """
    bm, bn = scores.shape
    out = torch.empty((bm, bn), dtype=torch.float32, device=scores.device)
    _probe_kernel[(1,)](scores.float().contiguous(), row_pos.to(torch.int32).contiguous(),
                        col_pos.to(torch.int32).contiguous(), out, **_constants(scale, tau),
                        lse_offset=_lse_offset("scale_invariant", tau), BM=bm, BN=bn,
                        CAUSAL=bool(causal), MODE=0 if poly else 1, DEG=POLY_DEGREE,
                        ROWS_ARE_Q=rows_are_q)
    return out
