"""Batches: truncated-BPTT windows over contiguous streams, for training and for evaluation."""

from __future__ import annotations

import torch

class StreamBatcher:
    """Truncated-BPTT batches over ``batch_size`` contiguous streams of the data.

    As in char-rnn, row b of every batch continues where row b of the previous
    batch stopped, so the hidden state can be carried over. The position
    (epoch, offset) and the generator fully determine the next batch, which is
    what makes an exact resume possible. Each stream needs at least ``seq_len + 1`` ids.
    ``rows`` keeps a block of the ``batch_size`` streams (one rank's share of a distributed
    batch): the streams, lengths and positions are those of the whole batch.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int,
                 random_seq_len: bool = False, generator: torch.Generator | None = None, rows: slice = slice(None)):
        self.stream_len = (len(data) - 1) // batch_size
        usable = batch_size * self.stream_len
        self.inputs = data[:usable].view(batch_size, self.stream_len)[rows]
        self.targets = data[1:usable + 1].view(batch_size, self.stream_len)[rows]
        self.seq_len = seq_len
        self.random_seq_len = random_seq_len
        self.generator = generator
        self.epoch = 0
        self.offset = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.stream_len // self.seq_len

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.offset / self.stream_len

    def next_length(self) -> int:
        """AWD-LSTM style: usually around seq_len, sometimes around half of it."""
        if not self.random_seq_len:
            return self.seq_len
        draw = torch.rand(2, generator=self.generator)
        base = self.seq_len if draw[0] < 0.95 else self.seq_len / 2
        length = int(round(base + 0.1 * self.seq_len * float(torch.randn(1, generator=self.generator))))
        return max(self.seq_len // 4, min(length, 2 * self.seq_len, self.stream_len))

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(inputs, targets, new_epoch); ``new_epoch`` means: reset the hidden state."""
        length = self.next_length()
        new_epoch = False
        if self.offset + length > self.stream_len:
            self.epoch, self.offset, new_epoch = self.epoch + 1, 0, True
        start = self.offset
        self.offset += length
        return self.inputs[:, start:self.offset], self.targets[:, start:self.offset], new_epoch or start == 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def eval_geometry(length: int, batch_size: int, seq_len: int) -> tuple[int, int]:
    """(streams, characters per stream) that evaluation windows over ``length`` ids read."""
    streams = max(1, min(batch_size, (length - 1) // seq_len))
    return streams, (length - 1) // streams


def eval_window_count(length: int, batch_size: int, seq_len: int) -> int:
    """How many windows ``eval_windows`` yields over ``length`` ids, without a cap."""
    return -(-eval_geometry(length, batch_size, seq_len)[1] // seq_len)


def eval_windows(data: torch.Tensor, batch_size: int, seq_len: int, max_batches: int | None = None):
    """Contiguous evaluation windows over ``batch_size`` streams, for a hidden state carried along."""
    streams, stream_len = eval_geometry(len(data), batch_size, seq_len)
    inputs = data[: streams * stream_len].view(streams, stream_len)
    targets = data[1: streams * stream_len + 1].view(streams, stream_len)
    starts = range(0, stream_len, seq_len)
    for i, start in enumerate(starts):
        if max_batches is not None and i >= max_batches:
            return
        yield inputs[:, start:start + seq_len], targets[:, start:start + seq_len]
