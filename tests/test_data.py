"""Tests of scaleinv_dist.data: corpus loading and splitting, tokenizer, token stores, batches."""
from __future__ import annotations

import json
import multiprocessing
import random
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
import torch

from scaleinv_dist.config import Config, DataConfig
from scaleinv_dist.data import (IGNORE_INDEX, DataError, TokenStore, TrainLoader, build_data,
                                build_tokenizer, count_validation_tokens, embedded_corpus,
                                load_corpus, load_documents, prepare_data, validation_windows)
from scaleinv_dist.data import corpus as corpus_mod
from scaleinv_dist.data.near_dup import (THRESHOLD, estimate_jaccard, near_duplicate_groups,
                                         normalise, shingle_hashes, sketch)
from scaleinv_dist.data.split import split_groups

VOCAB = 320  # tiny: 256 byte pieces + specials + the synthetic alphabet


# ----------------------------------------------------------------------------- helpers

def make_texts(n: int, words: int = 300, seed: int = 0) -> list[str]:
    """n distinct synthetic documents of random pseudo-words, lines of 12 words."""
    rng = random.Random(seed)
    pool = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8)))
            for _ in range(4000)]
    out = []
    for i in range(n):
        k = words + 37 * i
        ws = [rng.choice(pool) for _ in range(k)]
        lines = [" ".join(ws[j:j + 12]) + "." for j in range(0, k, 12)]
        out.append(f"Doc {i}.\n" + "\n".join(lines) + "\n")
    return out


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({field: t, "id": i}) + "\n")
    return path


def synthetic_store(lengths=(3, 1, 7, 2, 12, 5, 9, 4, 20, 6), seed: int = 0) -> TokenStore:
    """Documents of known lengths with token ids >= 10 (bos=1, eos=2 are added by the store)."""
    rng = np.random.default_rng(seed)
    return TokenStore.from_token_lists([rng.integers(10, 1000, n).tolist() for n in lengths])


def reference_window(store: TokenStore, w: int, L: int, masking: bool):
    """Slow, obviously-correct window construction to compare against."""
    starts = set(store.offsets[:-1].tolist())
    s = w * L
    tok = [int(store.tokens[s + i]) for i in range(L)]
    lab = [int(store.tokens[s + i + 1]) for i in range(L)]
    if not masking:
        return tok, lab, list(range(L)), [0] * L
    pos, doc, p, d = [], [], 0, 0
    for i in range(L):
        if i > 0 and (s + i) in starts:
            p, d = 0, d + 1
        pos.append(p)
        doc.append(d)
        p += 1
        if (s + i + 1) in starts:
            lab[i] = IGNORE_INDEX
    return tok, lab, pos, doc


def tiny_cfg(tmp_path: Path, path: str = "", **data) -> Config:
    cfg = Config()
    cfg.data = DataConfig(path=path, vocab_size=VOCAB, cache_dir=str(tmp_path / "cache"), **data)
    cfg.train.seq_len = 32
    cfg.train.micro_batch_size = 4
    return cfg


# ----------------------------------------------------------------------------- packing

def test_window_example_by_hand():
    store = TokenStore.from_token_lists([[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]])
    # stream: 1 10 11 12 2 | 1 20 21 2 | 1 30 31 32 33 34 2
    loader = TrainLoader(store, seq_len=4, micro_batch_size=1, seed=0)
    tok, lab, pos, doc = loader.window(1)  # stream tokens 4..8
    assert tok.tolist() == [2, 1, 20, 21]
    assert lab.tolist() == [IGNORE_INDEX, 20, 21, 2]  # eos -> next document's bos is not scored
    assert pos.tolist() == [0, 0, 1, 2]  # the partial first document counts from the row start
    assert doc.tolist() == [0, 1, 1, 1]
    tok, lab, pos, doc = loader.window(2)  # stream tokens 8..12: 2 1 30 31 (+32)
    assert lab.tolist() == [IGNORE_INDEX, 30, 31, 32] and pos.tolist() == [0, 0, 1, 2]


