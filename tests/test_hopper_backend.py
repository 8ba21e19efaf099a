"""The Hopper backend (FlashAttention-4's SM90 kernels with the transform as a CuTe DSL score_mod).

On CPU: which inputs it takes (one run of consecutive positions, causal, no documents) and that it
reports why it can't run. On an sm90 GPU with flash-attn-4 (`-m gpu`): bf16 against the float64
reference for out, lse, dq, dk, dv at several head dims, with GQA; "auto" picks it only where it
applies, and the Triton kernel elsewhere.
"""
import numpy as np
import pytest
import torch

from scaleinv_dist import attention_reference
from scaleinv_dist.attention import scale_invariant_attention
from scaleinv_dist.kernels import flash_si_hopper as hopper

TAU = 10.0


@pytest.mark.parametrize("pos, expected", [
    (torch.arange(16).expand(2, 16), True),
    (torch.arange(5, 21)[None], True),
    (torch.stack([torch.arange(16), torch.arange(16)]).contiguous(), True),
    (torch.stack([torch.arange(16), torch.arange(1, 17)]), False),  # rows differ
    (torch.cat([torch.arange(8), torch.arange(10, 18)])[None], False),  # a gap
    (torch.arange(16).flip(0)[None], False),  # permuted
    (torch.cat([torch.arange(4), torch.arange(12, 16), torch.arange(4, 12)])[None], False),  # zigzag-like
])
def test_contiguous_positions(pos, expected):
    assert hopper._contiguous(pos) is expected


def test_reports_why_not_on_cpu():
    q = torch.randn(1, 2, 16, 64)
    pos = torch.arange(16)[None]
    reason = hopper.supports(q, q, q, "scale_invariant", q_pos=pos, k_pos=pos, causal=True)
    assert isinstance(reason, str) and reason


def _hopper_ready() -> bool:
    return (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
            and hopper.IMPORT_ERROR is None)


def _rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _errors(backend, q, k, v, do, pos):
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out, lse = scale_invariant_attention(*leaves, pos, pos, tau=TAU, backend=backend,
                                         return_lse=True)
    out.backward(do)
    return out, lse, [x.grad for x in leaves]


