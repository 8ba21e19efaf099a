"""Training: optimizers and schedules (fast, in process), then real DeepSpeed CPU runs in subprocesses
(slow): exact resume on 2 ranks, NaN policies, SIGUSR1 preemption, a dead / hung rank, CLI errors.

Fault injection uses test-only environment variables read by scaleinv_dist.train.faults:
SCALEINV_TEST_PREEMPT_AT_STEP, SCALEINV_TEST_NAN_AT_STEP, SCALEINV_TEST_DIE_AT_STEP /
SCALEINV_TEST_HANG_AT_STEP with SCALEINV_TEST_DIE_RANK.
"""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scaleinv_dist.config import load_config
from scaleinv_dist.run_dir import latest_checkpoint, load_trained_model
from scaleinv_dist.train.loop import EXIT_NONFINITE, EXIT_PEER_FAILURE, EXIT_PREEMPTED
from scaleinv_dist.train import faults
from scaleinv_dist.train.optim import AdamW, Muon, build_optimizer, newton_schulz
from scaleinv_dist.train.schedule import LRSchedule, build_scheduler

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
TINY = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.n_kv_head=1", "train.seq_len=64",
        "train.micro_batch_size=4", "run.log_every=1", "run.wandb=disabled", "run.progress=false",
        "data.vocab_size=300", "data.max_documents=12", "attention.backend=reference",
        "train.warmup_steps=2"]


# ============================================================================= fast: optimizers
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(11, 8)
        self.fc = torch.nn.Linear(8, 16, bias=False)
        self.proj = torch.nn.Linear(16, 8, bias=True)
        self.gain = torch.nn.Parameter(torch.ones(8))
        self.lm_head = torch.nn.Linear(8, 11, bias=False)

    def forward(self, x):
        h = self.wte(x) * self.gain
        return self.lm_head(self.proj(torch.relu(self.fc(h))))


def _loss(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 11, (4, 5), generator=g)
    return torch.nn.functional.cross_entropy(model(x).reshape(-1, 11), x.reshape(-1))


def test_adamw_groups_no_decay_on_1d_params():
    torch.manual_seed(0)
    cfg = load_config(None, ["train.weight_decay=0.1"])
    opt = build_optimizer(Tiny(), cfg)
    assert isinstance(opt, AdamW)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["adamw_decay"]["weight_decay"] == 0.1 and by_name["adamw_no_decay"]["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in by_name["adamw_decay"]["params"])
    assert all(p.dim() == 1 for p in by_name["adamw_no_decay"]["params"])
    assert len(by_name["adamw_no_decay"]["params"]) == 2  # gain + bias


def test_muon_groups_and_determinism():
    cfg = load_config(None, ["train.optimizer=muon", "train.muon_lr=0.05", "train.lr=0.01"])
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Tiny()
        opt = build_optimizer(model, cfg)
        assert isinstance(opt, Muon)
        groups = {g["name"]: g for g in opt.param_groups}
        muon_params = {id(p) for p in groups["muon"]["params"]}
        assert muon_params == {id(model.fc.weight), id(model.proj.weight)}  # hidden matrices only
        assert groups["muon"]["lr"] == 0.05 and groups["adamw_decay"]["lr"] == 0.01
        for step in range(3):
            opt.zero_grad()
            _loss(model, step).backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_muon_decreases_loss():
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(model, load_config(None, ["train.optimizer=muon", "train.muon_lr=0.02",
                                                    "train.lr=0.01"]))
    first = _loss(model).item()
    for _ in range(30):
        opt.zero_grad()
        _loss(model).backward()
        opt.step()
    assert _loss(model).item() < first - 0.3


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    for shape in [(16, 64), (64, 16), (32, 32)]:
        g = torch.randn(*shape)
        o = newton_schulz(g, steps=10)
        s = torch.linalg.svdvals(o)
        assert s.max() < 1.3 and s.min() > 0.5, s  # the quintic iteration targets S ~ U(0.7, 1.2)


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_skip_updates_leaves_parameters_and_state(kind):
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(model, load_config(None, [f"train.optimizer={kind}"]))
    _loss(model).backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in opt.state.items()}
    opt.zero_grad()
    _loss(model, 1).backward()
    opt.skip_updates = True
    opt.step()
    opt.step()  # DeepSpeed ZeRO calls step once per group: the flag holds until reset
    opt.skip_updates = False
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    for k, s in opt.state.items():
        for n, v in s.items():
            assert torch.equal(v, state[k][n]) if torch.is_tensor(v) else v == state[k][n]


