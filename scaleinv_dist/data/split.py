"""Deterministic train/validation split by whole documents, near-duplicates kept together.

Rule (no random numbers, only content hashes):
1. Documents are grouped: near-duplicates (near_dup.py) form one group; every group goes to one split.
2. Groups are sorted by total length in characters, longest first (ties: by hash).
3. Let f = val_fraction (if f > 0.5 the same rule picks the *training* groups with 1 - f).
   The sorted groups are cut into consecutive strata at the boundaries floor(k / f), k = 0, 1, ...
   (strata of about 1/f groups). From each full stratum the group with the smallest hash goes to
   validation; a final partial stratum of m groups contributes its smallest-hash group only when
   the hash of its first group, as a number u in [0, 1), is below m * f.
4. At least one group is in each split (the smallest-hash group is moved if one side is empty).

So the validation split is a length-stratified sample: it always holds one of the ~1/f longest
groups (long-context evaluation needs long documents) and its length distribution follows training.
A group's hash is the smallest sha256 of its members' texts: independent of file names and order.
"""
from __future__ import annotations

import hashlib
import math

from .errors import DataError


def _u(hex_digest: str) -> float:
    return int(hex_digest[:16], 16) / 2.0**64


def split_groups(texts: list[str], groups: list[int], val_fraction: float) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) of `texts`, each sorted ascending.

    groups[i] is the group id of texts[i] (same id = must stay together).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    if len(members) < 2:
        raise DataError(f"the corpus has {len(texts)} document(s) forming {len(members)} group of "
                        "near-duplicates; a train/validation split by whole documents needs at least "
                        "two distinct documents: add documents")
    info = []
    for g, idx in members.items():
        key = min(hashlib.sha256(texts[i].encode("utf-8", "surrogatepass")).hexdigest() for i in idx)
        info.append((-sum(len(texts[i]) for i in idx), key, g))
    info.sort()
    f = val_fraction if val_fraction <= 0.5 else 1.0 - val_fraction
    picked: list[tuple[str, int]] = []
    n, k = len(info), 0
    while True:
        lo, hi = math.floor(k / f + 1e-9), math.floor((k + 1) / f + 1e-9)
        if lo >= n:
            break
        stratum = info[lo:min(hi, n)]
        if hi <= n or _u(stratum[0][1]) < len(stratum) * f:
            best = min(stratum, key=lambda t: t[1])
            picked.append((best[1], best[2]))
        k += 1
    chosen = {g for _, g in picked}
    if not chosen:
        chosen = {min(info, key=lambda t: t[1])[2]}
    if len(chosen) == n:
        chosen.discard(max(picked)[1])
    val_groups = chosen if val_fraction <= 0.5 else {t[2] for t in info} - chosen
    train = sorted(i for g, idx in members.items() if g not in val_groups for i in idx)
    val = sorted(i for g, idx in members.items() if g in val_groups for i in idx)
    return train, val
