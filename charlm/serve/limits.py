"""What a server lets one request ask for, and how many requests it takes at once: one place for
the defaults of the library and of ``charlm serve``'s options (light to import: the CLI reads it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import CharlmError

MAX_SLOTS = 64  # requests generated at once, in one batch
MAX_WAITING = 64  # requests that may wait for a slot; more get 503


@dataclass(frozen=True)
class Limits:
    """What one request may ask and how long it may take; the slots and queue are the engine's."""

    max_length: int = 5000  # characters one request may generate
    max_body_bytes: int = 64 * 1024
    time_limit: float = 120.0  # seconds a request may run, queue included; then it ends with what it has
    queue_timeout: float = 30.0  # seconds a request may wait for a slot; then 503

    def validate(self) -> None:
        for name, value in vars(self).items():
            if not 0 < value < math.inf:
                raise CharlmError(f"--{name.replace('_', '-')} must be a finite number more than 0, got {value}")
