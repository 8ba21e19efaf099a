"""The fused linear + cross-entropy (scaleinv_dist.loss) against float64 references: the summed
loss, the gradient with respect to the hidden states and the head weight, with ignored labels and
chunks that do not divide the token count; backward recomputes nothing; evaluation's per-token
losses come from the same chunked logits."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from scaleinv_dist.loss import IGNORE_INDEX, chunked_cross_entropy, token_cross_entropy

T, D, V = 37, 16, 53  # 37 tokens: no chunk size below divides it


def inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=g, dtype=dtype).requires_grad_()
    w = (0.5 * torch.randn(V, D, generator=g, dtype=dtype)).requires_grad_()
    y = torch.randint(0, V, (T,), generator=g)
    y[::5] = IGNORE_INDEX
    y[-1] = IGNORE_INDEX  # the last chunk ends on an ignored token
    return h, w, y


def reference(h, w, y, scale=0.5):
    """float64 loss sum and gradients of scale * loss sum (an upstream gradient that is not 1)."""
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    loss = F.cross_entropy(h64 @ w64.t(), y, ignore_index=IGNORE_INDEX, reduction="sum")
    gh, gw = torch.autograd.grad(scale * loss, (h64, w64))
    return loss.detach(), gh, gw


def rel(a, b):
    """Largest absolute error relative to the reference's largest magnitude."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("chunk", [1, 7, 16, 36, 10_000])
def test_fused_matches_float64_reference(chunk):
    """fp32 inputs: loss, d/dh and d/dW within 2e-6 (relative to the largest reference value)."""
    h, w, y = inputs()
    loss, n = chunked_cross_entropy(h[None], w, y[None], chunk)
    gh, gw = torch.autograd.grad(0.5 * loss, (h, w))
    ref, rh, rw = reference(h, w, y)
    assert loss.dtype == torch.float32 and int(n) == int((y != IGNORE_INDEX).sum())
    assert rel(loss, ref) <= 2e-6 and rel(gh, rh) <= 2e-6 and rel(gw, rw) <= 2e-6
    assert gh[y == IGNORE_INDEX].abs().max() == 0  # ignored tokens get no gradient


def test_fused_in_float64_is_exact():
    """float64 inputs are computed in float64: agreement to 1e-12."""
    h, w, y = inputs(dtype=torch.float64)
    loss, _ = chunked_cross_entropy(h, w, y, 8)
    gh, gw = torch.autograd.grad(0.5 * loss, (h, w))
    ref, rh, rw = reference(h, w, y)
    assert loss.dtype == torch.float64
    assert rel(loss, ref) <= 1e-12 and rel(gh, rh) <= 1e-12 and rel(gw, rw) <= 1e-12


