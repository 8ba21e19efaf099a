"""The transform against its formula, and the reference backend against a naive float64 softmax."""
import math

import pytest
import torch

from scaleinv_dist import attention_reference
from scaleinv_dist.attention import attention_backend_for, scale_invariant_attention
from scaleinv_dist.transform import alibi_slopes, si_bias, si_scale

TOL = 1e-10  # float64 reference vs naive float64: rounding only


def naive(q, k, v, q_pos, k_pos, *, tau=10.0, causal=True, transform="scale_invariant",
          q_seg=None, k_seg=None, slopes=None):
    """Materialise every logit with Python-level formulas; float64; GQA by repeating heads."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    qp = q_pos.expand(q.shape[0], -1).double()
    kp = k_pos.expand(q.shape[0], -1).double()
    diff = qp[:, :, None] - kp[:, None, :]
    t = diff.clamp_min(0) if causal else diff.abs()
    if transform == "scale_invariant":
        logits = torch.sqrt(1 + 2 * torch.log(1 + t / tau))[:, None] * s - 2 * torch.log(1 + t / tau)[:, None]
    elif transform == "alibi":
        logits = s - slopes.double()[None, :, None, None] * t[:, None]
    else:
        logits = s
    visible = (diff >= 0) if causal else torch.ones_like(diff, dtype=torch.bool)
    if q_seg is not None:
        visible = visible & (q_seg.expand(q.shape[0], -1)[:, :, None] == k_seg.expand(q.shape[0], -1)[:, None, :])
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    lse = torch.logsumexp(logits, -1)
    p = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return p @ v, lse


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_transform_identity_at_zero_and_values():
    t = torch.tensor([0.0, 1.0, 10.0, 100.0, 65535.0], dtype=torch.float64)
    a, m = si_scale(t, 10.0), si_bias(t, 10.0)
    assert a[0] == 1.0 and m[0] == 0.0
    # values from the paper notes' table (tau = 10)
    for ti, ai, mi in [(1, 1.091, -0.191), (10, 1.545, -1.386), (100, 2.407, -4.796), (65535, 4.310, -17.576)]:
        assert abs(si_scale(torch.tensor(float(ti)), 10.0).item() - ai) < 1e-3
        assert abs(si_bias(torch.tensor(float(ti)), 10.0).item() - mi) < 1e-3
    # E[exp(L)] = e^0.5 / (t/tau + 1) for standard normal base logits
    assert torch.allclose(torch.exp(m + a**2 / 2), math.exp(0.5) / (t / 10 + 1))


def test_alibi_slopes_geometric():
    s = alibi_slopes(8)
    assert torch.allclose(s, torch.tensor([2.0 ** (-i) for i in range(1, 9)]))
    assert alibi_slopes(6).shape == (6,)


CASES = {
    "contiguous": dict(nq=37, nk=37),
    "gqa_nq_ne_nk": dict(nq=20, nk=45, q_off=25),
    "gaps_permuted": dict(nq=30, nk=30, permute=True, gaps=True),
    "documents": dict(nq=40, nk=40, docs=True),
    "no_visible_rows": dict(nq=16, nk=16, q_off=-8),
    "noncausal": dict(nq=24, nk=31, causal=False),
    "alibi": dict(nq=33, nk=33, transform="alibi"),
    "none": dict(nq=33, nk=33, transform="none"),
}


def make_case(seed, nq, nk, q_off=0, permute=False, gaps=False, docs=False, causal=True,
              transform="scale_invariant"):
    gen = torch.Generator().manual_seed(seed)
    b, hq, hkv, d = 2, 4, 2, 16
    q = torch.randn(b, hq, nq, d, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(b, hkv, nk, d, generator=gen, dtype=torch.float64) * 2
    v = torch.randn(b, hkv, nk, d, generator=gen, dtype=torch.float64)
    step = 7 if gaps else 1
    k_pos = torch.arange(nk) * step
    q_pos = torch.arange(nq) * step + q_off * step
    if permute:
        q_pos = q_pos[torch.randperm(nq, generator=gen)]
        k_pos = k_pos[torch.randperm(nk, generator=gen)]
    seg = None
    if docs:
        seg = (torch.arange(nq) >= 13).long() + (torch.arange(nq) >= 29).long()
    return dict(q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, causal=causal, transform=transform,
                q_seg=seg, k_seg=seg, slopes=alibi_slopes(hq) if transform == "alibi" else None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_naive_forward_backward(name):
    c = make_case(hash(name) % 1000, **CASES[name])
    q, k, v = (c[x].clone().requires_grad_() for x in "qkv")
    out, lse = scale_invariant_attention(
        q, k, v, c["q_pos"], c["k_pos"], causal=c["causal"], transform=c["transform"],
        backend="reference", return_lse=True, q_seg=c["q_seg"], k_seg=c["k_seg"], alibi_slopes=c["slopes"])
    qn, kn, vn = (c[x].clone().requires_grad_() for x in "qkv")
    ref_out, ref_lse = naive(qn, kn, vn, c["q_pos"], c["k_pos"], causal=c["causal"],
                             transform=c["transform"], q_seg=c["q_seg"], k_seg=c["k_seg"], slopes=c["slopes"])
    assert rel(out, ref_out) < TOL
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite].double() - ref_lse[finite]).abs().max() < 1e-5  # lse is returned in float32
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_out.backward(grad)
    for got, want in ((q.grad, qn.grad), (k.grad, kn.grad), (v.grad, vn.grad)):
        assert torch.isfinite(got).all()
        assert rel(got, want) < TOL


def test_no_visible_key_gives_zero_and_neg_inf():
    c = make_case(3, **CASES["no_visible_rows"])
    q = c["q"].clone().requires_grad_()
    out, lse = scale_invariant_attention(q, c["k"], c["v"], c["q_pos"], c["k_pos"],
                                         backend="reference", return_lse=True)
    hidden = c["q_pos"] < 0
    assert torch.all(out[:, :, hidden] == 0) and torch.all(torch.isneginf(lse[:, :, hidden]))
    out.sum().backward()
    assert torch.all(q.grad[:, :, hidden] == 0) and torch.isfinite(q.grad).all()


def test_chunking_matches_single_block(monkeypatch):
    c = make_case(5, **CASES["gaps_permuted"])
    opts = dict(scale=0.25, tau=10.0, causal=True, transform="scale_invariant")
    args = (c["q"], c["k"], c["v"], c["q_pos"].expand(2, -1), c["k_pos"].expand(2, -1))
    full = attention_reference.forward(*args, **opts)
    monkeypatch.setattr(attention_reference, "_MAX_BLOCK_ELEMENTS", 1)  # 16-key chunks
    chunked = attention_reference.forward(*args, **opts)
    assert rel(chunked[0], full[0]) < TOL and rel(chunked[1], full[1]) < TOL


def test_external_lse_backward_gives_block_share():
    """Backward of a key block with the global out/lse sums to the full gradient (ring contract)."""
    c = make_case(11, nq=24, nk=24)
    opts = dict(scale=0.25, tau=10.0, causal=True, transform="scale_invariant")
    qp, kp = c["q_pos"].expand(2, -1), c["k_pos"].expand(2, -1)
    out, lse = attention_reference.forward(c["q"], c["k"], c["v"], qp, kp, **opts)
    do = torch.randn_like(out)
    dq, dk, dv = attention_reference.backward(do, c["q"], c["k"], c["v"], out, lse, qp, kp, **opts)
    parts = [attention_reference.backward(do, c["q"], c["k"][:, :, s], c["v"][:, :, s], out, lse, qp, kp[:, s], **opts)
             for s in (slice(0, 10), slice(10, 24))]
    assert rel(parts[0][0] + parts[1][0], dq) < TOL
    assert rel(torch.cat([parts[0][1], parts[1][1]], 2), dk) < TOL
    assert rel(torch.cat([parts[0][2], parts[1][2]], 2), dv) < TOL


def test_flex_backend_matches_reference_on_cpu():
    pytest.importorskip("torch.nn.attention.flex_attention")
    c = make_case(7, **CASES["documents"])
    q, k, v = (c[x].float() for x in "qkv")
    args = (q, k, v, c["q_pos"], c["k_pos"])
    kw = dict(q_seg=c["q_seg"], k_seg=c["k_seg"], return_lse=True)
    ref = scale_invariant_attention(*args, backend="reference", **kw)
    flex = scale_invariant_attention(*args, backend="flex", **kw)
    assert rel(flex[0], ref[0]) < 1e-5
    assert (flex[1] - ref[1]).abs().max() < 1e-4


@pytest.mark.parametrize("bad, msg", [
    (dict(q_pos=torch.arange(5.0)), "integer dtype"),
    (dict(q_pos=torch.arange(4)), "has shape"),
    (dict(k=torch.randn(1, 3, 5, 8)), "multiple of key/value heads"),
    (dict(transform="bogus"), "unknown transform"),
    (dict(backend="cuda-magic"), "unknown attention backend"),
])
def test_bad_input_errors(bad, msg):
    args = dict(q=torch.randn(1, 4, 5, 8), k=torch.randn(1, 2, 5, 8), v=None, q_pos=torch.arange(5),
                k_pos=torch.arange(5), transform="scale_invariant", backend="reference")
    args.update(bad)
    if args["v"] is None:
        args["v"] = torch.randn_like(args["k"])
    with pytest.raises((ValueError, TypeError), match=msg):
        scale_invariant_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("q_pos"),
                                  args.pop("k_pos"), **args)


# ----------------------------------------------------------------------------- backend registry
def test_auto_takes_the_first_backend_that_supports_the_inputs(monkeypatch):
    """A faster (fake) entry in front of the registry: auto takes it where its supports() says
    yes, else falls back to the reference with exactly one warning per reason; naming it
    explicitly raises that reason instead."""
    import types
    import warnings

    from scaleinv_dist import attention_backend as backends

    fake = types.SimpleNamespace(
        supports=lambda q, k, v, transform, **layout: None if q.shape[-1] == 8 else "only head dim 8",
        forward=attention_reference.forward, backward=attention_reference.backward)
    real_load = backends.load
    monkeypatch.setattr(backends, "REGISTRY", {
        "fast": backends.Entry("unused", True, ("cpu",), (torch.float64,)), **backends.REGISTRY})
    monkeypatch.setattr(backends, "load", lambda name: fake if name == "fast" else real_load(name))
    backends._warn_once.cache_clear()
    q8, q16 = torch.randn(1, 2, 5, 8, dtype=torch.float64), torch.randn(1, 2, 5, 16, dtype=torch.float64)
    assert backends.resolve("auto", q8) == "fast"
    assert backends.resolve("auto", q8.float()) == "reference"  # not tried for float32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.resolve("auto", q16) == "reference"
        assert backends.resolve("auto", q16) == "reference"
    assert [str(w.message) for w in caught] == [
        "attention backend 'fast' skipped: only head dim 8; falling back"]
    with pytest.raises(ValueError, match="'fast': only head dim 8"):
        backends.resolve("fast", q16)
    pos = torch.arange(5)
    out = scale_invariant_attention(q8, q8, q8, pos, pos)  # runs through the fake entry
    want = scale_invariant_attention(q8, q8, q8, pos, pos, backend="reference")
    assert torch.equal(out, want)
    # attention_backend_for names what a call with the same arguments runs on
    assert attention_backend_for(q8, q8, q8, pos, pos, tau=3.0) == "fast"
    assert attention_backend_for(q16, q16, q16, pos, pos) == "reference"
    assert attention_backend_for(q8, q8, q8, pos, pos, backend="reference") == "reference"


def test_contract_backends_follow_the_protocol():
    """Every registry entry with contract=True provides supports, forward and backward; flex has
    no backward and is refused where the ring needs one."""
    from scaleinv_dist import attention_backend as backends

    module = backends.contract_ops("reference")
    assert all(callable(getattr(module, f)) for f in ("supports", "forward", "backward"))
    assert backends.resolve("auto", torch.randn(1, 1, 4, 12)) == "reference"  # CPU: any head dim
    with pytest.raises(ValueError, match="no forward/backward contract"):
        backends.contract_ops("flex")
