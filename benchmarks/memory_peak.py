"""Where the GPU memory was at the peak: the allocations alive at the moment the CUDA caching
allocator held the most, grouped by the line of our code that made them.

`benchmarks/train_throughput.py --memory-trace` records the allocator's history during its
measured steps (torch.cuda.memory._record_memory_history, Python stacks) and writes this summary
beside its tables; a snapshot saved some other way is summarised with

    python benchmarks/memory_peak.py snapshot.pickle [--top 25]

The trace is replayed event by event (alloc adds a block, free_completed removes it); the peak is
the largest total, or, after an out-of-memory error, the moment of the failed request (listed
too). Blocks allocated before recording began are not in the trace, so the peak here counts only
what the recorded steps allocated (the weights and optimizer state usually come before).
"""
from __future__ import annotations

import argparse
import contextlib
import pickle
import sys
from collections import defaultdict
from pathlib import Path

GiB = 2**30
OURS = ("scaleinv_dist", "kernels", "benchmarks")  # path parts that mark a frame as our code
MAX_EVENTS = 1_000_000  # allocator events kept (a ring: older ones are dropped past this)


def origin(frames: list[dict]) -> str:
    """"path:line function" of the innermost frame of our code, the path from our top folder on
    (the whole stack's innermost frame when none is ours; '?' without frames)."""
    ours = [f for f in frames if any(f"/{part}/" in f.get("filename", "") for part in OURS)]
    if not ours and not frames:
        return "?"
    f = (ours or frames)[0]
    path = f.get("filename", "?")
    for part in OURS:
        if f"/{part}/" in path:
            path = path[path.rindex(f"/{part}/") + 1:]
            break
    return f"{path}:{f.get('line', '?')} {f.get('name', '?')}"


def peak_allocations(trace: list[dict]) -> tuple[int, list[tuple[str, int, int]], dict | None]:
    """(bytes alive, [(origin, bytes, blocks)] alive, largest first, the failed request or None) at
    the peak of one device's trace (events with action, addr, size, frames), or at its last
    out-of-memory event when there is one."""
    ooms = [i for i, e in enumerate(trace) if e["action"] == "oom"]
    if ooms:
        peak_at = ooms[-1]
    else:
        total = peak = peak_at = 0
        for i, e in enumerate(trace):
            if e["action"] == "alloc":
                total += e["size"]
            elif e["action"] == "free_completed":
                total -= e["size"]
            if total > peak:
                peak, peak_at = total, i
    live: dict[int, dict] = {}
    for e in trace[:peak_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in live.values():
        g = groups[origin(e.get("frames", []))]
        g[0] += e["size"]
        g[1] += 1
    rows = sorted(((k, v[0], v[1]) for k, v in groups.items()), key=lambda r: -r[1])
    return sum(e["size"] for e in live.values()), rows, trace[ooms[-1]] if ooms else None


@contextlib.contextmanager
def recorded(path: Path | None, device):
    """Record the CUDA allocator's history (Python stacks) inside the block and write `summary`
    of it to `path`, also when the block fails (out of memory); nothing on CPU or without a path."""
    import torch

    if path is None or device.type != "cuda":
        yield
        return
    torch.cuda.memory._record_memory_history(max_entries=MAX_EVENTS, stacks="python")
    try:
        yield
    finally:
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(summary(snapshot, device=device.index or 0))


def summary(snapshot: dict, top: int = 25, device: int = 0) -> str:
    """A markdown table of the allocations alive at the peak of `device`'s trace in `snapshot`
    (torch.cuda.memory._snapshot()'s dict)."""
    traces = snapshot.get("device_traces") or []
    trace = traces[device] if device < len(traces) else []
    if not trace:
        return "no allocator trace recorded (memory history was off, or nothing was allocated)\n"
    peak, rows, oom = peak_allocations(trace)
    when = "at the failed allocation" if oom is not None else "at the peak"
    lines = [f"Allocations alive {when}: {peak / GiB:.2f} GiB recorded in {sum(r[2] for r in rows)} "
             f"blocks ({len(trace)} events).", ""]
    if oom is not None:
        lines += [f"Out of memory asking for {oom['size'] / GiB:.2f} GiB.", ""]
    lines += ["| allocated at | GiB | blocks |", "|---|---|---|"]
    lines += [f"| {o} | {b / GiB:.2f} | {n} |" for o, b, n in rows[:top]]
    rest = rows[top:]
    if rest:
        lines.append(f"| ({len(rest)} more places) | {sum(r[1] for r in rest) / GiB:.2f} | "
                     f"{sum(r[2] for r in rest)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("snapshot", help="a pickle written by torch.cuda.memory._dump_snapshot")
    ap.add_argument("--top", type=int, default=25, help="places listed (the rest are summed)")
    args = ap.parse_args()
    try:
        with open(args.snapshot, "rb") as f:
            snapshot = pickle.load(f)
        if not isinstance(snapshot, dict):
            raise pickle.UnpicklingError(f"it holds a {type(snapshot).__name__}, not a snapshot")
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        print(f"memory_peak: cannot read {args.snapshot}: {err}; pass a file written by "
              f"torch.cuda.memory._dump_snapshot", file=sys.stderr)
        sys.exit(2)
    print(summary(snapshot, args.top), end="")


if __name__ == "__main__":
    main()
