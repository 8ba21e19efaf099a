"""The GPT: every positional scheme x logit transform runs forward and backward; the chunked loss and
activation checkpointing change nothing; p-RoPE / RoPE frequencies and the relative-position property."""
import math

import pytest
import torch
import torch.nn.functional as F

from scaleinv_dist.config import load_config
import scaleinv_dist.model as model_mod
from scaleinv_dist import memory
from scaleinv_dist.loss import chunked_cross_entropy
from scaleinv_dist.model import apply_rotary, build_model, rotary_inv_freq, rotary_tables
from tiny_runs import packed_batch

V, B, N = 97, 2, 24


def small_cfg(*overrides):
    return load_config(None, ["model.n_layer=2", "model.d_model=32", "model.n_head=4", "model.n_kv_head=2",
                              f"model.vocab_size={V}", f"train.seq_len={N}", "attention.backend=reference",
                              *overrides])


def batch(seed=0, docs=True):
    return packed_batch(V, B, N, seed, docs)


def rel(a, b):
    """Largest absolute difference relative to the largest reference magnitude (fp32 sums of
    different lengths differ by rounding only)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


COMBOS = [(p, t) for p in ("p_rope", "rope", "nope") for t in ("scale_invariant", "none", "logn")]
COMBOS.append(("alibi", "none"))


@pytest.mark.parametrize("position,transform", COMBOS, ids=lambda x: str(x))
def test_forward_backward_shapes(position, transform):
    torch.manual_seed(0)
    model = build_model(small_cfg(f"attention.position={position}", f"attention.transform={transform}"))
    tokens, positions, doc_ids, labels = batch()
    logits = model(tokens, positions, doc_ids)
    assert logits.shape == (B, N, V) and torch.isfinite(logits).all()
    loss_sum, n = model(tokens, positions, doc_ids, labels)
    assert loss_sum.dtype == torch.float32 and loss_sum.dim() == 0
    assert int(n) == (labels != -100).sum()
    (loss_sum / n).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.shape == p.shape and torch.isfinite(p.grad).all(), name
    if transform == "logn":
        assert any("logn_scale" in name for name, _ in model.named_parameters())


def test_loss_at_init_is_about_log_vocab():
    torch.manual_seed(0)
    model = build_model(small_cfg())
    tokens, positions, doc_ids, labels = batch()
    with torch.no_grad():
        loss_sum, n = model(tokens, positions, doc_ids, labels)
    assert abs(loss_sum.item() / n.item() - math.log(V)) < 0.15


def test_build_model_takes_vocab_from_tokenizer():
    cfg = small_cfg("model.vocab_size=0")
    model = build_model(cfg, vocab_size=123)
    assert model.lm_head.weight.shape[0] == 123 and model.wte.weight.shape[0] == 123


def test_positions_shape_mismatch_is_a_clear_error():
    model = build_model(small_cfg())
    tokens, positions, doc_ids, labels = batch()
    with pytest.raises(ValueError, match="positions"):
        model(tokens, positions[:, :-1], doc_ids, labels)


@pytest.mark.parametrize("chunk", [1, 7, 16, 10_000])
def test_chunked_loss_equals_full_cross_entropy(chunk):
    torch.manual_seed(0)
    h = torch.randn(B, N, 16, requires_grad=True)
    w = torch.randn(V, 16, requires_grad=True)
    labels = torch.randint(0, V, (B, N))
    labels[0, :3] = -100
    loss_sum, n = chunked_cross_entropy(h, w, labels, chunk)
    gh, gw = torch.autograd.grad(loss_sum, (h, w))
    full = F.cross_entropy((h @ w.t()).reshape(-1, V).float(), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
    fh, fw = torch.autograd.grad(full, (h, w))
    assert int(n) == (labels != -100).sum()
    assert rel(loss_sum, full) <= 1e-6
    assert rel(gh, fh) <= 1e-6 and rel(gw, fw) <= 1e-6


def test_model_loss_chunk_size_does_not_matter():
    tokens, positions, doc_ids, labels = batch()
    grads = []
    for chunk in (5, 100_000):
        torch.manual_seed(0)
        model = build_model(small_cfg(f"train.loss_chunk_tokens={chunk}"))
        loss_sum, n = model(tokens, positions, doc_ids, labels)
        loss_sum.backward()
        grads.append((loss_sum.detach(), [p.grad.clone() for p in model.parameters()]))
    assert rel(grads[0][0], grads[1][0]) <= 1e-6
    for a, b in zip(grads[0][1], grads[1][1]):
        assert rel(a, b) <= 1e-5


@pytest.mark.parametrize("mode", ["full", "selective", "offload"])
def test_activation_checkpointing_gives_the_same_gradients(mode, monkeypatch):
    """fp32: the loss is bit-identical, gradients within rtol 1e-6. full / offload recompute each
    block's halves in token chunks, here 5 chunks of at most 5 tokens (B = 2 rows of 24)."""
    monkeypatch.setattr(memory, "RECOMPUTE_CHUNK_TOKENS", 10)
    tokens, positions, doc_ids, labels = batch()
    results = {}
    for m in ("none", mode):
        torch.manual_seed(0)
        model = build_model(small_cfg(f"train.activation_checkpointing={m}"))
        loss_sum, n = model(tokens, positions, doc_ids, labels)
        (loss_sum / n).backward()
        results[m] = (loss_sum.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
    assert torch.equal(results["none"][0], results[mode][0])
    for k, g in results["none"][1].items():
        assert torch.allclose(g, results[mode][1][k], rtol=1e-6, atol=1e-8), k


def test_activation_checkpointing_flags():
    model = build_model(small_cfg("train.activation_checkpointing=full"))
    assert model.checkpoint_blocks and not model.offload_checkpoints
    assert all(b.checkpoint_halves and not b.checkpoint_mlp for b in model.blocks)
    model = build_model(small_cfg("train.activation_checkpointing=selective"))
    assert not model.checkpoint_blocks
    assert all(b.checkpoint_mlp and not b.checkpoint_halves for b in model.blocks)
    model = build_model(small_cfg("train.activation_checkpointing=offload"))
    assert model.checkpoint_blocks and model.offload_checkpoints
    assert all(b.checkpoint_halves and not b.checkpoint_mlp for b in model.blocks)


def cpu_peak_bytes(fn) -> int:
    """The most CPU memory fn() holds at once beyond what was allocated before (bytes), from the
    profiler's allocation events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def test_recomputing_a_block_in_token_chunks_lowers_its_peak_memory(monkeypatch):
    """full / offload recompute a block in its backward; with its halves in 8 checkpointed token
    chunks the block's forward + backward holds at most 0.8x the memory of one chunk (measured at
    width 64, 1024 tokens, fp32, an attention that keeps linear memory: 6.9 vs 4.7 KB per token)."""
    model = build_model(load_config(None, ["model.n_layer=1", "model.d_model=64", "model.n_head=4",
                                           f"model.vocab_size={V}", "train.activation_checkpointing=full"]))
    block, n = model.blocks[0], 1024
    positions = torch.arange(n)[None]
    rotary = rotary_tables(positions, model.inv_freq, torch.float32)
    x = torch.randn(1, n, 64, requires_grad=True)

    def sdpa(q, k, v, *rest):  # PyTorch's CPU flash attention: keeps q, k, v, out and the lse
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward_backward():
        block(x, rotary, positions, None, sdpa).sum().backward()

    peaks = {}
    for chunk in (n, n // 8):
        monkeypatch.setattr(memory, "RECOMPUTE_CHUNK_TOKENS", chunk)
        forward_backward()  # allocator and profiler warm-up
        peaks[chunk] = cpu_peak_bytes(forward_backward)
    assert peaks[n // 8] <= 0.8 * peaks[n], peaks


def test_offload_keeps_block_inputs_in_host_memory(monkeypatch):
    """With "offload" the tensors autograd keeps from the forward pass are the blocks' inputs
    (and positions), packed by HostOffload: nothing of the block's insides is saved."""
    from scaleinv_dist import offload

    model = build_model(small_cfg("train.activation_checkpointing=offload"))
    tokens, positions, doc_ids, labels = batch()
    packed = []
    real_init = offload.HostOffload.__init__

    def spy_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        inner = self.pack_hook

        def pack(t):
            packed.append(tuple(t.shape))
            return inner(t)
        self.pack_hook = pack

    monkeypatch.setattr(offload.HostOffload, "__init__", spy_init)
    loss_sum, n = model(tokens, positions, doc_ids, labels)
    (loss_sum / n).backward()
    assert packed.count((B, N, 32)) == len(model.blocks), packed  # one input per block (d_model 32)
    assert set(packed) <= {(B, N, 32), (B, N)}, packed  # and the positions / document ids


