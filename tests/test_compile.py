"""torch.compile of the blocks (scaleinv_dist.model.compile_model): the compiled model gives the
loss and gradients of the eager one under every activation-checkpointing mode, the attention call
stays outside the compiled code (swappable, context parallelism keeps its parity), and
`train.compile` applies on CUDA only.

The CPU tests use backend="aot_eager" (Dynamo capture, AOTAutograd's joint graph and partitioner,
checkpoint regions as traced higher-order ops; no C++ compiler): everything compile does here
except Inductor's code generation, which one slow test runs as well. Tolerance: 1e-5 relative to
the largest magnitude of each gradient (observed: ~1e-8, float32 rounding of reordered ops).
"""
import json
import os
import socket
import tempfile

import pytest
import torch

from scaleinv_dist.config import load_config
from scaleinv_dist import memory
from scaleinv_dist.model import build_model, compile_model, compile_wanted
from tiny_runs import packed_batch

V, B, N, D_MODEL = 97, 2, 24, 32
TOL = 1e-5


def small_cfg(*overrides):
    return load_config(None, ["model.n_layer=2", f"model.d_model={D_MODEL}", "model.n_head=4",
                              "model.n_kv_head=2", f"model.vocab_size={V}", f"train.seq_len={N}",
                              "attention.backend=reference", *overrides])


def batch(seed=0):
    return packed_batch(V, B, N, seed)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def loss_and_grads(model, steps=2):
    """Loss and gradients of the last of `steps` forward/backward passes (the first compiles)."""
    tokens, positions, doc_ids, labels = batch()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss_sum, n = model(tokens, positions, doc_ids, labels)
        (loss_sum / n).backward()
    return loss_sum.detach(), {k: p.grad for k, p in model.named_parameters()}


