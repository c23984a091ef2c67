"""`charlm sample --interactive`, driven as a user would: through a pseudo-terminal, keys and all."""

import codecs
import io
import os
import pty
import select
import sys
import time

import pytest

from charlm import SampleSettings, generate, load_model
from charlm.interactive import Session, run

PROMPT = "\n> "


class Terminal:
    """`python -m charlm ARGS` on the slave side of a pseudo-terminal, its controlling terminal."""

    def __init__(self, *args: str):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: nothing but exec, so no test state runs twice
            os.execve(sys.executable, [sys.executable, "-m", "charlm", *args], {**os.environ, "LC_ALL": "C.UTF-8"})
        self.seen, self.decoder = "", codecs.getincrementaldecoder("utf-8")("replace")  # a read may split a character

    def read_until(self, text: str, timeout: float = 60.0) -> str:
        """Everything written since the last read, up to and including ``text`` (line ends as "\\n")."""
        deadline = time.time() + timeout
        while text not in self.seen:
            left = deadline - time.time()
            assert left > 0, f"{text!r} did not appear; the terminal shows {self.seen[-500:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                self.seen = (self.seen + self.decoder.decode(os.read(self.fd, 65536))).replace("\r\n", "\n")
        upto = self.seen.index(text) + len(text)
        shown, self.seen = self.seen[:upto], self.seen[upto:]
        return shown

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def ask(self, line: str) -> str:
        """Type ``line`` and Enter; what the session answered before its next prompt."""
        self.type(line + "\r")
        return self.read_until(PROMPT)[len(line) + 1:-len(PROMPT)]

    def exit_status(self, timeout: float = 30.0) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:  # drain what is left, so the child never blocks on a full terminal
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.seen += self.decoder.decode(os.read(self.fd, 65536))
            except OSError:  # the child closed its side
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = None
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        pytest.fail("the session did not end")

    def close(self) -> None:
        """Kill the child if it still runs (a test failed or it hung) and free the terminal."""
        if self.pid is not None:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
            os.close(self.fd)


@pytest.fixture
def open_terminal():
    """open_terminal(*args): a Terminal that is killed at the end of the test, whatever happened in it."""
    started: list[Terminal] = []

    def start(*args: str) -> Terminal:
        started.append(Terminal(*args))
        return started[-1]
    yield start
    for each in started:
        each.close()


@pytest.fixture
def pretrained():
    model, vocab, _, _ = load_model("pretrained")
    return model, vocab


def continuation(pretrained, prime: str, **settings) -> str:
    return generate(*pretrained, prime, SampleSettings(**settings))[0]


def test_a_terminal_session_continues_primes_keeps_settings_and_ends_on_ctrl_d(pretrained, open_terminal):
    terminal = open_terminal("sample", "--interactive", "--length", "40", "--seed", "7")
    terminal.read_until(PROMPT)
    assert terminal.ask("ROMEO:") == continuation(pretrained, "ROMEO:", length=40, seed=7)
    assert "temperature=0.0" in terminal.ask(":temperature 0")
    greedy = terminal.ask("JULIET:")
    assert greedy == terminal.ask("JULIET:") == continuation(pretrained, "JULIET:", length=40, temperature=0)
    assert ":top_p" in terminal.ask(":help")
    assert terminal.ask(":temperature -1").startswith("error: --temperature must be a finite number, 0")
    assert terminal.ask("snow \u2603").startswith("error: the prime text has characters the model never saw")
    assert "temperature=0.0" in terminal.ask(":settings"), "a refused value changed the settings"
    terminal.type("\x04")  # Ctrl-D
    assert terminal.exit_status() == 0
    assert "Traceback" not in terminal.seen


def test_ctrl_c_stops_a_continuation_then_ends_the_session_at_the_prompt(open_terminal):
    terminal = open_terminal("sample", "-i", "--length", "1000000000")
    terminal.read_until(PROMPT)
    terminal.type("KING:\r")
    terminal.read_until("KING:\n")
    terminal.read_until(" ")  # text is streaming
    terminal.type("\x03")  # Ctrl-C while the text is made: back to the prompt
    assert "[stopped]" in terminal.read_until(PROMPT)
    assert "length=5" in terminal.ask(":length 5")
    assert len(terminal.ask("KING:")) == 5
    # Ctrl-C at the prompt: the end. Not at the very instant the prompt shows: a signal that lands
    # between readline printing it and waiting for a key is only noticed at the next key (CPython).
    time.sleep(0.5)
    terminal.type("\x03")
    assert terminal.exit_status() == 0
    assert "Traceback" not in terminal.seen


def test_the_library_session_reads_lines_from_any_source(pretrained):
    out = io.StringIO()
    lines = iter(["::colon", ":length 3", ":top-k 1", "ab", ":quit", "never read"])
    run(Session(*pretrained, SampleSettings(length=10, seed=1), out), lambda: next(lines))
    written = out.getvalue()  # compared as text: a continuation may hold a newline of its own
    assert written.startswith(continuation(pretrained, ":colon", length=10, seed=1) + "\n")
    assert written.endswith("\n" + continuation(pretrained, "ab", length=3, top_k=1, seed=1) + "\n")
    assert next(lines) == "never read"


def test_interactive_refuses_a_prime_or_several_samples(cli):
    for extra in (["--prime", "A"], ["--num-samples", "2"]):
        code, _, err = cli("sample", "--interactive", *extra)
        assert code == 1 and err.count("\n") == 1 and "--interactive reads its primes from the prompt" in err