def _assert_matches_float64(n, d, hq, hkv, seed):
    """The hopper backend (bf16, autograd) against float64 on random inputs. Tolerance: relative
    error <= 1e-2 (bf16 operands) and no worse than 1.25x FlexAttention's on the same inputs."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, do = (torch.randn(1, hq, n, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    k, v = (torch.randn(1, hkv, n, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    pos = torch.arange(1000, 1000 + n, device="cuda")  # any start: only differences matter
    opts = dict(scale=d ** -0.5, tau=TAU, causal=True, transform="scale_invariant")
    x64 = [x.double() for x in (q, k, v)]
    r_out, r_lse = attention_reference.forward(*x64, pos[None], pos[None], **opts)
    r_grads = attention_reference.backward(do.double(), *x64, r_out, r_lse, pos[None], pos[None],
                                           **opts)
    ours = _errors("hopper", q, k, v, do, pos)
    flex = _errors("flex", q, k, v, do, pos)
    for name, x, f, r in zip(("out", "lse", "dq", "dk", "dv"), [ours[0], ours[1], *ours[2]],
                             [flex[0], flex[1], *flex[2]], [r_out, r_lse, *r_grads]):
        assert torch.isfinite(x).all(), name
        err, bar = _rel(x, r), _rel(f, r)
        assert err <= max(1e-2, 1.25 * bar), f"{name}: {err:.2e} (flex {bar:.2e})"


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper_ready(), reason="needs an sm90 GPU with flash-attn-4")
@pytest.mark.parametrize("d", hopper.HEAD_DIMS)
@pytest.mark.parametrize("hq, hkv", [(2, 2), (4, 2)])
def test_hopper_matches_float64(d, hq, hkv):
    """The default variant at every supported head dim, with and without GQA."""
    _assert_matches_float64(2048, d, hq, hkv, seed=d * 10 + hq)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper_ready(), reason="needs an sm90 GPU with flash-attn-4")
@pytest.mark.parametrize("variant, n", [("tile", 4096), ("tile_lin", 8192)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq, hkv", [(2, 2), (4, 2)])
def test_tile_variant_matches_float64(variant, n, d, hq, hkv, monkeypatch):
    """The tile variants: degree-2 polynomials on far tiles (at N = 4096 most of them), and with
    `tile_lin` degree 1 on the farthest (distance >= 4054 for 128 columns: about a quarter of the
    causal tiles at N = 8192)."""
    monkeypatch.setattr(hopper, "VARIANT", variant)
    _assert_matches_float64(n, d, hq, hkv, seed=d + hq)


def test_named_hopper_refuses_what_it_cannot_run():
    """Named, backend="hopper" says in one line why it cannot run the inputs (here: no GPU)."""
    q = torch.randn(1, 2, 16, 64)
    pos = torch.arange(16)
    with pytest.raises(ValueError, match="attention.backend='hopper'"):
        scale_invariant_attention(q, q, q, pos, pos, tau=TAU, backend="hopper")


# ----------------------------------------------------------------------------- the PTX, on CPU
def _run_ptx(ptx: str, x: np.ndarray, diff: np.ndarray) -> np.ndarray:
    """Executes the transform's PTX on float32 / int32 arrays (the handful of opcodes it uses;
    lg2.approx and sqrt.approx as exact float32 log2 / sqrt, which they approximate to ~2^-22)."""
    regs = {"$1": x.astype(np.float32), "$2": diff.astype(np.int32)}
    f32, u32, i32 = np.float32, np.uint32, np.int32

    def val(tok, kind):
        if tok in regs:
            return regs[tok].view(kind) if regs[tok].dtype != kind else regs[tok]
        if tok.startswith("0f"):
            return np.array([int(tok[2:], 16)], dtype=u32).view(f32)[0]
        return kind(int(tok, 0)) if kind is not f32 else f32(float(tok))

    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        if op in ("mov.b32",):
            out = regs[src[0]].copy() if src[0] in regs else val(src[0], f32)
        elif op in ("or.b32", "and.b32", "shr.u32"):
            a, b = val(src[0], u32), val(src[1], u32)
            out = {"or.b32": a | b, "and.b32": a & b, "shr.u32": a >> b}[op].astype(u32)
        elif op in ("max.s32", "sub.s32"):
            a, b = val(src[0], i32), val(src[1], i32)
            out = (np.maximum(a, b) if op == "max.s32" else np.asarray(a - b)).astype(i32)
        elif op == "fma.rn.ftz.f32":
            a, b, c = (np.asarray(val(t, f32), dtype=np.float64) for t in src)
            out = (a * b + c).astype(f32)
        elif op in ("sub.ftz.f32", "mul.ftz.f32"):
            a, b = val(src[0], f32), val(src[1], f32)
            out = np.asarray(a - b if op.startswith("sub") else a * b, dtype=f32)
        elif op == "lg2.approx.ftz.f32":
            out = np.log2(val(src[0], f32)).astype(f32)
        elif op == "sqrt.approx.ftz.f32":
            out = np.sqrt(val(src[0], f32)).astype(f32)
        else:
            raise AssertionError(f"opcode {op} not emulated")
        regs[dst] = np.asarray(out)
    return regs["$0"].view(np.float32)


@pytest.mark.parametrize("variant", hopper.VARIANTS)
@pytest.mark.parametrize("tau", [10.0, 3.0])
def test_transform_ptx_matches_float64(variant, tau):
    """Every variant's PTX, run op by op, against the float64 transform: |L - ref| <= 2e-4 (1 + |s|)
    and |dL*a - ref| <= 2e-4 |dL| a, for t from 0 to 2^22 and negative differences (clamped)."""
    rng = np.random.default_rng(0)
    diff = np.concatenate([np.arange(-5, 300), rng.integers(0, 1 << 22, 2000)]).astype(np.int32)
    s = rng.normal(0, 3, diff.shape).astype(np.float32)
    t = np.maximum(diff, 0).astype(np.float64)
    m = 2 * np.log1p(t / tau)
    a = np.sqrt(1 + m)
    logit = _run_ptx(hopper.transform_ptx(tau, variant, backward=False), s, diff)
    grad = _run_ptx(hopper.transform_ptx(tau, variant, backward=True), s, diff)
    assert np.all(np.abs(logit - (a * s - m)) <= 2e-4 * (1 + np.abs(s)))
    assert np.all(np.abs(grad - s * a) <= 2e-4 * np.abs(s) * a + 1e-30)


def test_contiguity_cache_follows_the_tensor_not_its_memory():
    """An in-place change (version bump) and a new tensor are re-checked, never answered from a
    stale entry."""
    pos = torch.arange(16)[None].clone()
    assert hopper._contiguous(pos)
    pos[0, 8:] += 5  # now gapped
    assert not hopper._contiguous(pos)
    for _ in range(20):  # new tensors, possibly at recycled addresses
        assert hopper._contiguous(torch.arange(16)[None].clone())
        assert not hopper._contiguous(torch.arange(16).flip(0)[None].clone())


_COMPILE_SCRIPT = """
import sys, torch
from torch._subclasses.fake_tensor import FakeTensorMode
from scaleinv_dist.kernels import flash_si_hopper as hopper
hopper.VARIANT = sys.argv[1]
d = int(sys.argv[2])
opts = dict(scale=d ** -0.5, tau=10.0, causal=True, transform="scale_invariant")
with FakeTensorMode(allow_non_fake_inputs=True):
    q = torch.empty(1, 4, 1024, d, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.empty(1, 2, 1024, d, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    out, lse = hopper.forward(q, k, v, **opts)
    dq, dk, dv = hopper.backward(out, q, k, v, out, lse, **opts)
assert out.shape == q.shape and lse.shape == q.shape[:3] and dk.shape == k.shape
print("compiled")
"""


@pytest.mark.skipif(hopper.IMPORT_ERROR is not None, reason="needs flash-attn-4 (pip install -e '.[hopper]')")
@pytest.mark.parametrize("variant", hopper.VARIANTS)
@pytest.mark.parametrize("d", [64, 128])
def test_fa4_kernels_compile_for_sm90_without_a_gpu(variant, d):
    """FA4's SM90 forward and backward with our score_mods compile to sm_90a cubins on any machine
    (torch fake tensors; FA4's CPU-only compilation switches)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FLASH_ATTENTION_ARCH": "sm_90", "CUTE_DSL_ARCH": "sm_90a",
           "FLASH_ATTENTION_NUM_SMS": "132",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, variant, str(d)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


def test_contiguity_cache_hits_new_views_of_one_positions_tensor(monkeypatch):
    """The model's positions reach every layer as a new broadcast view of one tensor: one check,
    then hits."""
    hopper._CONTIGUOUS_CACHE.clear()
    pos = torch.arange(32)
    checks = []
    real_all = torch.Tensor.all
    monkeypatch.setattr(torch.Tensor, "all", lambda self, *a, **k: checks.append(1) or real_all(self, *a, **k))
    for _ in range(12):
        assert hopper._contiguous(pos.unsqueeze(0).expand(4, 32))
    assert len(checks) == 1


def test_gqa_backward_runs_on_repeated_kv(monkeypatch):
    """FA4's SM90 backward with a score_mod is wrong under GQA (measured on an H200), so backward()
    hands it K, V repeated per query head and sums dK, dV over each group. Checked on CPU with a
    stand-in for FA4 that computes the float64 reference (and refuses GQA with a score_mod, as the
    real one should never get it): the result must equal the reference GQA gradients to 1e-5 (backward()
    hands FA4 the lse in float32, as FA4 requires)."""
    from types import SimpleNamespace

    opts = dict(scale=16 ** -0.5, tau=TAU, causal=True, transform="scale_invariant")

    def fake_bwd(q, k, v, out, dout, lse, scale, causal, score_mod=None, score_mod_bwd=None):
        assert score_mod is not None and k.shape[2] == q.shape[2], "GQA reached FA4 with a score_mod"
        pos = torch.arange(q.shape[1])[None]
        to_bhnd = [x.transpose(1, 2) for x in (dout, q, k, v, out)]
        grads = attention_reference.backward(*to_bhnd, lse, pos, pos, **opts)
        return tuple(g.transpose(1, 2) for g in grads)

    monkeypatch.setattr(hopper, "_fa4", SimpleNamespace(_flash_attn_bwd=fake_bwd))
    monkeypatch.setattr(hopper, "score_mods", lambda tau, variant: ("fwd", "bwd"))
    monkeypatch.setattr(hopper, "VARIANT", "mufu")  # FA4's own classes (the fake has none)
    torch.manual_seed(0)
    q, do = (torch.randn(2, 6, 40, 16, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, 2, 40, 16, dtype=torch.float64) for _ in range(2))
    pos = torch.arange(40)[None]
    out, lse = attention_reference.forward(q, k, v, pos, pos, **opts)
    got = hopper.backward(do, q, k, v, out, lse, **opts)
    want = attention_reference.backward(do, q, k, v, out, lse, pos, pos, **opts)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("degree", [2, 1])
@pytest.mark.parametrize("toward", [1, -1])  # columns are keys (forward) or queries (backward)
@pytest.mark.parametrize("tile_n", [64, 128, 176])
def test_tile_row_polynomials_within_the_kernel_error_bound(tile_n, toward, degree):
    """The tile variants' per-row Taylor coefficients (row_taylor, the code the kernel runs), in
    float32 with approximate log2 / rsqrt / rcp, against the float64 logits, on rows at the
    smallest distance the kernel admits and farther: |L_poly - L| stays under the Triton kernel's
    bound (flash_si.poly_error_bound, span = the row's column range) plus 2e-6 (1 + |S|) of
    float32 rounding."""
    from scaleinv_dist.kernels.flash_si import poly_error_bound

    rng = np.random.default_rng(tile_n)
    f32 = np.float32
    cols = np.array([c for c in range(tile_n) if c % 8 < 2], dtype=np.float64)  # one thread's
    x_last = cols[-1]
    t_first = hopper.poly_min_distance(tile_n, TAU, degree)
    for t_row_min in [t_first, t_first + 1, 3 * t_first, 10 ** 5, 3 * 10 ** 6]:
        t0 = t_row_min + x_last if toward == 1 else t_row_min  # at the thread's first column
        scale = 128 ** -0.5
        s_raw = rng.uniform(-30, 30, cols.size) / scale  # scaled scores up to |S| = 30
        x_c = 0.5 * x_last
        coef = hopper.row_taylor(f32(t0) - f32(x_c * toward), f32(x_c), f32(scale), TAU, np.log2,
                                 lambda u: f32(1) / np.sqrt(u), lambda u: f32(1) / u, toward,
                                 degree)
        a0, a1, a2, m0, m1, m2 = (f32(c) for c in coef)
        x = cols.astype(f32)
        got = ((a2 * x + a1) * x + a0) * s_raw.astype(f32) - ((m2 * x + m1) * x + m0)
        t = t0 - toward * cols
        assert t.min() == t_row_min
        m = 2 * np.log1p(t / TAU)
        want = np.sqrt(1 + m) * scale * s_raw - m
        assert degree == 2 or a2 == m2 == 0
        bound = poly_error_bound(x_last, t_row_min, TAU, 30.0, degree) + 2e-6 * (1 + 30.0)
        err = np.abs(got.astype(np.float64) - want).max()
        assert err <= bound, (t_row_min, err, bound)


def test_auto_variant_takes_tile_lin_only_where_measured_and_checked():
    """`auto`: tile_lin at D = 64 and 128 (timed and checked on a GPU), mufu at the other head
    dims; a named variant passes through, an unknown one is refused naming the setting."""
    pick = hopper.pick_variant
    assert [pick("auto", d) for d in (64, 96, 128, 192, 256)] == \
        ["tile_lin", "mufu", "tile_lin", "mufu", "mufu"]
    assert pick("swlog", 128) == "swlog"
    with pytest.raises(ValueError, match="SCALEINV_HOPPER_VARIANT"):
        pick("fast", 128)
