"""train.activation_checkpointing=auto (scaleinv_dist.memory): the estimator's parameter count is the
model's, its estimates grow with length and shrink with recompute, and the choice it makes for the
162M model on a fake 80 GB card, on CPU, and without a training device."""
import os

import pytest
import torch

from scaleinv_dist import memory
from scaleinv_dist.config import ConfigError, load_config
from scaleinv_dist.memory import MODES, choose_checkpointing, estimate_peak, param_counts
from scaleinv_dist.model import build_model

H100 = 81559 * 2**20  # bytes: an 80 GB card's total as nvidia-smi reports it (79.6 GiB)
GB = 1e9
VOCAB = 32768
LENGTHS = [4096, 16384, 65536, 262144, 1 << 20, 1 << 21]


def paper_162m(*overrides):
    return load_config("configs/paper-162m.yaml", ["train.micro_batch_size=1", *overrides])


@pytest.mark.parametrize("overrides", [[], ["model.n_kv_head=2", "model.mlp_ratio=3"],
                                       ["model.head_dim=48", "model.n_layer=3"]])
def test_param_counts_are_the_models(overrides):
    cfg = load_config(None, ["model.vocab_size=97", *overrides])
    model = build_model(cfg)
    matrices = sum(p.numel() for n, p in model.blocks.named_parameters() if p.dim() == 2)
    assert param_counts(cfg.model, 97) == (sum(p.numel() for p in model.parameters()), matrices)


@pytest.mark.parametrize("bf16", [True, False])
def test_estimates_grow_with_length_and_shrink_with_recompute(bf16):
    cfg = paper_162m()
    rows = [estimate_peak(cfg, VOCAB, bf16, n) for n in LENGTHS]
    for mode in MODES:
        device = [r[mode].device for r in rows]
        assert all(a < b for a, b in zip(device, device[1:])), (mode, device)
    offload_host = [r["offload"].host for r in rows]
    assert all(a < b for a, b in zip(offload_host, offload_host[1:]))
    for r in rows:
        device = [r[m].device for m in MODES]
        assert all(a > b for a, b in zip(device, device[1:])), device
        assert all(r[m].host == 0 for m in MODES[:-1])
    # fp32 activations cost more than bf16 ones at every length
    if bf16:
        fp32 = [estimate_peak(cfg, VOCAB, False, n) for n in LENGTHS]
        assert all(a["none"].device < b["none"].device for a, b in zip(rows, fp32))


def test_tokens_per_device_follow_micro_batch_and_context_parallelism():
    one = estimate_peak(paper_162m(), VOCAB, True, 65536)
    same = estimate_peak(paper_162m("train.micro_batch_size=4", "parallel.context_parallel_size=4"),
                         VOCAB, True, 65536)
    assert one == same


# peaks recorded in benchmarks/RESULTS.md (configs/paper-162m.yaml, vocabulary 50304, AdamW, H100 80GB,
# blocks not compiled): (sequence length, sequences, context-parallel GPUs, mode, peak GiB). The `full`
# and `offload` peaks recorded there (512k full 52.6, 1M offload 69.7, 256k offload 26.1, 1M full on 4
# GPUs 32.1) predate the token-chunked recompute of the blocks' halves and no longer describe the code.
MEASURED = [(4096, 16, 1, "selective", 21.1), (16384, 4, 1, "selective", 21.7),
            (65536, 1, 1, "selective", 21.7)]


@pytest.mark.parametrize("length,seqs,cp,mode,peak_gib", MEASURED)
def test_estimate_bounds_each_recorded_peak_within_30_percent(length, seqs, cp, mode, peak_gib):
    cfg = paper_162m(f"train.micro_batch_size={seqs}", "train.optimizer=adamw",
                     f"parallel.context_parallel_size={cp}")
    estimate = estimate_peak(cfg, 50304, True, length)[mode].device / 2**30
    assert peak_gib <= estimate <= 1.3 * peak_gib


# peaks with compiled blocks and the `hopper` backend (benchmarks/RESULTS.md, one H100, 2026-12-05,
# and the 2M `offload` step on one H200, 2026-12-06; (sequence length, sequences, mode, peak GiB);
# the `offload` ones after the token-chunked recompute): the estimate models eager blocks, so for
# compiled ones it must stay above, within 1.8x
MEASURED_COMPILED = [(16384, 4, "none", 28.3), (16384, 4, "selective", 19.0), (65536, 1, "none", 29.3),
                     (65536, 1, "selective", 19.0), (1 << 20, 1, "offload", 28.8),
                     (1 << 21, 1, "offload", 56.5)]


