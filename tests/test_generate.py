"""KV-cache decoding against full forward passes, sampling, batching, bad input and the CLI (CPU, fp32)."""
from pathlib import Path

import pytest
import torch

from scaleinv_dist.config import save_config
from scaleinv_dist.generate import (GenerationError, IncompatibleCheckpointError, KVCache, decode_step,
                                    generate, load_model, pad_prompts, prefill, sample_next)
from tiny_runs import SCHEMES, TRAIN_LEN, VOCAB, make_run, tiny_config, tiny_model

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def full_logits(model, tokens):
    with torch.no_grad():
        return model(tokens[None], torch.arange(len(tokens))[None])[0]


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("position,transform", SCHEMES, ids=[f"{p}+{t}" for p, t in SCHEMES])
def test_cached_decoding_matches_full_forward(position, transform):
    """Prefill + one-token steps give the full forward's logits at every position, past 4x the
    training length, for a batch of right-aligned prompts of different lengths (padding invisible)."""
    model = tiny_model(position, transform)
    gen = torch.Generator().manual_seed(1)
    total = 4 * TRAIN_LEN + 8
    seqs = [torch.randint(0, VOCAB, (total,), generator=gen) for _ in range(2)]
    lens = [TRAIN_LEN + 9, 5]  # one prompt longer than the training length, one short
    tokens, positions, valid, lengths = pad_prompts([s[:n].tolist() for s, n in zip(seqs, lens)], "cpu")
    width = tokens.shape[1]
    logits, cache = prefill(model, tokens, positions, valid, max_len=width + total, all_logits=True)
    refs = [full_logits(model, s) for s in seqs]
    worst = 0.0
    for row, n in enumerate(lens):
        worst = max(worst, (logits[row, width - n:] - refs[row][:n]).abs().max().item())
    for step in range(total - max(lens)):
        nxt = torch.stack([s[n + step] for s, n in zip(seqs, lens)])
        out = decode_step(model, cache, nxt, lengths + step)
        for row, n in enumerate(lens):
            worst = max(worst, (out[row] - refs[row][n + step]).abs().max().item())
    assert worst < 1e-5, f"max |cached - full| logit difference {worst:.3g}"
    assert refs[0].abs().max() > 1.0  # the comparison is not between near-zero logits


def test_chunked_prefill_matches_full_forward():
    model = tiny_model("p_rope", "scale_invariant")
    seq = torch.randint(0, VOCAB, (3 * TRAIN_LEN + 5,), generator=torch.Generator().manual_seed(2))
    logits, cache = prefill(model, seq[None], torch.arange(len(seq))[None], chunk_size=7, all_logits=True)
    assert cache.length == len(seq)
    assert (logits[0] - full_logits(model, seq)).abs().max().item() < 1e-5


def test_cache_positions_can_start_anywhere():
    """Positions are absolute: a window at an offset decodes like the full forward at that offset."""
    model = tiny_model("rope", "none")
    seq = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(100, 120)
    with torch.no_grad():
        ref = model(seq[None], pos[None])[0]
    _, cache = prefill(model, seq[None, :12], pos[None, :12], max_len=20)
    for i in range(12, 20):
        out = decode_step(model, cache, seq[i:i + 1], pos[i:i + 1])
        assert (out[0] - ref[i]).abs().max().item() < 1e-5


def test_cache_overflow_is_an_error():
    model = tiny_model()
    _, cache = prefill(model, torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None], max_len=5)
    decode_step(model, cache, torch.tensor([1]), torch.tensor([4]))
    with pytest.raises(GenerationError, match="KV cache holds 5 tokens"):
        decode_step(model, cache, torch.tensor([1]), torch.tensor([5]))
    assert isinstance(cache, KVCache) and cache.length == 5


# ----------------------------------------------------------------------------- generate()
@pytest.mark.parametrize("position,transform", [("p_rope", "scale_invariant"), ("alibi", "none")])
def test_batched_prompts_match_one_by_one(position, transform):
    model = tiny_model(position, transform)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (3, 11, 1, TRAIN_LEN + 4)]
    batched = generate(model, prompts, max_new_tokens=24)
    single = [generate(model, [p], max_new_tokens=24)[0] for p in prompts]
    assert batched == single
    assert all(len(o) == 24 for o in batched)


def test_greedy_continuation_is_argmax_of_full_forward():
    model = tiny_model()
    prompt = [5, 9, 33, 2, 71]
    out = generate(model, [prompt], max_new_tokens=12)[0]
    seq = torch.tensor(prompt + out)
    ref = full_logits(model, seq)[len(prompt) - 1:-1].argmax(-1).tolist()
    assert out == ref


