"""``charlm bench serve``: N streaming clients against a ``charlm serve`` of its own, for T seconds.

The server runs in a process of its own on 127.0.0.1 (so its memory is its own), the clients in this
one, on asyncio and httpx. Each client asks for one seeded stream after another and counts the
characters it receives; a request still running at the end counts what it received so far. The
clients share the machine's cores with the server, so the figures are a lower bound of what the
server does alone. The same model's one-stream rate through the library (``charlm.generate``, no
HTTP) is measured too, for the comparison.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import CharlmError

MAX_CLIENTS = 256
MAX_SECONDS = 600
START_TIMEOUT = 120.0
ONE_STREAM_LENGTH = 2000


@dataclass
class ClientTally:
    """What the clients saw: characters, finished requests, errors (with the first few reasons), first-character waits."""

    chars: int = 0
    requests: int = 0
    errors: int = 0
    reasons: list[str] = field(default_factory=list)
    first_char_seconds: list[float] = field(default_factory=list)

    def fail(self, reason: str) -> None:
        self.errors += 1
        if len(self.reasons) < 5:
            self.reasons.append(reason)


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile (``share`` in 0..1) of ``values``; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


async def one_request(client, body: dict, tally: ClientTally, stop_at: float) -> None:
    """One streamed generation: its characters, when the first came, and whether it ended well."""
    import httpx

    sent = time.perf_counter()
    first = True
    try:
        async with client.stream("POST", "/v1/generate", json=body) as reply:
            if reply.status_code != 200:
                tally.fail(f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}")
                return
            async for line in reply.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if "text" in event:
                    if first:
                        tally.first_char_seconds.append(time.perf_counter() - sent)
                        first = False
                    tally.chars += len(event["text"])
                    if time.perf_counter() >= stop_at:
                        return
                elif event.get("done"):
                    if event["finish_reason"] != "length":
                        tally.fail(f"ended by {event['finish_reason']}")
                    else:
                        tally.requests += 1
                    return
            tally.fail("the stream ended without its done event")
    except httpx.HTTPError as err:
        tally.fail(f"{type(err).__name__}: {err}")


async def drive(url: str, clients: int, seconds: float, length: int) -> ClientTally:
    """``clients`` loops of seeded streaming requests until ``seconds`` have passed."""
    import httpx

    tally = ClientTally()
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(60.0)) as client:
        async def loop(index: int) -> None:
            number = 0
            while time.perf_counter() < stop_at:
                body = {"prime": "ROMEO:", "length": length, "temperature": 0.8, "seed": index * 100_000 + number, "stream": True}
                await one_request(client, body, tally, stop_at)
                number += 1

        await asyncio.gather(*(loop(index) for index in range(clients)))
    return tally


def memory_of(pid: int) -> dict[str, float]:
    """A process's resident memory now and at its peak, in MB (Linux)."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                found["rss_mb" if line.startswith("VmRSS") else "peak_rss_mb"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return found


def started_server(checkpoint: str | None, clients: int) -> tuple[subprocess.Popen, str]:
    """``charlm serve`` on a free loopback port with a slot for every client; its process and address."""
    command = [sys.executable, "-m", "charlm", "serve", checkpoint or "pretrained", "--port", "0",
               "--max-slots", str(clients), "--max-waiting", str(clients)]
    errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: a pipe nobody reads would block the server once full
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ready = select.select([server.stdout], [], [], START_TIMEOUT)[0]
    line = server.stdout.readline() if ready else ""
    if not line.startswith("charlm serve: http://"):
        server.kill()
        server.wait()
        errors.seek(0)
        raise CharlmError(f"the server did not start: {line.strip() or errors.read().strip()[-300:]}")
    return server, line.split()[2]


def one_stream_rate(checkpoint: str | None) -> float:
    """Characters per second of one stream through the library, for the same model."""
    from ..model.checkpoint import load_model
    from ..sampling import SampleSettings, generate

    loaded = load_model(checkpoint)
    started = time.perf_counter()
    generate(loaded.model, loaded.vocab, "ROMEO:", SampleSettings(length=ONE_STREAM_LENGTH, temperature=0.8, seed=0))
    return ONE_STREAM_LENGTH / (time.perf_counter() - started)


def load_test(clients: int, seconds: float, length: int = 500, checkpoint: str | None = None) -> dict:
    """Serve ``checkpoint`` and drive it with ``clients`` streaming clients for ``seconds``: the figures."""
    if not 1 <= clients <= MAX_CLIENTS:
        raise CharlmError(f"--clients must be 1 to {MAX_CLIENTS}, got {clients}")
    if not 0 < seconds <= MAX_SECONDS:
        raise CharlmError(f"--seconds must be more than 0 and at most {MAX_SECONDS}, got {seconds}")
    if length < 1:
        raise CharlmError(f"--length must be at least 1, got {length}")
    from .server import require_serve_extra
    require_serve_extra()
    server, url = started_server(checkpoint, clients)
    try:
        started = time.perf_counter()
        tally = asyncio.run(drive(url, clients, seconds, length))
        elapsed = time.perf_counter() - started
        memory = memory_of(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    report = {"clients": clients, "seconds": round(elapsed, 2), "length": length, **asdict(tally)}
    del report["first_char_seconds"]
    waits = tally.first_char_seconds
    report.update(chars_per_s=tally.chars / elapsed, first_char_p50_ms=1e3 * (percentile(waits, 0.5) or 0),
                  first_char_p99_ms=1e3 * (percentile(waits, 0.99) or 0), server_memory=memory,
                  one_stream_library_chars_per_s=one_stream_rate(checkpoint))
    return report