@pytest.mark.parametrize("L", [1, 3, 5, 8])
@pytest.mark.parametrize("masking", [True, False])
def test_windows_match_reference(L, masking):
    store = synthetic_store()
    loader = TrainLoader(store, seq_len=L, micro_batch_size=2, seed=1, document_masking=masking)
    assert loader.n_windows == (store.n_tokens - 1) // L
    for w in range(loader.n_windows):
        got = [a.tolist() for a in loader.window(w)]
        assert got == [list(x) for x in reference_window(store, w, L, masking)], w


def test_labels_are_inputs_shifted_by_one():
    store = synthetic_store()
    for masking in (True, False):
        loader = TrainLoader(store, 6, 4, seed=3, document_masking=masking)
        for _ in range(10):
            b = loader.next_batch()
            assert b.tokens.dtype == b.labels.dtype == b.positions.dtype == b.doc_ids.dtype == torch.int64
            assert b.tokens.shape == b.labels.shape == (4, 6)
            inner, nxt = b.labels[:, :-1], b.tokens[:, 1:]
            kept = inner != IGNORE_INDEX
            assert torch.equal(inner[kept], nxt[kept])
            # the only masked labels are the ones whose next token starts a document (bos)
            assert torch.all(nxt[~kept] == store.bos_id)
            if not masking:
                assert kept.all()
                assert torch.equal(b.positions, torch.arange(6).expand(4, 6))
                assert not b.doc_ids.any()
            else:
                # a new segment starts exactly where a bos sits (or at the row start)
                starts = torch.ones_like(b.doc_ids, dtype=torch.bool)
                starts[:, 1:] = b.doc_ids[:, 1:] != b.doc_ids[:, :-1]
                assert torch.equal(starts[:, 1:], b.tokens[:, 1:] == store.bos_id)
                assert torch.all(b.positions[starts] == 0)


def test_every_token_is_a_label_once_per_epoch():
    store = synthetic_store()
    L = 5
    loader = TrainLoader(store, L, 1, seed=0, document_masking=False)
    seen = sorted(int(w) * L + i + 1 for w in loader.window_order(0) for i in range(L))
    assert seen == list(range(1, loader.n_windows * L + 1))


def test_same_seed_same_batches_different_seed_different():
    store = synthetic_store(lengths=tuple(range(5, 60)))
    a, b, c = (TrainLoader(store, 8, 4, seed=s) for s in (7, 7, 8))
    for _ in range(30):  # several epochs
        x, y, z = a.next_batch(), b.next_batch(), c.next_batch()
        assert all(torch.equal(getattr(x, k), getattr(y, k)) for k in ("tokens", "labels", "positions", "doc_ids"))
    assert not np.array_equal(a.epoch_permutation(0), c.epoch_permutation(0))
    assert not np.array_equal(a.epoch_permutation(0), a.epoch_permutation(1))  # reshuffled per epoch


@pytest.mark.parametrize("dp", [2, 3])
def test_data_parallel_shards_disjoint_and_covering(dp):
    store = synthetic_store(lengths=tuple(range(5, 60)))
    loaders = [TrainLoader(store, 8, 2, seed=5, dp_rank=r, dp_size=dp) for r in range(dp)]
    for epoch in range(3):
        orders = [ld.window_order(epoch) for ld in loaders]
        assert all(len(o) == loaders[0].windows_per_rank for o in orders)
        union = np.concatenate(orders)
        assert len(set(union.tolist())) == len(union)  # disjoint
        perm = loaders[0].epoch_permutation(epoch)
        assert set(union.tolist()) == set(perm[:len(union)].tolist())  # all but n % dp windows
        assert len(union) > loaders[0].n_windows - dp
    # the batches a rank yields are its windows
    b = loaders[1].next_batch()
    w = loaders[1].window_order(0)[:2]
    assert torch.equal(b.tokens, torch.from_numpy(np.stack([loaders[1].window(int(i))[0] for i in w])))


def test_exact_resume_across_epochs():
    store = synthetic_store(lengths=tuple(range(5, 15)))
    ref = TrainLoader(store, 8, 3, seed=11)
    for _ in range(7):
        ref.next_batch()
    state = ref.state_dict()
    expected = [ref.next_batch() for _ in range(20)]
    assert ref.epoch >= 2
    resumed = TrainLoader(store, 8, 3, seed=11)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    for e in expected:
        got = resumed.next_batch()
        assert torch.equal(got.tokens, e.tokens) and torch.equal(got.labels, e.labels)
    with pytest.raises(DataError, match="seq_len"):
        TrainLoader(store, 4, 3, seed=11).load_state_dict(state)


