"""Sentencepiece tokenizer: load a given model or train a byte-fallback BPE on the training split.

Trained models are cached as {cache_dir}/tokenizers/spm-bpe-v{vocab}-{hash}.model, the hash taken
over (training-corpus fingerprint, vocab_size, trainer settings), so a second run reuses the model.
Training is deterministic (same documents -> byte-identical model) and takes a few seconds on
the embedded corpus: at most TRAIN_CHAR_CAP characters are used, in ~1000-character chunks taken
evenly across the corpus.

Text is not normalised (identity rule, whitespace kept, no dummy prefix), so decode(encode(t)) == t
for any text without the character U+2581 (sentencepiece's space marker; it decodes to a space).
Unknown characters fall back to their UTF-8 bytes (256 byte pieces). "\n" is always its own piece.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

from ..config import DataConfig
from .cache import atomic_write_bytes, fingerprint, short_hash
from .errors import DataError

TRAIN_CHAR_CAP = 20_000_000  # characters of training text the tokenizer sees at most
CHUNK_CHARS = 1000  # training "sentences": runs of whole lines of about this many characters
_TRAINER = dict(
    model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
    remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
    split_digits=True, character_coverage=0.9999, input_sentence_size=0, shuffle_input_sentence=False,
    max_sentence_length=1 << 16, hard_vocab_limit=False, user_defined_symbols=["\n"],
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
)
_TRAINER_VERSION = 1  # bump when _TRAINER or the chunking changes (invalidates cached models)


_DATA_TOKENIZER_FIX = "point data.tokenizer at a sentencepiece .model file or leave it empty to train one"
RUN_TOKENIZER_FIX = ("a run directory holds the tokenizer.model it was trained with: copy it back from the "
                     "training's cache (<cache_dir>/tokenizers/) or retrain")


def load_sentencepiece(path: str | Path, fix: str = _DATA_TOKENIZER_FIX):
    """(SentencePieceProcessor, the file's bytes) of a model file; DataError ending in `fix` when
    the file can't be read or is not a sentencepiece model."""
    import sentencepiece as spm

    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"cannot read the tokenizer {path} ({err.strerror or err}); {fix}") from None
    try:
        return spm.SentencePieceProcessor(model_proto=data), data
    except RuntimeError:  # sentencepiece: "could not parse ModelProto"
        raise DataError(f"{path} is not a sentencepiece model (it does not parse); {fix}") from None


