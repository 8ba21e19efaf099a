"""Ring attention over any contract backend (attention_reference, the Triton kernel).

Every rank keeps its queries; the key/value shards travel around the ring (rank -> rank + 1) while
each rank attends its queries to the visiting block. The next transfer is posted before the current
block's compute (batched isend/irecv), so communication hides behind attention. Partial results are
merged exactly by log-sum-exp in fp32 (`merge_lse`). Backward sends K/V around again, together with
fp32 dK/dV accumulators that arrive back at their owners after the last step; each step calls the
backend's backward with the GLOBAL (merged) out and lse, which yields that block's exact share.

Positions are data: the key positions / document ids of all ring ranks are all-gathered once per
batch (a few bytes per token) and drive the backend's mask and transform and a skip plan: a
(query piece, key piece) pair is computed only if some key can be visible (causal: min key position
<= max query position; packed documents: overlapping document-id ranges). A shard is cut into
`pieces` equal runs (zigzag: 2, head and tail), so zigzag steps compute only the visible halves.
The layout never changes the numbers, only the skipped work.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------- the merge
def merge_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Combine two softmax-normalised partial attentions over disjoint key sets.

    out_*: (..., N, D) normalised outputs; lse_*: (..., N) natural-log sums of exp(logits).
    Returns (out, lse) in fp32 (fp64 if either input is fp64): the attention over the union of the
    key sets. Rows with lse = -inf (no visible key) carry weight 0; if both are -inf the result is
    out = 0, lse = -inf, never NaN. Associative and commutative up to rounding.
    """
    acc = torch.float64 if torch.float64 in (out_a.dtype, out_b.dtype, lse_a.dtype, lse_b.dtype) \
        else torch.float32
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # both -inf -> 0 (weights 0 below)
    w_a = torch.exp(lse_a - m)
    w_b = torch.exp(lse_b - m)
    total = w_a + w_b
    seen = total > 0
    safe = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, m + torch.log(safe), torch.full_like(m, float("-inf")))
    out = (out_a.to(acc) * (w_a / safe)[..., None] + out_b.to(acc) * (w_b / safe)[..., None])
    return out, lse


def _merge_into_eager(acc_out, acc_lse, out_b, lse_b) -> None:
    out, lse = merge_lse(acc_out, acc_lse, out_b, lse_b)
    acc_out.copy_(out)
    acc_lse.copy_(lse)


@functools.lru_cache(maxsize=None)
def _compiled_merge():
    try:
        return torch.compile(_merge_into_eager, dynamic=True, fullgraph=True)
    except Exception as err:  # pragma: no cover - depends on the GPU box
        warnings.warn(f"torch.compile of the ring merge failed ({err}); using eager merges")
        return _merge_into_eager


_COMPILE_OK = [True]


def merge_into(acc_out, acc_lse, out_b, lse_b) -> None:
    """In-place `merge_lse` of a block result into fp32 accumulators (fused by torch.compile on CUDA)."""
    if acc_out.is_cuda and _COMPILE_OK[0]:
        try:
            _compiled_merge()(acc_out, acc_lse, out_b, lse_b)
            return
        except Exception as err:  # pragma: no cover - depends on the GPU box
            _COMPILE_OK[0] = False
            warnings.warn(f"compiled ring merge failed ({err}); using eager merges")
    _merge_into_eager(acc_out, acc_lse, out_b, lse_b)


# ----------------------------------------------------------------------------- communication
class _Pending:
    def __init__(self, works, recv):
        self.works, self.recv = works, recv

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()
        return self.recv


