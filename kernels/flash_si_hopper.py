"""Scale-invariant attention on Hopper (sm90) through FlashAttention-4's warp-specialised kernels.

FlashAttention-4 (PyPI `flash-attn-4`, module `flash_attn.cute`, written in CUTLASS's CuTe DSL)
runs FlashAttention-3's design on Hopper: a TMA producer warp and two consumer warpgroups in
ping-pong, so that one warpgroup's softmax overlaps the other's wgmma. Its SM90 forward and
backward accept a `score_mod` (and its derivative `score_mod_bwd`) that is compiled into the
kernel. This module gives them the scale-invariant transform as CuTe DSL code:

    t = max(q_idx - kv_idx, 0),  m(t) = 2 ln(1 + t/tau),  a(t) = sqrt(1 + m(t))
    forward:  L = a(t) * S - m(t)            (S = scale * q.k, computed by the kernel)
    backward: dL/dS = a(t)

Per score element that is one log2 and one square root on the special-function unit beside the
softmax's exp2, and a few FMAs (docs/kernel.md gives the measured cost).

What runs here (everything else goes to the Triton kernel, see `supports`): a CUDA
device of compute capability 9.x with `flash_attn.cute` importable; bf16 or fp16; head dim 64, 96,
128, 192 or 256 (the ones checked on a GPU); causal self-attention whose query and key positions are the same run of
consecutive integers (one GPU, or Ulysses after its all-to-all); no document ids; transform
"scale_invariant" or "none". q_idx - kv_idx is then the position difference t.

Contract (as every backend, scaleinv_dist.attention): forward(q, k, v, q_pos, k_pos, ...) ->
(out (B, Hq, N, D) in q's dtype, lse (B, Hq, N) float32, natural log); backward(dout, q, k, v,
out, lse, ...) -> (dq, dk, dv) given an external out and lse.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os

import torch

try:  # optional: flash-attn-4 and nvidia-cutlass-dsl (Hopper machines only)
    import cutlass
    import cutlass.cute as cute
    from cutlass import Float32, const_expr
    from flash_attn.cute import interface as _fa4
    from flash_attn.cute.flash_bwd_sm90 import FlashAttentionBackwardSm90
    from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
    from flash_attn.cute.utils import AuxData
    from quack import layout_utils
except Exception as _err:  # noqa: BLE001 - any import failure means "not available here"
    _fa4 = None
    IMPORT_ERROR = f"{type(_err).__name__}: {_err}"
else:
    IMPORT_ERROR = None

TRANSFORMS = ("scale_invariant", "none")
# Head dims checked against float64 on an H200 (tests/test_hopper_backend.py, 2026-12-05).
HEAD_DIMS = (64, 96, 128, 192, 256)
_CONTIGUOUS_CACHE: dict = {}


# ----------------------------------------------------------------------------- the transform
# Each score element runs one short PTX sequence (inline asm, one element at a time), so that what
# reaches the special-function unit (MUFU) is explicit. t = max(diff, 0) becomes a float with an
# integer OR and one FADD (t < 2^23) instead of a quarter-rate I2F conversion. Then
#   x = 1 + t/tau,  y = log2 x,  u = 1 + m = 1 + 2 ln2 y,  a = sqrt(u)
#   forward L = s a + (1 - u),  backward dL/ds = a.
# Variants (docs/kernel.md gives each one's instruction counts, benchmarks/hopper_sass.py):
#   mufu    y = lg2.approx, a = sqrt.approx: 2 MUFU per element beside the softmax's exp2
#   swlog   y in software: exponent bits + a degree-5 polynomial of the mantissa (5 FMA,
#           |error| <= 6e-5 in log2), a on the MUFU: 1 MUFU
#   swsqrt  y on the MUFU, a = u rsqrt(u) with the bit-trick guess and two Newton steps (8 FMA,
#           relative error <= 5e-6): 1 MUFU
#   sw      both in software: 0 MUFU
#   tile    far from the diagonal (every distance of a tile >= poly_min_distance), a(t) and m(t)
#           as Taylor polynomials per accumulator row, 5 FMA and no MUFU per element (the Triton
#           kernel's POLY tiles, docs/kernel.md), in the forward and the backward; near the
#           diagonal `mufu`.
#   tile_lin  as `tile`, and on the farthest tiles (distance over the degree-1 rule, POLY_RATIO[1])
#           degree-1 polynomials: 3 FMA per element (forward), 2 (backward's dL/dS).
#   auto    the fastest measured (`pick_variant`): `tile_lin` in both directions at the head dims
#           where it was both timed and checked against float64 on a GPU (TILE_LIN_AUTO_HEAD_DIMS),
#           `mufu` at the others (timed at D = 96, 192 and 256 in one H200 run, 2026-12-06, on a
#           machine where FA4 plain also ran slow: weighting the backward's 2.5x FLOPs, neither
#           variant was faster at both 16k and 64k; docs/kernel.md). Measured on one H200,
#           2026-12-05 (benchmarks/hopper_variants.py, N = 16k and 64k): tile_lin is the fastest
#           forward at D = 64 and 128 and the fastest backward at D = 64; at D = 128 its backward
#           ties `mufu` (0.873 vs 0.877 of FA4 plain at 16k, 0.883 vs 0.870 at 64k).
VARIANTS = ("mufu", "swlog", "swsqrt", "sw", "tile", "tile_lin")
TILE_VARIANTS = ("tile", "tile_lin")  # our subclasses of FA4's kernels (near the diagonal: mufu)
TILE_LIN_AUTO_HEAD_DIMS = (64, 128)  # where `auto` takes tile_lin: timed faster than mufu there
DEFAULT_VARIANT = "auto"
# What forward/backward use: the environment variable named VARIANT_ENV, else the default
# (benchmarks/hopper_variants.py sets it per row).
VARIANT_ENV = "SCALEINV_HOPPER_VARIANT"
VARIANT = os.environ.get(VARIANT_ENV, DEFAULT_VARIANT)
# FA4 forward tile options for the transform (tile_mn, mma_pv_is_rs, intra_wg_overlap); empty:
# FA4's own choice per head dim (benchmarks/hopper_variants.py --fwd-tiles times others).
FWD_TILE_OPTIONS: dict = {}

# log2(1 + z) ~ z (c1 + c2 z + c3 z^2 + c4 z^3 + c5 z^4) on [0, 1): a least-squares fit on Chebyshev
# nodes, rounded to float32 (|error| <= 6e-5); the PTX takes float32 immediates in hex.
LOG2_POLY = (1.4426156282424927, -0.7170624732971191, 0.44226813316345215, -0.22770363092422485,
             0.059941161423921585)


def variant_env_prefix() -> str:
    """'SCALEINV_HOPPER_VARIANT=<value> ' when the environment sets the variant, else '': for the
    command line that benchmark results headers record."""
    return f"{VARIANT_ENV}={os.environ[VARIANT_ENV]} " if VARIANT_ENV in os.environ else ""


def _f32_hex(x: float) -> str:
    """x as a PTX float32 immediate (0fXXXXXXXX)."""
    import struct

    return "0f%08X" % struct.unpack("<I", struct.pack("<f", x))[0]


_F32 = {"one": _f32_hex(1.0), "e23": _f32_hex(2.0 ** 23), "e23_bias": _f32_hex(2.0 ** 23 + 127),
        "two_ln2": _f32_hex(2 * math.log(2)), "m05": _f32_hex(-0.5), "one5": _f32_hex(1.5),
        **{f"c{i + 1}": _f32_hex(c) for i, c in enumerate(LOG2_POLY)}}


def transform_ptx(tau: float, variant: str, backward: bool) -> str:
    """PTX for one element: inputs $1 (f32: scaled score s, or dL in backward) and $2 (s32:
    q_idx - kv_idx); output $0 (f32: the logit L, or dL * a(t))."""
    c = dict(_F32, inv_tau=_f32_hex(1.0 / tau))
    log2 = ("lg2.approx.ftz.f32 y, x;" if variant in ("mufu", "swsqrt") + TILE_VARIANTS else
            "mov.b32 xb, x; shr.u32 eb, xb, 23; or.b32 eb, eb, 0x4B000000; mov.b32 e, eb;"
            " sub.ftz.f32 e, e, {e23_bias}; and.b32 mb, xb, 0x007FFFFF; or.b32 mb, mb, 0x3F800000;"
            " mov.b32 z, mb; sub.ftz.f32 z, z, {one}; fma.rn.ftz.f32 p, z, {c5}, {c4};"
            " fma.rn.ftz.f32 p, p, z, {c3}; fma.rn.ftz.f32 p, p, z, {c2};"
            " fma.rn.ftz.f32 p, p, z, {c1}; fma.rn.ftz.f32 y, p, z, e;")
    newton = "mul.ftz.f32 r2, r, r; fma.rn.ftz.f32 k, h, r2, {one5}; mul.ftz.f32 r, r, k;"
    sqrt = ("sqrt.approx.ftz.f32 a, u;" if variant in ("mufu", "swlog") + TILE_VARIANTS else
            "mov.b32 ub, u; shr.u32 rb, ub, 1; sub.s32 rb, 0x5F3759DF, rb; mov.b32 r, rb;"
            " mul.ftz.f32 h, u, {m05}; " + newton + " " + newton + " mul.ftz.f32 a, u, r;")
    tail = ("mul.ftz.f32 $0, $1, a;" if backward else
            "sub.ftz.f32 w, {one}, u; fma.rn.ftz.f32 $0, $1, a, w;")
    body = ("max.s32 d, $2, 0; or.b32 tb, d, 0x4B000000; mov.b32 t, tb; sub.ftz.f32 t, t, {e23};"
            " fma.rn.ftz.f32 x, t, {inv_tau}, {one}; " + log2
            + " fma.rn.ftz.f32 u, y, {two_ln2}, {one}; " + sqrt + " " + tail)
    decl = (".reg .s32 d, rb; .reg .b32 tb, xb, eb, mb, ub;"
            " .reg .f32 t, x, y, u, a, w, e, z, p, r, r2, h, k;")
    return "{\n" + decl + "\n" + body.format(**c).replace("; ", ";\n") + "\n}"


@functools.lru_cache(maxsize=None)
def transform_ops(tau: float, variant: str):
    """(fwd_op, bwd_op): the per-element PTX as CuTe DSL ops, op(x: f32, q_idx - kv_idx: i32)."""
    from cutlass._mlir.dialects import llvm
    from cutlass.cutlass_dsl import T, dsl_user_op

    def elementwise(ptx):
        @dsl_user_op
        def op(x, diff, *, loc=None, ip=None):
            return cutlass.Float32(llvm.inline_asm(
                T.f32(), [cutlass.Float32(x).ir_value(loc=loc, ip=ip),
                          cutlass.Int32(diff).ir_value(loc=loc, ip=ip)],
                ptx, "=f,f,r", has_side_effects=False, is_align_stack=False,
                asm_dialect=llvm.AsmDialect.AD_ATT))
        return op

    return tuple(elementwise(transform_ptx(tau, variant, backward=b)) for b in (False, True))


@functools.lru_cache(maxsize=None)
def score_mods(tau: float, variant: str):
    """(score_mod, score_mod_bwd) for FA4, with tau and the variant compiled in.

    FA4 calls score_mod on short vectors (TensorSSA) of scores already multiplied by softmax_scale,
    with the matching q_idx / kv_idx (int32). score_mod_bwd gets dL (the gradient w.r.t. the
    modified score) and returns the gradient w.r.t. the scaled score, dL * a(t).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown Hopper transform variant {variant!r}; choose one of {VARIANTS}")
    fwd_op, bwd_op = transform_ops(tau, variant)

    @cute.jit
    def score_mod(scores, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
        out = cute.make_rmem_tensor(scores.shape, cutlass.Float32)
        for i in cutlass.range_constexpr(cute.size(scores.shape)):
            out[i] = fwd_op(scores[i], q_idx[i] - kv_idx[i])
        return out.load()

    @cute.jit
    def score_mod_bwd(grad, scores, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
        out = cute.make_rmem_tensor(grad.shape, cutlass.Float32)
        for i in cutlass.range_constexpr(cute.size(grad.shape)):
            out[i] = bwd_op(grad[i], q_idx[i] - kv_idx[i])
        return out.load()

    # FA4 caches compiled kernels by a hash of the callable; name what differs explicitly.
    score_mod.__cute_hash__ = f"scaleinv-si-fwd-{variant}-{tau!r}"
    score_mod_bwd.__cute_hash__ = f"scaleinv-si-bwd-{variant}-{tau!r}"
    return score_mod, score_mod_bwd


# ----------------------------------------------------------------------------- the tile variant
def row_taylor(te, x_c, scale, tau, log2, rsqrt, rcp, toward=1, degree=2):
    """Coefficients (A0, A1, A2, M0, M1, M2) with, for a row of scores at distances
    t = te + toward (x_c - x) (x >= 0 the column offset, te the centre distance; toward = 1 when
    the columns are keys, -1 when they are queries):
        scale * a(t) ~ A0 + A1 x + A2 x^2,   m(t) ~ M0 + M1 x + M2 x^2
    the Taylor polynomials of `degree` (2, or 1 with A2 = M2 = 0) around te (error:
    flash_si.poly_error_bound with span = the row's column range). log2, rsqrt, rcp: the
    operations to use (MUFU on the GPU, numpy in tests).

        f = ln(1 + t/tau),  f' = 1/(t + tau),  f'' = -f'^2;  m = 2 f,  a = sqrt(1 + m)
        a' = f'/a,  a''/2 = -f'^2 (1 + 1/a^2) / (2 a),  m''/2 = -f'^2
    """
    m0 = log2(te * (1.0 / tau) + 1.0) * (2.0 * math.log(2.0))
    ra = rsqrt(m0 + 1.0)
    f1 = rcp(te + tau)
    a = ((m0 + 1.0) * ra * scale, f1 * ra * (scale * toward))
    m = (m0, f1 * (2.0 * toward))
    if degree == 1:  # p0 + p1 z with z = x_c - x, as a polynomial in x
        return tuple(c for p0, p1 in (a, m) for c in (p0 + p1 * x_c, p1 * -1.0, 0.0))
    f1sq = f1 * f1
    a += (f1sq * ra * (ra * ra + 1.0) * (-0.5 * scale),)
    m += (f1sq * -1.0,)

    def in_x(p0, p1, p2):  # p0 + p1 z + p2 z^2 with z = x_c - x, as a polynomial in x
        return (p0 + (p1 + p2 * x_c) * x_c, (p1 + p2 * x_c * 2.0) * -1.0, p2)

    return in_x(*a) + in_x(*m)


def poly_min_distance(cols: int, tau: float, degree: int = 2) -> int:
    """Smallest t_min of a tile that the tile variants evaluate by a polynomial of `degree`: a
    row's column range (at most cols - 1) over t_min + tau below the Triton kernel's
    POLY_RATIO[degree] (1/8 for degree 2, 1/32 for degree 1)."""
    from .flash_si import POLY_RATIO

    return math.ceil((cols - 1) / POLY_RATIO[degree] - tau)


if IMPORT_ERROR is None:
    @cute.jit
    def row_polynomials(acc, thr_mma, m_block, n_block, tile_m: cutlass.Constexpr,
                        tile_n: cutlass.Constexpr, keys_are_rows: cutlass.Constexpr,
                        pack: cutlass.Constexpr, tau: cutlass.Constexpr, scale,
                        grad: cutlass.Constexpr, degree: cutlass.Constexpr = 2):
        """On a tile whose every distance passes poly_min_distance(degree), per element 5 FMA
        (degree 2; degree 1: 3) and no MUFU:
            grad False: acc = scale a(t) acc - m(t)   (the logits from raw scores)
            grad True:  acc = a(t) acc                 (dL/dS from dL; pass scale = 1)
        with per-row Taylor coefficients (row_taylor: 3 MUFU a row, and a thread holds few rows).
        The accumulator is (queries x keys), or (keys x queries) when keys_are_rows (FA4's
        backward with SdP_swapAB); pack = query heads packed into the rows (FA4's pack_gqa), else 1.
        Column offsets come from thread 0's slice of the tile: compile-time constants."""
        shape = (tile_n, tile_m) if const_expr(keys_are_rows) else (tile_m, tile_n)
        cS = cute.make_identity_tensor(shape)
        acc_mn = layout_utils.reshape_acc_to_mn(acc)
        tScS_mn = layout_utils.reshape_acc_to_mn(thr_mma.partition_C(cS))
        t0ScS_mn = layout_utils.reshape_acc_to_mn(thr_mma.get_slice(0).partition_C(cS))
        ncol = cute.size(tScS_mn.shape[1])
        x_c = Float32(t0ScS_mn[0, ncol - 1][1]) * 0.5
        toward = -1 if const_expr(keys_are_rows) else 1
        for r in cutlass.range_constexpr(cute.size(tScS_mn.shape[0])):
            row, col = tScS_mn[r, 0][0], tScS_mn[0][1]  # this thread's first column
            if const_expr(keys_are_rows):
                t0 = Float32(m_block * tile_m + col - (n_block * tile_n + row))
            else:
                t0 = Float32((m_block * tile_m + row) // pack - (n_block * tile_n + col))
            a0, a1, a2, m0, m1, m2 = row_taylor(t0 - x_c * toward, x_c, scale, tau, _mufu_log2,
                                                _mufu_rsqrt, cute.arch.rcp_approx, toward,
                                                degree)
            for c in cutlass.range_constexpr(ncol):
                x = Float32(t0ScS_mn[0, c][1])
                if const_expr(degree == 1):
                    if const_expr(grad):
                        acc_mn[r, c] = (a1 * x + a0) * acc_mn[r, c]
                    else:
                        acc_mn[r, c] = (a1 * x + a0) * acc_mn[r, c] - (m1 * x + m0)
                elif const_expr(grad):
                    acc_mn[r, c] = ((a2 * x + a1) * x + a0) * acc_mn[r, c]
                else:
                    acc_mn[r, c] = (((a2 * x + a1) * x + a0) * acc_mn[r, c]
                                    - ((m2 * x + m1) * x + m0))

    @cute.jit
    def far_tile(m_block, n_block, tile_m: cutlass.Constexpr, tile_n: cutlass.Constexpr,
                 cols: cutlass.Constexpr, pack: cutlass.Constexpr, tau: cutlass.Constexpr,
                 degree: cutlass.Constexpr = 2):
        """Whether every distance of the (m_block, n_block) tile passes
        poly_min_distance(cols, tau, degree)."""
        return ((m_block * tile_m) // pack - n_block * tile_n - (tile_n - 1)
                >= poly_min_distance(cols, tau, degree))

    @cute.jit
    def tile_score_mod(acc, thr_mma, m_block, n_block, tile_m: cutlass.Constexpr,
                       tile_n: cutlass.Constexpr, cols: cutlass.Constexpr,
                       keys_are_rows: cutlass.Constexpr, pack: cutlass.Constexpr,
                       tau: cutlass.Constexpr, scale, grad: cutlass.Constexpr,
                       linear_far: cutlass.Constexpr, exact: cutlass.Constexpr):
        """The tile variants' step on one tile of S (grad False) or dL (grad True): degree 1 when
        linear_far and every distance passes poly_min_distance(cols, tau, 1), else degree 2 when
        it passes poly_min_distance(cols, tau), else exact() (near the diagonal). Arguments as in
        row_polynomials; cols = the accumulator row's length."""
        poly = (acc, thr_mma, m_block, n_block, tile_m, tile_n, keys_are_rows, pack, tau, scale,
                grad)
        if const_expr(linear_far):
            if far_tile(m_block, n_block, tile_m, tile_n, cols, pack, tau, 1):
                row_polynomials(*poly, 1)
            else:
                degree2_or_exact(poly, m_block, n_block, tile_m, tile_n, cols, pack, tau, exact)
        else:
            degree2_or_exact(poly, m_block, n_block, tile_m, tile_n, cols, pack, tau, exact)

    @cute.jit
    def degree2_or_exact(poly: cutlass.Constexpr, m_block, n_block, tile_m: cutlass.Constexpr,
                         tile_n: cutlass.Constexpr, cols: cutlass.Constexpr,
                         pack: cutlass.Constexpr, tau: cutlass.Constexpr,
                         exact: cutlass.Constexpr):
        """tile_score_mod below degree 1: degree 2 where the tile passes
        poly_min_distance(cols, tau), else exact(). poly: row_polynomials' arguments up to grad."""
        if far_tile(m_block, n_block, tile_m, tile_n, cols, pack, tau):
            row_polynomials(*poly)
        else:
            exact()

    class TileSIForward(FlashAttentionForwardSm90):
        """FA4's SM90 forward with the polynomial on far key tiles (the tile variants); `tau` and
        `linear_far` (degree 1 on the farthest tiles: `tile_lin`) are class attributes
        (see _tile_classes)."""
        tau = 10.0
        linear_far = False

        @cute.jit
        def apply_score_mod(self, thr_mma_qk, batch_idx, head_idx, m_block, acc_S, n_block,
                            softmax_scale, seqlen, aux_data: AuxData = AuxData(),
                            fastdiv_mods=None):
            exact = functools.partial(FlashAttentionForwardSm90.apply_score_mod, self,
                                      thr_mma_qk, batch_idx, head_idx, m_block, acc_S, n_block,
                                      softmax_scale, seqlen, aux_data, fastdiv_mods)
            tile_score_mod(acc_S, thr_mma_qk, m_block, n_block, self.tile_m, self.tile_n,
                           self.tile_n, False,
                           self.qhead_per_kvhead if const_expr(self.pack_gqa) else 1, self.tau,
                           softmax_scale, False, self.linear_far, exact)

    class TileSIBackward(FlashAttentionBackwardSm90):
        """FA4's SM90 backward with the polynomial on far tiles, for the recomputed logits and
        for dL/dS. Near the diagonal dL/dS runs `mufu`'s op from the indices alone, so FA4's copy
        of the unmodified scores (acc_S_pre) is never read and its registers are freed."""
        tau = 10.0
        linear_far = False

        @cute.jit
        def apply_score_mod(self, acc_S, thr_mma_SdP, batch_idx, head_idx, m_block, n_block,
                            softmax_scale, seqlen_info, aux_data: AuxData = AuxData(),
                            fastdiv_mods=(None, None)):
            exact = functools.partial(FlashAttentionBackwardSm90.apply_score_mod, self, acc_S,
                                      thr_mma_SdP, batch_idx, head_idx, m_block, n_block,
                                      softmax_scale, seqlen_info, aux_data, fastdiv_mods)
            tile_score_mod(acc_S, thr_mma_SdP, m_block, n_block, self.tile_m, self.tile_n,
                           self.row_cols(), self.SdP_swapAB, 1, self.tau, softmax_scale, False,
                           self.linear_far, exact)

        @cute.jit
        def apply_score_mod_bwd(self, grad_tensor, score_tensor, thr_mma_SdP, batch_idx,
                                head_idx, m_block, n_block, softmax_scale, seqlen_info,
                                aux_data: AuxData = AuxData(), fastdiv_mods=(None, None)):
            exact = functools.partial(self.grad_exact, grad_tensor, thr_mma_SdP, m_block,
                                      n_block)
            tile_score_mod(grad_tensor, thr_mma_SdP, m_block, n_block, self.tile_m, self.tile_n,
                           self.row_cols(), self.SdP_swapAB, 1, self.tau, 1.0, True,
                           self.linear_far, exact)

        @cute.jit
        def grad_exact(self, grad_tensor, thr_mma_SdP, m_block, n_block):
            """dL/dS = a(t) dL element by element (`mufu`'s op) from the indices alone."""
            swap = self.SdP_swapAB
            cS = cute.make_identity_tensor((self.tile_n, self.tile_m) if const_expr(swap)
                                           else (self.tile_m, self.tile_n))
            cS = cute.domain_offset((n_block * self.tile_n, m_block * self.tile_m)
                                    if const_expr(swap)
                                    else (m_block * self.tile_m, n_block * self.tile_n), cS)
            tScS = thr_mma_SdP.partition_C(cS)
            bwd_op = transform_ops(self.tau, "tile")[1]  # its PTX is mufu's
            q_at, k_at = (1, 0) if const_expr(swap) else (0, 1)
            for i in cutlass.range_constexpr(cute.size(grad_tensor.shape)):
                grad_tensor[i] = bwd_op(grad_tensor[i], tScS[i][q_at] - tScS[i][k_at])

        def row_cols(self) -> int:
            """Columns of a row of the S / dP accumulator: queries when SdP_swapAB, else keys."""
            return self.tile_m if self.SdP_swapAB else self.tile_n


def _mufu_log2(x):
    return cute.math.log2(x, fastmath=True)


def _mufu_rsqrt(x):
    return cute.math.rsqrt(x, fastmath=True)


@functools.lru_cache(maxsize=None)
def _tile_classes(tau: float, linear_far: bool):
    """(TileSIForward, TileSIBackward) with tau and linear_far (`tile_lin`) compiled in."""
    suffix = f"_tau{tau:g}" + ("_lin" if linear_far else "")
    return tuple(type(base.__name__ + suffix, (base,), {"tau": float(tau), "linear_far": linear_far})
                 for base in (TileSIForward, TileSIBackward))


# ----------------------------------------------------------------------------- eligibility
def _contiguous(pos: torch.Tensor) -> bool:
    """True when every row of pos (B, N) is the same run first, first + 1, ... The model passes one
    positions tensor to every layer (as new broadcast views of it), so the answer is cached per
    memory, layout and version (one device sync a step). Entries hold their tensor, so its memory
    cannot be reused by another tensor while the entry lives (no stale hit through a recycled
    data pointer)."""
    key = (pos.data_ptr(), tuple(pos.shape), tuple(pos.stride()), pos.dtype, pos.device)
    hit = _CONTIGUOUS_CACHE.get(key)
    if hit is not None and hit[1] == pos._version:
        return hit[2]
    row = pos[0]
    ok = bool(((row[1:] - row[:-1]) == 1).all()) if row.numel() > 1 else True
    if ok and pos.shape[0] > 1 and pos.stride(0) != 0:
        ok = bool((pos == row).all())
    if len(_CONTIGUOUS_CACHE) >= 8 and key not in _CONTIGUOUS_CACHE:
        _CONTIGUOUS_CACHE.pop(next(iter(_CONTIGUOUS_CACHE)))
    _CONTIGUOUS_CACHE[key] = (pos, pos._version, ok)
    return ok


def supports(q, k, v, transform, *, q_pos=None, k_pos=None, q_seg=None, k_seg=None,
             causal=True) -> str | None:
    """None when this backend runs these validated inputs, else why not (one short phrase)."""
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "needs a Hopper (sm90) GPU"
    if _fa4 is None:
        return (f"flash_attn.cute is not importable ({IMPORT_ERROR}); pip install -e '.[hopper]' "
                f"for the faster Hopper kernels")
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"needs bf16 or fp16 inputs, got {q.dtype}"
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        return (f"head dim {d} is not one of {HEAD_DIMS} (FA4's SM90 backward gives a wrong dq "
                f"at D = 48 and 80, measured; other head dims are unverified)")
    if transform not in TRANSFORMS:
        return f"transform {transform!r} is not one of {TRANSFORMS}"
    if not causal:
        return "only causal attention"
    if q_pos is None or k_pos is None:
        return "runs one device's whole sequence (context-parallel shards use the Triton kernel)"
    if q_seg is not None:
        return "document ids (q_seg/k_seg) go to the Triton kernel"
    if q.shape[2] != k.shape[2]:
        return "needs as many queries as keys"
    if not (q_pos.data_ptr() == k_pos.data_ptr() and q_pos.stride() == k_pos.stride()
            or torch.equal(q_pos, k_pos)):
        return "query and key positions differ (a context-parallel shard)"
    if not _contiguous(q_pos):
        return "positions are not one run of consecutive integers"
    return None


# ----------------------------------------------------------------------------- contract
def _bnhd(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> FA4's (B, N, H, D) with a unit last stride (a view when possible)."""
    x = x.transpose(1, 2)
    return x if x.stride(-1) == 1 else x.contiguous()


def pick_variant(variant: str, head_dim: int) -> str:
    """The concrete variant that `variant` ("auto" or one of VARIANTS) means at `head_dim`."""
    if variant != "auto":
        if variant not in VARIANTS:
            raise ValueError(f"unknown Hopper transform variant {variant!r} ({VARIANT_ENV})"
                             f"; choose auto or one of {', '.join(VARIANTS)}")
        return variant
    return "tile_lin" if head_dim in TILE_LIN_AUTO_HEAD_DIMS else "mufu"


@contextlib.contextmanager
def _kernel_classes(variant, tau: float):
    """With a tile variant, FA4 builds our subclasses of its SM90 kernels (it looks their classes
    up by name in its interface module at each call)."""
    if variant not in TILE_VARIANTS:
        yield
        return
    saved = _fa4.FlashAttentionForwardSm90, _fa4.FlashAttentionBackwardSm90
    _fa4.FlashAttentionForwardSm90, _fa4.FlashAttentionBackwardSm90 = _tile_classes(
        float(tau), variant == "tile_lin")
    try:
        yield
    finally:
        _fa4.FlashAttentionForwardSm90, _fa4.FlashAttentionBackwardSm90 = saved


def _mods(transform: str, tau: float, head_dim: int):
    """(variant or None, score_mod, score_mod_bwd) for one call: (None, None, None) without the
    transform."""
    if transform != "scale_invariant":
        return None, None, None
    variant = pick_variant(VARIANT, head_dim)
    return (variant, *score_mods(float(tau), variant))


def forward(q, k, v, q_pos=None, k_pos=None, q_seg=None, k_seg=None, *, scale, tau, causal,
            transform, alibi_slopes=None):
    """out (B, Hq, N, D), lse (B, Hq, N) float32 natural log. Inputs as in the module docstring."""
    variant, score_mod, _ = _mods(transform, tau, q.shape[-1])
    with _kernel_classes(variant, tau):
        out, lse, *_ = _fa4._flash_attn_fwd(_bnhd(q), _bnhd(k), _bnhd(v), softmax_scale=scale,
                                            causal=True, score_mod=score_mod, return_lse=True,
                                            **(FWD_TILE_OPTIONS if score_mod is not None else {}))
    return out.transpose(1, 2), lse


def backward(dout, q, k, v, out, lse, q_pos=None, k_pos=None, q_seg=None, k_seg=None, *, scale,
             tau, causal, transform, alibi_slopes=None):
    """(dq, dk, dv) in the inputs' layout, given an external out and lse (from any backend)."""
    variant, score_mod, score_mod_bwd = _mods(transform, tau, q.shape[-1])
    group = q.shape[1] // k.shape[1]
    repeat_kv = group > 1 and score_mod is not None
    if repeat_kv:
        # FA4's SM90 backward with a score_mod is wrong under GQA (dq, dk, dv; measured on an H200,
        # its plain GQA backward is right): run it on K, V repeated per query head and sum the
        # key/value gradients over each group.
        k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
    with _kernel_classes(variant, tau):
        dq, dk, dv = _fa4._flash_attn_bwd(_bnhd(q), _bnhd(k), _bnhd(v), _bnhd(out), _bnhd(dout),
                                          lse.float().contiguous(), scale, True,
                                          score_mod=score_mod, score_mod_bwd=score_mod_bwd)
    dk, dv = (x.transpose(1, 2) for x in (dk, dv))
    if repeat_kv:
        b, h, n, d = dk.shape
        dk, dv = (x.view(b, h // group, group, n, d).float().sum(2).to(x.dtype) for x in (dk, dv))
    return dq.transpose(1, 2), dk, dv