# ============================================================================= fast: schedules
def test_warmup_then_cosine():
    f = LRSchedule("cosine", steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(99) > 0.1 and f(99) == pytest.approx(0.1, abs=0.01)
    assert all(f(k) >= f(k + 1) for k in range(10, 99))


def test_wsd_stable_then_linear_cooldown():
    f = LRSchedule("wsd", steps=100, warmup_steps=5, min_lr_ratio=0.0, cooldown_fraction=0.3)
    assert f(0) == pytest.approx(0.2)
    assert all(f(k) == 1.0 for k in range(5, 71))
    assert f(70) == 1.0 and f(85) == pytest.approx(0.5)
    assert f(99) == pytest.approx(1 / 30) and f(99) > 0
    diffs = [f(k) - f(k + 1) for k in range(70, 99)]
    assert max(diffs) - min(diffs) < 1e-12  # linear


def test_constant_and_min_ratio():
    f = LRSchedule("constant", steps=50, warmup_steps=0, min_lr_ratio=0.5)
    assert all(f(k) == 1.0 for k in range(50))
    g = LRSchedule("wsd", steps=10, warmup_steps=0, min_lr_ratio=0.25, cooldown_fraction=0.5)
    assert g(9) == pytest.approx(0.25 + 0.75 / 5)


def test_scheduler_drives_group_lrs():
    cfg = load_config(None, ["train.optimizer=muon", "train.lr=0.01", "train.muon_lr=0.1",
                             "train.warmup_steps=4", "train.schedule=constant"])
    opt = build_optimizer(Tiny(), cfg)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(5):
        lrs.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    assert lrs[0]["muon"] == pytest.approx(0.025) and lrs[0]["adamw_decay"] == pytest.approx(0.0025)
    assert lrs[4]["muon"] == pytest.approx(0.1) and lrs[4]["adamw_no_decay"] == pytest.approx(0.01)
    assert all(f is None for f in sched.state_dict()["lr_lambdas"])  # the shape is not saved


# ============================================================================= fast: fault hook
def test_fault_hook_is_inert_unless_its_variable_names_the_step(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SCALEINV_TEST_")]:
        monkeypatch.delenv(key)
    x = torch.tensor(2.0)
    assert faults.inject("micro_loss", 3, 0, value=x) is x
    assert faults.inject("step_end", 3, 0, value=None) is None
    faults.inject("step_start", 3, 1)
    faults.inject("save:before_publish", 3)
    monkeypatch.setenv("SCALEINV_TEST_NAN_AT_STEP", "3")
    assert torch.isnan(faults.inject("micro_loss", 3, 0, value=x))
    assert faults.inject("micro_loss", 3, 1, value=x) is x and faults.inject("micro_loss", 2, 0, value=x) is x
    monkeypatch.setenv("SCALEINV_TEST_PREEMPT_AT_STEP", "3")
    assert faults.inject("step_end", 3, 0) == "SCALEINV_TEST_PREEMPT_AT_STEP"
    assert faults.inject("step_end", 3, 1, value="SIGUSR1") == "SIGUSR1"
    with pytest.raises(ValueError, match="unknown fault injection point"):
        faults.inject("nowhere", 1)


# ============================================================================= slow: real runs
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out) if "split" not in r}