def test_too_short_training_data_error():
    store = TokenStore.from_token_lists([[10, 11, 12]])  # 5 tokens
    with pytest.raises(DataError, match=r"has 5 tokens.*seq_len <= 4"):
        TrainLoader(store, seq_len=8, micro_batch_size=1, seed=0)
    with pytest.raises(DataError, match=r"seq_len <= 2"):
        TrainLoader(store, seq_len=3, micro_batch_size=1, seed=0, dp_size=2)
    TrainLoader(store, seq_len=4, micro_batch_size=3, seed=0).next_batch()  # one window is enough


def test_batch_to_device():
    b = TrainLoader(synthetic_store(), 4, 2, seed=0).next_batch().to("cpu")
    assert b.tokens.device.type == "cpu" and b.shape == (2, 4)


# ----------------------------------------------------------------------------- validation windows

def _scored(store, L, **kw):
    """{(document, index of the predicted token in it)} and the number of label tokens."""
    index, n = set(), 0
    offsets = store.offsets
    where = {int(t): i for i, t in enumerate(store.tokens) if t > 2}  # ids >= 10 are unique here
    for b in validation_windows(store, L, batch_size=3, **kw):
        assert torch.equal(b.positions, torch.arange(L).expand_as(b.positions)) and not b.doc_ids.any()
        for row_t, row_l in zip(b.tokens.numpy(), b.labels.numpy()):
            # locate the row in the stream: labels are the row's next tokens within one document
            k = int(np.flatnonzero(row_t > 2)[0])
            s = where[int(row_t[k])] - k
            assert np.array_equal(store.tokens[s:s + L], row_t)
            d = int(np.searchsorted(offsets, s, side="right") - 1)
            assert s + L < offsets[d + 1]  # the label of the last token is in the same document
            assert np.array_equal(row_l, store.tokens[s + 1:s + L + 1])
            index |= {(d, s + 1 + i - int(offsets[d])) for i in range(L)}
            n += int((row_l != IGNORE_INDEX).sum())
    return index, n