def test_fused_under_bf16_autocast():
    """CPU bf16 autocast: the matmuls run in bf16 as nn.Linear's would. Against autograd through
    the same bf16 logits: loss 1e-5, gradients 1e-2 (bf16 rounding of the gradient matmuls' inputs);
    against float64: 2e-2."""
    h, w, y = inputs(seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked_cross_entropy(h, w, y, 8)
        gh, gw = torch.autograd.grad(0.5 * loss, (h, w))
        unfused = F.cross_entropy((h @ w.t()).float(), y, ignore_index=IGNORE_INDEX, reduction="sum")
        uh, uw = torch.autograd.grad(0.5 * unfused, (h, w))
    assert gh.dtype == h.dtype and gw.dtype == w.dtype
    assert rel(loss, unfused) <= 1e-5 and rel(gh, uh) <= 1e-2 and rel(gw, uw) <= 1e-2
    ref, rh, rw = reference(h, w, y)
    assert rel(loss, ref) <= 2e-2 and rel(gh, rh) <= 2e-2 and rel(gw, rw) <= 2e-2


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_backward_recomputes_nothing():
    """The forward forms the gradients (3 matmuls a chunk: logits, d/dh, d/dW); the backward runs
    no matmul at all."""
    h, w, y = inputs()
    with _CountMatmuls() as fwd:
        loss, _ = chunked_cross_entropy(h, w, y, 10)
    with _CountMatmuls() as bwd:
        loss.backward()
    assert fwd.calls == 3 * 4 and bwd.calls == 0, (fwd.calls, bwd.calls)


def test_weight_only_and_no_grad_paths():
    h, w, y = inputs()
    ref, _, rw = reference(h, w, y, scale=1.0)
    loss, _ = chunked_cross_entropy(h.detach(), w, y, 7)  # a frozen trunk: only d/dW
    (gw,) = torch.autograd.grad(loss, (w,))
    assert rel(gw, rw) <= 2e-6
    with torch.no_grad():
        loss_ng, _ = chunked_cross_entropy(h, w, y, 7)
    assert loss_ng.requires_grad is False and rel(loss_ng, ref) <= 2e-6


def test_all_labels_ignored():
    h, w, y = inputs()
    loss, n = chunked_cross_entropy(h, w, torch.full_like(y, IGNORE_INDEX), 8)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert int(n) == 0 and loss.item() == 0.0
    assert gh.abs().max() == 0 and gw.abs().max() == 0


@pytest.mark.parametrize("chunk", [1, 10, 10_000])
def test_token_cross_entropy_matches_float64(chunk):
    """Per-token losses (evaluation), shape of labels, 0 where ignored; within 1e-5 absolute."""
    h, w, y = inputs()
    out = token_cross_entropy(h.view(1, T, D), w, y.view(1, T), chunk)
    ref = F.cross_entropy(h.detach().double() @ w.detach().double().t(), y, ignore_index=IGNORE_INDEX,
                          reduction="none")
    assert out.shape == (1, T) and out.dtype == torch.float32
    assert (out[0] - ref).abs().max().item() <= 1e-5
    assert (out[0][y == IGNORE_INDEX] == 0).all()


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_chunk_arithmetic_matches(backend, fresh_dynamo):
    """compile_backend compiles the per-chunk softmax / gradient arithmetic (what compile_model
    turns on): fp32 within 2e-6 of float64; under bf16 autocast, within 1e-2 of the eager fused
    result (bf16 rounding of the gradient)."""
    h, w, y = inputs()
    loss, _ = chunked_cross_entropy(h, w, y, 10, compile_backend=backend)  # chunks of 10 and 7
    gh, gw = torch.autograd.grad(0.5 * loss, (h, w))
    ref, rh, rw = reference(h, w, y)
    assert rel(loss, ref) <= 2e-6 and rel(gh, rh) <= 2e-6 and rel(gw, rw) <= 2e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_c, _ = chunked_cross_entropy(h, w, y, 10, compile_backend=backend)
        ch, cw = torch.autograd.grad(loss_c, (h, w))
        loss_e, _ = chunked_cross_entropy(h, w, y, 10)
        eh, ew = torch.autograd.grad(loss_e, (h, w))
    assert rel(loss_c, loss_e) <= 1e-5 and rel(ch, eh) <= 1e-2 and rel(cw, ew) <= 1e-2


def test_second_backward_is_refused():
    """The stored gradients are scaled in place, so a second backward would be wrong: it raises."""
    h, w, y = inputs()
    loss, _ = chunked_cross_entropy(h, w, y, 8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", [None, "inductor"])
def test_fused_on_cuda_under_bf16_autocast(backend):
    """CUDA bf16 autocast, eager and compiled chunk arithmetic: within 2e-2 of float64."""
    h, w, y = (t.cuda() if not t.requires_grad else t.detach().cuda().requires_grad_() for t in inputs(seed=2))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = chunked_cross_entropy(h, w, y, 10, compile_backend=backend)
        gh, gw = torch.autograd.grad(0.5 * loss, (h, w))
    ref, rh, rw = reference(h.cpu(), w.cpu(), y.cpu())
    assert rel(loss.cpu(), ref) <= 2e-2 and rel(gh.cpu(), rh) <= 2e-2 and rel(gw.cpu(), rw) <= 2e-2