def check_same(eager, compiled):
    assert rel(compiled[0], eager[0]) <= TOL, (compiled[0], eager[0])
    assert eager[1].keys() == compiled[1].keys()
    for k, g in eager[1].items():
        assert rel(compiled[1][k], g) <= TOL, k


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["none", "selective", "full", "offload"])
def test_compiled_equals_eager(mode, one_thread, monkeypatch):
    """full / offload run the compiled halves on token chunks of two sizes here (RECOMPUTE_CHUNK_TOKENS)."""
    monkeypatch.setattr(memory, "RECOMPUTE_CHUNK_TOKENS", 2 * (N // 3 + 1))
    torch.manual_seed(0)
    eager = loss_and_grads(build_model(small_cfg(f"train.activation_checkpointing={mode}")))
    torch.manual_seed(0)
    model = compile_model(build_model(small_cfg(f"train.activation_checkpointing={mode}")), "aot_eager")
    check_same(eager, loss_and_grads(model))
    assert list(model.state_dict()) == list(build_model(small_cfg()).state_dict())  # names unchanged


def test_compiled_equals_eager_under_bf16_autocast(one_thread):
    """The GPU setting on CPU: bf16 autocast traced inside the compiled halves (autocast_dtype casts
    q, k, v there). aot_eager runs the same bf16 ops: TOL as in fp32 (observed ~1e-7)."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(small_cfg("train.activation_checkpointing=selective"))
        if compiled:
            compile_model(model, "aot_eager")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(loss_and_grads(model))
    (eager_loss, eager_grads), (loss, grads) = results
    check_same((eager_loss, eager_grads), (loss, grads))


def saved_shapes(model) -> set:
    """Shapes of every tensor autograd keeps for backward during one forward of `model`."""
    shapes = set()

    def pack(t):
        shapes.add(tuple(t.shape))
        return t

    tokens, positions, doc_ids, labels = batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum, n = model(tokens, positions, doc_ids, labels)
    (loss_sum / n).backward()
    return shapes


def test_selective_checkpointing_still_recomputes_the_mlp_when_compiled(one_thread):
    """Compiled, "selective" saves no MLP hidden activation (B, N, 4 d_model); "none" does."""
    hidden = (B, N, 4 * D_MODEL)
    for mode, kept in (("none", True), ("selective", False)):
        torch._dynamo.reset()
        model = compile_model(build_model(small_cfg(f"train.activation_checkpointing={mode}")), "aot_eager")
        assert (hidden in saved_shapes(model)) == kept, mode


def test_attention_stays_swappable_after_compile(one_thread):
    """The attention function is looked up at every call, outside the compiled halves: swapping
    model.attend after compiling (as apply_cp may) takes effect, with no recompilation."""
    torch.manual_seed(0)
    model = compile_model(build_model(small_cfg()), "aot_eager")
    tokens, positions, doc_ids, labels = batch()
    model(tokens, positions, doc_ids, labels)
    calls = []

    def spy(q, k, v, *rest):
        calls.append(q.shape)
        return model.local_attend(q, k, v, *rest)

    model.attend = spy
    model(tokens, positions, doc_ids, labels)
    assert len(calls) == len(model.blocks)


def test_compile_wanted_only_on_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert small_cfg().train.compile is True  # the default (measured faster on an H200)
    assert not compile_wanted(small_cfg("train.compile=false"), "cuda")
    cfg = small_cfg()
    assert compile_wanted(cfg, torch.device("cuda", 0)) and compile_wanted(cfg, "cuda")
    assert not compile_wanted(cfg, torch.device("cpu"))
    assert not compile_wanted(small_cfg("train.compile=true", "train.zero_stage=3"), "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not compile_wanted(cfg, "cuda")
    model = build_model(cfg, device="cpu")  # the training loop's call on CPU: eager blocks
    assert all(b.pre.__func__ is type(b).pre for b in model.blocks)


@pytest.mark.slow
def test_inductor_compiled_equals_eager(one_thread):
    """Inductor's generated C++ (needs a compiler; about a minute on a cold cache)."""
    torch.manual_seed(0)
    eager = loss_and_grads(build_model(small_cfg("train.activation_checkpointing=selective")))
    torch.manual_seed(0)
    model = compile_model(build_model(small_cfg("train.activation_checkpointing=selective")))
    check_same(eager, loss_and_grads(model))


# ----------------------------------------------------------------------------- context parallelism
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cp_worker(rank: int, world: int, port: int, path: str) -> None:
    """Zigzag context parallelism over `world` gloo ranks with compiled blocks; rank 0 writes the
    summed loss and the all-reduced gradients."""
    import torch.distributed as dist

    from scaleinv_dist.config import ParallelConfig
    from scaleinv_dist.parallel import apply_cp, destroy_topology, init_topology, layout_for, shard_batch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        topo = init_topology(world, 1, timeout_s=120, backend="gloo")
        torch.manual_seed(0)
        model = build_model(small_cfg("train.activation_checkpointing=full"))
        apply_cp(model, topo, ParallelConfig(context_parallel_size=world, cp_strategy="zigzag"))
        compile_model(model, "aot_eager")
        tokens, positions, doc_ids, labels = shard_batch(*batch(), rank=topo.cp_rank, cp_size=world,
                                                         layout=layout_for("zigzag"))
        for _ in range(2):  # the first pass compiles
            model.zero_grad(set_to_none=True)
            loss_sum, n = model(tokens, positions, doc_ids, labels)
            loss_sum.backward()
        flat = torch.cat([loss_sum.detach()[None]] + [p.grad.flatten() for p in model.parameters()])
        dist.all_reduce(flat)
        if rank == 0:
            with open(path, "w") as f:
                json.dump(flat.tolist(), f)
        destroy_topology()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_context_parallel_parity_with_compiled_blocks():
    """2 ranks, zigzag, full checkpointing, compiled blocks: the summed loss and the summed
    gradients equal one eager process on whole sequences (TOL relative)."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    model = build_model(small_cfg("train.activation_checkpointing=full"))
    tokens, positions, doc_ids, labels = batch()
    loss_sum, _ = model(tokens, positions, doc_ids, labels)
    loss_sum.backward()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cp.json")
        mp.spawn(_cp_worker, args=(2, _free_port(), path), nprocs=2, join=True)
        with open(path) as f:
            flat = torch.tensor(json.load(f))
    assert rel(flat[:1], loss_sum.detach()[None]) <= TOL
    offset = 1
    for name, p in model.named_parameters():
        g = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        assert rel(g, p.grad) <= TOL, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_inductor_on_cuda_matches_eager(mode):
    """The training setting: CUDA, bf16 autocast, the fused Triton kernel (backend auto), Inductor.
    bf16 rounding differs between fused and unfused elementwise code: loss within 1e-2 relative,
    each gradient within 5e-2 of its largest magnitude."""
    cfg = ("attention.backend=auto", f"train.activation_checkpointing={mode}")
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(small_cfg(*cfg)).cuda()
        if compiled:
            compile_model(model)
        tokens, positions, doc_ids, labels = (t.cuda() for t in batch())
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss_sum, n = model(tokens, positions, doc_ids, labels)
            (loss_sum / n).backward()
        results.append((loss_sum.detach().float(), {k: p.grad.float() for k, p in model.named_parameters()}))
    (eager_loss, eager_grads), (loss, grads) = results
    assert rel(loss, eager_loss) <= 1e-2
    for k, g in eager_grads.items():
        assert rel(grads[k], g) <= 5e-2, k