def test_validation_windows_same_tokens_at_each_length():
    store = TokenStore.from_token_lists([list(range(100 + 1000 * k, 100 + 1000 * k + n))
                                         for k, n in enumerate([40, 7, 70, 33, 16, 100])])
    full = {}
    for L in (2, 4, 8, 16):
        idx, n = _scored(store, L, align_to=16)
        assert n == len(idx) == count_validation_tokens(store, L, align_to=16)
        full[L] = idx
        plain_idx, plain_n = _scored(store, L)
        assert plain_n == count_validation_tokens(store, L)
        # every document with more than L tokens is used, tail shorter than a window dropped
        docs = {d for d, _ in plain_idx}
        assert docs == {d for d, n in enumerate(store.doc_lengths) if n >= L + 1}
        assert plain_n == sum((n - 1) // L * L for n in store.doc_lengths)
    assert full[2] == full[4] == full[8] == full[16]  # identical scored tokens for every length
    # max_tokens keeps whole align_to blocks, the same ones for every length
    capped = [_scored(store, L, align_to=16, max_tokens=32)[0] for L in (4, 16)]
    assert capped[0] == capped[1] and len(capped[0]) == 32
    assert len({d for d, _ in capped[0]}) == 2  # spread over documents, not the first one only


def test_validation_too_long_error_names_longest():
    store = TokenStore.from_token_lists([[10] * 5, [11] * 9], )
    store.names = ["short.txt", "long.txt"]
    assert count_validation_tokens(store, 10) == 10  # 11 tokens: one window of 10
    with pytest.raises(DataError, match=r"long\.txt, has 11.*<= 10"):
        list(validation_windows(store, 11))


# ----------------------------------------------------------------------------- token store

def test_token_store_build_open(tmp_path):
    texts = make_texts(4, words=40)
    tok = build_tokenizer(DataConfig(vocab_size=VOCAB), texts, tmp_path)
    store = TokenStore.build(texts, tok, tmp_path / "store", names=["a", "b", "c", "d"])
    assert isinstance(store.tokens, np.memmap) and store.tokens.dtype == np.uint16
    assert store.n_docs == 4 and store.names == ["a", "b", "c", "d"]
    for i, t in enumerate(texts):
        d = store.doc(i).tolist()
        assert d[0] == tok.bos_id and d[-1] == tok.eos_id and tok.decode(d[1:-1]) == t
    assert np.load(tmp_path / "store" / "offsets.npy", allow_pickle=False).dtype == np.int64
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []  # nothing half-written left
    again = TokenStore.build(["other"], tok, tmp_path / "store")  # an existing store is reused
    assert again.n_docs == 4


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_deterministic_and_cached(tmp_path):
    texts = make_texts(6, words=200) + ["  indented:\n\tcode(x)  # with tabs  \n\n", "Ünïcödé ☃ 中文 \r\n"]
    cfg = DataConfig(vocab_size=VOCAB)
    a = build_tokenizer(cfg, texts, tmp_path / "a")
    b = build_tokenizer(cfg, texts, tmp_path / "b")
    assert Path(a.model_path).name == Path(b.model_path).name
    assert Path(a.model_path).read_bytes() == Path(b.model_path).read_bytes()  # deterministic
    assert a.vocab_size == VOCAB and a.bos_id != a.eos_id
    for t in texts + ["unseen words: zyxw 12345 ∂", ""]:
        ids = a.encode(t)
        assert all(0 <= i < a.vocab_size for i in ids)
        assert a.decode(ids) == t
    assert a.encode_batch(texts) == [a.encode(t) for t in texts]
    mtime = Path(a.model_path).stat().st_mtime_ns
    assert build_tokenizer(cfg, texts, tmp_path / "a").model_path == a.model_path
    assert Path(a.model_path).stat().st_mtime_ns == mtime  # reused, not retrained
    given = build_tokenizer(DataConfig(tokenizer=a.model_path), [], tmp_path)
    assert given.encode(texts[0]) == a.encode(texts[0])


def test_tokenizer_errors_and_tiny_vocab(tmp_path):
    with pytest.raises(DataError, match="data.tokenizer.*does not exist"):
        build_tokenizer(DataConfig(tokenizer=str(tmp_path / "nope.model")), ["x"], tmp_path)
    with pytest.raises(DataError, match=r"vocab_size=100 is too small.*>= 261"):
        build_tokenizer(DataConfig(vocab_size=100), make_texts(2), tmp_path)
    # more distinct characters than a 280-piece vocabulary holds: the rare ones become byte pieces
    texts = [t.upper() + t + "0123456789 ÀÉÎÕÜ àéîõü !?;:'()[]{}<>" for t in make_texts(3, words=80)]
    tok = build_tokenizer(DataConfig(vocab_size=280), texts, tmp_path)
    assert tok.vocab_size == 280 and all(tok.decode(tok.encode(t)) == t for t in texts)


# ----------------------------------------------------------------------------- corpus and split

def test_near_duplicates_grouped_and_kept_in_one_split():
    texts = make_texts(12, words=400, seed=1)
    rng = random.Random(0)
    # an "edition" of document 3: every 8th word changed, case and punctuation altered
    words = texts[3].split(" ")
    edited = " ".join(w.upper() if i % 8 == 0 else (w + "," if i % 5 == 0 else w) for i, w in enumerate(words))
    edited = edited.replace("e", "ee", 40)
    texts += [edited, texts[5]]  # a near-duplicate and an exact duplicate
    groups = near_duplicate_groups(texts)
    assert groups[12] == groups[3] and groups[13] == groups[5]
    assert len(set(groups)) == 12
    for frac in (0.1, 0.3, 0.5, 0.8):
        train, val = split_groups(texts, groups, frac)
        assert train and val and sorted(train + val) == list(range(len(texts)))
        for a, b in ((3, 12), (5, 13)):
            assert (a in val) == (b in val)
    # the rule depends on content only: shuffling the documents gives the same split
    train, val = split_groups(texts, groups, 0.25)
    order = list(range(len(texts)))
    rng.shuffle(order)
    shuffled = [texts[i] for i in order]
    t2, v2 = split_groups(shuffled, near_duplicate_groups(shuffled), 0.25)
    assert sorted(shuffled[i] for i in v2) == sorted(texts[i] for i in val)
    # validation holds one of the longest documents
    group_len = {g: sum(len(t) for t, h in zip(texts, groups) if h == g) for g in set(groups)}
    longest = sorted(group_len, key=lambda g: -group_len[g])[:4]  # the first stratum at f = 0.25
    assert any(groups[i] in longest for i in val)


def test_embedded_corpus_no_leakage_between_splits():
    docs = embedded_corpus()
    names = [n for n, _ in docs]
    assert len(docs) == 42 and not any(n.endswith("_gut_f.txt") for n in names)  # folios dropped
    corpus = load_corpus(DataConfig(val_fraction=0.1))
    assert len(corpus.train) + len(corpus.val) == 42 and corpus.val
    assert not {d.name for d in corpus.train} & {d.name for d in corpus.val}
    sk = {d.name: sketch(shingle_hashes(normalise(d.text))) for d in corpus.train + corpus.val}
    worst = max(estimate_jaccard(sk[a.name], sk[b.name]) for a in corpus.train for b in corpus.val)
    assert worst < THRESHOLD
    # one of the longest plays is held out, so long-context evaluation has long documents
    by_len = sorted(corpus.train + corpus.val, key=lambda d: -len(d.text))
    assert any(d in corpus.val for d in by_len[:10])
    again = load_corpus(DataConfig(val_fraction=0.1))
    assert [d.name for d in again.val] == [d.name for d in corpus.val]  # deterministic


def test_embedded_source_selection():
    assert corpus_mod.embedded_sources("") == ("shakespeare",)
    assert corpus_mod.embedded_sources("embedded:shakespeare+cpython") == ("shakespeare", "cpython")
    assert corpus_mod.embedded_sources("/data/x.jsonl") is None
    with pytest.raises(DataError, match="unknown embedded corpus 'wiki'"):
        embedded_corpus("wiki")


def test_first_folio_editions_never_split_from_modern_ones(tmp_path):
    """All 77 texts of the package, as a user directory: each folio/modern pair stays together."""
    src = corpus_mod._shakespeare_dir()
    for p in src.glob("*_gut*.txt"):
        shutil.copy(p, tmp_path / p.name)
    corpus = load_corpus(DataConfig(path=str(tmp_path), val_fraction=0.2, cache_dir=str(tmp_path / "c")))
    assert len(corpus.train) + len(corpus.val) == 77
    val = {Path(d.name).name for d in corpus.val}
    train = {Path(d.name).name for d in corpus.train}
    groups = near_duplicate_groups([d.text for d in corpus.train + corpus.val])
    names = [Path(d.name).name for d in corpus.train + corpus.val]
    pairs = [(a, b) for i, a in enumerate(names) for j, b in enumerate(names) if i < j and groups[i] == groups[j]]
    assert len(pairs) == 35
    for a, b in pairs:
        assert (a in val) == (b in val) and (a in train) == (b in train)


def test_jsonl_parquet_txt_sources(tmp_path):
    texts = make_texts(10, words=30)
    write_jsonl(tmp_path / "d.jsonl", texts[:5], field="body")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": texts[5:], "n": list(range(5))}), tmp_path / "d.parquet")
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts[:3]):
        (tmp_path / "txt" / f"{i}.txt").write_text(t)
    (tmp_path / "txt" / "empty.txt").write_text("  \n")
    cache = str(tmp_path / "cache")
    for path, expect in ((tmp_path / "d.jsonl", texts[:5]), (tmp_path / "d.parquet", texts[5:]),
                         (tmp_path / "d.*", texts)):
        train, val = load_documents(DataConfig(path=str(path), text_field="body", cache_dir=cache, val_fraction=0.2))
        assert sorted(train + val) == sorted(expect) and train and val
    train, val = load_documents(DataConfig(path=str(tmp_path / "txt"), cache_dir=cache, val_fraction=0.3))
    assert sorted(train + val) == sorted(texts[:3])  # the whitespace-only file is dropped
    train, val = load_documents(DataConfig(path=str(tmp_path / "d.jsonl"), text_field="body", cache_dir=cache,
                                           max_documents=3))
    assert sorted(train + val) == sorted(texts[:3])