def test_greedy_is_deterministic_and_seeded_sampling_reproducible():
    model = tiny_model()
    prompts = [[3, 4, 5], [7]]
    assert generate(model, prompts, 16) == generate(model, prompts, 16)
    a = generate(model, prompts, 16, temperature=1.0, top_p=0.9, seed=7)
    b = generate(model, prompts, 16, temperature=1.0, top_p=0.9, seed=7)
    c = generate(model, prompts, 16, temperature=1.0, top_p=0.9, seed=8)
    assert a == b and a != c


def test_top_p_towards_zero_is_greedy():
    model = tiny_model("rope", "none")
    prompts = [[3, 4, 5], [8, 1, 2, 60, 61]]
    greedy = generate(model, prompts, 20)
    assert generate(model, prompts, 20, temperature=1.5, top_p=1e-9, seed=3) == greedy
    logits = torch.randn(6, VOCAB)
    assert torch.equal(sample_next(logits, 1.0, 1e-9), logits.argmax(-1))


def test_top_p_restricts_to_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, -1)
    draws = sample_next(logits, 1.0, 0.75, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75; 2 and 3 are cut


def test_eos_stops_a_row_and_stream_sees_every_token():
    model = tiny_model()
    free = generate(model, [[3, 4, 5], [9, 10]], 12)
    eos = free[0][3]
    seen = []
    out = generate(model, [[3, 4, 5], [9, 10]], 12, eos_id=eos, stream=lambda r, t: seen.append((r, t)))
    assert out[0] == free[0][:free[0].index(eos) + 1]
    assert out[1] == free[1][:free[1].index(eos) + 1] if eos in free[1] else out[1] == free[1]
    assert [t for r, t in seen if r == 0] == out[0] and [t for r, t in seen if r == 1] == out[1]


def test_tensor_prompts_accepted():
    model = tiny_model()
    assert generate(model, torch.tensor([3, 4, 5]), 5) == generate(model, [[3, 4, 5]], 5)


def test_bad_inputs_give_clear_errors():
    model = tiny_model()
    with pytest.raises(GenerationError, match="non-empty list"):
        generate(model, [], 5)
    with pytest.raises(GenerationError, match="prompt 2 is empty"):
        generate(model, [[1, 2], []], 5)
    with pytest.raises(GenerationError, match="configured maximum of 20 tokens"):
        generate(model, [list(range(18))], 5, max_length=20)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(model, [[1, VOCAB + 3]], 5)
    with pytest.raises(GenerationError, match="top_p"):
        generate(model, [[1]], 5, top_p=0.0)
    with pytest.raises(GenerationError, match="temperature"):
        generate(model, [[1]], 5, temperature=-1.0)


def test_incompatible_checkpoint_is_a_clear_error(tmp_path):
    run = make_run(tmp_path)
    save_config(tiny_config("p_rope", "scale_invariant", "model.d_model=96"), run / "config.yaml")
    with pytest.raises(IncompatibleCheckpointError, match=r"does not match.*\n.*shape"):
        load_model(run, device="cpu")
    save_config(tiny_config("p_rope", "logn"), run / "config.yaml")  # logn adds a parameter
    with pytest.raises(IncompatibleCheckpointError, match="missing tensor blocks.0.attn.logn_scale"):
        load_model(run, device="cpu")


def test_load_model_roundtrip(tmp_path):
    run = make_run(tmp_path, "alibi", "none")
    model, cfg, folder = load_model(run, device="cpu")
    assert folder.name == "step_1" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert model.inv_freq is None and model.alibi_slopes.dtype == torch.float32
    ref = tiny_model("alibi", "none")
    assert generate(model, [[4, 5, 6]], 8) == generate(ref, [[4, 5, 6]], 8)


# ----------------------------------------------------------------------------- the CLI
def load_launcher(name: str):
    """launch/<name>.py as a module (not on sys.path: launch/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli(argv, capsys):
    try:
        rc = load_launcher("generate").main(argv)
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_streams_text_and_reports_speed(tmp_path, capsys):
    import sentencepiece as spm

    run = make_run(tmp_path)
    rc, out, err = cli(["--run", str(run), "--prompt", "The quick brown", "--prompt", "Once upon",
                        "--max-new-tokens", "10", "--ignore-eos"], capsys)
    assert rc == 0, err
    assert out.startswith("The quick brown") and "Once upon" in out
    assert "tokens/s" in err and "10 new tokens" in err
    # the streamed text is the decoded greedy continuation
    sp = spm.SentencePieceProcessor(model_file=str(run / "tokenizer.model"))
    ids = [sp.bos_id()] + sp.encode("The quick brown")
    new = generate(tiny_model(), [ids], 10)[0]
    assert out.splitlines()[0] == sp.decode(ids + new)
    # --batch gives the same text
    rc2, out2, _ = cli(["--run", str(run), "--prompt", "The quick brown", "--prompt", "Once upon",
                        "--max-new-tokens", "10", "--ignore-eos", "--batch"], capsys)
    assert rc2 == 0 and out2 == out


def test_cli_prompt_file_and_sampling(tmp_path, capsys):
    run = make_run(tmp_path)
    f = tmp_path / "prompts.txt"
    f.write_text("Hello world\n\nScale invariant\n")
    argv = ["--run", str(run), "--prompt-file", str(f), "--max-new-tokens", "6", "--temperature", "0.9",
            "--top-p", "0.9", "--seed", "5"]
    rc, out, err = cli(argv, capsys)
    assert rc == 0, err
    assert out.count("\n") == 2 and "all prompts" in err
    assert cli(argv, capsys)[1] == out  # same seed, same text


@pytest.mark.parametrize("case", ["empty", "blank_file", "too_long", "incompatible", "no_run"])
def test_cli_bad_input(tmp_path, capsys, case):
    run = make_run(tmp_path)
    argv = ["--run", str(run), "--prompt", "Hello"]
    expect = ""
    if case == "empty":
        argv, expect = ["--run", str(run), "--prompt", "  "], "prompt 1 is empty"
    elif case == "blank_file":
        (tmp_path / "p.txt").write_text("\n \n")
        argv, expect = ["--run", str(run), "--prompt-file", str(tmp_path / "p.txt")], "no non-empty line"
    elif case == "too_long":
        argv = argv[:3] + ["The quick brown fox jumps over a dog " * 40, "--max-new-tokens", "8"]
        expect = f"configured maximum of {16 * TRAIN_LEN} tokens"
    elif case == "incompatible":
        save_config(tiny_config("p_rope", "scale_invariant", "model.n_layer=3"), run / "config.yaml")
        expect = "does not match the model"
    else:
        argv, expect = ["--run", str(tmp_path / "nope"), "--prompt", "Hi"], "does not exist"
    rc, out, err = cli(argv, capsys)
    assert rc == 2 and expect in err, err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- GPU (bf16)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("position,transform", [("p_rope", "scale_invariant"), ("alibi", "none"),
                                                ("p_rope", "logn")])
def test_gpu_cached_decoding(position, transform):
    """On CUDA: fp32 with the reference backend is exact as on CPU; bf16 with the configured
    backend (auto: fused kernel / FlexAttention prefill) tracks the bf16 full forward."""
    from scaleinv_dist.generate import cast_parameters

    cpu = tiny_model(position, transform)
    seq = torch.randint(0, VOCAB, (6 * TRAIN_LEN,), generator=torch.Generator().manual_seed(5)).cuda()
    n_prompt = TRAIN_LEN + 7
    for dtype, backend, tol in ((torch.float32, "reference", 1e-5), (torch.bfloat16, "auto", 0.15)):
        model = cast_parameters(tiny_model(position, transform).cuda(), dtype)
        model.attn_cfg.backend = backend
        with torch.no_grad():
            ref = model(seq[None], torch.arange(len(seq), device="cuda")[None])[0].float()
        logits, cache = prefill(model, seq[None, :n_prompt], torch.arange(n_prompt, device="cuda")[None],
                                max_len=len(seq), all_logits=True)
        diffs = [(logits[0] - ref[:n_prompt]).abs().max().item()]
        for p in range(n_prompt, len(seq)):
            out = decode_step(model, cache, seq[p:p + 1], torch.tensor([p], device="cuda"))
            diffs.append((out[0] - ref[p]).abs().max().item())
        assert max(diffs) < tol * max(1.0, ref.abs().max().item()), (dtype, backend, max(diffs))
    model = cast_parameters(tiny_model(position, transform).cuda(), torch.float32)
    prompts = [[3, 4, 5], list(range(10, 10 + TRAIN_LEN + 3))]
    assert generate(model, prompts, 16) == generate(cpu, prompts, 16)
