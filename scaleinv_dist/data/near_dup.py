"""Near-duplicate grouping of documents (e.g. a First Folio and a modern edition of one play).

Similarity is the Jaccard index of the sets of 5-character shingles of each document after
normalisation (lower case, letters only: digits, punctuation and whitespace removed), estimated
with a 512-bin one-permutation MinHash sketch and found with locality-sensitive hashing
(170 bands of 3 bins). Documents whose estimated Jaccard index is >= `threshold` are joined,
transitively, into one group; exact duplicates (same text after normalisation) always are.

On the embedded Shakespeare corpus the two editions of a play have Jaccard 0.48-0.63 and
different plays at most 0.28, hence the default threshold 0.38. Everything is deterministic
(fixed hash constants, no randomness).
"""
from __future__ import annotations

import functools
import hashlib
from collections import defaultdict

import numpy as np

SHINGLE = 5  # characters
BIN_BITS = 9
BINS = 1 << BIN_BITS  # sketch size (one-permutation MinHash bins)
_SHIFT = np.uint64(64 - BIN_BITS)
ROWS = 3  # bins per LSH band
THRESHOLD = 0.38
MIN_SHINGLES = 50  # shorter documents are only grouped with exact duplicates
_EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)


@functools.lru_cache(maxsize=1)
def _bmp_letters() -> np.ndarray:
    """is_letter[code point] (str.isalpha) for the Basic Multilingual Plane."""
    return np.array([chr(c).isalpha() for c in range(0x10000)], dtype=bool)


def normalise(text: str) -> np.ndarray:
    """Code points (uint32) of the lower-cased letters of `text`: what similarity is computed on."""
    cps = np.frombuffer(text.lower().encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    table = _bmp_letters()
    mask = table[np.minimum(cps, 0xFFFF)]
    high = cps > 0xFFFF
    if high.any():
        uniq, inv = np.unique(cps[high], return_inverse=True)
        mask[high] = np.array([chr(c).isalpha() for c in uniq.tolist()], dtype=bool)[inv]
    return cps[mask]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def shingle_hashes(cps: np.ndarray) -> np.ndarray:
    """Sorted uint64 hashes of the SHINGLE-letter substrings of normalised code points."""
    cps = cps.astype(np.uint64)
    n = len(cps) - SHINGLE + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(SHINGLE):
            h = h * np.uint64(0x100000001B3) + cps[i:i + n]
    return np.sort(_mix(h))


def sketch(hashes: np.ndarray) -> np.ndarray:
    """(BINS,) uint64 one-permutation MinHash: the smallest hash in each bin of the top BIN_BITS bits.

    `hashes` must be sorted ascending; empty bins hold the sentinel 2**64-1.
    """
    edges = np.arange(BINS, dtype=np.uint64) << _SHIFT
    idx = np.searchsorted(hashes, edges)
    sig = np.full(BINS, _EMPTY, dtype=np.uint64)
    ok = idx < len(hashes)
    vals = hashes[np.minimum(idx, max(len(hashes) - 1, 0))] if len(hashes) else sig
    ok &= (vals >> _SHIFT) == np.arange(BINS, dtype=np.uint64)
    sig[ok] = vals[ok]
    return sig


def estimate_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard estimate from two sketches: agreeing bins over bins not empty in both."""
    both_empty = (a == _EMPTY) & (b == _EMPTY)
    used = BINS - int(both_empty.sum())
    return float(((a == b) & ~both_empty).sum()) / used if used else 1.0


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def near_duplicate_groups(texts: list[str], threshold: float = THRESHOLD) -> list[int]:
    """Group id of each text: the smallest index in its near-duplicate group (a singleton: itself)."""
    n = len(texts)
    uf = _UnionFind(n)
    exact: dict[str, int] = {}
    sigs: list[np.ndarray | None] = []
    for i, text in enumerate(texts):
        norm = normalise(text)
        key = hashlib.sha256(norm.tobytes()).hexdigest()
        if key in exact:
            uf.union(exact[key], i)
        else:
            exact[key] = i
        hashes = shingle_hashes(norm)
        sigs.append(sketch(hashes) if len(hashes) >= MIN_SHINGLES else None)

    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    for i, sig in enumerate(sigs):
        if sig is None:
            continue
        for band in range(BINS // ROWS):
            part = sig[band * ROWS:(band + 1) * ROWS]
            if (part == _EMPTY).all():
                continue
            buckets[(band, part.tobytes())].append(i)
    checked: set[tuple[int, int]] = set()
    for members in buckets.values():
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                pair = (members[x], members[y])
                if pair in checked:
                    continue
                checked.add(pair)
                if estimate_jaccard(sigs[pair[0]], sigs[pair[1]]) >= threshold:
                    uf.union(*pair)
    return [uf.find(i) for i in range(n)]
