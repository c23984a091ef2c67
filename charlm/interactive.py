"""Interactive sampling: a prime per line, its continuation written as it is made, settings kept.

A line is a prime, or a command when it starts with ``:`` (``:temperature 0.7``, ``:help``; a
prime that starts with a colon is written with two). ``Session`` knows nothing of terminals: it
takes lines and writes text, so Python can drive it as the CLI does; ``run`` is the loop over a
line source (the CLI passes ``input``, with readline's editing and history on a terminal).
Ctrl-C while text is being made stops that continuation; Ctrl-C or end of input at the prompt ends.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Callable, TextIO

from .data.vocab import Vocab
from .errors import CharlmError
from .model.charrnn import CharRNN
from .sampling import SampleSettings, stream

# Setting -> the parser of its value; the optional ones also take "off".
SETTINGS: dict[str, Callable[[str], object]] = {
    "length": int, "temperature": float, "top_k": int, "top_p": float, "seed": int}
OPTIONAL = {"top_k", "top_p", "seed"}
HELP = """\
Type a prime and press Enter: its continuation is written as it is made (Ctrl-C stops it).
  :length N          characters per continuation
  :temperature T     softmax temperature; 0 is greedy
  :top_k K | off     sample from the K most likely characters only
  :top_p P | off     sample from the smallest set with probability mass P
  :seed N | off      the same seed gives the same continuation of the same prime
  :settings          show the settings
  :help              this text
  :quit              end (so do Ctrl-D and Ctrl-C at the prompt)
A prime that starts with ':' is written with two (::)."""


class Quit(Exception):
    """The user asked to end the session."""


class Session:
    """The model, its vocabulary and the settings every prime is continued with."""

    def __init__(self, model: CharRNN, vocab: Vocab, settings: SampleSettings, out: TextIO):
        settings.validate()
        self.model, self.vocab, self.settings, self.out = model, vocab, replace(settings, num_samples=1), out

    def handle(self, line: str) -> None:
        """Continue the prime ``line``, or carry out the command it holds; bad input is reported, not raised."""
        try:
            if line.startswith(":") and not line.startswith("::"):
                self.command(line[1:].split())
            else:
                self.continue_prime(line[1:] if line.startswith("::") else line)
        except CharlmError as err:
            self.write(f"error: {err}\n")

    def continue_prime(self, prime: str) -> None:
        try:
            for piece, in stream(self.model, self.vocab, prime, self.settings):
                self.write(piece)
        except KeyboardInterrupt:
            self.write(" [stopped]")
        self.write("\n")

    def command(self, words: list[str]) -> None:
        name, values = (words[0].replace("-", "_"), words[1:]) if words else ("help", [])
        if name in ("quit", "exit", "q"):
            raise Quit
        if name == "help":
            self.write(HELP + "\n")
        elif name == "settings":
            self.write(self.describe() + "\n")
        elif name in SETTINGS:
            self.set(name, values)
            self.write(self.describe() + "\n")
        else:
            raise CharlmError(f"unknown command :{words[0]}; type :help for the commands")

    def set(self, name: str, values: list[str]) -> None:
        if len(values) != 1:
            raise CharlmError(f":{name} takes one value, e.g. :{name} {getattr(self.settings, name) or 1}")
        text = values[0]
        try:
            value = None if name in OPTIONAL and text.lower() in ("off", "none") else SETTINGS[name](text)
        except ValueError:
            raise CharlmError(f":{name} needs a number{' or off' if name in OPTIONAL else ''}, got {text!r}") from None
        changed = replace(self.settings, **{name: value})
        changed.validate()
        self.settings = changed

    def describe(self) -> str:
        shown = {name: value for name, value in asdict(self.settings).items() if name in SETTINGS}
        return "  ".join(f"{name}={'off' if value is None else value}" for name, value in shown.items())

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def run(session: Session, read_line: Callable[[], str]) -> None:
    """Hand every line ``read_line`` gives to ``session`` until end of input, Ctrl-C or :quit."""
    while True:
        try:
            line = read_line()
        except (EOFError, KeyboardInterrupt):
            session.write("\n")
            return
        try:
            session.handle(line)
        except Quit:
            return
