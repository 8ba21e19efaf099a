"""The issue-17 protocol: passkey needles, needle accuracy, sweep plans with seeds, aggregation over
seeds, reproduction.json's shape and publishing into the docs; one end-to-end CPU smoke sweep."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaleinv_dist.evaluate import niah, publish, sweep
from scaleinv_dist.evaluate.common import EvalError

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "scaleinv_dist" / "data" / "assets" / "python-bpe-8192.model"


@pytest.fixture(scope="module")
def tok():
    from scaleinv_dist.data import Tokenizer
    return Tokenizer(MODEL)


@pytest.fixture
def passkey(tok):
    hay = tok.encode("def f(x):\n    return x + 1\n\n# a comment. Another sentence.\n" * 200)
    return niah.NeedleBuilder(tok, hay, bos_id=tok.bos_id, seed=0, task="passkey")


# ----------------------------------------------------------------------------- needle
def test_passkey_format_and_digit_answer(passkey, tok):
    e = passkey.build(256, 0.5)
    assert len(e.value) == 5 and e.value.isdigit() and e.tokens.numel() == 256
    assert e.key == niah.PASSKEY and not e.distractors
    needle = tok.decode(e.tokens[e.needle_start:e.needle_start + e.needle_len].tolist())
    assert needle == f" The pass key is {e.value}. Remember it. {e.value} is the pass key."
    tail = tok.decode(e.tokens[e.region_end:].tolist())
    assert tail == f" What is the pass key? The pass key is {e.value}"
    assert [tok.decode([int(t)]) for t in e.answer] == [" "] * (len(e.answer) - 5) + list(e.value)
    with pytest.raises(ValueError, match="one needle"):
        passkey.build(256, 0.5, n_needles=2)


class Copier(torch.nn.Module):
    """A fake model that predicts each token of a sequence correctly except the answer's last
    digit where `wrong` is set: an exact-match scorer must count only the all-correct rows."""

    def __init__(self, vocab, wrong: set[int]):
        super().__init__()
        self.vocab, self.wrong, self.calls = vocab, wrong, 0

    def forward(self, tokens, positions, doc_ids=None, labels=None):
        logits = torch.zeros(*tokens.shape, self.vocab)
        for b, row in enumerate(tokens):
            full = self.current[self.calls + b]
            for i in range(len(full) - 1):
                target = int(full[i + 1])
                if i == len(full) - 2 and (self.calls + b) in self.wrong:
                    target = (target + 1) % self.vocab
                logits[b, i, target] = 1.0
        self.calls += tokens.shape[0]
        return logits


def test_needle_accuracy_counts_exact_matches(passkey, tok):
    examples = [passkey.build(128, d) for d in (0.0, 0.5, 1.0) for _ in range(4)]
    model = Copier(tok.vocab_size, wrong={1, 5, 6, 11})
    model.current = [e.tokens for e in examples]
    hits = niah.score_teacher_forced(model, examples, batch_size=3)
    assert hits == [i not in {1, 5, 6, 11} for i in range(12)]
    assert sum(hits) / len(hits) == pytest.approx(8 / 12)


def test_run_grid_accuracy_by_length_is_mean_over_depths(passkey, tok, monkeypatch):
    outcomes = iter([True, False, True, True, False, False, True, True])  # (depth, sample) per length

    def fake_score(model, examples, *a, **k):
        return [next(outcomes) for _ in examples]

    monkeypatch.setattr(niah, "score_teacher_forced", fake_score)
    grid = niah.run_grid(None, passkey, [96, 128], [0.0, 1.0], samples=2, progress=False)
    assert grid["accuracy"] == [[0.5, 0.0], [1.0, 1.0]]
    assert grid["hits"] == [[1, 0], [2, 2]]
    assert grid["accuracy_by_length"] == [0.75, 0.5]


def test_finetune_with_lm_batches_runs_and_learns(passkey, tok):
    from scaleinv_dist.config import AttentionConfig, ModelConfig
    from scaleinv_dist.data import TokenStore, TrainLoader
    from scaleinv_dist.evaluate.niah_finetune import finetune_on_needles
    from scaleinv_dist.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2),
                AttentionConfig(backend="reference"), train_seq_len=96)
    store = TokenStore.from_token_lists([list(range(10, 400))] * 4, vocab_size=tok.vocab_size)
    lm = iter(TrainLoader(store, 96, 2, seed=0))
    losses = finetune_on_needles(model, passkey, 96, steps=30, lr=3e-3, batch_size=4, progress=False,
                                 lm_batches=lm)
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # the answer loss falls


def test_lm_batches_continue_after_the_pretraining_windows(tmp_path):
    from types import SimpleNamespace

    from scaleinv_dist.data import TokenStore, TrainLoader
    from scaleinv_dist.evaluate.niah_finetune import unseen_train_batches
    from scaleinv_dist.train.checkpoint import save_state_files

    store = TokenStore.from_token_lists([list(range(10 + 300 * d, 300 + 300 * d)) for d in range(8)],
                                        vocab_size=4096)  # every window distinct
    trained = TrainLoader(store, 32, 4, seed=7)
    seen = {tuple(row.tolist()) for _ in range(5) for row in trained.next_batch().tokens}
    save_state_files({"loader": trained.state_dict()}, tmp_path, "rank_00000")
    expected = trained.next_batch()  # what pretraining would have read next
    bundle = SimpleNamespace(train_loader=TrainLoader(store, 32, 4, seed=7))
    got = next(unseen_train_batches(bundle, tmp_path))
    assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.labels, expected.labels)
    assert bundle.train_loader.index == 24 and not seen & {tuple(r.tolist()) for r in got.tokens}
    fresh = SimpleNamespace(train_loader=TrainLoader(store, 32, 4, seed=7))
    next(unseen_train_batches(fresh, tmp_path / "no-such-checkpoint"))  # no state: from the start
    assert fresh.train_loader.index == 4


# ----------------------------------------------------------------------------- plans and jobs
def test_plan_keys_checked(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("config: configs/tiny.yaml\nseedz: {rope: [1]}\n")
    with pytest.raises(EvalError, match="did you mean 'seeds'"):
        sweep.load_plan(str(plan))
    plan.write_text("needle: {finetune_step: 3}\n")
    with pytest.raises(EvalError, match="finetune_steps"):
        sweep.load_plan(str(plan))
    assert sweep.load_plan(str(ROOT / "configs" / "sweeps" / "python.yaml"))["seeds"]["rope"] == [1234, 1235]
    plan.write_text("config: configs/tiny.yaml\ngpus:\nseeds:\n")  # empty keys: not given
    assert sweep.load_plan(str(plan)) == {"config": "configs/tiny.yaml"}


def test_jobs_per_seed_and_needle_on_first_seed(tmp_path):
    jobs = sweep.build_jobs(["si_p_rope", "alibi"], "c.yaml", tmp_path, [], None, [1, 4], None,
                            seeds={"si_p_rope": [1, 2], "alibi": [1]}, needle={"task": "passkey"})
    assert [j.name for j in jobs] == ["si_p_rope-seed1", "si_p_rope-seed2", "alibi-seed1"]
    assert "run.seed=2" in jobs[1].train_cmd and jobs[1].run_dir == tmp_path / "runs" / "si_p_rope-seed2"
    assert [j.niah_cmd is not None for j in jobs] == [True, False, True]
    cmd = jobs[0].niah_cmd
    assert cmd[cmd.index("--task") + 1] == "passkey" and "--finetune-lm" in cmd
    plain = sweep.build_jobs(["rope"], "c.yaml", tmp_path, [], None, [1], None)
    assert plain[0].name == "rope" and plain[0].niah_cmd is None and plain[0].seed is None


# ----------------------------------------------------------------------------- results
def _summary(tmp_path) -> dict:
    """A finished two-method, three-job sweep written as eval.json / niah.json files."""
    jobs = sweep.build_jobs(["si_p_rope", "rope"], "c.yaml", tmp_path, [], None, [1, 4, 16], None,
                            seeds={"si_p_rope": [1, 2], "rope": [1]}, needle={})
    losses = {"si_p_rope-seed1": [3.0, 3.01, 3.02], "si_p_rope-seed2": [3.2, 3.19, 3.24],
              "rope-seed1": [3.1, 3.6, 4.5]}
    for job in jobs:
        job.run_dir.mkdir(parents=True)
        res = {str(L): {"loss": v, "tokens": 64, "buckets": [{"lo": 0, "hi": L, "loss_sum": v * 64,
                                                               "count": 64, "loss": v}]}
               for L, v in zip((8, 32, 128), losses[job.name])}
        (job.run_dir / "eval.json").write_text(json.dumps(
            {"results": res, "step": 5, "epochs": 0.5, "training": {"train_loss": 3.0, "tokens": 320}}))
        if job.niah_cmd:
            acc = [1.0, 0.9, 0.8] if job.method == "si_p_rope" else [1.0, 0.1, 0.0]
            (job.run_dir / "niah.json").write_text(json.dumps(
                {"lengths": [8, 32, 128], "depths": [0, 1], "accuracy": [acc, acc], "hits": [[1] * 3] * 2,
                 "samples": 1, "accuracy_by_length": acc, "task": "passkey",
                 "finetune": {"first_loss": 9.0, "last_loss": 0.1, "steps": 40}}))
        job.status = "ok"
    return sweep.collect(jobs, 8, [1, 4, 16])


def test_aggregate_mean_and_spread_over_seeds(tmp_path):
    agg = sweep.aggregate(_summary(tmp_path))
    si = agg["si_p_rope"]
    assert si["seeds"] == [1, 2] and si["loss"]["16"] == [3.02, 3.24]
    assert si["mean"]["16"] == pytest.approx(3.13)
    assert si["std"]["16"] == pytest.approx(math.sqrt(2 * 0.11 ** 2))  # sample std of two values
    assert agg["rope"]["std"]["1"] is None  # one seed: no spread
    assert si["needle"] == {"1": 1.0, "4": 0.9, "16": 0.8}


def test_reproduction_json_shape(tmp_path):
    manifest = {"source": "embedded:python", "train_tokens": 1000, "val_tokens": 100, "train_docs": 9,
                "val_docs": 1, "vocab_size": 8192, "python_corpus": {"python": "3.12.1", "distributions": []}}
    rep = sweep.reproduction(_summary(tmp_path), manifest)
    assert list(rep) == ["corpus", "methods", "needle"]
    assert rep["corpus"]["name"] == "embedded:python" and rep["corpus"]["train_tokens"] == 1000
    assert set(rep["methods"]) == {"si_p_rope", "rope"}
    for m in rep["methods"].values():
        assert list(m) == ["seeds", "loss"] and list(m["loss"]) == ["1", "4", "16"]
        assert all(len(v) == len(m["seeds"]) for v in m["loss"].values())
    assert rep["needle"]["rope"] == {"1": 1.0, "4": 0.1, "16": 0.0}
    json.dumps(rep)  # plain JSON


def test_publish_writes_docs_and_replaces_its_section(tmp_path):
    out = tmp_path / "sw"
    summary = _summary(out)
    sweep.write_outputs(summary, out, "test")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "RESULTS.md").write_text("# Results\n\n## Older section\n\ntext\n")
    for _ in range(2):  # publishing twice replaces the section instead of adding another
        written = publish.publish(out, docs)
    text = (docs / "RESULTS.md").read_text()
    assert text.count(publish.SECTION_BEGIN) == 1 and "## Older section" in text
    assert text.index(publish.SECTION_BEGIN) < text.index("## Older section")
    assert "- scale-invariant p-RoPE within 0.05 nats of its 1x loss at 16x: agrees (16x - 1x = +0.030)." in text
    assert "- RoPE at least 0.5 nats above scale-invariant p-RoPE at 16x: agrees (gap +1.370)." in text
    assert "- needle accuracy of RoPE near 0 (<= 0.1) at 16x: agrees (0.00)." in text
    cell = "| 40 steps, 9.00 → 0.10 |"  # the fine-tune cell: the same in RESULTS.md and sweep.md
    assert cell in text and cell in (out / "sweep.md").read_text()
    for name in ("reproduction.json", "python_sweep_loss_vs_length.png", "python_sweep_buckets.png",
                 "python_sweep_needle.png"):
        assert (docs / name) in written and (docs / name).stat().st_size > 100
    assert json.loads((docs / "reproduction.json").read_text()) == json.loads((out / "reproduction.json").read_text())
    with pytest.raises(EvalError, match="sweep.json"):
        publish.publish(tmp_path / "missing", docs)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_smoke_sweep_plan_end_to_end(tmp_path):
    """The GPU command's pipeline on CPU: data prepared once, two seeds, eval, passkey needle."""
    out = tmp_path / "sw"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "SCALEINV_CACHE": os.environ.get("SCALEINV_CACHE") or str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "launch/sweep.py", "--plan", "configs/sweeps/python-smoke.yaml",
                           "--out", str(out), "--methods", "si_p_rope"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in summary["rows"]] == ["si_p_rope-seed1", "si_p_rope-seed2"]
    assert all(r["status"] == "ok" and r["step"] == 4 for r in summary["rows"])
    assert summary["rows"][0]["needle"]["task"] == "passkey" and "needle" not in summary["rows"][1]
    rep = json.loads((out / "reproduction.json").read_text())
    assert rep["methods"]["si_p_rope"]["seeds"] == [1, 2] and set(rep["needle"]["si_p_rope"]) == {"1", "2"}
    manifest = json.loads((out / "data_manifest.json").read_text())
    assert manifest["source"] == "embedded:python" and manifest["python_corpus"]["distributions"]
    assert (out / "runs" / "si_p_rope-seed2" / "data_manifest.json").is_file()
