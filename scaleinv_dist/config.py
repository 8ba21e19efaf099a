"""One config tree of dataclasses, loaded from YAML and overridable by dotted `key=value` arguments.

    cfg = load_config("configs/tiny.yaml", ["train.steps=20", "attention.position=rope"])

Unknown keys and bad values raise ConfigError naming the key and the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A user-facing configuration mistake (bad key, bad value, missing file)."""


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    log_every: int = 10  # steps between log lines / metrics.jsonl records
    progress: bool = True  # progress bar on rank 0
    wandb: str = "offline"  # offline | online | disabled
    wandb_project: str = "scaleinv-dist"


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: the tokenizer's vocabulary size
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 4
    n_kv_head: int = 0  # 0: same as n_head (no grouped-query attention)
    head_dim: int = 0  # 0: d_model // n_head
    mlp_ratio: float = 4.0
    init_std: float = 0.02


@dataclass
class AttentionConfig:
    transform: str = "scale_invariant"  # scale_invariant | none | logn
    position: str = "p_rope"  # p_rope | rope | nope | alibi
    tau: float = 10.0  # tokens; the scale-invariant transform's local-region size
    backend: str = "auto"  # auto | hopper | triton | flex | reference
    rope_base: float = 10000.0  # rope
    p_rope_base: float = 1024.0  # p_rope: the longest wavelength is 2*pi*base tokens
    p_rope_fraction: float = 0.5  # p_rope: fraction of rotary channel pairs that rotate


@dataclass
class DataConfig:
    path: str = ""  # file, directory or glob of .txt/.jsonl/.json/.parquet; "" = embedded corpus
    hub_name: str = ""  # a Hugging Face hub dataset name (needs network); used when path == ""
    text_field: str = "text"  # column holding the document text (jsonl / parquet / hub)
    tokenizer: str = ""  # a sentencepiece .model file; "" = train one on the training split
    vocab_size: int = 4096  # when training a tokenizer
    val_fraction: float = 0.1  # fraction of documents held out for validation
    cache_dir: str = ""  # tokenizer and token arrays; "" = ~/.cache/scaleinv_dist
    document_masking: bool = True  # packed documents don't attend across boundaries
    max_documents: int = 0  # 0 = all


@dataclass
class TrainConfig:
    steps: int = 200
    seq_len: int = 256
    micro_batch_size: int = 8  # sequences per rank per micro step
    grad_accum: int = 1
    optimizer: str = "adamw"  # adamw | muon (Muon for 2-D hidden matrices, AdamW for the rest)
    lr: float = 3e-3  # AdamW lr (embeddings, head, norms, gains; all params for adamw)
    muon_lr: float = 0.02
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 10
    cooldown_fraction: float = 0.3  # wsd: final fraction of steps decaying linearly to min_lr
    min_lr_ratio: float = 0.1
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    activation_checkpointing: str = "none"  # none | selective | full | offload | auto (memory.py)
    loss_chunk_tokens: int = 8192  # cross-entropy chunk; full logits are never materialised
    compile: bool = True  # torch.compile the blocks around the attention call (CUDA only;
    #                       steps 1.16x to 1.69x faster on an H200, docs/training.md)
    checkpoint_every: int = 100  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps; 0 = no evaluation during training
    eval_tokens: int = 65536  # validation tokens per evaluation during training
    nan_policy: str = "stop"  # stop | skip: what a non-finite loss does
    collective_timeout_s: int = 600  # a dead rank makes the others exit after this


@dataclass
class EvalConfig:
    length_multiples: list[float] = field(default_factory=lambda: [1.0, 4.0, 16.0])
    context_lengths: list[int] = field(default_factory=list)  # absolute; overrides multiples
    max_tokens: int = 0  # validation tokens per length; 0 = all
    batch_size: int = 1


@dataclass
class ParallelConfig:
    context_parallel_size: int = 1
    cp_strategy: str = "zigzag"  # ring | zigzag | ulysses | hybrid: parallel.layouts.CP_STRATEGIES
    ulysses_degree: int = 1  # hybrid: all-to-all degree inside; ring across


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


CHOICES = {
    "run.device": ("auto", "cpu", "cuda"),
    "run.dtype": ("auto", "float32", "bfloat16"),
    "run.wandb": ("offline", "online", "disabled"),
    "attention.transform": ("scale_invariant", "none", "logn"),
    "attention.position": ("p_rope", "rope", "nope", "alibi"),
    "attention.backend": ("auto", "hopper", "triton", "flex", "reference"),
    "train.optimizer": ("adamw", "muon"),
    "train.schedule": ("cosine", "wsd", "constant"),
    "train.activation_checkpointing": ("none", "full", "selective", "offload", "auto"),
    "train.nan_policy": ("stop", "skip"),
}


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(value, typ, key: str):
    origin = typing.get_origin(typ)
    if origin is list:
        (inner,) = typing.get_args(typ)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads exponents without a dot (1e-3) as strings
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {typ}")


def _set(cfg: Config, dotted: str, value) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if "." not in dotted:
        raise ConfigError(f"config key {dotted!r} must be section.key" + _suggest(dotted, sections))
    section, key = dotted.split(".", 1)
    if section not in sections:
        raise ConfigError(f"unknown config section {section!r}" + _suggest(section, sections))
    obj = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if key not in fields:
        full = [f"{section}.{k}" for k in fields]
        raise ConfigError(f"unknown config key {dotted!r}" + _suggest(dotted, full))
    hints = typing.get_type_hints(type(obj))
    coerced = _coerce(value, hints[key], dotted)
    choices = CHOICES.get(dotted)
    if choices and coerced not in choices:
        raise ConfigError(f"{dotted}={coerced!r} is not valid; choose one of {', '.join(choices)}")
    setattr(obj, key, coerced)