class RingComm:
    """Send a list of tensors to the next ring rank and receive the same shapes from the previous."""

    def __init__(self, group, ranks: tuple[int, ...] | list[int] | None = None):
        self.group = group
        self.ranks = tuple(ranks) if ranks is not None else tuple(dist.get_process_group_ranks(group))
        self.size = len(self.ranks)
        self.rank = dist.get_rank(group)
        self.next = self.ranks[(self.rank + 1) % self.size]
        self.prev = self.ranks[(self.rank - 1) % self.size]

    def exchange(self, tensors, tag: int = 0) -> _Pending:
        """Post sends of `tensors` to next and receives from prev; `.wait()` returns the received."""
        recv = [torch.empty_like(t) for t in tensors]
        ops = []
        for i, (s, r) in enumerate(zip(tensors, recv)):
            ops.append(dist.P2POp(dist.isend, s.contiguous(), self.next, self.group, tag + i))
            ops.append(dist.P2POp(dist.irecv, r, self.prev, self.group, tag + i))
        return _Pending(dist.batch_isend_irecv(ops), recv)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """(size, *x.shape): x of every ring rank, in ring order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.stack(parts)


# ----------------------------------------------------------------------------- the skip plan
@dataclass
class _Step:
    src: int  # ring rank that owns the visiting K/V block
    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_seg: torch.Tensor | None
    k_seg: torch.Tensor | None
    full_q: bool
    full_k: bool


@dataclass
class RingPlan:
    """Which sub-block of queries x visiting keys each ring step computes (None: skipped)."""
    steps: list
    n_q: int
    n_k: int

    @property
    def computed(self) -> int:
        return sum(s is not None for s in self.steps)


def _piece_bounds(x: torch.Tensor, pieces: int):
    """min and max over each of `pieces` equal runs of the last dim: (..., pieces) each."""
    v = x.reshape(*x.shape[:-1], pieces, x.shape[-1] // pieces)
    return v.amin(-1), v.amax(-1)


def build_ring_plan(q_pos, k_pos, q_seg=None, k_seg=None, *, causal: bool = True,
                    comm: RingComm | None = None, pieces: int = 1, skip: bool = True) -> RingPlan:
    """All-gather the key positions / document ids over the ring and decide every step's block.

    q_pos, k_pos, q_seg, k_seg: (B, n) this rank's global positions / document ids (segs or None).
    Correctness never depends on the plan: pieces that are not skipped are masked by the backend.
    """
    size = comm.size if comm is not None else 1
    rank = comm.rank if comm is not None else 0
    nq, nk = q_pos.shape[-1], k_pos.shape[-1]
    has_seg = q_seg is not None
    meta = torch.stack((k_pos.long(), k_seg.long()) if has_seg else (k_pos.long(),))
    all_meta = comm.all_gather(meta) if size > 1 else meta[None]  # (R, 1|2, B, nk)
    k_pos_all = all_meta[:, 0].to(k_pos.dtype)
    k_seg_all = all_meta[:, 1].to(k_seg.dtype) if has_seg else None

    pq = pieces if (pieces > 1 and nq % pieces == 0 and nk % pieces == 0) else 1
    visible = None
    if skip and (causal or has_seg):
        qmin, qmax = _piece_bounds(q_pos.long(), pq)  # (B, Pq)
        kmin, kmax = _piece_bounds(all_meta[:, 0], pq)  # (R, B, Pk)
        stats = [qmax, kmin]
        if has_seg:
            stats += [*_piece_bounds(q_seg.long(), pq), *_piece_bounds(all_meta[:, 1], pq)]
        flat = torch.cat([s.reshape(-1) for s in stats]).cpu()  # the plan's one host sync
        sizes = [s.numel() for s in stats]
        parts = [p.view(s.shape) for p, s in zip(flat.split(sizes), stats)]
        qmax_c, kmin_c = parts[0], parts[1]
        vis = torch.ones(size, qmax_c.shape[0], pq, pq, dtype=torch.bool)  # (R, B, Pq, Pk)
        if causal:
            vis &= kmin_c[:, :, None, :] <= qmax_c[None, :, :, None]
        if has_seg:
            qsmin, qsmax, ksmin, ksmax = parts[2:]
            vis &= (ksmin[:, :, None, :] <= qsmax[None, :, :, None]) & \
                   (ksmax[:, :, None, :] >= qsmin[None, :, :, None])
        visible = vis.any(1)  # (R, Pq, Pk)

    steps = []
    qlen, klen = nq // pq, nk // pq
    for s in range(size):
        src = (rank - s) % size
        if visible is None:
            q_lo, q_hi, k_lo, k_hi = 0, nq, 0, nk
        else:
            v = visible[src]
            rows = v.any(1).nonzero().flatten().tolist()
            cols = v.any(0).nonzero().flatten().tolist()
            if not rows:
                steps.append(None)
                continue
            q_lo, q_hi = rows[0] * qlen, (rows[-1] + 1) * qlen
            k_lo, k_hi = cols[0] * klen, (cols[-1] + 1) * klen
        steps.append(_Step(
            src=src, q_lo=q_lo, q_hi=q_hi, k_lo=k_lo, k_hi=k_hi,
            q_pos=q_pos[:, q_lo:q_hi].contiguous(), k_pos=k_pos_all[src][:, k_lo:k_hi].contiguous(),
            q_seg=q_seg[:, q_lo:q_hi].contiguous() if has_seg else None,
            k_seg=k_seg_all[src][:, k_lo:k_hi].contiguous() if has_seg else None,
            full_q=(q_lo, q_hi) == (0, nq), full_k=(k_lo, k_hi) == (0, nk)))
    return RingPlan(steps=steps, n_q=nq, n_k=nk)


# ----------------------------------------------------------------------------- ring attention
def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Slices:
    """Contiguous sub-blocks along the token dim (dim 2), made once per (lo, hi)."""

    def __init__(self, x: torch.Tensor):
        self.x, self.cache = x, {}

    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        if lo == 0 and hi == self.x.shape[2]:
            return self.x
        key = (lo, hi)
        if key not in self.cache:
            self.cache[key] = self.x[:, :, lo:hi].contiguous()
        return self.cache[key]


def _sub(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return x if lo == 0 and hi == x.shape[2] else x[:, :, lo:hi].contiguous()


def _ring_forward(q, k, v, plan: RingPlan, comm: RingComm | None, ops, opts):
    acc = _acc_dtype(q)
    b, hq, n, _ = q.shape
    out = torch.zeros(b, hq, n, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((b, hq, n), float("-inf"), dtype=acc, device=q.device)
    size = comm.size if comm is not None else 1
    qs = _Slices(q)
    kv = [k.contiguous(), v.contiguous()]
    first = True
    for s in range(size):
        pending = comm.exchange(kv, tag=0) if s < size - 1 else None
        st = plan.steps[s]
        if st is not None:
            o_b, l_b = ops.forward(qs(st.q_lo, st.q_hi), _sub(kv[0], st.k_lo, st.k_hi),
                                   _sub(kv[1], st.k_lo, st.k_hi), st.q_pos, st.k_pos, st.q_seg,
                                   st.k_seg, **opts)
            if first:  # merging into (0, -inf) is the identity
                out[:, :, st.q_lo:st.q_hi].copy_(o_b)
                lse[:, :, st.q_lo:st.q_hi].copy_(l_b)
                first = False
            else:
                merge_into(out[:, :, st.q_lo:st.q_hi], lse[:, :, st.q_lo:st.q_hi], o_b, l_b)
        if pending is not None:
            kv = pending.wait()
    return out.to(q.dtype), lse


def _ring_backward(dout, q, k, v, out, lse, plan: RingPlan, comm: RingComm | None, ops, opts):
    acc = _acc_dtype(q)
    size = comm.size if comm is not None else 1
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    qs, dos, outs, lses = _Slices(q), _Slices(dout.contiguous()), _Slices(out), _Slices(lse)
    kv = [k.contiguous(), v.contiguous()]
    pending_dkv = None
    for s in range(size):
        pending_kv = comm.exchange(kv, tag=0) if s < size - 1 else None
        st = plan.steps[s]
        grads = None
        if st is not None:
            lo, hi = st.q_lo, st.q_hi
            grads = ops.backward(dos(lo, hi), qs(lo, hi), _sub(kv[0], st.k_lo, st.k_hi),
                                 _sub(kv[1], st.k_lo, st.k_hi), outs(lo, hi), lses(lo, hi),
                                 st.q_pos, st.k_pos, st.q_seg, st.k_seg, **opts)
            dq[:, :, lo:hi] += grads[0]
        # the accumulators of the visiting block: fresh at step 0, else received from prev
        if pending_dkv is None:
            dk_acc = torch.zeros(k.shape, dtype=acc, device=k.device)
            dv_acc = torch.zeros(v.shape, dtype=acc, device=v.device)
        else:
            dk_acc, dv_acc = pending_dkv.wait()
        if grads is not None:
            dk_acc[:, :, st.k_lo:st.k_hi] += grads[1]
            dv_acc[:, :, st.k_lo:st.k_hi] += grads[2]
        if size > 1:  # pass them on; after the last step they land at their owner
            pending_dkv = comm.exchange([dk_acc, dv_acc], tag=2)
        if pending_kv is not None:
            kv = pending_kv.wait()
    if size > 1:
        dk_acc, dv_acc = pending_dkv.wait()
    return dq.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, comm, ops, opts):
        out, lse = _ring_forward(q, k, v, plan, comm, ops, opts)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.comm, ctx.ops, ctx.opts = plan, comm, ops, opts
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, ctx.plan, ctx.comm, ctx.ops, ctx.opts)
        return dq, dk, dv, None, None, None, None


def ring_attention(q, k, v, plan: RingPlan, comm: RingComm | None, ops, *, scale: float, tau: float,
                   causal: bool, transform: str, alibi_slopes=None):
    """(out, lse) of this rank's queries over the keys of all ring ranks; differentiable in q, k, v.

    q (B, Hq, n, D), k/v (B, Hkv, n, D) this rank's shard; `plan` from build_ring_plan with the
    same ring; `ops` a contract backend module (attention.backend_ops). lse is fp32 (fp64 for fp64).
    """
    opts = dict(scale=scale, tau=tau, causal=causal, transform=transform, alibi_slopes=alibi_slopes)
    return _RingAttention.apply(q, k, v, plan, comm, ops, opts)
