"""``charlm serve``: load a model, bind the address, run uvicorn (on a thread) and the batch (on the main
thread) until Ctrl-C or SIGTERM."""

from __future__ import annotations

import importlib
import signal
import socket
import threading
from pathlib import Path
from typing import Callable

import torch

from ..errors import CharlmError
from ..model.checkpoint import PRETRAINED_NAME, load_model
from ..runinfo import checkpoint_info
from .limits import MAX_SLOTS, MAX_WAITING, Limits

GRACEFUL_SHUTDOWN_SECONDS = 2  # open streams get this long to end once a stop is asked for


def require_serve_extra() -> None:
    for package in ("fastapi", "uvicorn"):
        try:
            importlib.import_module(package)
        except ImportError:
            raise CharlmError(f'charlm serve needs {package}: install the serve extra with: pip install "charlm[serve]"') from None


def bound_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: any free port), so the address is known before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise CharlmError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port or --host") from None
    sock.listen(128)
    return sock


def address_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def model_name(checkpoint: str | None) -> str:
    """The name replies give the served model: 'pretrained', or the run directory's or file's name."""
    if checkpoint is None or checkpoint == PRETRAINED_NAME:
        return PRETRAINED_NAME
    path = Path(checkpoint)
    return path.parent.name if path.suffix == ".pt" and path.parent.name else path.name


def serve(checkpoint: str | None = None, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
          max_slots: int = MAX_SLOTS, max_waiting: int = MAX_WAITING, device: str | torch.device = "auto",
          on_ready: Callable[[str], None] | None = None) -> str:
    """Serve a checkpoint (the bundled model by default) until Ctrl-C or SIGTERM; returns the signal's name.

    ``on_ready(address)`` is called once the socket listens (requests made from then on are served)."""
    require_serve_extra()
    import uvicorn

    from ..device import resolve_device
    from .app import create_app
    from .engine import Engine

    if max_slots < 1 or max_waiting < 0:
        raise CharlmError(f"--max-slots must be at least 1 and --max-waiting 0 or more, got {max_slots} and {max_waiting}")
    limits = limits or Limits()
    limits.validate()
    loaded = load_model(checkpoint, resolve_device(device) if isinstance(device, str) else device)
    sock = bound_socket(host, port)
    engine = Engine(loaded.model, loaded.vocab, max_slots, max_waiting, in_thread=False)
    app = create_app(engine, checkpoint_info(loaded.checkpoint["path"], loaded.checkpoint), limits, model_name(checkpoint))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS))
    stopped_by: list[str] = []

    def http() -> None:  # uvicorn on a thread of its own; the batch steps on this one
        try:
            server.run(sockets=[sock])
        finally:
            engine.stop()

    def stop(number: int, frame) -> None:
        stopped_by.append(signal.Signals(number).name)
        server.should_exit = True
        engine.stop()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="charlm-http", daemon=True)
    try:
        thread.start()
        if on_ready is not None:
            on_ready(address_of(sock))
        engine.run()  # until a signal, or uvicorn ends
    finally:
        server.should_exit = True
        engine.stop()
        thread.join(GRACEFUL_SHUTDOWN_SECONDS + 5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return stopped_by[0] if stopped_by else "stopped"
