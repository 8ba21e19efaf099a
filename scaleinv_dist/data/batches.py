"""Batches: packed training windows (shuffled, sharded, resumable) and validation windows.

All tensors are int64 of shape (B, L) with L = sequence length in tokens:
    tokens     input token ids
    labels     the token each position must predict (the next one); IGNORE_INDEX (-100) = not scored
    positions  position of each token for the positional encoding (see the rules below)
    doc_ids    segment id of each token inside its row; attention may mask across segments

Training (TrainLoader). The training store's token stream (documents as [bos] .. [eos], back to
back) is cut into windows of L+1 tokens starting at multiples of L: window w covers stream tokens
[w*L, w*L + L]; inputs are its first L tokens, labels its last L. Every token is a label exactly
once per epoch. With document_masking=True:
  * doc_ids start at 0 in every row and increase by one at each document start (bos) in the row;
  * positions restart at 0 at each document start; the tokens of the first, partial document of a
    row (a document that began in an earlier window) count from 0 at the row start, i.e. positions
    are offsets from the first token the row's attention can see of that document;
  * the label of a document's last token (its eos, whose next token is the next document's bos)
    is IGNORE_INDEX: predicting which document comes next is noise.
With document_masking=False: positions = 0..L-1, doc_ids = 0, every label is the real next token.
Order: per epoch e, np.random.Generator(PCG64([seed, e])).permutation(n_windows); data-parallel
rank r of D takes every D-th window of it starting at r (ranks never share a window; the last
n_windows % D windows of the permutation are left out that epoch). The loader is endless: a batch
that runs past an epoch's end continues with the next epoch's order. state_dict() is
(epoch, index) = the epoch and how many of this rank's windows of it were consumed.

Validation (validation_windows). Every validation document (its tokens [bos] .. [eos]) is cut
into non-overlapping windows of `length` input tokens from its start: window k has inputs
doc[k*length : (k+1)*length] and labels doc[k*length+1 : (k+1)*length+1], so a window needs
length+1 tokens and every label is the real next token of the same document; a document tail
too short for a full window is dropped (documents with <= length tokens give no window).
positions = 0..length-1, doc_ids = 0. With align_to=A (a multiple of every length compared),
each document is first cut to its first floor((n-1)/A)*A + 1 tokens, so every length dividing A
scores exactly the same tokens; compare context lengths that way.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
import torch

from ..loss import IGNORE_INDEX
from .errors import DataError
from .tokens import TokenStore


@dataclass
class Batch:
    """tokens, labels, positions, doc_ids: (B, L) int64 tensors (see the module docstring)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    doc_ids: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(*(getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)

    def num_scored(self) -> int:
        """Labels that count in the loss (not IGNORE_INDEX)."""
        return int((self.labels != IGNORE_INDEX).sum())


def _to_batch(tokens, labels, positions, doc_ids) -> Batch:
    return Batch(*(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
                   for a in (tokens, labels, positions, doc_ids)))


class TrainLoader:
    """Endless iterator of training Batches of micro_batch_size windows of seq_len tokens."""

    def __init__(self, store: TokenStore, seq_len: int, micro_batch_size: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1, document_masking: bool = True):
        if seq_len < 1 or micro_batch_size < 1:
            raise DataError(f"seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        self.store, self.seq_len, self.micro_batch_size = store, seq_len, micro_batch_size
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.document_masking = document_masking
        n = store.n_tokens
        self.n_windows = max(0, (n - 1) // seq_len)
        if self.n_windows < dp_size:
            longest = (n - 1) // dp_size
            raise DataError(f"the training split has {n} tokens, fewer than seq_len+1 = {seq_len + 1} "
                            f"per data-parallel rank x {dp_size} ranks; set train.seq_len <= {longest} "
                            "or add training data")
        self.windows_per_rank = self.n_windows // dp_size
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    # -- order
    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """All window indices in epoch `epoch`'s shuffled order (the same on every rank)."""
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        return rng.permutation(self.n_windows)

    def window_order(self, epoch: int) -> np.ndarray:
        """This rank's windows in epoch `epoch`, in the order it consumes them."""
        perm = self.epoch_permutation(epoch)
        return perm[self.dp_rank::self.dp_size][:self.windows_per_rank]

    def _take(self) -> int:
        if self.index >= self.windows_per_rank:
            self.epoch, self.index = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.window_order(self.epoch), self.epoch
        w = int(self._order[self.index])
        self.index += 1
        return w

    # -- windows
    def window(self, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, labels, positions, doc_ids) of window w, each (seq_len,) int64."""
        L, start = self.seq_len, w * self.seq_len
        chunk = self.store.tokens[start:start + L + 1].astype(np.int64)
        tokens, labels = chunk[:-1], chunk[1:].copy()
        if not self.document_masking:
            return tokens, labels, np.arange(L, dtype=np.int64), np.zeros(L, dtype=np.int64)
        offsets = self.store.offsets  # starts[i]: chunk token i is a document's first token (bos)
        lo, hi = np.searchsorted(offsets, [start, start + L + 1], side="left")
        starts = np.zeros(L + 1, dtype=bool)
        starts[offsets[lo:hi] - start] = True
        is_start = starts[:L].copy()
        is_start[0] = True  # the row's first token starts its first segment
        doc_ids = np.cumsum(is_start) - 1
        seg_first = np.flatnonzero(is_start)
        positions = np.arange(L, dtype=np.int64) - seg_first[doc_ids]
        labels[starts[1:]] = IGNORE_INDEX  # the next token starts another document
        return tokens, labels, positions, doc_ids.astype(np.int64)

    def next_batch(self) -> Batch:
        rows = [self.window(self._take()) for _ in range(self.micro_batch_size)]
        return _to_batch(*(np.stack(parts) for parts in zip(*rows)))

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def __next__(self) -> Batch:
        return self.next_batch()

    # -- progress and resume
    @property
    def epochs_done(self) -> float:
        """Epochs consumed so far by this rank, fractional."""
        return self.epoch + self.index / self.windows_per_rank

    @property
    def tokens_per_epoch(self) -> int:
        """Label tokens per epoch over all ranks."""
        return self.windows_per_rank * self.dp_size * self.seq_len

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len,
                "dp_size": self.dp_size, "dp_rank": self.dp_rank, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seq_len", "dp_size", "n_windows"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"cannot resume the data order: the checkpoint has {key}={state[key]}, "
                                f"this run {getattr(self, key)}; resume with the same train.seq_len, "
                                "data-parallel size and data")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


# ----------------------------------------------------------------------------- validation

def _validation_index(store: TokenStore, length: int, max_tokens: int = 0,
                      align_to: int = 0) -> list[tuple[int, int]]:
    """(document, start token within it) of every validation window, in the order they are scored."""
    if length < 1:
        raise DataError(f"validation length {length} must be >= 1")
    if align_to and align_to % length:
        raise DataError(f"align_to={align_to} must be a multiple of the validation length {length}")
    lengths = store.doc_lengths
    if store.n_docs == 0 or int(lengths.max()) < length + 1:
        longest = int(lengths.max()) if store.n_docs else 0
        name = store.names[int(lengths.argmax())] if store.n_docs else "(none)"
        raise DataError(f"no validation document has the {length + 1} tokens a window of {length} "
                        f"needs; the longest, {name}, has {longest}; evaluate at lengths <= {max(longest - 1, 0)} "
                        "or add longer validation documents")
    block = align_to or length  # windows are chosen in blocks of this many label tokens
    blocks = []
    for d, n in enumerate(lengths.tolist()):
        for b in range((n - 1) // block):
            blocks.append((d, b * block))
    if max_tokens > 0 and blocks:
        k = max(1, min(len(blocks), max_tokens // block))
        picks = (np.arange(k) * len(blocks)) // k  # evenly spread over all documents
        blocks = [blocks[i] for i in picks]
    return [(d, s + j * length) for d, s in blocks for j in range(block // length)]


def count_validation_tokens(store: TokenStore, length: int, max_tokens: int = 0, align_to: int = 0) -> int:
    """How many label tokens validation_windows(store, length, ...) scores."""
    return len(_validation_index(store, length, max_tokens, align_to)) * length


def validation_windows(store: TokenStore, length: int, max_tokens: int = 0, batch_size: int = 1,
                       align_to: int = 0) -> Iterator[Batch]:
    """Batches (<= batch_size rows) of validation windows of `length` tokens; see the module docstring.

    max_tokens > 0 keeps about that many label tokens, in whole blocks (windows, or align_to spans)
    spread evenly over the documents; with align_to it is the same tokens for every length.
    """
    index = _validation_index(store, length, max_tokens, align_to)
    batch_size = max(1, batch_size)
    positions = np.arange(length, dtype=np.int64)
    for i in range(0, len(index), batch_size):
        rows = []
        for d, s in index[i:i + batch_size]:
            doc = store.doc(d)
            chunk = doc[s:s + length + 1].astype(np.int64)
            labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
            labels[:len(chunk) - 1] = chunk[1:]
            rows.append((chunk[:length], labels, positions, np.zeros(length, dtype=np.int64)))
        yield _to_batch(*(np.stack(parts) for parts in zip(*rows)))
