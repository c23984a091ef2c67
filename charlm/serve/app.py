"""The HTTP API over an ``Engine`` (FastAPI): routes, validation, limits and server-sent events.

Every refusal is a JSON error ``{"error": {"message", "type", "param", "code"}}`` (the OpenAI shape, so
its clients show it) with a 4xx status naming the field; a full server is a 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator, ClassVar

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import __version__
from ..errors import CharlmError
from ..sampling import SampleSettings
from .engine import Engine, EngineBusy, Ending, Job
from .limits import Limits

RETRY_AFTER_SECONDS = 1
DISCONNECT_POLL_SECONDS = 0.25
SEED_LIMIT = 2 ** 63


class ApiError(Exception):
    """A refused request: its status, a message naming what was wrong, and the field (``param``) if one."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": None}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def busy(reason: str) -> ApiError:
    return ApiError(503, f"the server is busy ({reason}); retry in {RETRY_AFTER_SECONDS} s", kind="server_busy",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


class GenerateRequest(BaseModel):
    """``POST /v1/generate``: the options of ``charlm sample``, with its defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prime: str = Field("", description="text to start from (not repeated in the reply)")
    length: int = Field(500, ge=0, description="characters to generate")
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False, description="softmax temperature; 0 is greedy")
    top_k: int | None = Field(None, ge=1, description="sample only from the K most likely characters")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="sample only from the smallest set with this mass")
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="the same seed gives the same text; random if left out")
    stream: bool = Field(False, description="reply as server-sent events, a piece of text at a time")

    length_field: ClassVar[str] = "length"
    prime_field: ClassVar[str] = "prime"

    def generation(self) -> tuple[str, SampleSettings]:
        return self.prime, SampleSettings(length=self.length, temperature=self.temperature, top_k=self.top_k,
                                          top_p=self.top_p, seed=self.seed)

    def reply(self, seed: int, model_name: str) -> GenerateReply:
        return GenerateReply(self.prime, seed)


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event holding ``data`` as JSON."""
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data)}\n\n"


@dataclass(frozen=True)
class GenerateReply:
    """The replies of ``/v1/generate``: one JSON object, or a text event per piece and a ``done`` event."""

    prime: str
    seed: int

    def summary(self, ending: Ending) -> dict[str, Any]:
        return {"prime": self.prime, "length": ending.length, "seed": self.seed,
                "chars_per_second": round(ending.chars_per_second, 1), "finish_reason": ending.reason}

    def whole(self, text: str, ending: Ending) -> dict[str, Any]:
        return {"text": text, **self.summary(ending)}

    def piece(self, text: str) -> str:
        return sse({"text": text})

    def last(self, ending: Ending) -> str:
        return sse({"done": True, **self.summary(ending)}, event="done")


async def json_body(request: Request, limit: int) -> Any:
    """The request's JSON, refused (413) as soon as it is known to pass ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is larger than this server's limit of {limit:,} bytes (--max-body-bytes)", "body")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as err:  # RecursionError: arrays nested thousands deep
        raise ApiError(400, f"the request body is not JSON ({err})", "body") from None


def field_error(err: ValidationError) -> ApiError:
    """The first problem pydantic found, naming its field."""
    first = err.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or "body"
    value = f" (got {json.dumps(first['input'])[:60]})" if first["type"] != "missing" and first["loc"] else ""
    return ApiError(422, f"{param}: {first['msg']}{value}", param)


class Mailbox:
    """Items from the engine's thread to asyncio queues: everything that arrives together (a step's
    pieces for every request) costs the event loop one wake-up, not one each."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock, self.items, self.scheduled = loop, threading.Lock(), [], False

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self.deliver)
        except RuntimeError:  # the loop has closed: the server is gone, nobody is listening
            pass

    def deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


