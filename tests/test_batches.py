"""StreamBatcher and eval_windows: continuity of streams, epochs, resume, minimum sizes."""

from __future__ import annotations

import pytest
import torch

from charlstm.batches import StreamBatcher, eval_windows
from charlstm.errors import CharlstmError, UsageError


def ramp(n: int) -> torch.Tensor:
    """Tokens whose value is their position (int32 so that every position is distinct)."""
    return torch.arange(n, dtype=torch.int32)


def test_shapes_dtypes_and_shift():
    b = StreamBatcher(ramp(1000).to(torch.uint8), batch_size=4, seq_len=8)
    x, y, first = b.next_batch()
    assert x.shape == y.shape == (8, 4) and x.dtype == y.dtype == torch.long
    assert first is True
    tokens = ramp(1000).to(torch.uint8).long()
    # y is x shifted by one position of the same stream
    assert torch.equal(x[1:], y[:-1])
    for col in range(4):
        start = int(col * b.stream_len)
        assert torch.equal(x[:, col], tokens[start:start + 8])


def test_stream_continuity_over_an_epoch():
    n, B, T = 1003, 5, 7
    b = StreamBatcher(ramp(n), batch_size=B, seq_len=T)
    assert b.stream_len == (n - 1) // B and b.steps_per_epoch == b.stream_len // T
    xs, ys = [], []
    prev_y = None
    for step in range(b.steps_per_epoch):
        x, y, first = b.next_batch()
        assert first == (step == 0)
        if prev_y is not None:
            # window k+1 of every stream starts exactly where window k ended
            assert torch.equal(x[0], prev_y[-1])
            assert torch.equal(x[0], xs[-1][-1] + 1)
        prev_y = y
        xs.append(x)
        ys.append(y)
    x_all = torch.cat(xs)  # (steps*T, B)
    y_all = torch.cat(ys)
    for col in range(B):
        expected = torch.arange(col * b.stream_len, col * b.stream_len + b.steps_per_epoch * T)
        assert torch.equal(x_all[:, col], expected)
        assert torch.equal(y_all[:, col], expected + 1)
    assert b.epoch == 1 and b.position == 0


def test_epochs_are_deterministic_and_shift_within_slack():
    n, B, T = 2000, 3, 10
    tokens = ramp(n)
    a, c = StreamBatcher(tokens, B, T, seed=7), StreamBatcher(tokens, B, T, seed=7)
    assert a.slack == a.stream_len % T and a.slack > 0
    offsets = {a.epoch_offset(e) for e in range(1, 30)}
    assert offsets <= set(range(a.slack + 1)) and len(offsets) > 1
    assert a.epoch_offset(0) == 0
    for _ in range(3 * a.steps_per_epoch + 2):
        xa, ya, fa = a.next_batch()
        xc, yc, fc = c.next_batch()
        assert torch.equal(xa, xc) and torch.equal(ya, yc) and fa == fc
        # never reads past the end, always in bounds of its own stream
        assert int(ya.max()) <= n - 1
    assert a.epoch == 3 and a.position == 2
    assert a.epochs_done == pytest.approx(3 + 2 / a.steps_per_epoch)


def test_resume_mid_epoch_gives_the_same_batches():
    tokens = ramp(5000)
    a = StreamBatcher(tokens, 4, 16, seed=3)
    for _ in range(a.steps_per_epoch + 5):
        a.next_batch()
    state = a.state_dict()
    assert state["epoch"] == 1 and state["position"] == 5
    b = StreamBatcher(tokens, 4, 16, seed=0)
    b.load_state_dict(state)
    for _ in range(a.steps_per_epoch + 3):
        xa, ya, fa = a.next_batch()
        xb, yb, fb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and fa == fb


def test_resume_rejects_other_sizes():
    state = StreamBatcher(ramp(5000), 4, 16).state_dict()
    with pytest.raises(CharlstmError, match="batch_size"):
        StreamBatcher(ramp(5000), 8, 16).load_state_dict(state)
    with pytest.raises(CharlstmError, match="n_tokens"):
        StreamBatcher(ramp(6000), 4, 16).load_state_dict(state)
    with pytest.raises(CharlstmError, match="out of range"):
        StreamBatcher(ramp(5000), 4, 16).load_state_dict({**state, "position": 10**6})


def test_minimum_size_is_batch_times_window_plus_one():
    B, T = 4, 8
    b = StreamBatcher(ramp(B * T + 1), B, T)
    assert b.steps_per_epoch == 1
    x, y, _ = b.next_batch()
    assert int(y.max()) == B * T
    with pytest.raises(CharlstmError) as e:
        StreamBatcher(ramp(B * T), B, T, split="val")
    msg = str(e.value)
    assert "val split has 32 characters" in msg and "at least 33" in msg and "--batch-size" in msg
    with pytest.raises(UsageError):
        StreamBatcher(ramp(100), 0, 8)


def test_works_on_memory_mapped_corpus_tokens(tiny_corpus_file, tmp_path):
    from charlstm.corpus import load_corpus

    c = load_corpus(str(tiny_corpus_file), data_dir=tmp_path / "data", progress=False)
    train = c.split()["train"]
    b = StreamBatcher(train, 4, 32)
    x, y, _ = b.next_batch()
    text = c.vocab.decode(train)
    s = b.stream_len
    assert c.vocab.decode(x[:, 1]) == text[s:s + 32]
    assert c.vocab.decode(y[:, 1]) == text[s + 1:s + 33]


# --------------------------------------------------------------------------- eval_windows


@pytest.mark.parametrize("n,B,T", [(101, 4, 8), (100, 3, 7), (9, 16, 4), (2, 1, 5), (64, 8, 8)])
def test_eval_windows_cover_every_target_once(n, B, T):
    tokens = ramp(n)
    seen = []
    prev = None
    for x, y, mask in eval_windows(tokens, B, T):
        assert x.shape == y.shape == mask.shape and x.shape[0] == T and x.dtype == torch.long
        assert mask.dtype == torch.bool
        assert torch.equal(y[mask], x[mask] + 1)                 # targets follow their inputs
        if prev is not None:                                     # continuity where the stream goes on
            cont = mask[0]
            assert torch.equal(x[0][cont], prev[-1][cont] + 1)
        prev = x
        # padding only at the end of a column
        assert torch.all(mask[1:] <= mask[:-1])
        seen.append(y[mask])
    seen = torch.cat(seen).sort().values
    assert torch.equal(seen, torch.arange(1, n))                 # every target exactly once


def test_eval_windows_too_short():
    with pytest.raises(CharlstmError, match="at least 2"):
        list(eval_windows(ramp(1), 4, 8))
