"""The ``charlm`` command: parses options, calls the library, prints results.

No training, sampling or evaluation logic lives here. Every config key is a
``--section.key`` option, generated from the config dataclasses so the help
always lists every option with its default.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

try:  # typer vendors click from 0.2x on; older releases use the click package
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors

from .config import Config, all_keys, load_config, set_value
from .errors import CharlmError

app = typer.Typer(
    help="Train character-level RNN/LSTM/GRU language models, sample from them and evaluate them.",
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Keys common enough to deserve a short option of their own.
SHORT_OPTIONS = {
    "data.path": "--data", "data.dir": "--data-dir", "train.out": "--out", "train.device": "--device",
    "train.max_time": "--max-time", "train.max_steps": "--max-steps", "train.max_epochs": "--max-epochs",
    "train.seed": "--seed",
}


def option_names(key: str, kind: type) -> list[str]:
    """Every key is ``--section.key``; a common one also answers to its short option."""
    name = "--" + key.replace("_", "-")
    if kind is bool:  # a flag pair: --model.tie-weights / --model.no-tie-weights
        section, field = name[2:].split(".")
        return [f"{name}/--{section}.no-{field}"]
    return [SHORT_OPTIONS[key], name] if key in SHORT_OPTIONS else [name]


def with_config_options(func):
    """Add one typer option per config key (default None: 'keep the config file's value')."""
    signature = inspect.signature(func)
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for key, (kind, default, help_text) in all_keys().items():
        params.append(inspect.Parameter(
            key.replace(".", "__"), inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
            default=typer.Option(None, *option_names(key, kind), help=f"{help_text} [default: {default!r}]", show_default=False),
        ))
    func.__signature__ = signature.replace(parameters=params)
    return func


def resolve_config_file(name: str | None) -> Path | None:
    """A path, or a bundled config's name ('tiny' -> configs/tiny.toml); None for the built-in defaults."""
    if name is None:
        default = Path("configs/shakespeare.toml")
        if default.is_file():
            return default
        bundled = CONFIG_DIR / "shakespeare.toml"
        return bundled if bundled.is_file() else None
    for candidate in (Path(name), Path("configs") / f"{name}.toml", CONFIG_DIR / f"{name}.toml", CONFIG_DIR / name):
        if candidate.is_file():
            return candidate
    raise CharlmError(f"config file {name} not found; give a path or one of: "
                      + ", ".join(p.stem for p in sorted(CONFIG_DIR.glob("*.toml"))))


@app.command(no_args_is_help=False)
@with_config_options
def train(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="TOML config file, or the name of one in configs/ (e.g. tiny) [default: configs/shakespeare.toml]", show_default=False),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the run in this directory from its last.pt (its saved config, plus any options given here)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    **overrides: Any,
) -> None:
    """Train a model on a text corpus (Tiny Shakespeare by default), with checkpoints in a run directory."""
    from .model.checkpoint import load_checkpoint
    from .console import ConsoleReporter, console, eval_table
    from .training.loop import TrainingInterrupted, resume_checkpoint, train as run_training

    given = {key.replace("__", "."): value for key, value in overrides.items() if value is not None}
    if "data.dir" not in given and "CHARLM_DATA_DIR" in os.environ:
        given["data.dir"] = os.environ["CHARLM_DATA_DIR"]
    checkpoint = None
    if resume is not None:
        last = resume_checkpoint(resume)
        checkpoint = load_checkpoint(last)
        cfg = Config.from_dict(checkpoint["config"], source=str(last))
        cfg = load_config(None, {**flatten(cfg), **given, "train.out": str(resume)})
    else:
        cfg = load_config(resolve_config_file(config), given)
    try:
        result = run_training(cfg, resume=resume is not None, reporter=ConsoleReporter(quiet), checkpoint=checkpoint)
    except TrainingInterrupted as stop:
        console.print(f"[bold yellow]{stop}[/]: saved {stop.checkpoint}; continue with: charlm train --resume {stop.checkpoint.parent}", soft_wrap=True)
        raise typer.Exit(stop.exit_code)
    console.print(eval_table(
        f"final evaluation, full validation split (step {result.step:,}, {result.epochs:.2f} epochs, "
        f"{result.elapsed:.0f}s, stopped by {result.stopped_by})", result.final,
        {"best periodic val loss": f"{result.best_val_loss:.4f}", "run": str(result.run_dir)},
    ))


