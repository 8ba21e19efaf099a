"""The exported Hugging Face folder, loaded through transformers, against scaleinv_dist's model (CPU, fp32)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'transformers>=5' or .[test])")

from scaleinv_dist.export_hf import ExportError, export_run  # noqa: E402
from scaleinv_dist.generate import generate, load_model  # noqa: E402
from scaleinv_dist.config import save_config  # noqa: E402
from tiny_runs import SCHEMES, TRAIN_LEN, VOCAB, make_run, tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def load_hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).float().eval()


@pytest.mark.parametrize("position,transform", SCHEMES, ids=[f"{p}+{t}" for p, t in SCHEMES])
def test_exported_model_matches_logits_and_greedy(tmp_path, position, transform):
    run = make_run(tmp_path, position, transform)
    folder = export_run(run, tmp_path / f"hf_{position}_{transform}")
    ours, _, _ = load_model(run, device="cpu")
    hf = load_hf(folder)
    assert type(hf).__name__ == "ScaleInvForCausalLM" and hf.config.model_type == "scaleinv_gpt"
    tokens = torch.randint(0, VOCAB, (2, 3 * TRAIN_LEN + 5), generator=torch.Generator().manual_seed(1))
    n = tokens.shape[1]
    with torch.no_grad():
        a = ours(tokens, torch.arange(n)[None].expand(2, n))
        b = hf(input_ids=tokens).logits
        # explicit positions (an offset window) go through position_ids
        c = ours(tokens, 40 + torch.arange(n)[None].expand(2, n))
        d = hf(input_ids=tokens, position_ids=40 + torch.arange(n)[None]).logits
    assert a.abs().max() > 1.0
    assert (a - b).abs().max().item() < 1e-5
    assert (c - d).abs().max().item() < 1e-5
    # greedy continuation past the training length: ours vs transformers' generate (KV cache)
    prompt = tokens[:1, :TRAIN_LEN + 3]
    mine = generate(ours, prompt, 2 * TRAIN_LEN)[0]
    theirs = hf.generate(prompt, max_new_tokens=2 * TRAIN_LEN, do_sample=False, eos_token_id=None,
                         pad_token_id=None)
    assert theirs[0, prompt.shape[1]:].tolist() == mine


def test_generate_without_cache_and_batched_left_padding(tmp_path):
    from transformers import AutoTokenizer

    run = make_run(tmp_path)
    folder = export_run(run, tmp_path / "hf")
    ours, _, _ = load_model(run, device="cpu")
    hf = load_hf(folder)
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    prompts = [[1, 40, 41], [1, 7, 8, 9, 10, 11, 12, 13, 14]]
    mine = generate(ours, prompts, 12)
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
    assert batch["attention_mask"][0].tolist()[:6] == [0] * 6  # left padding
    cached = hf.generate(**batch, max_new_tokens=12, do_sample=False, eos_token_id=None)
    uncached = hf.generate(**batch, max_new_tokens=12, do_sample=False, eos_token_id=None, use_cache=False)
    assert cached[:, 9:].tolist() == mine
    assert uncached[:, 9:].tolist() == mine


def test_tokenizer_encodes_like_sentencepiece(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    run = make_run(tmp_path)
    folder = export_run(run, tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(run / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    for text in ["The quick brown fox", "Hello  world,\tunseen ü characters!", " leading space"]:
        assert tok(text)["input_ids"] == [sp.bos_id()] + sp.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert tok.eos_token_id == sp.eos_id() and tok.bos_token_id == sp.bos_id()


def test_exported_folder_contents_and_no_package_import(tmp_path):
    run = make_run(tmp_path, "alibi", "none")
    folder = export_run(run, tmp_path / "hf_alone")
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_scaleinv.py", "configuration_scaleinv.py",
            "tokenization_scaleinv.py", "tokenizer.model", "tokenizer_config.json",
            "generation_config.json", "README.md"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_scaleinv.ScaleInvForCausalLM"
    assert config["position"] == "alibi" and config["train_seq_len"] == TRAIN_LEN
    for name in ("modeling_scaleinv.py", "configuration_scaleinv.py", "tokenization_scaleinv.py"):
        imports = [line for line in (folder / name).read_text().splitlines()
                   if line.lstrip().startswith(("import ", "from "))]
        assert imports and not any("scaleinv_dist" in line for line in imports), imports
    # load and run in a fresh interpreter where importing scaleinv_dist fails
    code = (
        "import sys; sys.modules['scaleinv_dist'] = None\n"
        "import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        f"t = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        "ids = t('The quick brown', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=5, do_sample=False)\n"
        "print('OK', out.shape[1] - ids.shape[1])\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_bfloat16_export_loads(tmp_path):
    from safetensors import safe_open

    run = make_run(tmp_path)
    folder = export_run(run, tmp_path / "hf_bf16", dtype="bfloat16")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.get_tensor("wte.weight").dtype == torch.bfloat16
    ours, _, _ = load_model(run, device="cpu")
    hf = load_hf(folder)
    tokens = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        diff = (ours(tokens, torch.arange(20)[None]) - hf(input_ids=tokens).logits).abs().max().item()
    assert diff < 0.1  # bf16 rounding of the weights only


def test_export_errors(tmp_path):
    run = make_run(tmp_path)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export_run(run, out)
    export_run(run, out, overwrite=True)
    assert not (out / "something").exists() and (out / "config.json").is_file()
    save_config(tiny_config("p_rope", "scale_invariant", "model.d_model=32"), run / "config.yaml")
    with pytest.raises(ValueError, match="does not match"):
        export_run(run, tmp_path / "other")


def test_export_cli_with_verify(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("launch_export", ROOT / "launch" / "export.py")
    launch_export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_export)
    run = make_run(tmp_path, "p_rope", "logn")
    rc = launch_export.main(["--run", str(run), "--out", str(tmp_path / "cli_out"), "--verify"])
    out = capsys.readouterr().out
    assert rc == 0 and "verify: max |logit difference|" in out and "(ok)" in out, out
    with pytest.raises(SystemExit) as exc:
        launch_export.main(["--run", str(run), "--out", str(tmp_path / "cli_out")])
    assert exc.value.code == 2 and "not empty" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_exported_model_on_gpu(tmp_path):
    run = make_run(tmp_path, "p_rope", "scale_invariant")
    folder = export_run(run, tmp_path / "hf_gpu")
    ours, _, _ = load_model(run, device="cpu")
    hf = load_hf(folder).cuda()
    tokens = torch.randint(0, VOCAB, (2, 3 * TRAIN_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(tokens, torch.arange(tokens.shape[1])[None].expand(2, -1))
        b = hf(input_ids=tokens.cuda()).logits.cpu()
    assert (a - b).abs().max().item() < 1e-4
    prompt = tokens[:1, :TRAIN_LEN]
    mine = generate(ours, prompt, 16)[0]
    theirs = hf.generate(prompt.cuda(), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=None)
    assert theirs[0, TRAIN_LEN:].tolist() == mine
    hf_bf16 = hf.to(torch.bfloat16)
    with torch.no_grad():
        c = hf_bf16(input_ids=tokens.cuda()).logits.float().cpu()
    assert (a - c).abs().max().item() < 0.15 * a.abs().max().item()
