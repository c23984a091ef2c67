"""The ``charlm`` command: parses options, calls the library, prints results.

No training, sampling or evaluation logic lives here. Every config key is a
``--section.key`` option, generated from the config dataclasses so the help
always lists every option with its default.
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import asdict
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import typer

try:  # typer vendors click from 0.2x on; older releases use the click package
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors

from .config import Config, all_keys, bench_config, load_config
from .errors import CharlmError
from .serve.limits import MAX_SLOTS, MAX_WAITING, Limits

app = typer.Typer(
    help="Train character-level RNN/LSTM/GRU language models, sample from them and evaluate them.",
    add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
)

# Seconds a quiet rank waits before it exits: torchrun stops the whole job when one process ends.
QUIET_RANK_GRACE = 2.0
# Keys common enough to deserve a short option of their own in `charlm train`.
TRAIN_SHORT_OPTIONS = {
    "data.path": "--data", "data.dir": "--data-dir", "train.out": "--out", "train.device": "--device",
    "train.max_time": "--max-time", "train.max_steps": "--max-steps", "train.max_epochs": "--max-epochs",
    "train.seed": "--seed",
}
# The keys `charlm bench` measures with, each also under its field's name (--cell, --batch-size).
BENCH_KEYS = [key for key in all_keys() if key.startswith("model.")] + [
    "train.batch_size", "train.seq_len", "train.precision", "train.device",
    "data.path", "data.unit", "data.exclude", "data.encoding_errors"]


def option_names(key: str, kind: type, short: str | None) -> list[str]:
    """Every key is ``--section.key``; ``short`` is another name for it."""
    name = "--" + key.replace("_", "-")
    if kind is bool:  # a flag pair: --model.tie-weights / --model.no-tie-weights
        section, field = name[2:].split(".")
        return [f"{name}/--{section}.no-{field}"]
    return [short, name] if short else [name]


def with_config_options(keys: list[str] | None = None, short: dict[str, str] | None = None, defaults: Config | None = None):
    """Add one typer option per config key (default None: 'keep the config's value'), with the help
    text and type of its dataclass field and the default ``defaults`` (the built-in config) gives it."""
    def decorate(func):
        signature = inspect.signature(func)
        params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        shown = (defaults or Config()).flat()
        for key, (kind, _, help_text) in all_keys().items():
            if keys is not None and key not in keys:
                continue
            params.append(inspect.Parameter(
                key.replace(".", "__"), inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
                default=typer.Option(None, *option_names(key, kind, (short or {}).get(key)),
                                     help=f"{help_text} [default: {shown[key]!r}]", show_default=False),
            ))
        func.__signature__ = signature.replace(parameters=params)
        return func
    return decorate


def read_text(path: Path) -> str:
    """A whole UTF-8 text file, or one line saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CharlmError(f"{path} is not valid UTF-8 (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    except OSError as err:
        raise CharlmError(f"cannot read {path} ({err.strerror or err})") from None


def given_options(overrides: dict[str, Any]) -> dict[str, Any]:
    """The config keys given on the command line, by their dotted names."""
    return {key.replace("__", "."): value for key, value in overrides.items() if value is not None}


@app.command(no_args_is_help=False)
@with_config_options(short=TRAIN_SHORT_OPTIONS)
def train(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="TOML config file, or the name of a bundled one (shakespeare, quick, tiny, pretrained, enwik8, text8) [default: the built-in defaults, which equal shakespeare]", show_default=False),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the run in this directory from its last.pt, with its saved config; options such as --max-steps may change how long it trains, never the model or the data"),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="start a new run (--out) from the weights of this run directory, checkpoint or 'pretrained': fine-tuning, with a fresh optimizer and schedule", show_default=False),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only errors and the final line"),
    log_format: str = typer.Option("text", "--log-format", help="text|json: json prints one JSON object per event on stdout"),
    **overrides: Any,
) -> None:
    """Train a model on a text corpus (Tiny Shakespeare by default), with checkpoints in a run directory."""
    from .console import ConsoleReporter, JsonReporter, console
    from .training.distributed import is_quiet_rank
    from .training.loop import TrainingInterrupted
    from .training.runs import finetune_config, resume as resume_run, train as train_run

    if log_format not in ("text", "json"):
        raise CharlmError(f"--log-format must be text or json, got {log_format!r}")
    given, reporter = given_options(overrides), JsonReporter() if log_format == "json" else ConsoleReporter(quiet)
    try:
        if resume is not None:
            if config is not None or init_from is not None:
                raise CharlmError("--resume continues a run with its saved config: it takes no --config or --init-from; "
                                  "start a new run with --out for those")
            resume_run(resume, given, reporter=reporter)
        elif init_from is not None:
            train_run(finetune_config(init_from, config, given), init_from=init_from, reporter=reporter)
        else:
            train_run(load_config(config, given), reporter=reporter)
    except TrainingInterrupted as stop:
        if is_quiet_rank():
            raise typer.Exit(stop.exit_code)
        console.print(f"[bold yellow]{stop}[/]: saved {stop.checkpoint}; continue with: charlm train --resume {stop.checkpoint.parent}", soft_wrap=True)
        raise typer.Exit(stop.exit_code)


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
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|mps"),
    prime_file: Optional[Path] = typer.Option(None, "--prime-file", help="read the prime text from this UTF-8 file", show_default=False),
    adapt: Optional[Path] = typer.Option(None, "--adapt", help="first adapt the model to this text file by dynamic evaluation (steers the style; the checkpoint is not changed)", show_default=False),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="read a prime per line and write its continuation; :help lists the commands"),
) -> None:
    """Generate text from a checkpoint, printed as it is produced (one sample streams in constant memory)."""
    from .device import resolve_device
    from .model.checkpoint import load_model
    from .sampling import SampleSettings, generate, stream

    settings = SampleSettings(length=length, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, num_samples=num_samples)
    settings.validate()
    if prime_file is not None:
        if prime:
            raise CharlmError("give the prime as --prime TEXT or --prime-file FILE, not both")
        prime = read_text(prime_file)
    if interactive and (prime or num_samples != 1):
        raise CharlmError("--interactive reads its primes from the prompt, one sample at a time: drop --prime, --prime-file and --num-samples")
    model, vocab, _, _ = load_model(checkpoint, resolve_device(device))
    if adapt is not None:
        from .dynamic import adapted_to
        model = adapted_to(model, vocab, adapt)
    out = sys.stdout
    if interactive:
        return sample_interactively(model, vocab, settings)
    if num_samples == 1:
        pieces = stream(model, vocab, prime, settings)  # refuses bad input before the prime is printed
        out.write(prime)
        for piece, in pieces:
            out.write(piece)
            out.flush()
        out.write("\n")
        return
    for i, text in enumerate(generate(model, vocab, prime, settings)):
        out.write(f"{'' if i == 0 else chr(10)}--- sample {i + 1} ---\n{prime}{text}\n")