def flatten(config: Config) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config.to_dict().items() for key, value in values.items()}


@app.command()
def sample(
    checkpoint: Optional[str] = typer.Argument(None, help="run directory (uses best.pt), checkpoint file, or 'pretrained'", show_default="the bundled pretrained model"),
    prime: str = typer.Option("", "--prime", "-p", help="text to start from (printed first)"),
    length: int = typer.Option(500, "--length", "-n", help="characters to generate"),
    temperature: float = typer.Option(1.0, "--temperature", "-t", help="softmax temperature; 0 is greedy"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="sample only from the K most likely characters", show_default="off"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="sample only from the smallest set with probability mass P", show_default="off"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed; the same seed gives the same text", show_default="random"),
    num_samples: int = typer.Option(1, "--num-samples", help="independent samples, generated as one batch"),
    device: str = typer.Option("cpu", "--device", help="auto|cpu|cuda|mps"),
) -> None:
    """Generate text from a checkpoint, printed as it is produced."""
    from .device import resolve_device
    from .model.checkpoint import load_model
    from .sampling import SampleSettings, generate

    settings = SampleSettings(length=length, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, num_samples=num_samples)
    settings.validate()
    model, vocab, _, _ = load_model(checkpoint, resolve_device(device))
    out = sys.stdout
    if num_samples == 1:
        out.write(prime)
        generate(model, vocab, prime, settings, on_text=lambda _, text: (out.write(text), out.flush()))
        out.write("\n")
        return
    for i, text in enumerate(generate(model, vocab, prime, settings)):
        out.write(f"{'' if i == 0 else chr(10)}--- sample {i + 1} ---\n{prime}{text}\n")


@app.command("eval")
def evaluate_command(
    checkpoint: Optional[str] = typer.Argument(None, help="run directory (uses best.pt), checkpoint file, or 'pretrained'", show_default="the bundled pretrained model"),
    data: Optional[Path] = typer.Option(None, "--data", help="evaluate on this whole text file instead of the validation split", show_default="validation split of the training corpus"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="cache directory for the training corpus (env CHARLM_DATA_DIR)", show_default="the checkpoint's"),
    skip_unknown: bool = typer.Option(False, "--skip-unknown", help="leave out characters the model never saw, and count them"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|mps"),
) -> None:
    """Loss (nats/char), bits per char and perplexity of a checkpoint."""
    from .console import eval_table
    from .device import resolve_device
    from .evaluation import evaluate_checkpoint
    from .model.checkpoint import load_model

    target = resolve_device(device)
    model, vocab, cfg, payload = load_model(checkpoint, target)
    if data_dir is not None or "CHARLM_DATA_DIR" in os.environ:
        cfg.data.dir = data_dir if data_dir is not None else os.environ["CHARLM_DATA_DIR"]
    report = evaluate_checkpoint(model, vocab, cfg, target, data, skip_unknown)
    if as_json:
        print(json.dumps({"checkpoint": payload["path"], "data": report.source, "skipped_chars": report.skipped,
                          "step": payload.get("step"), **report.result.to_dict()}))
        return
    from rich.console import Console

    extra = {"checkpoint": payload["path"], "data": report.source}
    if report.skipped:
        extra["unknown characters skipped"] = f"{report.skipped:,}"
    Console().print(eval_table("charlm eval", report.result, extra))


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="run directory (uses best.pt) or checkpoint file"),
    out: Path = typer.Option(..., "--out", "-o", help="file to write"),
) -> None:
    """Write a small inference-only checkpoint (fp16 weights, no optimizer state)."""
    from .model.checkpoint import export_for_inference

    path = export_for_inference(checkpoint, out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command()
def plot(
    runs: list[Path] = typer.Argument(..., help="run directories (or metrics.jsonl files) to draw, one curve each"),
    out: Path = typer.Option(Path("loss.png"), "--out", "-o", help="PNG file to write"),
    x_axis: str = typer.Option("time", "--x", help="step|time: optimizer steps or minutes of training"),
    title: Optional[str] = typer.Option(None, "--title", help="title above the plot", show_default=False),
) -> None:
    """Draw validation and training loss curves of runs to a PNG (needs: pip install 'charlm[plot]')."""
    from .plot import plot_runs, read_metrics

    path = plot_runs([read_metrics(run) for run in runs], out, x_axis, title)
    print(f"wrote {path}")


@app.command()
def bench(
    cell: str = typer.Option("lstm", "--cell", help="rnn|lstm|gru"),
    layers: int = typer.Option(2, "--layers", help="recurrent layers"),
    hidden_size: int = typer.Option(512, "--hidden-size", help="units per layer"),
    embedding_size: int = typer.Option(128, "--embedding-size", help="embedding width"),
    batch_size: int = typer.Option(64, "--batch-size", help="training batch (streams)"),
    seq_len: int = typer.Option(128, "--seq-len", help="training sequence length"),
    precision: str = typer.Option("auto", "--precision", help="auto|fp32|bf16"),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|mps"),
    corpus_mb: int = typer.Option(100, "--corpus-mb", help="size of the generated corpus for the encoding test"),
    fast: bool = typer.Option(False, "--fast", help="tiny sizes and short timings: checks that everything runs"),
    profile: bool = typer.Option(False, "--profile", help="also show where a training step's time goes (PyTorch profiler)"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
) -> None:
    """Measure matmul peak, training/eval/sampling throughput, corpus encoding speed and peak memory."""
    from .bench import BenchSettings, plain_model, run_bench, to_json

    checked = Config()
    set_value(checked, "model.cell", cell, "--cell")
    set_value(checked, "train.precision", precision, "--precision")
    for name, value in {"--layers": layers, "--hidden-size": hidden_size, "--embedding-size": embedding_size,
                        "--batch-size": batch_size, "--seq-len": seq_len, "--corpus-mb": corpus_mb}.items():
        if value < 1:
            raise CharlmError(f"{name} must be at least 1, got {value}")
    settings = BenchSettings(model=plain_model(cell, layers, hidden_size, embedding_size), batch_size=batch_size, seq_len=seq_len, precision=precision,
                             device=device, fast=fast, corpus_mb=corpus_mb, profile=profile)
    if as_json:
        print(to_json(run_bench(settings)))
        return
    from .console import bench_line, console
    results = run_bench(settings, on_result=lambda name, value: console.print(bench_line(name, value)))
    console.print(f"peak memory: {results['peak_memory_mb']:,.0f} MB ({results['device']}, {results['precision']}, "
                  f"{results['threads']} threads, torch {results['torch']})")


def main(argv: list[str] | None = None) -> int:
    """Entry point: every expected failure becomes one line on stderr and a non-zero exit code."""
    try:
        code = app(args=argv, standalone_mode=False)
    except CharlmError as err:
        print(f"charlm: error: {err}", file=sys.stderr)
        return 1
    except click_errors.NoArgsIsHelpError as err:
        print(err.ctx.get_help() if err.ctx else str(err))
        return 0
    except click_errors.UsageError as err:
        hint = f"; see 'charlm {err.ctx.info_name} --help'" if err.ctx and err.ctx.parent else "; see 'charlm --help'"
        print(f"charlm: error: {err.format_message()}{hint}", file=sys.stderr)
        return 2
    except typer.Exit as err:
        return err.exit_code
    except typer.Abort:
        print("charlm: interrupted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("charlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return code if isinstance(code, int) else 0
