"""Long-context evaluation: loss by length and position bucket, needle-in-a-haystack, the sweep.

Fast tests use a character-level fake tokenizer and synthetic validation stores; the end-to-end
ones (marked slow) train a tiny model with launch/train.py and run the real entry points.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from scaleinv_dist.config import AttentionConfig, ModelConfig
from scaleinv_dist.evaluate import lengths as ev
from scaleinv_dist.evaluate import niah
from scaleinv_dist.evaluate.niah_finetune import finetune_on_needles, finetune_until, needle_batch
from scaleinv_dist.model import GPT

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fakes
class CharTokenizer:
    """One token per ASCII character: enough to check placement and scoring exactly."""
    vocab_size, bos_id, eos_id = 128, None, None

    def encode(self, text):
        return [ord(c) for c in text if ord(c) < 128]

    def decode(self, ids):
        return "".join(chr(int(i)) for i in ids)


WORDS = "the a cat dog sat ran on under house river old green quiet tall over".split()


def haystack_text(n_sentences=400, seed=0):
    rng = np.random.default_rng(seed)
    sents = []
    for _ in range(n_sentences):
        words = rng.choice(WORDS, size=int(rng.integers(3, 9)))
        sents.append(" ".join(words).capitalize() + ".")
    return " ".join(sents)


def tiny_gpt(vocab=128, seed=0, **attn):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, n_layer=1, d_model=32, n_head=2)
    return GPT(cfg, AttentionConfig(backend="reference", **attn), train_seq_len=64).eval()


class Oracle(torch.nn.Module):
    """A fake model that knows every example: its logits put the true next token first."""

    def __init__(self, examples, vocab=128):
        super().__init__()
        self.vocab = vocab
        self.table = {tuple(e.tokens[:-1].tolist()): e.tokens[1:] for e in examples}

    def forward(self, tokens, positions, doc_ids=None, labels=None):
        logits = torch.zeros(*tokens.shape, self.vocab)
        for b, row in enumerate(tokens):
            nxt = self.table[tuple(row.tolist())]
            logits[b, torch.arange(len(nxt)), nxt] = 1.0
        return logits


def find(seq, sub):
    seq, sub = list(seq), list(sub)
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


@pytest.fixture(scope="module")
def builder():
    tok = CharTokenizer()
    return niah.NeedleBuilder(tok, tok.encode(haystack_text()), seed=0)


# ----------------------------------------------------------------------------- loss by length
def synthetic_store(vocab=97, seed=0, lengths=(20, 90, 300, 520, 700, 1100)):
    from scaleinv_dist.data import TokenStore

    rng = np.random.default_rng(seed)
    docs = [rng.integers(3, vocab, size=n).tolist() for n in lengths]
    return TokenStore.from_token_lists(docs, bos_id=1, eos_id=2, vocab_size=vocab)


def test_bucket_index_and_edges():
    pos = torch.tensor([0, 1, 2, 3, 4, 7, 8, 1023, 1024])
    assert ev.bucket_index(pos).tolist() == [0, 1, 2, 2, 3, 3, 4, 10, 11]
    assert ev.bucket_edges(16) == [0, 1, 2, 4, 8, 16] and ev.n_buckets(16) == 5
    assert ev.bucket_edges(20) == [0, 1, 2, 4, 8, 16, 20]


def test_token_losses_match_model_loss():
    model = tiny_gpt(vocab=97)
    tokens = torch.randint(0, 97, (2, 40))
    labels = torch.randint(0, 97, (2, 40))
    labels[0, :5] = -100
    pos = torch.arange(40).expand(2, 40)
    with torch.no_grad():
        per_token = ev.token_losses(model, tokens, pos, None, labels, chunk_tokens=7)
        total, n = model(tokens, pos, None, labels)
    assert per_token[0, :5].eq(0).all() and int(n) == 75
    assert torch.allclose(per_token.sum(), total, rtol=1e-5)


@pytest.mark.parametrize("align", [True, False])
def test_evaluate_lengths_same_tokens_buckets_and_init_loss(align):
    from scaleinv_dist.data import count_validation_tokens
    from scaleinv_dist.evaluate.data_access import choose_align

    store, vocab, lengths = synthetic_store(), 97, [16, 64, 256]
    align_to = choose_align(store, lengths) if align else 0
    assert align_to == (256 if align else 0)
    res = ev.evaluate_lengths(tiny_gpt(vocab), store, lengths, max_tokens=0, batch_size=3,
                              align_to=align_to, progress=False)
    for L in lengths:
        r = res[L]
        assert r["tokens"] == count_validation_tokens(store, L, 0, align_to) > 0
        assert r["windows"] * L == r["tokens"]
        assert sum(b["count"] for b in r["buckets"]) == r["tokens"]
        assert r["buckets"][-1]["hi"] == L and sum(b["loss_sum"] for b in r["buckets"]) == pytest.approx(r["loss_sum"])
        assert abs(r["loss"] - math.log(vocab)) < 0.1  # random init predicts ~uniformly
    if align:  # the same documents and tokens at every length
        assert len({res[L]["tokens"] for L in lengths}) == 1
    else:  # every whole window of each length: shorter lengths see more of the tails
        assert res[16]["tokens"] >= res[64]["tokens"] >= res[256]["tokens"]


def test_evaluate_lengths_max_tokens_and_permutation_invariance():
    """Positions are data: scoring a window's tokens in any order (as a CP layout does) is the same."""
    store = synthetic_store()
    model = tiny_gpt(vocab=97)
    base = ev.evaluate_lengths(model, store, [64], max_tokens=128, progress=False)[64]
    assert base["tokens"] == 128
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))

    def shard(b):
        return SimpleNamespace(tokens=b.tokens[:, perm], labels=b.labels[:, perm],
                               positions=b.positions[:, perm], doc_ids=b.doc_ids[:, perm])

    permuted = ev.evaluate_lengths(model, store, [64], max_tokens=128, shard=shard, progress=False)[64]
    assert permuted["loss"] == pytest.approx(base["loss"], abs=1e-5)
    assert [b["count"] for b in permuted["buckets"]] == [b["count"] for b in base["buckets"]]