def sample_interactively(model, vocab, settings) -> None:
    """The prompt loop of `charlm sample --interactive`, with line editing and history on a terminal."""
    from .interactive import Session, run

    prompt = ""
    if sys.stdin.isatty():
        importlib.import_module("readline")  # loaded, it gives input() line editing and history
        prompt = "> "
    session = Session(model, vocab, settings, sys.stdout)
    session.write("Type a prime and press Enter; :help lists the commands, Ctrl-D ends.\n")
    run(session, lambda: input(prompt))


@app.command("eval")
def evaluate_command(
    checkpoint: Optional[str] = typer.Argument(None, help="run directory (uses best.pt), checkpoint file, or 'pretrained'", show_default="the bundled pretrained model"),
    data: Optional[Path] = typer.Option(None, "--data", help="evaluate on this whole text file instead of the validation split", show_default="validation split of the training corpus"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="cache directory for the training corpus (env CHARLM_DATA_DIR)", show_default="the checkpoint's"),
    skip_unknown: bool = typer.Option(False, "--skip-unknown", help="leave out characters the model never saw, and count them"),
    split: str = typer.Option("valid", "--split", help="valid|test|train: which split of the training corpus (test: enwik8 and text8's standard one)"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|mps"),
    dynamic: bool = typer.Option(False, "--dynamic", help="dynamic evaluation: score each segment, then learn from it (the checkpoint on disk is not changed)"),
    dynamic_lr: Optional[float] = typer.Option(None, "--dynamic-lr", help="step size of the RMS-normalised update", show_default="tuned, see docs/RESULTS.md"),
    dynamic_decay: Optional[float] = typer.Option(None, "--dynamic-decay", help="pull toward the trained weights per segment", show_default="tuned"),
    dynamic_segment: Optional[int] = typer.Option(None, "--dynamic-segment", help="characters scored, then learned from, at a time", show_default="tuned"),
) -> None:
    """Loss (nats/char), bits per char and perplexity of a checkpoint."""
    from .console import eval_table, progress_bar
    from .dynamic import dynamic_settings
    from .evaluation import evaluate

    settings = dynamic_settings(lr=dynamic_lr, decay=dynamic_decay, segment=dynamic_segment) if dynamic else None
    with progress_bar("dynamic evaluation", disable=as_json or not dynamic) as on_progress:
        report = evaluate(checkpoint, data, device=device, data_dir=data_dir, skip_unknown=skip_unknown, split=split,
                          dynamic=settings, on_progress=on_progress)
    if as_json:
        print(json.dumps({"checkpoint": report.checkpoint, "data": report.source, "skipped_chars": report.skipped,
                          "step": report.step, "dynamic": asdict(settings) if settings else None, **report.result.to_dict()}))
        return
    from rich.console import Console

    extra = {"checkpoint": report.checkpoint, "data": report.source}
    if settings:
        extra["dynamic evaluation"] = f"lr {settings.lr:g}, decay {settings.decay:g}, segment {settings.segment}"
    if report.skipped:
        extra["unknown characters skipped"] = f"{report.skipped:,}"
    Console().print(eval_table("charlm eval", report.result, extra))


def show(value: Any, as_json: bool, render: Callable[[Any], Any]) -> None:
    """``value`` as one line of JSON for scripts, or as the rich table ``render`` makes of it."""
    if as_json:
        print(json.dumps(value))
        return
    from rich.console import Console
    Console().print(render(value))


@app.command()
def info(
    checkpoint: Optional[str] = typer.Argument(None, help="run directory (uses best.pt), checkpoint file, or 'pretrained'", show_default="the bundled pretrained model"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
) -> None:
    """What a checkpoint is: model, vocabulary, training, corpus, versions (the model is not built)."""
    from .console import info_table
    from .runinfo import checkpoint_info

    show(checkpoint_info(checkpoint), as_json, info_table)


@app.command()
def runs(
    directory: Path = typer.Argument(Path("runs"), help="folder that holds run directories (searched at any depth)"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
) -> None:
    """Every run under a folder: model, steps, training time, best validation loss, status."""
    from .console import runs_table
    from .runinfo import list_runs

    show(list_runs(directory), as_json, lambda found: runs_table(found) if found else f"no runs under {directory}")


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="run directory (uses best.pt) or checkpoint file"),
    out: Path = typer.Option(..., "--out", "-o", help="file (pt) or folder (safetensors) to write"),
    export_format: str = typer.Option("pt", "--format", help="pt: a small charlm checkpoint; safetensors: a Hugging Face-style folder; onnx: the one-step model"),
    dtype: str = typer.Option("fp16", "--dtype", help="fp16|bf16|fp32: the stored weights' type (safetensors)"),
) -> None:
    """Write a small inference-only checkpoint (fp16 weights, no optimizer state) or a safetensors folder."""
    from .model.checkpoint import export_for_inference, shareable_payload

    if export_format == "safetensors":
        from .model.export import export_folder
        folder = export_folder(shareable_payload(checkpoint), out, dtype)
        size = sum(path.stat().st_size for path in folder.iterdir())
        print(f"wrote {folder}/ ({size / 1e6:.1f} MB: {', '.join(sorted(path.name for path in folder.iterdir()))})")
        return
    if export_format == "onnx":
        from .model.checkpoint import load_model
        from .model.export import export_onnx
        loaded = load_model(checkpoint)
        path = export_onnx(loaded.model, loaded.vocab.chars, out, loaded.vocab.unit)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return
    if export_format != "pt":
        raise CharlmError(f"--format must be pt, safetensors or onnx, got {export_format!r}")
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
    from .plot import plot_runs, run_curves

    path = plot_runs([run_curves(run) for run in runs], out, x_axis, title)
    print(f"wrote {path}")


@app.command()
def serve(
    checkpoint: Optional[str] = typer.Argument(None, help="run directory (uses best.pt), checkpoint file, or 'pretrained'", show_default="the bundled pretrained model"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface, reachable from other machines)"),
    port: int = typer.Option(8000, "--port", help="port to listen on; 0 picks a free one"),
    max_slots: int = typer.Option(MAX_SLOTS, "--max-slots", help="requests generated at once, in one batch"),
    max_waiting: int = typer.Option(MAX_WAITING, "--max-waiting", help="requests that may wait for a slot; more get 503"),
    queue_timeout: float = typer.Option(Limits.queue_timeout, "--queue-timeout", help="seconds a request may wait for a slot before a 503"),
    max_length: int = typer.Option(Limits.max_length, "--max-length", help="characters one request may ask for"),
    max_body_bytes: int = typer.Option(Limits.max_body_bytes, "--max-body-bytes", help="largest request body"),
    time_limit: float = typer.Option(Limits.time_limit, "--time-limit", help="seconds a request may take, waiting included; then it ends with the text so far"),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|mps"),
) -> None:
    """Serve a model over HTTP: a playground page, JSON and streaming APIs, and the OpenAI completions API (needs: pip install "charlm[serve]")."""
    from .serve.server import serve as serve_model

    limits = Limits(max_length=max_length, max_body_bytes=max_body_bytes, time_limit=time_limit, queue_timeout=queue_timeout)
    stopped_by = serve_model(checkpoint, host, port, limits, max_slots, max_waiting, device,
                             on_ready=lambda address: print(f"charlm serve: {address} (Ctrl-C to stop)", flush=True))
    print(f"charlm serve: stopped ({stopped_by})", flush=True)


bench_app = typer.Typer(help="Measure this machine: matmul peak, training/eval/sampling throughput, corpus encoding; "
                             "'charlm bench serve' load-tests charlm serve.", rich_markup_mode=None)
app.add_typer(bench_app, name="bench")


@bench_app.callback(invoke_without_command=True)
@with_config_options(keys=BENCH_KEYS, short={key: "--" + key.split(".")[1].replace("_", "-") for key in BENCH_KEYS},
                     defaults=bench_config())
def bench(
    ctx: typer.Context,
    corpus_mb: int = typer.Option(100, "--corpus-mb", help="size of the generated corpus for the encoding test (unless --path names a real one)"),
    fast: bool = typer.Option(False, "--fast", help="tiny sizes and short timings: checks that everything runs"),
    profile: bool = typer.Option(False, "--profile", help="also show where a training step's time goes (PyTorch profiler)"),
    encode_only: bool = typer.Option(False, "--encode-only", help="measure only the corpus encoding (e.g. of 1 GB: --corpus-mb 1000)"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
    **overrides: Any,
) -> None:
    """Measure matmul peak, training/eval/sampling throughput, corpus encoding speed and peak memory."""
    if ctx.invoked_subcommand is not None:
        return
    from .bench import BenchSettings, run_bench, to_json

    if corpus_mb < 1:
        raise CharlmError(f"--corpus-mb must be at least 1, got {corpus_mb}")
    config = load_config(base=bench_config().to_dict(), overrides=given_options(overrides))
    settings = BenchSettings(config=config, fast=fast, corpus_mb=corpus_mb, profile=profile, encode_only=encode_only)
    if as_json:
        print(to_json(run_bench(settings)))
        return
    from .console import bench_line, console
    results = run_bench(settings, on_result=lambda name, value: console.print(bench_line(name, value)))
    console.print(f"peak memory: {results['peak_memory_mb']:,.0f} MB ({results['device']}, {results['precision']}, "
                  f"{results['threads']} threads, torch {results['torch']})")


@bench_app.command("serve")
def bench_serve(
    checkpoint: Optional[str] = typer.Argument(None, help="run directory (uses best.pt), checkpoint file, or 'pretrained'", show_default="the bundled pretrained model"),
    clients: int = typer.Option(16, "--clients", help="concurrent streaming clients"),
    seconds: float = typer.Option(20.0, "--seconds", help="how long they ask"),
    length: int = typer.Option(500, "--length", help="characters per request"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
) -> None:
    """Load-test charlm serve on 127.0.0.1: aggregate chars/s, time to first character, errors, server memory."""
    from .serve.loadtest import load_test

    report = load_test(clients, seconds, length, checkpoint)
    if as_json:
        print(json.dumps(report))
        return
    memory = report["server_memory"]
    print(f"{report['clients']} clients, {report['seconds']:.1f} s, {report['length']} characters a request: "
          f"{report['chars_per_s']:,.0f} chars/s in all, {report['requests']} requests done, {report['errors']} errors"
          + (f" ({'; '.join(report['reasons'])})" if report['reasons'] else ""))
    print(f"time to first character: p50 {report['first_char_p50_ms']:,.0f} ms, p99 {report['first_char_p99_ms']:,.0f} ms; "
          f"server memory {memory.get('rss_mb', 0):,.0f} MB (peak {memory.get('peak_rss_mb', 0):,.0f} MB)")
    print(f"one stream through the library (no HTTP): {report['one_stream_library_chars_per_s']:,.0f} chars/s")


def main(argv: list[str] | None = None) -> int:
    """Entry point: every expected failure becomes one line on stderr and a non-zero exit code."""
    try:
        code = app(args=argv, standalone_mode=False)
    except CharlmError as err:
        from .training.distributed import is_quiet_rank
        if getattr(err, "rank", None) is not None or not is_quiet_rank():
            print(f"charlm: error: {err}", file=sys.stderr)
        else:  # another rank of a torchrun job, refused as rank 0 is: rank 0 says why, before torchrun stops it
            time.sleep(QUIET_RANK_GRACE)
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