class Tokenizer:
    """A sentencepiece model. Token ids are ints in [0, vocab_size)."""

    def __init__(self, model_path: str | Path):
        self.model_path = str(model_path)
        self.sp, data = load_sentencepiece(model_path)
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.vocab_size = int(self.sp.get_piece_size())
        self.bos_id = int(self.sp.bos_id())
        self.eos_id = int(self.sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise DataError(f"tokenizer {self.model_path} has no bos/eos pieces; train it with "
                            "--bos_id and --eos_id set, or leave data.tokenizer empty to train one")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos added)."""
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        """encode() of many texts, in parallel threads (0: all CPUs, at most 16).

        Texts are encoded in pieces cut after newlines ("\n" is always its own token, so the
        result is identical to encoding each text whole, and much faster for long documents).
        """
        threads = num_threads or min(16, os.cpu_count() or 1)
        pieces, owner = [], []
        for i, text in enumerate(texts):
            for piece in _chunks([text], cut_long_lines=False):
                pieces.append(piece)
                owner.append(i)
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(owner, self.sp.encode(pieces, num_threads=threads)):
            out[i].extend(ids)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids; bos/eos/unk decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def _chunks(docs: Sequence[str], cut_long_lines: bool = True) -> Iterator[str]:
    """Whole lines ("\n"-terminated) grouped into ~CHUNK_CHARS pieces; lines over 4*CHUNK_CHARS are
    cut when cut_long_lines (for training)."""
    for doc in docs:
        buf, size = [], 0
        lines = doc.split("\n")
        for j, line in enumerate(lines):
            if j < len(lines) - 1:
                line += "\n"
            while cut_long_lines and len(line) > 4 * CHUNK_CHARS:
                yield line[:4 * CHUNK_CHARS]
                line = line[4 * CHUNK_CHARS:]
            buf.append(line)
            size += len(line)
            if size >= CHUNK_CHARS:
                yield "".join(buf)
                buf, size = [], 0
        if size:
            yield "".join(buf)


def training_sentences(docs: Sequence[str], char_cap: int = TRAIN_CHAR_CAP) -> Iterator[str]:
    """The chunks the tokenizer trains on: every k-th chunk, k chosen to keep under char_cap."""
    total = sum(len(d) for d in docs)
    stride = max(1, -(-total // char_cap))
    for i, chunk in enumerate(_chunks(docs)):
        if i % stride == 0:
            yield chunk


_META_PIECES = 256 + 3 + 1  # byte pieces, unk/bos/eos, "\n"


def _frequent_chars(docs: Sequence[str], n_chars: int) -> set[str]:
    """The n_chars most frequent characters of the training text (ties broken by code point)."""
    counts: Counter = Counter()
    for chunk in training_sentences(docs):
        counts.update(chunk)
    counts.pop("\n", None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return {c for c, _ in ranked[:n_chars]} | {"\n"}


def _train(sentences: Iterator[str], vocab_size: int, threads: int) -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=out, vocab_size=vocab_size,
                                   num_threads=threads, minloglevel=2, **_TRAINER)
    return out.getvalue()


def train_tokenizer(docs: Sequence[str], vocab_size: int, model_path: Path, num_threads: int = 0) -> None:
    """Train a BPE sentencepiece model on `docs` and write it atomically to model_path.

    If the vocabulary is too small for every character of the corpus plus the 256 byte pieces, the
    model is trained on the text without its rarest characters: those get no piece of their own
    and are spelled with byte pieces.
    """
    min_vocab = _META_PIECES + 1
    if vocab_size < min_vocab:
        raise DataError(f"data.vocab_size={vocab_size} is too small: the tokenizer has 256 byte pieces "
                        f"and 4 special pieces; set data.vocab_size >= {min_vocab} (e.g. 4096)")
    threads = num_threads or min(16, os.cpu_count() or 1)
    n_chars = vocab_size - _META_PIECES
    model = b""
    for attempt in range(4):
        if attempt == 0:
            sentences = training_sentences(docs)
        else:
            keep = _frequent_chars(docs, n_chars)
            sentences = ("".join(c for c in chunk if c in keep) for chunk in training_sentences(docs))
        try:
            model = _train(sentences, vocab_size, threads)
            break
        except RuntimeError as err:
            m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(err))
            if not m:
                raise DataError(f"sentencepiece training failed: {str(err).splitlines()[0]}; check "
                                "data.vocab_size and that the training documents contain text") from None
            if attempt:
                n_chars -= int(m.group(2)) - int(m.group(1))
            if n_chars < 1:
                break
    if not model:
        raise DataError(f"data.vocab_size={vocab_size} is too small for this corpus; set "
                        f"data.vocab_size >= {_META_PIECES + 64} (e.g. 4096)")
    atomic_write_bytes(model_path, model)


def tokenizer_path(train_docs: Sequence[str], vocab_size: int, cache_dir: str | Path) -> Path:
    """Where the tokenizer trained on these documents with this vocab size is cached."""
    key = short_hash(fingerprint(train_docs), vocab_size, _TRAINER_VERSION, _TRAINER)
    return Path(cache_dir) / "tokenizers" / f"spm-bpe-v{vocab_size}-{key}.model"


def build_tokenizer(cfg: DataConfig, train_docs: Sequence[str], cache_dir: str | Path) -> Tokenizer:
    """cfg.tokenizer if set (must exist), else the cached or freshly trained model for train_docs."""
    if cfg.tokenizer:
        path = Path(os.path.expanduser(cfg.tokenizer))
        if not path.is_file():
            raise DataError(f"data.tokenizer={cfg.tokenizer!r} does not exist; point it at a "
                            "sentencepiece .model file or leave it empty to train one")
        return Tokenizer(path)
    if cfg.vocab_size < 1:
        raise DataError(f"data.vocab_size={cfg.vocab_size} must be positive (e.g. 4096)")
    if not train_docs:
        raise DataError("no training documents to train a tokenizer on; check data.path")
    path = tokenizer_path(train_docs, cfg.vocab_size, cache_dir)
    if not path.is_file():
        train_tokenizer(train_docs, cfg.vocab_size, path)
    return Tokenizer(path)
