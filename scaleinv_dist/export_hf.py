"""Export a trained run as a Hugging Face-style folder that transformers loads with remote code.

    export_run("runs/tiny", "exports/tiny")        # or: python launch/export.py --run runs/tiny --out exports/tiny

writes

    model.safetensors            the weights, same tensor names as scaleinv_dist's GPT (float32 by default)
    config.json                  model_type "scaleinv_gpt", auto_map -> the two files below
    configuration_scaleinv.py    } standalone remote code: torch + transformers only, copied verbatim
    modeling_scaleinv.py         } from scaleinv_dist/hf_template/
    tokenization_scaleinv.py     the sentencepiece tokenizer for AutoTokenizer (needs sentencepiece)
    tokenizer.model              the run's sentencepiece model
    tokenizer_config.json, special_tokens_map.json, generation_config.json, README.md

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    AutoTokenizer.from_pretrained(folder, trust_remote_code=True)

Exporting needs neither transformers nor a GPU. The modeling file is a readable template kept in
the package (not generated): tests/test_export.py checks its logits against scaleinv_dist's model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .config import ConfigError, to_dict

TEMPLATE_DIR = Path(__file__).resolve().parent / "hf_template"
REMOTE_FILES = ("configuration_scaleinv.py", "modeling_scaleinv.py", "tokenization_scaleinv.py")
MODEL_TYPE = "scaleinv_gpt"
DEFAULT_MAX_LENGTH_MULTIPLE = 16  # max_position_embeddings hint: 16x the training length


class ExportError(ConfigError):
    """A user-facing export mistake (existing output folder, missing tokenizer...)."""


def hf_config(model, cfg, *, bos_id=None, eos_id=None, pad_id=None, dtype: str = "float32") -> dict:
    """config.json contents for a scaleinv_dist GPT and its Config."""
    m, a = model.cfg, cfg.attention
    attn = model.blocks[0].attn
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["ScaleInvForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_scaleinv.ScaleInvConfig",
            "AutoModelForCausalLM": "modeling_scaleinv.ScaleInvForCausalLM",
        },
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": attn.n_head,
        "num_key_value_heads": attn.n_kv_head,
        "head_dim": attn.head_dim,
        "intermediate_size": model.blocks[0].mlp.fc.out_features,
        "position": a.position,
        "transform": a.transform,
        "tau": a.tau,
        "rope_base": a.rope_base,
        "p_rope_base": a.p_rope_base,
        "p_rope_fraction": a.p_rope_fraction,
        "train_seq_len": cfg.train.seq_len,
        "max_position_embeddings": DEFAULT_MAX_LENGTH_MULTIPLE * cfg.train.seq_len,
        "initializer_range": m.init_std,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "scaleinv_dist_config": to_dict(cfg),  # the full training config, for provenance
    }


def _special_ids(tokenizer_path: Path | None):
    if tokenizer_path is None:
        return None, None, None, {}
    from .data.tokenizer import RUN_TOKENIZER_FIX, load_sentencepiece

    sp, _ = load_sentencepiece(tokenizer_path, fix=RUN_TOKENIZER_FIX)

    def valid(i):
        return i if 0 <= i < sp.get_piece_size() else None

    bos, eos, unk, pad = valid(sp.bos_id()), valid(sp.eos_id()), valid(sp.unk_id()), valid(sp.pad_id())
    pad = pad if pad is not None else eos  # no pad piece: pad with EOS (masked out anyway)
    pieces = {name: sp.id_to_piece(i) for name, i in
              (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)) if i is not None}
    return bos, eos, pad, pieces


def _model_card(cfg, source: str, has_tokenizer: bool) -> str:
    a = cfg.attention
    tok = ("tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)\n"
           "ids = tok(\"Once upon a time\", return_tensors=\"pt\").input_ids\n"
           "out = model.generate(ids, max_new_tokens=32, do_sample=False)\n"
           "print(tok.decode(out[0], skip_special_tokens=True))\n") if has_tokenizer else ""
    return f"""# scaleinv_dist GPT ({a.position}, transform={a.transform}, tau={a.tau})

Exported from `{source}` by scaleinv_dist (`launch/export.py`). Trained at sequence length
{cfg.train.seq_len}; {cfg.model.n_layer} layers, d_model {cfg.model.d_model}, {cfg.model.n_head} heads.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = "."
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
{tok}```

Limits of this portable implementation: reference attention in plain PyTorch that materialises
the (batch, heads, queries, keys) logits (O(N^2) memory: long contexts need scaleinv_dist's fused
kernel instead), no sequence parallelism, no FlashAttention / SDPA path, no static cache or
torch.compile support. The KV cache (transformers' DynamicCache) is supported for `generate()`.
"""


def export_run(run_dir: str | Path, out: str | Path, *, checkpoint: str | Path | None = None,
               dtype: str = "float32", overwrite: bool = False, add_bos_token: bool = True,
               overrides=()) -> Path:
    """Write the Hugging Face folder `out` for a run's latest (or given) checkpoint; returns out."""
    from safetensors.torch import save_file

    from .generate import load_model

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ExportError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ExportError(f"output folder {out} exists and is not empty; pass --overwrite or another --out")
        if out.resolve() in (run_dir.resolve(), *run_dir.resolve().parents):
            raise ExportError(f"refusing to overwrite {out}: it holds the run directory")
    model, cfg, folder = load_model(run_dir, checkpoint, device="cpu", dtype=torch.float32, overrides=overrides)
    tok_path = run_dir / "tokenizer.model"
    if not tok_path.is_file() and cfg.data.tokenizer and Path(cfg.data.tokenizer).is_file():
        tok_path = Path(cfg.data.tokenizer)
    tok_path = tok_path if tok_path.is_file() else None
    bos, eos, pad, pieces = _special_ids(tok_path)

    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch_dtype = getattr(torch, dtype)
    state = {k: v.detach().to(torch_dtype).cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "model.safetensors").chmod(0o644)
    config = hf_config(model, cfg, bos_id=bos, eos_id=eos, pad_id=pad, dtype=dtype)
    config["scaleinv_source"] = {"run_dir": str(run_dir), "checkpoint": str(folder)}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": False}
    (tmp / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None
                                                            or k == "do_sample"}, indent=2) + "\n")
    for name in REMOTE_FILES:
        shutil.copyfile(TEMPLATE_DIR / name, tmp / name)
    if tok_path is not None:
        shutil.copyfile(tok_path, tmp / "tokenizer.model")
        tok_cfg = {
            "tokenizer_class": "ScaleInvTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_scaleinv.ScaleInvTokenizer", None]},
            "add_bos_token": bool(add_bos_token), "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "padding_side": "left",
            "model_max_length": config["max_position_embeddings"], **pieces,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps(pieces, indent=2) + "\n")
    (tmp / "README.md").write_text(_model_card(cfg, str(run_dir), tok_path is not None))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out
