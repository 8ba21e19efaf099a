"""The python corpus (data.path=embedded:python): order, split without leakage, manifest, the
committed tokenizer, and the parallel paths (near-duplicate sketches, encoding) against serial ones.
Only small samples of the corpus are read (data.max_documents caps): never the full corpus."""
from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np
import pytest

from scaleinv_dist.config import DataConfig
from scaleinv_dist.data import TokenStore, Tokenizer, load_corpus, prepare_data
from scaleinv_dist.data import near_dup, python_corpus, tokens
from scaleinv_dist.data.near_dup import near_duplicate_groups

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "scaleinv_dist" / "data" / "assets" / "python-bpe-8192.model"
SAMPLE = 300  # documents read from the corpus in these tests


@pytest.fixture(scope="module")
def sample_cfg(tmp_path_factory):
    return DataConfig(path="embedded:python", max_documents=SAMPLE, tokenizer=str(MODEL),
                      cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_files_and_documents_in_deterministic_sorted_order():
    files = python_corpus.list_files()
    assert files == sorted(files, key=lambda f: (f[0], f[1])) and len(files) > 1000
    assert len({f[1] for f in files}) == len(files)  # names are unique
    assert all(f[1].startswith(f[0] + "/") for f in files)
    docs = python_corpus.python_documents(limit=60, workers=2)
    assert docs == python_corpus.python_documents(limit=60, workers=1)  # same with any pool size
    assert len(docs) == 60 and [n for n, _ in docs] == sorted(n for n, _ in docs)
    names = [n for n, _ in docs]
    assert names == [f[1] for f in files if f[1] in set(names)]  # the file order, filtered
    assert all(python_corpus.keep_text(t) for _, t in docs)
    assert len({t for _, t in docs}) == len(docs)  # exact duplicates dropped


def test_similarity_text_drops_only_a_leading_comment_block():
    code = "# Copyright 2024 X\n# Apache License\n\nimport os\n# inside\nx = 1\n"
    assert python_corpus.similarity_text("pkg/a.py", code) == "import os\n# inside\nx = 1\n"
    assert python_corpus.similarity_text("pkg/a.h", "/* licence\n * text\n */\nint x;\n") == "int x;\n"
    assert python_corpus.similarity_text("pkg/README.txt", code) == code  # not code: unchanged


def test_document_filter():
    code = "def f(x):\n    return x + 1\n" * 20
    assert python_corpus.keep_text(code)
    assert not python_corpus.keep_text("x = 1\n")  # too short
    assert not python_corpus.keep_text("data = [" + "1, " * 3000 + "]\n")  # one huge line: data
    assert not python_corpus.keep_text(("a" * 300 + "\n") * 10)  # mean line length > 120


def test_no_document_or_near_duplicate_in_both_splits(sample_cfg):
    corpus = load_corpus(sample_cfg)
    train, val = {d.name for d in corpus.train}, {d.name for d in corpus.val}
    assert train and val and not train & val and len(train) + len(val) == SAMPLE
    assert not {d.text for d in corpus.train} & {d.text for d in corpus.val}
    # near-duplicates as the split defines them (code compared without its leading licence block)
    groups = near_duplicate_groups([python_corpus.similarity_text(d.name, d.text)
                                    for d in corpus.train + corpus.val], workers=1)
    side = ["train"] * len(corpus.train) + ["val"] * len(corpus.val)
    by_group: dict[int, set] = {}
    for g, s in zip(groups, side):
        by_group.setdefault(g, set()).add(s)
    assert all(len(s) == 1 for s in by_group.values())
    assert corpus.info["python_corpus"]["docs"] == SAMPLE


def _planted(n=600, seed=0):
    """n distinct random documents, every 7th a light edit of the one before (a near-duplicate)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 7 == 6:
            words = out[-1].split(" ")
            words[rng.randrange(len(words))] = "edited"
            out.append(" ".join(words))
        else:
            out.append(" ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(6))
                                for _ in range(120)))
    return out


def test_near_duplicate_groups_parallel_equals_serial_and_finds_plants():
    texts = _planted()
    assert len(texts) >= near_dup.PARALLEL_MIN_DOCS  # the pool path runs
    par, ser = near_duplicate_groups(texts, workers=2), near_duplicate_groups(texts, workers=1)
    assert par == ser
    for i in range(6, len(texts), 7):
        assert par[i] == par[i - 1]  # each plant joins its original
    assert len(set(par)) == len(texts) - len(range(6, len(texts), 7))  # and nothing else is joined


def test_manifest_records_packages_and_versions(sample_cfg):
    m = prepare_data(sample_cfg)
    info = m["python_corpus"]
    assert info["python"] and info["roots"][0][0] == "stdlib"
    assert any(d["name"].lower() == "numpy" and d["version"] for d in info["distributions"])
    assert sum(p["docs"] for p in info["packages"].values()) == SAMPLE == m["train_docs"] + m["val_docs"]
    on_disk = [json.loads(p.read_text()) for p in (Path(sample_cfg.cache_dir) / "manifests").glob("*.json")]
    assert any(d.get("python_corpus") == info for d in on_disk)  # recorded next to the token cache
    assert m["signature"]["python_packages"][0] == info["python"]


def test_committed_tokenizer_has_single_digit_pieces():
    tok = Tokenizer(MODEL)
    assert tok.vocab_size == 8192
    digit_ids = [tok.sp.piece_to_id(d) for d in "0123456789"]
    assert len(set(digit_ids)) == 10 and tok.sp.unk_id() not in digit_ids
    for text in ("48213", " 1234567890", "x = 2024\n"):
        ids = tok.encode(text)
        digits = [i for i in ids if tok.decode([i]).strip().isdigit()]
        assert [tok.decode([i]) for i in digits] == [c for c in text if c.isdigit()]
        assert tok.decode(ids) == text


def test_parallel_encoding_equals_serial(tmp_path, monkeypatch):
    docs = [t for _, t in python_corpus.python_documents(limit=40, workers=1)]
    tok = Tokenizer(MODEL)
    serial = TokenStore.build(docs, tok, tmp_path / "serial", workers=1)
    monkeypatch.setattr(tokens, "PARALLEL_MIN_CHARS", 1)
    parallel = TokenStore.build(docs, tok, tmp_path / "parallel", workers=2)
    assert np.array_equal(np.asarray(serial.tokens), np.asarray(parallel.tokens))
    assert np.array_equal(serial.offsets, parallel.offsets)
    assert list(serial.doc(3)[1:-1]) == tok.encode(docs[3])