def test_corpus_errors(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match=r"data.path='.*nowhere' does not exist; set data.path"):
        load_documents(DataConfig(path=str(tmp_path / "nowhere"), cache_dir=cache))
    with pytest.raises(DataError, match="no files match"):
        load_documents(DataConfig(path=str(tmp_path / "*.jsonl"), cache_dir=cache))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.txt").write_text("\n\n")
    with pytest.raises(DataError, match="is empty"):
        load_documents(DataConfig(path=str(tmp_path / "empty"), cache_dir=cache))
    write_jsonl(tmp_path / "x.jsonl", ["some text", "more"], field="content")
    with pytest.raises(DataError, match=r"no column 'text' \(available: content, id\); set data.text_field"):
        load_documents(DataConfig(path=str(tmp_path / "x.jsonl"), cache_dir=cache))
    (tmp_path / "bad.jsonl").write_text('{"text": 1\n')
    with pytest.raises(DataError, match=r"cannot read .*bad.jsonl as json \(.*\); fix or remove"):
        load_documents(DataConfig(path=str(tmp_path / "bad.jsonl"), cache_dir=cache))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_documents(DataConfig(path=str(tmp_path / "x.csv"), cache_dir=cache))
    with pytest.raises(DataError, match="at least two distinct documents"):
        load_documents(DataConfig(path=str(tmp_path / "x.jsonl"), text_field="content", cache_dir=cache,
                                  max_documents=1))
    monkeypatch.setattr(corpus_mod, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(DataError, match=r"hub_name='user/corpus' needs the Hugging Face hub.*data.path"):
        load_documents(DataConfig(hub_name="user/corpus", cache_dir=cache))


# ----------------------------------------------------------------------------- end to end

def _prepare(cfg):
    return prepare_data(cfg)["train"]


def test_build_data_end_to_end_and_cache_reuse(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", make_texts(12, words=150))
    cfg = tiny_cfg(tmp_path, str(tmp_path / "d.jsonl"), val_fraction=0.2)
    # two processes preparing at once: the lock and atomic renames leave one valid cache
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        paths = pool.map(_prepare, [cfg, cfg])
    assert paths[0] == paths[1]
    data = build_data(cfg, dp_rank=1, dp_size=2)
    assert data.vocab_size == VOCAB and data.val_store.n_docs >= 1
    assert data.manifest["train_docs"] + data.manifest["val_docs"] == 12
    batch = data.train_loader.next_batch()
    assert batch.tokens.shape == (4, 32) and int(batch.tokens.max()) < VOCAB
    assert not set(data.train_store.names) & set(data.val_store.names)
    tokens_dir = Path(cfg.data.cache_dir) / "tokens"
    before = sorted((p, p.stat().st_mtime_ns) for p in tokens_dir.rglob("*"))
    assert len(list(tokens_dir.iterdir())) == 2  # one train and one val store, nothing left over
    again = build_data(cfg)
    assert again.manifest == data.manifest
    assert sorted((p, p.stat().st_mtime_ns) for p in tokens_dir.rglob("*")) == before
    L = data.val_store.doc_lengths.max() - 1
    assert count_validation_tokens(data.val_store, int(L)) == L


def test_scaleinv_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALEINV_CACHE", str(tmp_path / "envcache"))
    write_jsonl(tmp_path / "d.jsonl", make_texts(4, words=60))
    cfg = tiny_cfg(tmp_path, str(tmp_path / "d.jsonl"), val_fraction=0.3)
    cfg.data.cache_dir = ""
    cfg.train.seq_len = 8
    manifest = prepare_data(cfg)
    assert manifest["train"].startswith(str(tmp_path / "envcache"))


@pytest.mark.slow
def test_embedded_corpus_end_to_end(tmp_path):
    cfg = Config()
    cfg.data.cache_dir = str(tmp_path)
    data = build_data(cfg)
    assert data.vocab_size == cfg.data.vocab_size
    assert data.train_store.n_tokens > 1_000_000
    # evaluation at 16x the training length is possible on the held-out plays
    assert count_validation_tokens(data.val_store, 16 * cfg.train.seq_len) > 100_000
    text = data.tokenizer.decode(data.val_store.doc(0)[1:200].tolist())
    assert len(text) > 300