def test_check_lengths_names_the_longest_document():
    from scaleinv_dist.evaluate.common import EvalError
    from scaleinv_dist.evaluate.data_access import check_lengths

    store = synthetic_store()
    with pytest.raises(EvalError, match="longest validation document .1102 tokens"):
        check_lengths(store, [64, 2048])
    assert check_lengths(store, [64])[64] > 0


# ----------------------------------------------------------------------------- needles
@pytest.mark.parametrize("length", [300, 600, 2000])
def test_needle_at_requested_depth(builder, length):
    tok = builder.tok
    for depth in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        e = builder.build(length, depth, n_needles=3)
        assert e.tokens.shape == (length,) and e.tokens.dtype == torch.int64
        hits = find(e.tokens, tok.encode(" " + niah.needle_text(e.key, e.value)))
        assert hits == [e.needle_start], (depth, hits, e.needle_start)  # exactly once, where recorded
        room = e.region_end - e.region_start - e.needle_len
        located = (hits[0] - e.region_start) / room
        assert abs(located - depth) <= 0.02 * length / room + 1e-9, (depth, located)
        # distractors are other cities, present once each, and the question asks for the scored one
        assert len({k for k, _, _ in e.distractors} | {e.key}) == 3
        for k, v, start in e.distractors:
            assert find(e.tokens, tok.encode(" " + niah.needle_text(k, v))) == [start]
        tail = tok.decode(e.tokens[e.region_end:].tolist())
        assert tail == " " + niah.question_text(e.key) + " " + e.value
        assert tok.decode(e.answer.tolist()).strip() == e.value


def test_needle_snaps_to_sentence_boundary(builder):
    e = builder.build(4000, 0.5)
    before = builder.tok.decode([int(e.tokens[e.needle_start - 1])])
    assert before == ".", before  # a sentence end within 2% of the target was available


def test_needle_errors(builder):
    with pytest.raises(ValueError, match="depth"):
        builder.build(200, 1.5)
    with pytest.raises(ValueError, match="too short"):
        builder.build(40, 0.5)


def test_oracle_scores_one_and_random_near_chance(builder):
    examples = [builder.build(256, d) for d in (0.0, 0.3, 0.6, 1.0) for _ in range(5)]
    assert niah.score_teacher_forced(Oracle(examples), examples, batch_size=4) == [True] * len(examples)
    hits = niah.score_teacher_forced(tiny_gpt(), examples, batch_size=2)
    assert sum(hits) / len(hits) < 0.2  # 8-token exact match: chance is ~0