@pytest.mark.parametrize("mode, kept", [("none", True), ("full", False), ("offload", False)])
def test_full_and_offload_recompute_the_embedding_instead_of_keeping_it(mode, kept):
    """Outside the blocks' checkpoints, `full` and `offload` keep only the tokens of the embedding
    (its fp32 output, input of the first norm, is recomputed in the backward); `none` keeps it."""
    model = build_model(small_cfg(f"train.activation_checkpointing={mode}"))
    tokens, positions, doc_ids, labels = batch()
    outputs, saved = [], set()
    model.wte.register_forward_hook(lambda module, args, out: outputs.append(out))  # kept alive
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.add(t.data_ptr()) or t, lambda t: t):
        loss_sum, n = model(tokens, positions, doc_ids, labels)
    (loss_sum / n).backward()
    assert (outputs[0].data_ptr() in saved) == kept


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75, 1.0])
def test_p_rope_frequencies(fraction):
    cfg = small_cfg("attention.position=p_rope", f"attention.p_rope_fraction={fraction}",
                    "attention.p_rope_base=1024")
    head_dim = 64
    freqs = rotary_inv_freq(head_dim, cfg.attention)
    half = head_dim // 2
    assert freqs.shape == (half,) and freqs.dtype == torch.float64
    n_rot = round(fraction * half)
    assert (freqs == 0).sum().item() == half - n_rot  # position-free channel pairs
    rotating = freqs[freqs > 0]
    assert math.isclose(rotating.max().item(), 1.0)
    longest = 2 * math.pi / rotating.min().item()
    assert math.isclose(longest, 2 * math.pi * 1024, rel_tol=1e-9)  # max wavelength 2 pi base
    assert torch.all(rotating[1:] < rotating[:-1])  # geometric, decreasing


