"""What the terminal shows: a rich summary and tables, a tqdm progress bar."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from .evaluation import EvalResult
from .training.loop import Reporter, TrainResult

console = Console(stderr=True, highlight=False)


def key_value_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in rows.items():
        if value is not None:
            table.add_row(key, str(value))
    return table


def eval_table(title: str, result: EvalResult, extra: dict[str, Any] | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("loss (nats/char)", "bits/char", "perplexity", "characters"):
        table.add_column(name, justify="right")
    table.add_row(f"{result.loss:.4f}", f"{result.bits_per_char:.4f}", f"{result.perplexity:.3f}", f"{result.chars:,}")
    if extra:
        table.caption = ", ".join(f"{k}: {v}" for k, v in extra.items())
    return table


def duration(seconds: float) -> str:
    """'42s', '3m05s', '1h02m'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ConsoleReporter(Reporter):
    """Summary table at the start, a tqdm bar with loss, lr, chars/s and the time left (evaluations
    included) where stderr is a terminal, validation lines and samples as they come, the final
    evaluation's table at the end. ``quiet`` prints only the final line (errors always come)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bar: tqdm | None = None

    def start(self, summary: dict[str, Any]) -> None:
        if self.quiet:
            return
        console.print(key_value_table("charlm train", summary))
        if sys.stderr.isatty():  # a file or a pipe gets no bar and its control characters
            # tqdm's own time-left counts steps only; the postfix carries the budget's, evaluations included.
            self.bar = tqdm(total=None, unit="step", dynamic_ncols=True, file=sys.stderr, initial=0, leave=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {postfix}]")

    def progress(self, step: int, total: int | None, metrics: dict[str, float], seconds_left: float | None) -> None:
        if self.bar is None:
            return
        if total is not None and self.bar.total != total:
            self.bar.total = total
        self.bar.n = step
        left = f" left {duration(seconds_left)}" if seconds_left is not None else ""
        self.bar.set_postfix_str(
            f"loss {metrics['loss']:.3f} lr {metrics['lr']:.1e} {metrics['chars_per_sec']:,.0f} chars/s "
            f"epoch {metrics['epoch']:.2f}{left}", refresh=True)

    def evaluated(self, step: int, val_loss: float, is_best: bool) -> None:
        self.note(f"step {step}: validation loss {val_loss:.4f}" + (" (best so far, saved best.pt)" if is_best else ""))

    def sampled(self, step: int, text: str) -> None:
        first = next((line for line in text.splitlines() if line.strip()), "")
        self.note(f"step {step}: sample: {first[:100]}")

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif not self.quiet:
            console.print(text, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finished(self, result: TrainResult) -> None:
        if self.quiet:
            console.print(f"final validation loss {result.final.loss:.4f} ({result.final.bits_per_char:.4f} bits/char, "
                          f"step {result.step:,}, stopped by {result.stopped_by}), run: {result.run_dir}", soft_wrap=True)
            return
        console.print(eval_table(
            f"final evaluation, full validation split (step {result.step:,}, {result.epochs:.2f} epochs, "
            f"{result.elapsed:.0f}s, stopped by {result.stopped_by})", result.final,
            {"best periodic val loss": f"{result.best_val_loss:.4f}", "run": str(result.run_dir)},
        ))


class JsonReporter(Reporter):
    """One JSON object a line on stdout for every event of a run, for scripts (``--log-format json``)."""

    def emit(self, event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, **fields}, ensure_ascii=False), flush=True)

    def start(self, summary: dict[str, Any]) -> None:
        self.emit("start", **{key.replace(" ", "_"): value for key, value in summary.items() if value is not None})

    def progress(self, step: int, total: int | None, metrics: dict[str, float], seconds_left: float | None) -> None:
        self.emit("progress", step=step, total_steps=total, seconds_left=seconds_left, **metrics)

    def evaluated(self, step: int, val_loss: float, is_best: bool) -> None:
        self.emit("evaluation", step=step, val_loss=val_loss, best=is_best)

    def sampled(self, step: int, text: str) -> None:
        self.emit("sample", step=step, text=text)

    def note(self, text: str) -> None:
        self.emit("note", text=text)

    def finished(self, result: TrainResult) -> None:
        self.emit("final", step=result.step, epochs=result.epochs, elapsed=result.elapsed, stopped_by=result.stopped_by,
                  best_val_loss=result.best_val_loss, run_dir=str(result.run_dir), **result.final.to_dict())


@contextmanager
def progress_bar(title: str, disable: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar on stderr for the block, fed by the ``(done, total)`` callback it yields."""
    bar = tqdm(desc=title, unit="char", unit_scale=True, dynamic_ncols=True, disable=disable, file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
    try:
        yield update
    finally:
        bar.close()


def info_table(info: dict[str, Any]) -> Table:
    """``charlm info``: a checkpoint's facts, one row each (unknown ones, from older charlm, shown as such)."""
    def known(value: Any, fmt: str = "{}") -> str:
        return "unknown" if value is None else fmt.format(value)
    rows = {
        "checkpoint": info["checkpoint"],
        "model": f"{info['layers']}x{info['hidden_size']} {info['cell'].upper()}, embedding {info['embedding_size']}"
                 + (", tied" if info["tied"] else ""),
        "parameters": f"{info['parameters']:,}",
        "vocabulary": f"{info['vocabulary_size']:,} {'bytes' if info['unit'] == 'byte' else 'characters'}: {info['vocabulary']}",
        "trained": f"{known(info['step'], '{:,}')} steps, {known(info['epochs'], '{:.2f}')} epochs",
        "best validation loss": known(info["best_val_loss"], "{:.4f}"),
        "corpus": f"{info['corpus']} ({known(info['corpus_chars'], '{:,}')} {info['unit']}s, sha256 {known(info['corpus_sha256'])})",
        "corpus files": files_preview(info["corpus_files"]),
        "trained on": f"{known(info['device'])}, {known(info['precision'])}, {info['world_size']} process(es)",
        "initialised from": info["init_from"],
        "weights": f"the average of the last {info['averaged_steps']:,} steps (--train.average-last)" if info["averaged_steps"] else None,
        "versions": f"charlm {known(info['charlm_version'])}, PyTorch {known(info['torch_version'])}, "
                    f"checkpoint format {info['format_version']}",
    }
    return key_value_table("charlm info", rows)


def files_preview(names: list[str], shown: int = 3) -> str | None:
    """A multi-file corpus's file count and its first names (None for a one-file corpus)."""
    if not names:
        return None
    return f"{len(names):,}: {', '.join(names[:shown])}{' ...' if len(names) > shown else ''}"


def runs_table(runs: list[dict[str, Any]]) -> Table:
    """``charlm runs``: one row a run (its path under the folder listed), best validation loss first."""
    table = Table(title="charlm runs", title_justify="left")
    for name in ("run", "model", "steps", "training", "best val", "final val", "status"):
        table.add_column(name, justify="left" if name in ("run", "model", "status") else "right", no_wrap=name == "status")
    for run in runs:
        table.add_row(run["name"], run["model"] or "?", f"{run['steps']:,}", duration(run["training_seconds"]),
                      "-" if run["best_val_loss"] is None else f"{run['best_val_loss']:.4f}",
                      "-" if run["final_val_loss"] is None else f"{run['final_val_loss']:.4f}", run["status"])
    return table


def bench_line(name: str, value: dict[str, Any]) -> str:
    """One readable line per benchmark result."""
    if name == "matmul_gflops":
        return "matmul peak: " + ", ".join(f"{k} {v:,.1f} GFLOP/s" for k, v in value.items())
    if name == "train":
        return (f"train: {value['chars_per_s']:,.0f} chars/s, {value['gflops']:,.1f} GFLOP/s "
                f"({value['flops_per_char'] / 1e6:.1f} MFLOP/char), {value['fraction_of_peak']:.0%} of peak")
    if name == "train_profile":
        return "training step, most self time:\n" + "\n".join(
            f"  {row['share']:6.1%} {row['ms_per_step']:10,.1f} ms  {row['op']}" for row in value)
    if name == "eval":
        return f"eval: {value['chars_per_s']:,.0f} chars/s ({value['x_training']:.1f}x training)"
    if name == "sample":
        return (f"sample: one stream {value['one_stream_chars_per_s']:,.0f} chars/s, "
                f"256 streams {value['batch_256_chars_per_s']:,.0f} chars/s")
    if name == "encode":
        return (f"encode: {value['corpus_mb']:.0f} MB in {value['encode_seconds']:.2f}s ({value['encode_mb_per_s']:,.0f} MB/s), "
                f"peak memory {value['peak_memory_x_file']:.2f}x the file, cached reload {value['cached_load_seconds']:.3f}s")
    return f"{name}: {value}"