def _flatten(tree: dict, where: str) -> dict:
    """{section: {key: value}} -> {"section.key": value}; a section must be a mapping."""
    flat = {}
    sections = [f.name for f in dataclasses.fields(Config)]
    for section, keys in tree.items():
        if section not in sections:
            raise ConfigError(f"{where}: unknown config section {section!r}"
                              + _suggest(str(section), sections))
        if keys is None:  # a section whose keys are all commented out
            continue
        if not isinstance(keys, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping of keys "
                              f"(e.g. {section}: {{key: value}}), got {keys!r}")
        for key, value in keys.items():
            if isinstance(value, dict):
                raise ConfigError(f"{where}: {section}.{key} must be a value, not a mapping; "
                                  f"sections are one level deep (e.g. train: {{steps: 20}})")
            flat[f"{section}.{key}"] = value
    return flat


def _yaml_error_line(err: yaml.YAMLError) -> str:
    """'line L, column C: problem' of a YAML syntax error (one line)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def _read_yaml(path: Path):
    """The YAML document in `path`; ConfigError (one line, with the fix) when it can't be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"cannot read {path} ({err.strerror or err}); check the path and its "
                          f"permissions") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML ({_yaml_error_line(err)}); fix the syntax "
                          f"(see configs/tiny.yaml)") from None


def parse_override(arg: str) -> tuple[str, object]:
    """'train.steps=20' -> ('train.steps', 20); values are parsed as YAML scalars."""
    if "=" not in arg:
        raise ConfigError(f"override {arg!r} must look like section.key=value (e.g. train.steps=20)")
    key, raw = arg.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse the value of {key.strip()!r} ({_yaml_error_line(err)}); quote "
                          f"it or fix the YAML, e.g. {key.strip()}=\"...\"") from None


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    cfg = Config()
    if path:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file {str(p)!r} is a folder; pass a YAML file such as "
                              f"configs/tiny.yaml")
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found; see configs/ for examples")
        tree = _read_yaml(p) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections "
                              f"(e.g. train: {{steps: 20}}), got a {type(tree).__name__}")
        for key, value in _flatten(tree, str(p)).items():
            try:
                _set(cfg, key, value)
            except ConfigError as err:
                raise ConfigError(f"{p}: {err}") from None
    for arg in overrides:
        _set(cfg, *parse_override(arg))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a single key's type cannot express."""
    from .parallel.layouts import CP_STRATEGIES, LayoutError  # imports torch: only when validating

    m = cfg.model
    if m.head_dim == 0 and m.d_model % m.n_head:
        raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.n_head "
                          f"({m.n_head}), or set model.head_dim")
    if m.n_kv_head and m.n_head % m.n_kv_head:
        raise ConfigError(f"model.n_head ({m.n_head}) must be a multiple of model.n_kv_head "
                          f"({m.n_kv_head})")
    if cfg.attention.position == "alibi" and cfg.attention.transform == "scale_invariant":
        raise ConfigError("attention.position=alibi is a baseline on its own; "
                          "set attention.transform=none with it")
    if not 0.0 <= cfg.attention.p_rope_fraction <= 1.0:
        raise ConfigError("attention.p_rope_fraction must be in [0, 1]")
    if cfg.train.seq_len < 2 or cfg.train.steps < 1 or cfg.train.micro_batch_size < 1:
        raise ConfigError("train.seq_len must be >= 2 and train.steps, train.micro_batch_size >= 1")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError("data.val_fraction must be between 0 and 1 (exclusive)")
    p = cfg.parallel
    if p.cp_strategy not in CP_STRATEGIES:
        raise ConfigError(f"parallel.cp_strategy={p.cp_strategy!r} is not valid; choose one of "
                          f"{', '.join(CP_STRATEGIES)}")
    if p.context_parallel_size < 1 or p.ulysses_degree < 1:
        raise ConfigError("parallel.context_parallel_size and parallel.ulysses_degree must be >= 1")
    if p.context_parallel_size % p.ulysses_degree:
        raise ConfigError(f"parallel.ulysses_degree ({p.ulysses_degree}) must divide "
                          f"parallel.context_parallel_size ({p.context_parallel_size})")
    if p.context_parallel_size > 1:  # fail at load time, not after data preparation
        try:
            CP_STRATEGIES[p.cp_strategy].check(cfg.train.seq_len, p.context_parallel_size,
                                               m.n_head, m.n_kv_head or m.n_head, p.ulysses_degree)
        except LayoutError as err:
            raise ConfigError(f"{err} (train.seq_len / model heads vs parallel.*)") from None


def check_device(cfg: Config, device_type: str) -> None:
    """Options that `device_type` ("cuda" or "cpu") cannot run, as ConfigError, before any work.

    attention.backend=triton needs CUDA (on CPU only under the interpreter, TRITON_INTERPRET=1);
    attention.backend=hopper needs CUDA (a Hopper GPU with flash-attn-4, checked when it runs).
    bf16 (run.dtype) and every activation_checkpointing mode, offload included, also run on CPU.
    """
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if cfg.attention.backend == "triton" and device_type != "cuda" and not interpreted:
        raise ConfigError("attention.backend=triton needs a CUDA GPU, and none is in use here; set "
                          "attention.backend=auto (or reference), or TRITON_INTERPRET=1 to run the "
                          "kernel in the (slow) interpreter on CPU")
    if cfg.attention.backend == "hopper" and device_type != "cuda":
        raise ConfigError("attention.backend=hopper needs a Hopper (sm90) GPU with flash-attn-4, and "
                          "no CUDA GPU is in use here; set attention.backend=auto")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
