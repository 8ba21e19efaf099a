"""Config loading: every shipped config, typed overrides, and one-line errors for user mistakes."""
from pathlib import Path

import pytest

from scaleinv_dist.config import Config, ConfigError, load_config, save_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "paper-162m.yaml", "paper-304m.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.train.steps >= 1 and cfg.train.seq_len >= 2
    assert cfg.attention.transform in ("scale_invariant", "none", "logn")


def test_paper_configs_match_the_paper():
    c162 = load_config(ROOT / "configs" / "paper-162m.yaml")
    assert (c162.model.n_layer, c162.model.d_model, c162.model.n_head) == (12, 768, 6)
    assert c162.model.d_model // c162.model.n_head == 128
    c304 = load_config(ROOT / "configs" / "paper-304m.yaml")
    assert (c304.model.n_layer, c304.model.d_model, c304.model.n_head) == (16, 1024, 8)


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg.attention.transform == "scale_invariant" and cfg.attention.position == "p_rope"


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "train.steps=20", "train.lr=0.001", "attention.position=rope", "run.progress=false",
        "run.out_dir=runs/x", "eval.length_multiples=[1, 2]", "eval.context_lengths=512",
        "attention.tau=5", "model.n_layer=2.0",
    ])
    assert cfg.train.steps == 20 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.attention.position == "rope"
    assert cfg.run.progress is False
    assert cfg.run.out_dir == "runs/x"
    assert cfg.eval.length_multiples == [1.0, 2.0]
    assert cfg.eval.context_lengths == [512]
    assert cfg.attention.tau == 5.0 and isinstance(cfg.attention.tau, float)
    assert cfg.model.n_layer == 2 and isinstance(cfg.model.n_layer, int)


def test_exponent_without_dot_is_a_number():
    """YAML 1.1 reads 1e-3 (no dot) as a string; float keys still accept it, and reject words."""
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3
    with pytest.raises(ConfigError, match="must be a number"):
        load_config(None, ["train.lr=fast"])


def test_later_override_wins():
    cfg = load_config(None, ["train.steps=3", "train.steps=7"])
    assert cfg.train.steps == 7


def _error(*overrides, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg, "errors are one line"
    return msg


def test_unknown_key_suggests_nearest():
    msg = _error("train.step=5")
    assert "train.step" in msg and "train.steps" in msg
    msg = _error("atention.tau=5")
    assert "attention" in msg
    msg = _error("model.nlayer=3")
    assert "model.n_layer" in msg


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  warmup_step: 3\n")
    msg = _error(path=p)
    assert "train.warmup_step" in msg and "train.warmup_steps" in msg


def test_key_without_section():
    msg = _error("steps=5")
    assert "section.key" in msg


def test_bad_choice_lists_the_valid_ones():
    msg = _error("attention.position=rotary")
    assert "rotary" in msg and "p_rope" in msg and "alibi" in msg
    msg = _error("train.nan_policy=ignore")
    assert "stop" in msg and "skip" in msg


@pytest.mark.parametrize("override,word", [
    ("train.steps=abc", "integer"),
    ("train.steps=1.5", "integer"),
    ("train.lr=fast", "number"),
    ("run.progress=maybe", "true or false"),
    ("train.steps=true", "integer"),
])
def test_bad_type(override, word):
    msg = _error(override)
    assert override.split("=")[0] in msg and word in msg


def test_override_without_equals():
    msg = _error("train.steps")
    assert "key=value" in msg


@pytest.mark.parametrize("overrides,words", [
    (["model.d_model=100", "model.n_head=3"], ["d_model", "n_head"]),
    (["model.n_head=4", "model.n_kv_head=3"], ["n_kv_head"]),
    (["attention.position=alibi", "attention.transform=scale_invariant"], ["alibi", "transform=none"]),
    (["attention.p_rope_fraction=1.5"], ["p_rope_fraction"]),
    (["train.seq_len=1"], ["seq_len"]),
    (["data.val_fraction=0"], ["val_fraction"]),
    (["parallel.context_parallel_size=4", "parallel.ulysses_degree=3"], ["ulysses_degree"]),
])
def test_cross_field_errors(overrides, words):
    msg = _error(*overrides)
    for w in words:
        assert w in msg


def test_missing_config_file(tmp_path):
    msg = _error(path=tmp_path / "nope.yaml")
    assert "not found" in msg and "nope.yaml" in msg


def test_top_level_not_a_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    msg = _error(path=p)
    assert "mapping" in msg


def test_yaml_is_parsed_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("run:\n  out_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception) as info:
        load_config(p)
    assert "pwned" not in str(info.value) or "python/object" in str(info.value)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.steps=9", "model.vocab_size=300"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_deepspeed_config_mapping():
    from scaleinv_dist.train.engine import deepspeed_config
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "run.device=cpu", "train.micro_batch_size=3", "train.grad_accum=2", "train.zero_stage=2",
        "train.grad_clip=0.5"])
    ds = deepspeed_config(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and "torch_autocast" not in ds  # CPU: fp32
    bf16 = deepspeed_config(load_config(ROOT / "configs" / "tiny.yaml", ["run.dtype=bfloat16"]))
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16",  # fp32 master weights
                                      "lower_precision_safe_modules": []}  # and fp32 gradient reduction
    assert bf16["bf16"]["enabled"] is False
    assert "optimizer" not in ds  # client optimizer: no DeepSpeed optimizer op to build
    bad = load_config(None, ["train.zero_stage=4"])
    with pytest.raises(ConfigError, match="zero_stage"):
        deepspeed_config(bad)


