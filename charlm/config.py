"""Configuration: dataclasses with defaults, TOML loading and dotted overrides.

Every value lives in one place (the dataclasses below). A TOML file and then
command-line overrides (``model.cell=gru``) are applied on top, with the same
validation, so a typo is caught the same way wherever it was made.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, get_type_hints

from .errors import CharlmError


@dataclass
class DataConfig:
    path: str = field(default="", metadata={"help": "what to train on: a UTF-8 text file, a directory or glob of them (joined in sorted order), or a dataset name (enwik8, text8); empty means Tiny Shakespeare (downloaded once)"})
    dir: str = field(default="data", metadata={"help": "cache directory for downloaded and encoded corpora (env CHARLM_DATA_DIR)"})
    val_fraction: float = field(default=0.1, metadata={"help": "fraction of the corpus held out for validation (taken from the end)"})
    encoding_errors: str = field(default="strict", metadata={"help": "how to treat bytes that are not UTF-8: strict|replace|ignore"})
    skip_unknown: bool = field(default=False, metadata={"help": "with --init-from: leave out characters the model's vocabulary lacks (counted in the summary)"})
    unit: str = field(default="char", metadata={"help": "what the model reads and writes: char (Unicode code points) or byte (UTF-8 bytes, at most 256)"})
    exclude: str = field(default="", metadata={"help": "for a directory or glob: comma-separated patterns of relative paths to leave out, e.g. 'site-packages,test/*'"})


@dataclass
class ModelConfig:
    cell: str = field(default="lstm", metadata={"help": "recurrent cell: rnn|lstm|gru"})
    layers: int = field(default=2, metadata={"help": "number of stacked recurrent layers"})
    hidden_size: int = field(default=384, metadata={"help": "units per recurrent layer"})
    embedding_size: int = field(default=384, metadata={"help": "character embedding size (set equal to hidden_size to tie weights without a projection)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout between recurrent layers"})
    embedding_dropout: float = field(default=0.0, metadata={"help": "dropout on the character embeddings"})
    output_dropout: float = field(default=0.1, metadata={"help": "dropout on the last layer's output, before the softmax"})
    weight_drop: float = field(default=0.0, metadata={"help": "DropConnect on hidden-to-hidden weights (keeps fused kernels)"})
    tie_weights: bool = field(default=True, metadata={"help": "share the embedding matrix with the output layer"})
    forget_bias: float = field(default=1.0, metadata={"help": "LSTM only (other cells ignore it): start every forget gate's bias at this value (0: PyTorch's random initialisation)"})


@dataclass
class TrainConfig:
    out: str = field(default="runs/shakespeare", metadata={"help": "run directory for checkpoints, config and metrics"})
    batch_size: int = field(default=32, metadata={"help": "number of parallel streams per batch"})
    seq_len: int = field(default=64, metadata={"help": "truncated-BPTT length in characters"})
    random_seq_len: bool = field(default=False, metadata={"help": "draw each batch's BPTT length at random around seq_len"})
    lr: float = field(default=1e-2, metadata={"help": "peak learning rate (AdamW)"})
    min_lr: float = field(default=1e-4, metadata={"help": "learning rate at the end of the decay"})
    schedule: str = field(default="cosine", metadata={"help": "cosine|linear: how the learning rate decays from lr to min_lr after the warm-up"})
    weight_decay: float = field(default=0.25, metadata={"help": "AdamW weight decay on matrices"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.99, metadata={"help": "AdamW beta2"})
    warmup_steps: int = field(default=50, metadata={"help": "linear learning-rate warm-up steps"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0 disables)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0: no limit)"})
    max_epochs: float = field(default=0.0, metadata={"help": "stop after this many passes over the training split (0: no limit)"})
    max_time: str = field(default="14m", metadata={"help": "stop after this much training wall-clock, e.g. 90s, 15m, 1h (empty: no limit)"})
    eval_interval: int = field(default=250, metadata={"help": "evaluate on the validation split every N steps"})
    eval_batches: int = field(default=10, metadata={"help": "windows (16 streams x 256 chars each) read by the periodic evaluation; the final one reads the whole split"})
    checkpoint_interval: int = field(default=500, metadata={"help": "write last.pt every N steps"})
    log_interval: int = field(default=10, metadata={"help": "update the progress bar and metrics.jsonl every N steps"})
    seed: int = field(default=1337, metadata={"help": "random seed for weights, dropout and data order"})
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda|cuda:N|mps (auto picks CUDA when present)"})
    precision: str = field(default="auto", metadata={"help": "auto|fp32|bf16|fp16 (auto: bf16 autocast on a CPU that has it, else fp32; fp16 with a gradient scaler on CUDA)"})
    average_last: float = field(default=0.0, metadata={"help": "average the weights over this last fraction of the run (SWA: one equal share a step), and evaluate and save the average; 0: off, 1: the whole run"})
    max_bad_steps: int = field(default=10, metadata={"help": "stop after this many consecutive non-finite losses"})
    threads: int = field(default=0, metadata={"help": "CPU threads per process (0: PyTorch's default alone, the cores shared among the processes under torchrun)"})
    tensorboard: bool = field(default=False, metadata={"help": "also log the scalars and samples for TensorBoard, into RUN/tensorboard (needs: pip install 'charlm[tensorboard]')"})
    backend: str = field(default="auto", metadata={"help": "torch.distributed backend under torchrun: auto|gloo|nccl (auto: NCCL on CUDA, gloo on the CPU)"})


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Every value by its dotted key ('model.cell': 'lstm', ...)."""
        return {f"{section}.{key}": value for section, values in self.to_dict().items() for key, value in values.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "Config":
        config = cls()
        apply_tree(config, values, source)
        return config


def bench_config() -> Config:
    """What ``charlm bench`` measures unless told otherwise: a 2x512 LSTM with 128-wide embeddings,
    no regularisation or tying, 64 streams of 128 characters (the shape of docs/BENCHMARKS.md)."""
    return Config(
        model=ModelConfig(cell="lstm", layers=2, hidden_size=512, embedding_size=128, dropout=0.0, output_dropout=0.0,
                          embedding_dropout=0.0, weight_drop=0.0, tie_weights=False),
        train=TrainConfig(batch_size=64, seq_len=128),
    )


CHOICES = {
    "data.encoding_errors": ("strict", "replace", "ignore"),
    "data.unit": ("char", "byte"),
    "model.cell": ("rnn", "lstm", "gru"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.schedule": ("cosine", "linear"),
    "train.backend": ("auto", "gloo", "nccl"),
}


def sections(config: Config) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def all_keys() -> dict[str, tuple[type, Any, str]]:
    """Every dotted key with its type, default and help text, in declaration order."""
    keys: dict[str, tuple[type, Any, str]] = {}
    for name, section in sections(Config()).items():
        hints = get_type_hints(type(section))
        for f in dataclasses.fields(section):
            keys[f"{name}.{f.name}"] = (hints[f.name], getattr(section, f.name), f.metadata.get("help", ""))
    return keys


def unknown_key_error(key: str, source: str) -> CharlmError:
    close = difflib.get_close_matches(key, list(all_keys()), n=1, cutoff=0.5)
    if not close:  # a bare field name without its section, e.g. "cell"
        close = [k for k in all_keys() if k.split(".")[1] == key.split(".")[-1]]
    hint = f"; did you mean '{close[0]}'?" if close else "; run 'charlm train --help' for the list"
    return CharlmError(f"unknown config key '{key}' in {source}{hint}")


def coerce(key: str, kind: type, value: Any, source: str) -> Any:
    """Turn ``value`` (from TOML or a command-line string) into ``kind`` or fail clearly."""
    text_input = isinstance(value, str)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if text_input and value.lower() in ("true", "1", "yes", "on"):
                return True
            if text_input and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise CharlmError(f"config key '{key}' in {source} must be a finite number, got {value!r}")
            return number
        if kind is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except ValueError:
        pass
    raise CharlmError(f"config key '{key}' in {source} must be {kind.__name__}, got {value!r}")


def set_value(config: Config, key: str, value: Any, source: str) -> None:
    keys = all_keys()
    if key not in keys:
        raise unknown_key_error(key, source)
    kind = keys[key][0]
    value = coerce(key, kind, value, source)
    if key in CHOICES and value not in CHOICES[key]:
        raise CharlmError(f"config key '{key}' in {source} must be one of {'|'.join(CHOICES[key])}, got {value!r}")
    section, name = key.split(".")
    setattr(getattr(config, section), name, value)


def apply_tree(config: Config, values: dict[str, Any], source: str, prefix: str = "") -> None:
    for name, value in values.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            if prefix or name not in sections(config):
                raise unknown_key_error(key, source)
            apply_tree(config, value, source, prefix=f"{key}.")
        else:
            set_value(config, key, value, source)


def bundled_configs() -> dict[str, Traversable]:
    """The configs that ship inside the package (the repository's configs/), by name."""
    folder = importlib.resources.files("charlm.configs")
    return {entry.name.removesuffix(".toml"): entry for entry in folder.iterdir() if entry.name.endswith(".toml")}


def config_file(name: str | Path) -> Path | Traversable:
    """A TOML file's path, or the name of a bundled config ('quick' or 'quick.toml')."""
    if Path(name).is_file():
        return Path(name)
    bundled = bundled_configs()
    stem = str(name).removesuffix(".toml")
    if stem in bundled:
        return bundled[stem]
    raise CharlmError(f"config file {name} not found; give a path or one of the bundled configs: {', '.join(sorted(bundled))}")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """The built-in defaults (or ``base``, a saved config), then the TOML file (a path or a bundled
    config's name), then ``CHARLM_DATA_DIR``, then the overrides ({'model.cell': 'gru'}), then validation."""
    config = Config.from_dict(base, "the saved config") if base is not None else Config()
    if path is not None:
        source = config_file(path)
        try:
            apply_tree(config, tomllib.loads(source.read_text(encoding="utf-8")), str(path))
        except tomllib.TOMLDecodeError as err:
            raise CharlmError(f"config file {path} is not valid TOML: {err}") from None
    overrides = dict(overrides or {})
    if "CHARLM_DATA_DIR" in os.environ:
        overrides.setdefault("data.dir", os.environ["CHARLM_DATA_DIR"])
    for key, value in overrides.items():
        set_value(config, key, value, "the command line")
    validate(config)
    return config


def validate(config: Config) -> None:
    """Range checks that a type alone cannot express."""
    m, t, d = config.model, config.train, config.data
    positive = {"model.layers": m.layers, "model.hidden_size": m.hidden_size, "model.embedding_size": m.embedding_size,
                "train.batch_size": t.batch_size, "train.seq_len": t.seq_len, "train.eval_interval": t.eval_interval,
                "train.eval_batches": t.eval_batches, "train.checkpoint_interval": t.checkpoint_interval,
                "train.log_interval": t.log_interval, "train.max_bad_steps": t.max_bad_steps}
    if t.threads < 0:
        raise CharlmError(f"config key 'train.threads' must be 0 (auto) or more, got {t.threads}")
    for key, value in positive.items():
        if value < 1:
            raise CharlmError(f"config key '{key}' must be at least 1, got {value}")
    in_unit_interval = {f"model.{key}": getattr(m, key) for key in ("dropout", "embedding_dropout", "output_dropout", "weight_drop")}
    in_unit_interval |= {"train.beta1": t.beta1, "train.beta2": t.beta2}
    for key, value in in_unit_interval.items():
        if not 0.0 <= value < 1.0:
            raise CharlmError(f"config key '{key}' must be in [0, 1), got {value}")
    if not 0.0 < d.val_fraction < 1.0:
        raise CharlmError(f"config key 'data.val_fraction' must be between 0 and 1, got {d.val_fraction}")
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise CharlmError("learning rates must satisfy 0 <= train.min_lr <= train.lr and train.lr > 0")
    for key in ("max_steps", "max_epochs", "warmup_steps", "grad_clip", "weight_decay"):
        if getattr(t, key) < 0:
            raise CharlmError(f"config key 'train.{key}' must not be negative, got {getattr(t, key)}")
    max_time = parse_duration(t.max_time)
    if not 0.0 <= t.average_last <= 1.0:
        raise CharlmError(f"config key 'train.average_last' must be between 0 and 1, got {t.average_last}")
    if t.average_last and not (t.max_steps or t.max_epochs or max_time):
        raise CharlmError("--train.average-last needs a run of known length: set --train.max-steps, --train.max-epochs or --train.max-time")


def parse_duration(text: str) -> float | None:
    """'90' or '90s' -> 90.0, '15m' -> 900.0, '1h' -> 3600.0, '' -> None (no limit)."""
    if not text:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*", text)
    if not match:
        raise CharlmError(f"cannot read the duration '{text}'; write it like 90s, 15m or 1h")
    scale = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[match.group(2) or "s"]
    return float(match.group(1)) * scale


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def to_toml(config: Config) -> str:
    """The effective config as TOML that ``load_config`` reads back unchanged."""
    lines = []
    for name, values in config.to_dict().items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)