@pytest.mark.parametrize("length,seqs,mode,peak_gib", MEASURED_COMPILED)
def test_estimate_stays_above_each_compiled_peak_within_1_8x(length, seqs, mode, peak_gib):
    cfg = paper_162m(f"train.micro_batch_size={seqs}", "train.optimizer=adamw")
    estimate = estimate_peak(cfg, 50304, True, length)[mode].device / 2**30
    assert peak_gib <= estimate <= 1.8 * peak_gib


# the formula's choice (docs/training.md's table): none while it fits, then the least recompute
@pytest.mark.parametrize("length,expected", [(4096, "none"), (65536, "none"), (262144, "selective"),
                                             (1 << 20, "offload"), (1 << 21, "offload")])
def test_choice_for_the_162m_model_on_a_fake_80gb_card(length, expected):
    est = estimate_peak(paper_162m(), VOCAB, True, length)
    mode, line = choose_checkpointing(est, H100, 256 * 2**30, cuda=True)
    assert mode == expected
    assert line.startswith(f"train.activation_checkpointing=auto -> {expected} ")
    assert "79.6 available (GPU)" in line and "\n" not in line
    fits = "nothing fits" not in line
    assert fits == (length < 1 << 21)  # 2M tokens: no mode fits 80 GB by the estimate
    if expected != "none":  # every mode with less recompute does not fit
        assert all(est[m].device > H100 for m in MODES[:MODES.index(expected)])


def test_offload_needs_room_in_host_memory():
    est = estimate_peak(paper_162m(), VOCAB, True, 1 << 20)
    assert choose_checkpointing(est, H100, 64 * 2**30, cuda=True)[0] == "offload"
    mode, line = choose_checkpointing(est, H100, est["offload"].host / 2, cuda=True)
    assert mode == "offload" and "nothing fits" in line


def test_cpu_never_offloads_and_picks_none_when_it_fits():
    est = estimate_peak(paper_162m(), VOCAB, False, 4096)
    assert choose_checkpointing(est, 64 * GB, 64 * GB, cuda=False)[0] == "none"
    assert choose_checkpointing(est, est["none"].device - 1, 64 * GB, cuda=False)[0] == "selective"
    mode, line = choose_checkpointing(est, 1.0, 1.0, cuda=False)
    assert mode == "full" and "offload" not in line


def test_auto_at_build(capsys, monkeypatch):
    cfg = load_config(None, ["model.vocab_size=97", "train.activation_checkpointing=auto"])
    assert build_model(cfg).activation_checkpointing == "none"  # no training device: no choice
    assert capsys.readouterr().out == ""
    model = build_model(cfg, device=torch.device("cpu"))
    assert model.activation_checkpointing == "none"
    out = capsys.readouterr().out
    assert out.startswith("train.activation_checkpointing=auto -> none ") and out.count("\n") == 1
    monkeypatch.setattr(memory, "host_memory_bytes", lambda: 1.0)  # a host with no room: most frugal
    model = build_model(cfg, device=torch.device("cpu"))
    assert model.activation_checkpointing == "full" and model.checkpoint_blocks
    assert "-> full (nothing fits" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "1")  # only rank 0 says why
    assert build_model(cfg, device=torch.device("cpu")).activation_checkpointing == "full"
    assert capsys.readouterr().out == ""


def test_the_model_takes_only_resolved_modes():
    model = build_model(load_config(None, ["model.vocab_size=97"]))
    with pytest.raises(ValueError, match="resolve auto"):
        model.set_activation_checkpointing("auto")


def test_unknown_mode_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.activation_checkpointing=autoo"])
    msg = str(err.value)
    assert "\n" not in msg and "train.activation_checkpointing='autoo'" in msg and "auto" in msg


def test_expandable_segments_is_the_default_but_a_user_setting_wins(monkeypatch):
    """Training and the throughput benchmark ask the CUDA allocator for expandable segments, and
    keep whatever PYTORCH_CUDA_ALLOC_CONF the user exported."""
    from scaleinv_dist.device import prefer_expandable_segments

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    prefer_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    prefer_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
