"""Batches for truncated backpropagation through time, and evaluation windows.

A split of N tokens is cut into B contiguous streams, one per batch column.
Step k of an epoch gives every stream its k-th window of T tokens, so window
k+1 of a column starts exactly where window k ended: a hidden state carried
from one step to the next has always seen the text that precedes its input.
See docs/data.md for the layout and the minimum sizes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from torch import Tensor

from .errors import CharlstmError, UsageError
from .tokencache import release_pages

RELEASE_EVERY_BYTES = 32 * 1024 * 1024  # drop mapped corpus pages from the RSS after this much text read


def _too_short(split: str, n: int, batch_size: int, seq_len: int) -> CharlstmError:
    need = batch_size * seq_len + 1
    return CharlstmError(
        f"the {split} split has {n:,} characters, but --batch-size {batch_size} x --seq-len {seq_len} "
        f"needs at least {need:,} (batch size x seq len + 1); use a larger corpus or a smaller "
        f"--batch-size or --seq-len"
    )


def _gather(tokens: Tensor, idx: Tensor, token_map: Tensor | None = None) -> Tensor:
    """tokens[idx] as int64 (through ``token_map`` when given), touching only the indexed elements.

    index_select on the flat index: advanced indexing (``tokens[idx]``) is far slower
    (docs/performance.md, "Measurements behind smaller choices").
    """
    ids = tokens.index_select(0, idx.reshape(-1)).long()
    if token_map is not None:
        ids = token_map.index_select(0, ids)
    return ids.view(idx.shape)


class _PageReleaser:
    """Calls corpus.release_pages on a memory-mapped split every `every_bytes` of text read,
    so that the pages a long pass maps into the process do not pile up in its RSS."""

    def __init__(self, tokens: Tensor, bytes_per_call: int, every_bytes: int | None = None):
        every_bytes = RELEASE_EVERY_BYTES if every_bytes is None else every_bytes
        self.tokens = tokens
        self.every = max(1, every_bytes // max(1, bytes_per_call))
        self.calls = 0

    def tick(self) -> None:
        self.calls += 1
        if self.calls % self.every == 0:
            release_pages(self.tokens)


class StreamBatcher:
    """B contiguous streams of a split, served as windows of T tokens for truncated BPTT.

    Each stream is S = (N - 1) // B tokens long (plus one for the last target);
    an epoch is S // T steps. The S % T tokens per stream that do not fill a
    window are not wasted forever: epoch e > 0 starts every stream at an offset
    in [0, S % T] drawn from (seed, e), so the windows move a little between
    epochs. Epoch 0 starts at offset 0. Everything is deterministic and
    resumable from `state_dict()`.

    ``streams`` (a contiguous range of 0..B) makes the batcher serve only those
    columns of the global layout: one process's share when B streams are split
    across processes (charlstm.distributed.stream_range). The layout, the
    epoch offsets and the position do not depend on the share.
    """

    def __init__(self, tokens: Tensor, batch_size: int, seq_len: int, *, seed: int = 0, split: str = "train",
                 streams: range | None = None, token_map: Tensor | None = None):
        if batch_size < 1 or seq_len < 1:
            raise UsageError(f"--batch-size and --seq-len must be >= 1 (got {batch_size} and {seq_len})")
        tokens = tokens.reshape(-1)
        n = tokens.numel()
        if n < batch_size * seq_len + 1:
            raise _too_short(split, n, batch_size, seq_len)
        streams = range(batch_size) if streams is None else streams
        if len(streams) == 0 or streams.step != 1 or streams.start < 0 or streams.stop > batch_size:
            raise UsageError(f"streams must be a non-empty contiguous range inside 0..{batch_size} (got {streams})")
        self.tokens = tokens                        # (N,) any integer dtype, may be memory-mapped
        self.batch_size = batch_size                # B: streams of the whole (global) batch
        self.seq_len = seq_len                      # T
        self.seed = seed
        self.streams = streams                      # the columns this batcher serves (one process's share)
        self.token_map = token_map                  # (V_corpus,) long: ids -> another vocabulary's ids, or None
        self.stream_len = (n - 1) // batch_size     # S: inputs per stream
        self.steps_per_epoch = self.stream_len // seq_len
        self.slack = self.stream_len - self.steps_per_epoch * seq_len
        self.epoch = 0                              # completed epochs
        self.position = 0                           # index of the next window inside the current epoch
        self._stream_starts = torch.arange(streams.start, streams.stop, dtype=torch.long) * self.stream_len  # (b,)
        self._time = torch.arange(seq_len + 1, dtype=torch.long).unsqueeze(1)             # (T+1, 1)
        self._releaser = _PageReleaser(tokens, len(streams) * seq_len * tokens.element_size())

    def epoch_offset(self, epoch: int) -> int:
        """Where every stream starts in `epoch` (0 for the first epoch)."""
        if epoch == 0 or self.slack == 0:
            return 0
        return random.Random(f"{self.seed}:{epoch}").randint(0, self.slack)

    @property
    def epochs_done(self) -> float:
        """Completed epochs as a fraction (for --max-epochs)."""
        return self.epoch + self.position / self.steps_per_epoch

    def window_index(self, epoch: int, position: int) -> Tensor:
        """(T+1, b) indices into the split for this batcher's b streams: rows 0..T-1 are the
        inputs, rows 1..T the targets."""
        first = self._stream_starts + self.epoch_offset(epoch) + position * self.seq_len  # (b,)
        return first.unsqueeze(0) + self._time                                          # (T+1, b)

    def next_batch(self) -> tuple[Tensor, Tensor, bool]:
        """x (T, b) long, y (T, b) long (x shifted by one), and whether this window starts an epoch.

        b is the number of streams served (B unless ``streams`` names a share).
        Reset the carried hidden state when the flag is True.
        """
        idx = self.window_index(self.epoch, self.position)   # (T+1, b)
        window = _gather(self.tokens, idx, self.token_map)   # (T+1, b) long
        self._releaser.tick()
        x, y = window[:-1], window[1:]                       # (T, b), (T, b)
        starts_epoch = self.position == 0
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.position = 0
            self.epoch += 1
        return x, y, starts_epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, bool]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """JSON-safe position of the batcher, for checkpoints.

        The position is global: it is the same for every share of the streams,
        so a run saved by N processes resumes in any number that divides B.
        """
        return {
            "epoch": self.epoch, "position": self.position, "seed": self.seed,
            "batch_size": self.batch_size, "seq_len": self.seq_len, "n_tokens": self.tokens.numel(),
        }

    def load_state_dict(self, d: dict) -> None:
        """Continue from `state_dict()`; CharlstmError when it belongs to other data or sizes."""
        mine = self.state_dict()
        for key in ("batch_size", "seq_len", "n_tokens"):
            if key in d and d[key] != mine[key]:
                raise CharlstmError(
                    f"cannot resume the batch position: it was saved with {key}={d[key]}, this run has "
                    f"{mine[key]}; resume with the same data, --batch-size and --seq-len"
                )
        epoch, position = int(d["epoch"]), int(d["position"])
        if epoch < 0 or not 0 <= position < self.steps_per_epoch:
            raise CharlstmError(f"cannot resume the batch position: epoch {epoch}, position {position} is out of range")
        self.seed = int(d.get("seed", self.seed))
        self.epoch, self.position = epoch, position


def eval_windows(tokens: Tensor, num_streams: int, seq_len: int, *, split: str = "val",
                 token_map: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Windows covering every target of a split exactly once, for loss evaluation.

    The N - 1 targets (tokens 1..N-1) are cut into B = min(num_streams, N - 1)
    contiguous streams whose lengths differ by at most one. Yields
    x (T, B) long, y (T, B) long and mask (T, B) bool; window k+1 of each column
    continues window k, so carry the state across windows. Padding (mask False)
    appears only in the last window. ``token_map`` (V_corpus,) long translates
    the ids into another vocabulary's.
    """
    if num_streams < 1 or seq_len < 1:
        raise UsageError(f"--batch-size and --seq-len must be >= 1 (got {num_streams} and {seq_len})")
    tokens = tokens.reshape(-1)
    n_targets = tokens.numel() - 1
    if n_targets < 1:
        raise CharlstmError(
            f"the {split} split has {tokens.numel()} character(s); evaluation needs at least 2 "
            f"(use a larger corpus or a larger split fraction)"
        )
    b = min(num_streams, n_targets)
    base, extra = divmod(n_targets, b)
    lengths = torch.full((b,), base, dtype=torch.long)
    lengths[:extra] += 1                                              # (B,)
    starts = torch.cumsum(lengths, 0) - lengths                       # (B,) first input of each stream
    time = torch.arange(seq_len, dtype=torch.long).unsqueeze(1)       # (T, 1)
    n_windows = -(-int(lengths.max()) // seq_len)
    releaser = _PageReleaser(tokens, b * seq_len * tokens.element_size())
    for k in range(n_windows):
        step = k * seq_len + time                                     # (T, 1) offset inside the stream
        mask = step < lengths                                         # (T, B)
        idx = torch.where(mask, starts + step, starts)                # (T, B) padding reads a valid token
        x = _gather(tokens, idx, token_map)                           # (T, B)
        y = _gather(tokens, idx + 1, token_map)                       # (T, B)
        releaser.tick()
        yield x, y, mask