def test_run_grid_shape_and_oracle(builder):
    class GridOracle(torch.nn.Module):  # knows answers by reading the needle, like a perfect model
        def forward(self, tokens, positions, doc_ids=None, labels=None):
            tok = builder.tok
            logits = torch.zeros(*tokens.shape, 128)
            for b, row in enumerate(tokens):
                text = tok.decode(row.tolist())
                key = text.rsplit("special magic ", 1)[1].split(" ")[0]
                value = text.split(f"special magic {key} number is ", 1)[1][:7]
                target = tok.encode(" " + value)
                n = len(target)
                # the sequence is prompt + answer; positions -n-1 .. -1 of the input predict the answer
                full = row.tolist() + [target[-1]]
                for i in range(len(full) - 1):
                    logits[b, i, full[i + 1]] = 1.0
            return logits

    grid = niah.run_grid(GridOracle(), builder, [200, 400], [0.0, 0.5, 1.0], samples=3, n_needles=2,
                         progress=False)
    assert grid["accuracy"] == [[1.0, 1.0]] * 3 and grid["accuracy_by_length"] == [1.0, 1.0]
    assert len(grid["examples"]) == 2 * 3 * 3


def test_finetune_batch_masks_all_but_answer(builder):
    tokens, labels = needle_batch(builder, 256, 3, n_needles=2)
    assert tokens.shape == labels.shape == (3, 255)
    for row_t, row_l in zip(tokens, labels):
        scored = (row_l != -100).nonzero().flatten()
        assert scored.max() == 254 and len(scored) == 8  # " 1234567": the answer only
        text = builder.tok.decode(row_l[scored].tolist())
        assert text.strip().isdigit() and len(text.strip()) == 7


def test_finetune_runs(builder):
    model = tiny_gpt()
    losses = finetune_on_needles(model, builder, 160, steps=2, lr=1e-3, batch_size=2, progress=False)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert not model.training


@pytest.mark.parametrize("target, accs, rounds", [
    (None, [0.0], 1),              # no target: one round, no probe
    (0.9, [0.5, 0.95, 1.0], 2),    # stops at the first round that reaches the target
    (0.9, [0.1] * 10, 3),          # never reaches it: stops before passing max_steps (3 rounds of 2)
])
def test_finetune_until_repeats_rounds_until_the_probe_passes(builder, target, accs, rounds):
    model = tiny_gpt()
    calls = iter(accs)
    losses, probes = finetune_until(model, builder, 160, 2, 1e-3, lambda: next(calls), target, 6,
                                    batch_size=1, progress=False)
    assert len(losses) == 2 * rounds and all(math.isfinite(x) for x in losses)
    assert probes == ([] if target is None else accs[:rounds])


# ----------------------------------------------------------------------------- end to end (slow)
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.n_kv_head=0", "train.seq_len=32",
        "data.vocab_size=400", "data.max_documents=20", "train.micro_batch_size=4", "run.log_every=1"]


