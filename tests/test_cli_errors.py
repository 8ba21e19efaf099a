"""Every user mistake at an entry point is one `error: ...` line on stderr and exit code 2.

Each case runs a launch/ script as a subprocess with one broken input (the table of docs/errors.md)
and checks: exit code EXIT_USAGE, exactly one non-empty stderr line, no traceback, and the words
that name the problem. All cases fail while loading the config, run or data, before any training.
One case per error path and entry point (each process costs seconds of imports); the messages
themselves are unit-tested in test_config.py, test_data.py, test_generate.py and test_evaluate.py.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaleinv_dist.cli import EXIT_USAGE
from tiny_runs import make_run

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks CUDA-only options without CUDA")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Broken files and run directories, made once: {name: path}."""
    d = tmp_path_factory.mktemp("broken")
    files = {
        "bad_yaml": b"model: [\n",
        "scalar_section": b"model: 3\n",
        "latin1_yaml": b"model:\n  n_layer: 2 # \xe9\n",
        "ok_yaml": (f"run: {{out_dir: '{d / 'out_train'}'}}\nmodel: {{n_layer: 1, d_model: 32, n_head: 2}}\n"
                    "train: {seq_len: 16, steps: 1}\n").encode(),
        "latin1_txt": b"caf\xe9 au lait\n" * 20,
        "fake_model": b"this is not a sentencepiece model\n",
    }
    paths = {}
    for name, data in files.items():
        paths[name] = d / name.replace("_yaml", ".yaml").replace("_txt", ".txt").replace("_model", ".model")
        paths[name].write_bytes(data)
    (d / "text").mkdir()
    for i in range(8):  # a small corpus of distinct documents, so a bad tokenizer fails fast
        rng = random.Random(i)
        words = ("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)) for _ in range(300))
        (d / "text" / f"doc{i}.txt").write_text(" ".join(words))
    paths["text_dir"] = d / "text"

    run = make_run(d, name="run")  # a good run: config.yaml, tokenizer.model, one checkpoint
    paths["run"] = run
    shape = make_run(d, name="run_shape")  # the config no longer builds the checkpoint's shapes
    cfg = shape / "config.yaml"
    cfg.write_text(cfg.read_text().replace("d_model: 64", "d_model: 32"))
    paths["run_shape"] = shape
    old = make_run(d, name="run_other_version")  # a config key this version does not know
    cfg = old / "config.yaml"
    cfg.write_text(cfg.read_text().replace("  tau: 10.0\n", "  tau: 10.0\n  tau_schedule: none\n"))
    paths["run_other_version"] = old
    bad_tok = make_run(d, name="run_bad_tokenizer")
    (bad_tok / "tokenizer.model").write_bytes(files["fake_model"])
    paths["run_bad_tokenizer"] = bad_tok
    damaged = make_run(d, name="run_damaged")
    (damaged / "checkpoints" / "step_1" / "model.safetensors").write_bytes(b"garbage")
    paths["run_damaged"] = damaged
    paths["missing"] = d / "does_not_exist"
    paths["out"] = d / "out"
    paths["out_train"] = d / "out_train"
    paths["cache"] = d / "cache"
    return paths


def case(name, script, argv, words, cuda_free=False):
    """One broken input: argv with {name} placeholders for `inputs`; words the message must hold."""
    return pytest.param(script, argv, words, id=name, marks=[NO_CUDA] if cuda_free else [])


CASES = [
    # train: the config file and its overrides
    case("train-bad-yaml", "train", ["--config", "{bad_yaml}"], ["not valid YAML", "line 2"]),
    case("train-section-not-a-mapping", "train", ["--config", "{scalar_section}"], ["section 'model'"]),
    case("train-yaml-not-utf8", "train", ["--config", "{latin1_yaml}"], ["not UTF-8", "save it as UTF-8"]),
    case("train-bad-flag", "train", ["--config", "{ok_yaml}", "--steps", "3"], ["unrecognized arguments"]),
    case("train-cp-shape", "train", ["--config", "{ok_yaml}", "parallel.context_parallel_size=4",
                                     "train.seq_len=20"], ["use a multiple of 8"]),
    # train: data and tokenizer
    case("train-data-not-utf8", "train", ["--config", "{ok_yaml}", "data.path={latin1_txt}"], ["UTF-8"]),
    case("train-tokenizer-not-sentencepiece", "train",
         ["--config", "{ok_yaml}", "data.path={text_dir}", "data.tokenizer={fake_model}"],
         ["not a sentencepiece model", "data.tokenizer"]),
    # train: resuming a run directory of another model (make_run's d_model is 64, ok_yaml's 32)
    case("train-resume-other-shape", "train", ["--config", "{ok_yaml}", "run.out_dir={run}"],
         ["holds a checkpoint of another model", "checkpoint has shape"]),
    # train: CUDA-only options on a machine without CUDA
    case("train-triton-on-cpu", "train", ["--config", "{ok_yaml}", "attention.backend=triton"],
         ["needs a CUDA GPU", "TRITON_INTERPRET=1"], cuda_free=True),
    case("train-cuda-on-cpu", "train", ["--config", "{ok_yaml}", "run.device=cuda"], ["run.device=cuda"],
         cuda_free=True),
    # sweep
    case("sweep-bad-yaml", "sweep", ["--config", "{bad_yaml}", "--out", "{out}"], ["not valid YAML"]),
    # eval: the run directory and its checkpoint
    case("eval-no-run", "eval", ["--run", "{missing}"], ["does not exist"]),
    case("eval-other-shape", "eval", ["--run", "{run_shape}"],
         ["does not match the model", "config.yaml edited"]),
    case("eval-other-version", "eval", ["--run", "{run_other_version}"],
         ["unknown config key 'attention.tau_schedule'"]),
    case("eval-damaged-checkpoint", "eval", ["--run", "{run_damaged}"], ["damaged", "model.safetensors"]),
    case("eval-cuda-on-cpu", "eval", ["--run", "{run}", "--device", "cuda"], ["CUDA is not available"],
         cuda_free=True),
    case("eval-triton-on-cpu", "eval", ["--run", "{run}", "attention.backend=triton"],
         ["needs a CUDA GPU"], cuda_free=True),
    # score_stats
    case("score-stats-no-run", "score_stats", ["--run", "{missing}"], ["does not exist"]),
    # niah
    case("niah-bad-depths", "niah", ["--run", "{run}", "--depths", "0,2"], ["fractions in [0, 1]"]),
    case("niah-bad-flag-value", "niah", ["--run", "{run}", "--samples", "x"], ["invalid int value"]),
    # generate
    case("generate-tokenizer-not-sentencepiece", "generate",
         ["--run", "{run_bad_tokenizer}", "--prompt", "Hi"], ["not a sentencepiece model"]),
    case("generate-prompt-file-missing", "generate", ["--run", "{run}", "--prompt-file", "{missing}"],
         ["cannot read --prompt-file"]),
    case("generate-triton-on-cpu", "generate",
         ["--run", "{run}", "--prompt", "Hi", "attention.backend=triton"],
         ["needs a CUDA GPU"], cuda_free=True),
    # export
    case("export-no-run", "export", ["--run", "{missing}", "--out", "{out}"], ["does not exist"]),
    case("export-tokenizer-not-sentencepiece", "export", ["--run", "{run_bad_tokenizer}", "--out", "{out}"],
         ["not a sentencepiece model"]),
]


@pytest.mark.parametrize("script,argv,words", CASES)
def test_user_mistake_is_one_line_and_exit_2(inputs, train_env, script, argv, words):
    args = [a.format(**{k: str(v) for k, v in inputs.items()}) for a in argv]
    env = {k: v for k, v in train_env.items() if k != "TRITON_INTERPRET"}
    env["SCALEINV_CACHE"] = str(inputs["cache"])  # a private cache: data errors are not cached
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / f"{script}.py"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for w in words:
        assert w in lines[0], lines[0]
    for out in (inputs["out"], inputs["out_train"]):  # nothing was written
        assert not os.path.exists(out) or not any(Path(out).iterdir()), sorted(Path(out).rglob("*"))


def test_one_line_keeps_every_line_of_a_long_message():
    from scaleinv_dist.cli import one_line

    text = "checkpoint X does not match:\n  a: shape (1,)\n  b: shape (2,)\nWas config.yaml edited?"
    assert one_line(text) == ("checkpoint X does not match: a: shape (1,); b: shape (2,); "
                              "Was config.yaml edited?")
    assert one_line("one line") == "one line"