def test_rope_frequencies_and_none():
    cfg = small_cfg("attention.position=rope", "attention.rope_base=10000")
    freqs = rotary_inv_freq(64, cfg.attention)
    assert torch.allclose(freqs, 10000.0 ** (-torch.arange(32, dtype=torch.float64) / 32))
    for position, transform in (("nope", "scale_invariant"), ("alibi", "none")):
        c = small_cfg(f"attention.position={position}", f"attention.transform={transform}")
        assert rotary_inv_freq(64, c.attention) is None


@pytest.mark.parametrize("position", ["rope", "p_rope"])
def test_rotary_scores_depend_only_on_position_difference(position):
    cfg = small_cfg(f"attention.position={position}")
    d = 16
    inv = rotary_inv_freq(d, cfg.attention)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, d, dtype=torch.float64, generator=g)
    k = torch.randn(1, 1, 1, d, dtype=torch.float64, generator=g)

    def score(i, j):
        ci, si = rotary_tables(torch.tensor([[i]]), inv, torch.float64)
        cj, sj = rotary_tables(torch.tensor([[j]]), inv, torch.float64)
        return (apply_rotary(q, ci, si) * apply_rotary(k, cj, sj)).sum().item()

    for offset in (0, 1, 7, 100):
        ref = score(offset, 0)
        for shift in (3, 1000, 123_456):
            assert abs(score(shift + offset, shift) - ref) < 1e-9 * max(1.0, abs(ref))
    # and it does depend on the difference when something rotates
    assert abs(score(5, 0) - score(0, 0)) > 1e-6


def test_rotation_preserves_norm():
    cfg = small_cfg("attention.position=rope")
    inv = rotary_inv_freq(8, cfg.attention)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    cos, sin = rotary_tables(torch.arange(5).repeat(2, 1) * 97, inv, torch.float64)
    assert torch.allclose(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_documents_do_not_attend_across_boundaries():
    torch.manual_seed(0)
    model = build_model(small_cfg()).eval()
    tokens, positions, doc_ids, _ = batch()
    with torch.no_grad():
        logits = model(tokens, positions, doc_ids)
        # the second document of row 1 alone, positions from 0, gives the same logits
        half = N // 2
        alone = model(tokens[1:, half:], positions[1:, half:], doc_ids[1:, half:])
    assert torch.allclose(logits[1:, half:], alone, atol=1e-5)


def test_flops_per_token_formula():
    model = build_model(small_cfg())
    c = model.cfg
    head_dim = c.d_model // c.n_head
    expect = 6 * model.num_params(non_embedding=True) + 7 * c.n_layer * 512 * c.n_head * head_dim
    assert model.flops_per_token(512) == expect


def test_rotary_frequencies_survive_a_cast_to_bfloat16():
    """Casting the model (as mixed precision or a user's model.bfloat16() does) keeps the float64
    frequencies: RoPE angles at long positions stay exact."""
    cfg = load_config(None, ["model.vocab_size=64", "attention.position=rope"])
    model = build_model(cfg).bfloat16()
    assert model.inv_freq.dtype == torch.float64
    assert torch.equal(model.inv_freq, rotary_inv_freq(cfg.model.d_model // cfg.model.n_head, cfg.attention))


def test_attention_gets_one_dtype_under_autocast():
    """Under autocast q, k (float32 after rms_norm and rotary) and v (bf16) reach the attention
    function in the autocast dtype, so the fused kernel is not bypassed."""
    model = build_model(small_cfg())
    seen = []

    def attend(q, k, v, *rest):
        seen.append((q.dtype, k.dtype, v.dtype))
        return v.new_zeros(q.shape)

    model.attend = attend
    tokens, positions, doc_ids, _ = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens, positions, doc_ids)
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen), seen
    seen.clear()
    model(tokens, positions, doc_ids)  # no autocast: float32 stays
    assert all(d == (torch.float32,) * 3 for d in seen), seen


def test_mlp_token_chunks_change_nothing(monkeypatch):
    """Long sequences run the MLP in token chunks (no (N, 4 d) tensor past 2^30 elements); the
    output and gradients equal the unchunked MLP's (fp32, rtol 1e-6)."""
    torch.manual_seed(0)
    mlp = model_mod.MLP(small_cfg().model)
    x = torch.randn(2, 37, 32, requires_grad=True)
    full = mlp(x)
    gx_full, = torch.autograd.grad(full.square().sum(), x)
    monkeypatch.setattr(model_mod, "MAX_HIDDEN_ELEMENTS", 2 * 128 * 5)  # chunks of 5 tokens
    chunked = mlp(x)
    gx, = torch.autograd.grad(chunked.square().sum(), x)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_full, rtol=1e-6, atol=1e-6)
