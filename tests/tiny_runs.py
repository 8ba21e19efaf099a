"""Tiny random-init models, a packed token batch and hand-made run directories for the model,
compile, generation and export tests."""
import io
from pathlib import Path

import torch

from scaleinv_dist.config import load_config, save_config
from scaleinv_dist.loss import IGNORE_INDEX
from scaleinv_dist.model import build_model
from scaleinv_dist.run_dir import save_weights, write_manifest

TRAIN_LEN = 16
VOCAB = 96
SCHEMES = [("p_rope", "scale_invariant"), ("rope", "none"), ("nope", "none"), ("alibi", "none"),
           ("p_rope", "logn")]
TEXT = ["The quick brown fox jumps over the lazy dog.", "Scale invariant attention keeps long context sharp.",
        "Once upon a time there was a tiny language model.", "Hello world, this is a small corpus."] * 40


def packed_batch(vocab: int, rows: int, n: int, seed: int = 0, docs: bool = True):
    """(tokens, positions, doc_ids, labels), each (rows, n), random tokens and labels below vocab, the
    last label of each row ignored. docs: the second row packs two documents (positions restart)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, n), generator=g)
    labels = torch.randint(0, vocab, (rows, n), generator=g)
    labels[:, -1] = IGNORE_INDEX
    positions = torch.arange(n).repeat(rows, 1)
    doc_ids = torch.zeros(rows, n, dtype=torch.long)
    if docs:
        doc_ids[1, n // 2:] = 1
        positions[1, n // 2:] -= n // 2
    return tokens, positions, doc_ids, labels


def tiny_config(position="p_rope", transform="scale_invariant", *extra):
    return load_config(None, ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.n_kv_head=2",
                              "model.init_std=0.1", f"attention.position={position}",
                              f"attention.transform={transform}", f"train.seq_len={TRAIN_LEN}",
                              "attention.p_rope_base=16", "attention.backend=reference", *extra])


def tiny_model(position="p_rope", transform="scale_invariant", seed=0, vocab=VOCAB):
    torch.manual_seed(seed)
    model = build_model(tiny_config(position, transform), vocab_size=vocab).eval()
    if transform == "logn":  # make the LogN scale matter: distinct per-head values
        for block in model.blocks:
            block.attn.logn_scale.data.uniform_(0.2, 0.7)
    return model


def make_run(tmp_path: Path, position="p_rope", transform="scale_invariant", name=None) -> Path:
    """A run directory made by hand: config.yaml, tokenizer.model, checkpoints/step_1/model.safetensors."""
    import sentencepiece as spm

    run = tmp_path / (name or f"run_{position}_{transform}")
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_writer=buf, vocab_size=VOCAB,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    (run / "tokenizer.model").write_bytes(buf.getvalue())
    save_config(tiny_config(position, transform), run / "config.yaml")
    save_weights(tiny_model(position, transform), run / "checkpoints" / "step_1")
    write_manifest(run / "checkpoints" / "step_1")  # as every published checkpoint has
    (run / "checkpoints" / "latest").write_text("step_1")
    return run
