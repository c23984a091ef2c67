"""The OpenAI completions API (``POST /v1/completions``), so clients people already use work unchanged.

Its tokens are this model's characters: ``max_tokens`` and ``usage`` count characters.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ..sampling import SampleSettings
from .app import SEED_LIMIT, sse
from .engine import Ending

DEFAULT_MAX_TOKENS = 16  # OpenAI's


class CompletionRequest(BaseModel):
    """The fields of OpenAI's completions request that mean something for a character model."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = Field(None, description="any name: this server has one model")
    prompt: str = Field("", description="text to start from")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=0, description="characters to generate")
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one completion per request")
    user: str | None = None

    length_field: ClassVar[str] = "max_tokens"
    prime_field: ClassVar[str] = "prompt"

    def generation(self) -> tuple[str, SampleSettings]:
        return self.prompt, SampleSettings(length=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                                          seed=self.seed)

    def reply(self, seed: int, model_name: str) -> CompletionReply:
        return CompletionReply(model_name, len(self.prompt))


@dataclass(frozen=True)
class CompletionReply:
    """A ``text_completion`` object, or its stream of chunks closed by ``data: [DONE]``."""

    model: str
    prompt_chars: int
    id: str = field(default_factory=lambda: f"cmpl-{secrets.token_hex(12)}")
    created: int = field(default_factory=lambda: int(time.time()))

    def completion(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"text": text, "index": 0, "finish_reason": finish_reason, "logprobs": None}]}

    def whole(self, text: str, ending: Ending) -> dict[str, Any]:
        usage = {"prompt_tokens": self.prompt_chars, "completion_tokens": ending.length,
                 "total_tokens": self.prompt_chars + ending.length}
        return {**self.completion(text, ending.reason), "usage": usage}

    def piece(self, text: str) -> str:
        return sse(self.completion(text, None))

    def last(self, ending: Ending) -> str:
        return sse(self.completion("", ending.reason)) + "data: [DONE]\n\n"
