"""What evaluation needs from the data layer: the run's tokenizer and validation store, length
checks with the data's own messages, haystack text for needles, and epoch bookkeeping."""
from __future__ import annotations

import hashlib
import math
from functools import reduce
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import EvalError


def load_validation(cfg, run_dir: Path | None = None):
    """The DataBundle of the run's data, checked to use the tokenizer the run was trained with.

    If the cached data resolves to another tokenizer than <run>/tokenizer.model (e.g. a different
    cache directory trained another one), the data is rebuilt with the run's tokenizer.
    """
    import copy

    from ..data import DataError, build_data

    try:
        bundle = build_data(cfg)
        own = Path(run_dir) / "tokenizer.model" if run_dir is not None else None
        if own is not None and own.is_file():
            sha = hashlib.sha256(own.read_bytes()).hexdigest()
            if getattr(bundle.tokenizer, "sha256", sha) != sha:
                cfg2 = copy.deepcopy(cfg)
                cfg2.data.tokenizer = str(own.resolve())
                bundle = build_data(cfg2)
    except DataError as err:
        raise EvalError(str(err)) from None
    return bundle


def longest_document(store) -> int:
    """Tokens in the longest validation document (bos and eos included)."""
    return int(store.doc_lengths.max()) if store.n_docs else 0


def choose_align(store, lengths: Sequence[int]) -> int:
    """lcm of the lengths when every document prefix of that many tokens can hold them, else 0."""
    lcm = reduce(math.lcm, [int(x) for x in lengths])
    return lcm if lcm <= longest_document(store) - 1 else 0


def check_lengths(store, lengths: Sequence[int], max_tokens: int = 0, align_to: int = 0) -> dict:
    """Tokens each length will score; EvalError naming the longest document when one can't."""
    from ..data import DataError, count_validation_tokens

    longest = longest_document(store)
    too_long = [L for L in lengths if L + 1 > longest]
    if too_long:
        raise EvalError(f"evaluation length {max(too_long)} is longer than the longest validation "
                        f"document ({longest} tokens with bos/eos; the longest length it supports is "
                        f"{max(longest - 1, 0)}); use --lengths up to {max(longest - 1, 0)} or add longer "
                        f"validation documents")
    out = {}
    for L in lengths:
        try:
            out[int(L)] = count_validation_tokens(store, int(L), max_tokens, align_to)
        except DataError as err:
            raise EvalError(str(err)) from None
        if out[int(L)] == 0:
            raise EvalError(f"no validation tokens to score at length {L}; lower the length or pass "
                            f"--max-tokens 0")
    return out


def store_tokens(store, n: int) -> np.ndarray:
    """About n tokens of document text (bos/eos stripped), documents concatenated, as int64."""
    parts, total = [], 0
    for i in range(store.n_docs):
        doc = np.asarray(store.doc(i)[1:-1], dtype=np.int64)
        parts.append(doc)
        total += doc.size
        if total >= n:
            break
    if not parts or total == 0:
        raise EvalError("the validation split has no text to build needle haystacks from")
    return np.concatenate(parts)


def window_bos(bundle) -> int | None:
    """The id that starts every training document (contexts start with it), or None."""
    bos = int(getattr(bundle.val_store, "bos_id", -1))
    if bos < 0:
        bos = int(getattr(bundle.tokenizer, "bos_id", -1))
    return bos if bos >= 0 else None


def data_summary(bundle, training: dict) -> dict:
    """Corpus sizes and how many epochs of the training split the run has seen (anchors.md)."""
    out = {"train_tokens": int(bundle.train_store.n_tokens), "val_tokens": int(bundle.val_store.n_tokens),
           "val_documents": int(bundle.val_store.n_docs),
           "longest_val_document": longest_document(bundle.val_store), "epochs": None}
    seen = training.get("tokens")
    per_epoch = getattr(bundle.train_loader, "tokens_per_epoch", None) or out["train_tokens"]
    if isinstance(seen, (int, float)) and per_epoch:
        out["epochs"] = seen / per_epoch
    return out