def torchrun(nproc: int, overrides, env, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), TRAIN, "--config", str(ROOT / "configs" / "tiny.yaml"),
           *TINY, *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def spawn_ranks(nproc: int, overrides, env):
    """One process per rank with RANK / WORLD_SIZE set, as srun starts them (exit codes per rank)."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        e = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, TRAIN, "--config", str(ROOT / "configs" / "tiny.yaml"),
                                       *TINY, *overrides], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=600):
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
        out.append((p.returncode, o, e))
    return out


@pytest.mark.slow
def test_resume_on_two_ranks_gives_the_same_losses(tmp_path, train_env):
    """2-process DeepSpeed CPU runs: uninterrupted 8 steps == (preempted at 4, resumed to 8)."""
    common = ["train.steps=8", "train.checkpoint_every=4", "train.eval_every=4", "train.eval_tokens=2048"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    r = torchrun(2, [*common, f"run.out_dir={full}"], train_env)
    assert r.returncode == 0, r.stderr[-3000:]
    env = {**train_env, "SCALEINV_TEST_PREEMPT_AT_STEP": "4"}
    r = torchrun(2, [*common, f"run.out_dir={parts}", "train.checkpoint_every=0"], env)
    assert r.returncode != 0 and "preempted" in r.stderr, r.stderr[-3000:]
    assert latest_checkpoint(parts).name == "step_00000004"
    assert max(step_losses(parts)) == 4
    r = torchrun(2, [*common, f"run.out_dir={parts}"], train_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout

    a, b = step_losses(full), step_losses(parts)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])
    assert a[8] < a[1]

    # gradients are reduced once and scaled right: 2 ranks x 4 sequences == 1 rank x 2 micro
    # batches x 4 sequences (the loader deals the same 8 windows per step either way)
    accum = tmp_path / "accum"
    r = subprocess.run([sys.executable, TRAIN, "--config", str(ROOT / "configs" / "tiny.yaml"), *TINY,
                        "train.steps=8", "train.checkpoint_every=0", "train.grad_accum=2",
                        f"run.out_dir={accum}"], env=train_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    c = step_losses(accum)
    for step in range(1, 9):
        assert abs(a[step] - c[step]) <= 1e-5 * abs(a[step]), (step, a[step], c[step])
    recs = metrics(full)
    first = next(r for r in recs if "split" not in r)
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens", "mfu"):
        assert key in first, key
    assert first["mfu"] is None  # CPU
    evals = [r for r in recs if r.get("split") == "val"]
    assert [e["step"] for e in evals] == [4, 8] and all(e["context_length"] == 64 for e in evals)
    assert all(math.isfinite(e["loss"]) for e in evals)
    # the run directory follows run_dir.py: eval / export code loads the model
    model, cfg, folder = load_trained_model(full)
    assert folder.name == "step_00000008" and cfg.model.vocab_size == model.wte.weight.shape[0]
    assert (full / "tokenizer.model").is_file()
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["latest", "step_00000004",
                                                                      "step_00000008"]
    # no secrets in what the run wrote
    text = (full / "config.yaml").read_text()
    assert "WANDB_API_KEY" not in text and "SCALEINV_CACHE" not in text


@pytest.mark.slow
def test_bf16_mixed_precision_trains_with_fp32_weights(tmp_path, train_env):
    """run.dtype=bfloat16, the mode every GPU run takes: DeepSpeed torch_autocast (bf16 compute)
    over fp32 weights with ZeRO 0 and the client optimizer. DeepSpeed's own "bf16" mode refused
    exactly this (bf16 weights with fp32 gradient accumulation needs ZeRO >= 1). With
    train.activation_checkpointing=auto, which on CPU picks `none` for the tiny model and says so."""
    out = tmp_path / "bf16"
    r = torchrun(1, ["train.steps=3", "run.dtype=bfloat16", f"run.out_dir={out}",
                     "train.activation_checkpointing=auto"], train_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("train.activation_checkpointing=auto -> none (the least recompute that fits)") == 1
    losses = step_losses(out)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(x) for x in losses.values())
    model, _, _ = load_trained_model(out)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.slow
def test_nan_stop_keeps_last_good_checkpoint(tmp_path, train_env):
    out = tmp_path / "run"
    env = {**train_env, "SCALEINV_TEST_NAN_AT_STEP": "4"}
    results = finish(spawn_ranks(2, ["train.steps=6", "train.checkpoint_every=2", f"run.out_dir={out}"], env))
    assert [code for code, _, _ in results] == [EXIT_NONFINITE, EXIT_NONFINITE], results[0][2][-2000:]
    assert "non-finite loss at step 4" in results[0][2]
    assert "Traceback" not in results[0][2]
    assert latest_checkpoint(out).name == "step_00000002"
    losses = step_losses(out)
    assert losses[3] is not None and losses[4] is None


@pytest.mark.slow
def test_nan_skip_continues(tmp_path, train_env):
    out = tmp_path / "run"
    env = {**train_env, "SCALEINV_TEST_NAN_AT_STEP": "3"}
    r = subprocess.run([sys.executable, TRAIN, "--config", str(ROOT / "configs" / "tiny.yaml"), *TINY,
                        "train.steps=5", "train.nan_policy=skip", f"run.out_dir={out}"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = {rec["step"]: rec for rec in metrics(out) if "split" not in rec}
    assert recs[3]["loss"] is None and recs[3]["skipped"] is True
    assert all(math.isfinite(recs[s]["loss"]) for s in (1, 2, 4, 5))
    assert latest_checkpoint(out).name == "step_00000005"


@pytest.mark.slow
def test_sigusr1_checkpoints_at_the_next_step_and_exits_75(tmp_path, train_env):
    out = tmp_path / "run"
    procs = spawn_ranks(2, ["train.steps=100000", "train.checkpoint_every=0", f"run.out_dir={out}"],
                        train_env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if (out / "metrics.jsonl").is_file() and len(step_losses(out)) >= 2:
                break
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGUSR1)  # only one rank gets it: the others must follow
    finally:
        results = finish(procs, timeout=300)
    assert [code for code, _, _ in results] == [EXIT_PREEMPTED, EXIT_PREEMPTED], results[0][2][-3000:]
    folder = latest_checkpoint(out)
    assert folder is not None
    state = json.loads((folder / "trainer_state.json").read_text())["state"]
    assert state["step"] == max(step_losses(out)) == int(folder.name.split("_")[1])
    assert "preempted" in results[0][2]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["DIE", "HANG"])
def test_dead_or_hung_rank_makes_survivors_exit(tmp_path, train_env, fault):
    timeout_s = 20
    out = tmp_path / "run"
    env = {**train_env, f"SCALEINV_TEST_{fault}_AT_STEP": "3", "SCALEINV_TEST_DIE_RANK": "1"}
    procs = spawn_ranks(2, ["train.steps=50", "train.checkpoint_every=0", f"run.out_dir={out}",
                            f"train.collective_timeout_s={timeout_s}"], env)
    try:
        code, _, err = finish(procs[:1], timeout=300)[0]
        # the survivor stopped after step 2, within the timeout of the fault (plus slack for a busy CPU)
        assert code == EXIT_PEER_FAILURE, err[-3000:]
        assert "lost contact with another rank" in err and "Traceback" not in err
        last = metrics(out)[-1]
        assert last["step"] == 2
        waited = time.time() - (out / "metrics.jsonl").stat().st_mtime
        assert waited < 5 + (timeout_s if fault == "HANG" else 0) + 30
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        finish(procs, timeout=60)


def test_cli_config_error_is_one_line(train_env):
    r = subprocess.run([sys.executable, TRAIN, "--config", str(ROOT / "configs" / "tiny.yaml"), "train.stepz=3"],
                       env=train_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "train.steps" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, TRAIN, "--config", "no/such.yaml"], env=train_env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_data_error_is_one_line(tmp_path, train_env):
    r = subprocess.run([sys.executable, TRAIN, "--config", str(ROOT / "configs" / "tiny.yaml"), *TINY,
                        f"data.path={tmp_path / 'missing'}", f"run.out_dir={tmp_path / 'run'}"],
                       env=train_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: " in r.stderr and "missing" in r.stderr and "Traceback" not in r.stderr