def test_muon_with_zero_is_a_clear_error():
    import torch

    from scaleinv_dist.train.optim import build_optimizer
    cfg = load_config(None, ["train.optimizer=muon", "train.zero_stage=1"])
    with pytest.raises(ConfigError, match="zero_stage=0"):
        build_optimizer(torch.nn.Linear(4, 4), cfg)


@pytest.mark.parametrize("overrides, msg", [
    (["parallel.context_parallel_size=4", "train.seq_len=100"], "use a multiple of 8"),
    (["parallel.context_parallel_size=4", "parallel.cp_strategy=ulysses", "model.n_head=6",
      "model.d_model=192"], "does not divide the 6 query heads"),
])
def test_context_parallel_shapes_are_checked_at_load_time(overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, overrides)


@pytest.mark.parametrize("text,words", [
    (b"model: [\n", ["not valid YAML", "line 2, column 1", "fix the syntax"]),
    (b"train:\n\tsteps: 3\n", ["not valid YAML", "line 2"]),
    (b"model:\n  n_layer: 2 # caf\xe9\n", ["not UTF-8", "save it as UTF-8"]),
    (b"model: 3\n", ["section 'model' must be a mapping"]),
    (b"train:\n  steps: {a: 1}\n", ["train.steps must be a value, not a mapping"]),
    (b"trian:\n  steps: 3\n", ["unknown config section 'trian'", "did you mean 'train'"]),
    (b"train:\n  stepz: 3\n", ["bad.yaml: unknown config key 'train.stepz'", "train.steps"]),
])
def test_broken_yaml_files_are_one_line(tmp_path, text, words):
    p = tmp_path / "bad.yaml"
    p.write_bytes(text)
    msg = _error(path=p)
    for w in words:
        assert w in msg, msg


def test_config_path_is_a_folder(tmp_path):
    assert "is a folder" in _error(path=tmp_path)


def test_empty_section_is_allowed(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("eval:\n  # nothing set here\ntrain:\n  steps: 3\n")
    assert load_config(p).train.steps == 3


def test_override_with_broken_yaml_value():
    msg = _error("model.n_layer=[")
    assert "cannot parse the value of 'model.n_layer'" in msg and "quote it" in msg


def test_cp_strategy_names_come_from_the_table():
    from scaleinv_dist.parallel.layouts import CP_STRATEGIES

    for name in CP_STRATEGIES:
        assert load_config(None, [f"parallel.cp_strategy={name}"]).parallel.cp_strategy == name
    msg = _error("parallel.cp_strategy=stripes")
    assert "stripes" in msg and ", ".join(CP_STRATEGIES) in msg


def test_triton_backend_needs_cuda(monkeypatch):
    from scaleinv_dist.config import check_device

    cfg = load_config(None, ["attention.backend=triton"])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="attention.backend=triton needs a CUDA GPU"):
        check_device(cfg, "cpu")
    check_device(cfg, "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs the kernel on CPU
    check_device(cfg, "cpu")
    check_device(load_config(None, ["run.dtype=bfloat16", "train.activation_checkpointing=offload"]), "cpu")