@pytest.fixture(scope="session")
def eval_env(tmp_path_factory):
    env = dict(os.environ)
    env.setdefault("SCALEINV_CACHE", str(tmp_path_factory.mktemp("cache")))  # tokenizer trains once
    env["WANDB_MODE"] = "offline"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cmd(args, env, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, eval_env):
    """A tiny model trained 3 steps with the real entry point."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    proc = run_cmd(["launch/train.py", "--config", "configs/tiny.yaml", *TINY, "train.steps=3",
                    f"run.out_dir={out}"], eval_env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def evaluated_run(trained_run, eval_env):
    """launch/eval.py on the trained run at L and 4L (one process)."""
    proc = run_cmd(["launch/eval.py", "--run", str(trained_run), "--multiples", "1,4", "--max-tokens", "256"],
                   eval_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return trained_run, proc.stdout


@pytest.mark.slow
def test_eval_end_to_end(evaluated_run):
    run, stdout = evaluated_run
    assert "x train" in stdout and "loss" in stdout
    data = json.loads((run / "eval.json").read_text())
    assert set(data["results"]) == {"32", "128"} and data["step"] == 3 and data["align_to"] == 128
    r32, r128 = data["results"]["32"], data["results"]["128"]
    assert r32["tokens"] == r128["tokens"] > 0  # the same tokens at both lengths
    assert abs(r32["loss"] - math.log(400)) < 0.5 and data["epochs"] is not None
    assert (run / "eval_loss_vs_length.png").stat().st_size > 1000
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r.get("split") == "val" and r.get("source") == "eval"]
    assert {(r["context_length"], r["step"]) for r in val} >= {(32, 3), (128, 3)}


def load_launcher(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_eval_user_errors(trained_run, eval_env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SCALEINV_CACHE", eval_env["SCALEINV_CACHE"])
    main = load_launcher("eval").main
    for argv, message in (
        (["--run", str(tmp_path / "nope")], "does not exist"),
        (["--run", str(tmp_path)], "no config.yaml"),
        (["--run", str(trained_run), "--lengths", "100000000", "--no-metrics"],
         "longer than the longest validation document"),
        (["--run", str(trained_run), "--lengths", "1x"], "cannot parse"),
        (["--run", str(trained_run), "model.n_layr=2"], "did you mean 'model.n_layer'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and message in err, err
        assert err.count("\n") == 1  # one line, no traceback


@pytest.mark.slow
def test_niah_end_to_end(trained_run, eval_env, tmp_path):
    proc = run_cmd(["launch/niah.py", "--run", str(trained_run), "--lengths", "160,320", "--depths", "0,0.5,1",
                    "--samples", "2", "--finetune-steps", "1", "--finetune-length", "160",
                    "--finetune-batch", "1", "--finetune-until", "1.0", "--finetune-max-steps", "2",
                    "--out", str(tmp_path)], eval_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "niah.json").read_text())
    assert data["lengths"] == [160, 320] and data["depths"] == [0.0, 0.5, 1.0]
    assert len(data["accuracy"]) == 3 and all(len(row) == 2 for row in data["accuracy"])
    assert all(0.0 <= a <= 1.0 for row in data["accuracy"] for a in row)
    ft = data["finetune"]
    assert ft["steps"] in (1, 2) and len(ft["probe_accuracy"]) == ft["steps"] and ft["until"] == 1.0
    assert len(data["examples"]) == 12
    assert max(abs(e["actual_depth"] - e["depth"]) for e in data["examples"]) < 0.1
    assert (tmp_path / "niah_heatmap.png").stat().st_size > 1000
    proc = run_cmd(["launch/niah.py", "--run", str(trained_run), "--lengths", "40"], eval_env)
    assert proc.returncode == 2 and "too short" in proc.stderr


@pytest.mark.slow
def test_eval_context_parallel_matches_one_process(evaluated_run, eval_env, tmp_path):
    run, _ = evaluated_run  # the same lengths and tokens in one process
    env = dict(eval_env, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "launch/eval.py", "--run-dir", str(run), "--lengths", "32,128", "--max-tokens", "256",
                          "--no-metrics", "--no-plot", "--quiet", "--out", str(tmp_path),
                          "parallel.context_parallel_size=2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    for L in ("32", "128"):
        a = json.loads((run / "eval.json").read_text())["results"][L]
        b = json.loads((tmp_path / "eval.json").read_text())["results"][L]
        assert b["tokens"] == a["tokens"] and b["windows"] == a["windows"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert [x["count"] for x in b["buckets"]] == [x["count"] for x in a["buckets"]]


@pytest.mark.slow
def test_sweep_two_methods(eval_env, tmp_path):
    out = tmp_path / "sweep"
    proc = run_cmd(["launch/sweep.py", "--config", "configs/tiny.yaml", "--out", str(out),
                    "--methods", "si_p_rope,rope", "--steps", "2", "--parallel", "2", "--max-tokens", "256",
                    *TINY], eval_env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["lengths"] == [32, 128, 512]
    assert [r["name"] for r in summary["rows"]] == ["si_p_rope", "rope"]
    for row in summary["rows"]:
        assert row["status"] == "ok" and row["step"] == 2
        assert all(math.isfinite(row["losses"][k]) for k in ("32", "128", "512"))
    md = (out / "sweep.md").read_text()
    assert "Scale-invariant p-RoPE" in md and "RoPE" in md and "val @512 (16L)" in md
    assert (out / "sweep_loss_vs_length.png").stat().st_size > 1000
    assert (out / "runs" / "rope" / "config.yaml").read_text().count("position: rope") == 1


def test_sweep_rejects_unknown_method():
    from scaleinv_dist.evaluate.common import EvalError
    from scaleinv_dist.evaluate.sweep import select_methods

    assert select_methods("all")[0] == "si_p_rope" and len(select_methods(None)) == 6
    with pytest.raises(EvalError, match="did you mean 'alibi'"):
        select_methods("rope,alibii")


# ----------------------------------------------------------------------------- score statistics
def brute_force_stats(q, k, positions, doc_ids, edges, tau):
    """distance_stats by a loop over every (head, query, key), in float64."""
    b, hq, n, d = q.shape
    group = hq // k.shape[1]
    nb = len(edges) - 1
    out = {name: torch.zeros(hq, nb, dtype=torch.float64) for name in ("count", "sum_s", "sum_s2", "sum_mass")}
    for bi in range(b):
        for h in range(hq):
            for i in range(n):
                for j in range(n):
                    t = int(positions[bi, i] - positions[bi, j])
                    if t < 0 or (doc_ids is not None and doc_ids[bi, i] != doc_ids[bi, j]):
                        continue
                    bucket = [x for x in range(nb) if edges[x] <= t < edges[x + 1]]
                    if not bucket:
                        continue
                    s = float(q[bi, h, i].double() @ k[bi, h // group, j].double()) / math.sqrt(d)
                    g = math.log1p(t / tau)
                    out["count"][h, bucket[0]] += 1
                    out["sum_s"][h, bucket[0]] += s
                    out["sum_s2"][h, bucket[0]] += s * s
                    out["sum_mass"][h, bucket[0]] += math.exp(math.sqrt(1 + 2 * g) * s - 2 * g) * (1 + t / tau)
    return out


def test_distance_stats_match_a_loop_over_pairs():
    """GQA 4/2, positions with gaps, two documents in the second row, query chunks smaller than N,
    a last bucket that pairs beyond it fall out of: the sums equal a float64 loop's to 1e-10."""
    from scaleinv_dist.evaluate import score_stats as ss

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 13, 8, generator=g), torch.randn(2, 2, 13, 8, generator=g)
    positions = torch.stack([torch.arange(13) * 3, torch.arange(13)])
    doc_ids = torch.tensor([[0] * 13, [0] * 6 + [1] * 7])
    edges = [0, 1, 4, 16]  # distances up to 36 in the first row: those >= 16 are left out
    got = ss.distance_stats(q, k, positions, edges, 10.0, doc_ids, rows_per_chunk=5)
    want = brute_force_stats(q, k, positions, doc_ids, edges, 10.0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10)
    assert ss.distance_edges(100) == [0, 1, 4, 16, 64, 100] and ss.distance_edges(64) == [0, 1, 4, 16, 64]