class Run:
    """One request's engine job, seen from the event loop: its pieces, then its ending, in an asyncio queue."""

    def __init__(self, items: asyncio.Queue, job: Job):
        self.items, self.job = items, job
        self.first: str | Ending | None = None

    @classmethod
    async def submitted(cls, engine: Engine, mailbox: Mailbox, prime: str, settings: SampleSettings, limits: Limits,
                        prime_field: str) -> Run:
        """The job queued; its prime runs in a worker thread, so the event loop and the batch go on meanwhile."""
        items: asyncio.Queue = asyncio.Queue()

        def put(item: str | Ending) -> None:  # from the engine's thread
            mailbox.put(items, item)

        try:
            job = await asyncio.to_thread(engine.submit, prime, settings, put, put, limits.time_limit, limits.queue_timeout)
        except EngineBusy as err:
            raise busy(str(err)) from None
        except CharlmError as err:  # the prime's unknown characters or lone surrogates: the only input the engine still checks
            raise ApiError(422, f"{prime_field}: {err}", prime_field) from None
        return cls(items, job)

    async def started(self) -> None:
        """Wait for the first piece, so a request refused after waiting in the queue is a 503 before any header."""
        self.first = await self.items.get()
        if isinstance(self.first, Ending) and self.first.reason in ("busy", "stopped"):
            raise busy("no slot became free in time" if self.first.reason == "busy" else "it is stopping")

    async def pieces(self) -> AsyncIterator[str | Ending]:
        """Every piece, then the ending; leaving early (a client gone) frees the slot at once."""
        try:
            item = self.first
            while not isinstance(item, Ending):
                yield item
                item = await self.items.get()
            yield item
        finally:
            self.job.cancel()

    async def collect(self, request: Request) -> tuple[str, Ending]:
        """The whole text and the ending; a client that goes away meanwhile cancels the job."""
        watcher = asyncio.create_task(self.cancel_on_disconnect(request))
        try:
            texts = [item async for item in self.pieces()]
        finally:
            watcher.cancel()
        ending = texts.pop()
        if ending.reason == "error":
            raise ApiError(500, "generation failed on the server; see its log", kind="server_error")
        return "".join(texts), ending

    async def cancel_on_disconnect(self, request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        self.job.cancel()


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads and checks its JSON itself (to bound its size first)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def create_app(engine: Engine, info: dict[str, Any], limits: Limits = Limits(), model_name: str = "charlm") -> FastAPI:
    """The ASGI app serving ``engine``'s model; ``info`` is what ``GET /v1/model`` shows."""
    from .completions import CompletionRequest

    app = FastAPI(title="charlm", version=__version__, description="Character-level text generation, many requests in one batch.")
    app.add_exception_handler(ApiError, lambda request, err: err.response())
    page = resources.files(__package__).joinpath("page/index.html").read_text(encoding="utf-8")
    mailboxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}  # one per event loop: the server's

    async def generate(request: Request, kind: type[GenerateRequest] | type[CompletionRequest]):
        try:
            asked = kind.model_validate(await json_body(request, limits.max_body_bytes))
        except ValidationError as err:
            raise field_error(err) from None
        prime, settings = asked.generation()
        if settings.length > limits.max_length:
            raise ApiError(422, f"{asked.length_field}: at most {limits.max_length:,} characters a request on this server "
                                f"(--max-length), got {settings.length:,}", asked.length_field)
        loop = asyncio.get_running_loop()
        run = await Run.submitted(engine, mailboxes.setdefault(loop, Mailbox(loop)), prime, settings, limits, asked.prime_field)
        await run.started()
        reply = asked.reply(run.job.settings.seed, model_name)
        if not asked.stream:
            return JSONResponse(reply.whole(*await run.collect(request)))

        async def events() -> AsyncIterator[str]:
            async for item in run.pieces():
                yield reply.last(item) if isinstance(item, Ending) else reply.piece(item)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> str:
        return page

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        """The served model: cell, layers, sizes, parameters, vocabulary, training step, best validation loss."""
        return {"name": model_name, **info}

    @app.get("/v1/load")
    async def load() -> dict[str, Any]:
        """Slots in use and requests waiting, with the limits."""
        return {**engine.load(), "max_length": limits.max_length, "max_body_bytes": limits.max_body_bytes,
                "time_limit": limits.time_limit, "queue_timeout": limits.queue_timeout}

    @app.post("/v1/generate", openapi_extra=body_schema(GenerateRequest))
    async def generate_text(request: Request):
        """Generate a continuation of ``prime``: JSON, or with ``"stream": true`` server-sent events."""
        return await generate(request, GenerateRequest)

    @app.post("/v1/completions", openapi_extra=body_schema(CompletionRequest))
    async def completions(request: Request):
        """The OpenAI completions API (``max_tokens`` counts characters)."""
        return await generate(request, CompletionRequest)

    return app