def test_summary_of_constant_scores_is_the_transform_itself():
    """Every score equal to c: mean c, variance 0, and mass ratio exactly exp(a_t c + m_t)(1 + t/tau)
    in a one-distance bucket (1e-12)."""
    from scaleinv_dist.evaluate import score_stats as ss

    c, tau, t = 0.7, 10.0, 5
    q = torch.zeros(1, 1, 8, 4, dtype=torch.float64)
    q[..., 0] = c * 2.0  # q.k / sqrt(4) = c
    k = torch.zeros(1, 1, 8, 4, dtype=torch.float64)
    k[..., 0] = 1.0
    out = ss.summarise(ss.distance_stats(q, k, torch.arange(8)[None], [0, t, t + 1], tau))
    gt = math.log1p(t / tau)
    assert out["count"][0].tolist() == [8 + 7 + 6 + 5 + 4, 3]
    torch.testing.assert_close(out["mean"], torch.full((1, 2), c, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out["var"], torch.zeros(1, 2, dtype=torch.float64), rtol=0, atol=1e-12)
    want = math.exp(math.sqrt(1 + 2 * gt) * c - 2 * gt) * (1 + t / tau)
    assert abs(out["mass"][0, 1].item() - want) < 1e-12


@pytest.mark.slow
def test_score_stats_end_to_end(trained_run, eval_env, tmp_path):
    proc = run_cmd(["launch/score_stats.py", "--run", str(trained_run), "--multiples", "4", "--windows", "2",
                    "--out", str(tmp_path)], eval_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "score_stats.json").read_text())
    assert data["length"] == 128 and data["train_len"] == 32 and data["windows"] == 2
    assert data["edges"] == [0, 1, 4, 16, 64, 128] and len(data["layers"]) == 1
    layer = data["layers"][0]
    assert len(layer["var"]) == 2 and all(len(row) == 5 for row in layer["var"])
    assert layer["count"][0] == [256.0, 2 * (127 + 126 + 125), sum(2 * (128 - t) for t in range(4, 16)),
                                 sum(2 * (128 - t) for t in range(16, 64)), sum(2 * (128 - t) for t in range(64, 128))]
    assert all(v > 0 for row in layer["var"] for v in row[1:])
    assert "| layer | head | [0,1) |" in proc.stdout
    assert (tmp_path / "score_stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run_cmd(["launch/score_stats.py", "--run", str(trained_run), "--windows", "0"], eval_env)
    assert bad.returncode == 2 and "--windows must be at least 1" in bad.stderr and "Traceback" not in bad.stderr
