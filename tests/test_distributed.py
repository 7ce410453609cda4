"""Training across processes (torch.distributed, DDP under torchrun) and corpora larger than memory.

The end-to-end tests start `charlstm train` under torchrun with 2 CPU processes
(gloo, loopback 127.0.0.1 only, a free port) on a tiny corpus and check that
it computes what one process computes with the same global batch, and that
checkpoints move between 1 and 2 processes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_text
from typer.testing import CliRunner

from charlstm import checkpoint as ck
from charlstm import distributed as dist_mod
from charlstm.batches import StreamBatcher, eval_windows
from charlstm.cli import app
from charlstm.corpus import load_corpus, release_pages
from charlstm.errors import CharlstmError, UsageError

# No dropout (each process draws its own masks), constant learning rate (a resumed run keeps the schedule).
TINY = ["--data", "tiny.txt", "--hidden", "16", "--embed", "8", "--layers", "2", "--batch-size", "4",
        "--seq-len", "16", "--schedule", "constant", "--warmup", "0", "--lr", "1e-2", "--dropout", "0",
        "--eval-every", "3", "--checkpoint-every", "3", "--keep", "10", "--sample-chars", "0",
        "--threads", "1", "--no-progress"]


# --------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(cwd: Path, nproc: int, *args) -> subprocess.CompletedProcess:
    """`charlstm train ARGS` under torchrun with `nproc` CPU processes on the loopback interface."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", CHARLSTM_DIST_TIMEOUT="120", PYTHONUNBUFFERED="1")
    # the workers import this checkout's charlstm, installed or not (a GPU machine ran the suite uninstalled)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"          # gloo's pairs on loopback, whatever the host name resolves to
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "charlstm", "train", *map(str, args)]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def train_here(*args):
    result = CliRunner().invoke(app, ["train", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def weights(run: Path, step: int) -> dict:
    return ck.load_tensors(run / ck.checkpoint_name(step) / "model.safetensors")[0]


def assert_same_weights(a: dict, b: dict) -> None:
    """Equal up to float rounding: summation order differs, and Adam divides small gradients by
    their own size, so a few 1e-6 differences appear after some steps (a wrong split or loss
    scale moves weights by about lr = 1e-2 per step)."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "tiny.txt").write_text(tiny_text(), encoding="utf-8")
    return tmp_path


# --------------------------------------------------------------------------- ranks and streams

def test_env_context_from_torchrun_variables():
    assert dist_mod.env_context({}) is None
    ctx = dist_mod.env_context({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size) == (3, 4, 1, 2)
    assert not ctx.is_main and not ctx.is_local_main and not ctx.enabled   # not joined yet
    with pytest.raises(UsageError, match="incomplete"):
        dist_mod.env_context({"RANK": "0"})
    with pytest.raises(UsageError, match="inconsistent"):
        dist_mod.env_context({"RANK": "4", "WORLD_SIZE": "4"})
    assert dist_mod.backend_for(torch.device("cpu")) == "gloo"
    assert dist_mod.backend_for(torch.device("cuda", 0)) == "nccl"


def test_stream_shares_are_contiguous_and_cover_the_batch():
    shares = [dist_mod.stream_range(12, dist_mod.DistContext(rank=r, world_size=3)) for r in range(3)]
    assert shares == [range(0, 4), range(4, 8), range(8, 12)]
    with pytest.raises(UsageError, match="multiple of 3"):
        dist_mod.stream_range(10, dist_mod.DistContext(rank=0, world_size=3))
    full = torch.arange(2 * 12 * 5.0).reshape(2, 12, 5)                      # (L, B, H)
    parts = [dist_mod.my_streams(full, 12, dist_mod.DistContext(rank=r, world_size=3)) for r in range(3)]
    assert [p.shape for p in parts] == [(2, 4, 5)] * 3
    assert torch.equal(torch.cat(parts, dim=1), full)
    with pytest.raises(CharlstmError, match="12 streams"):
        dist_mod.my_streams(full, 8, dist_mod.SINGLE)


def test_single_process_helpers_change_nothing():
    ctx = dist_mod.SINGLE
    assert ctx.is_main and not ctx.enabled
    t = torch.randn(2, 3, 4)
    assert dist_mod.gather_streams(t, ctx) is t
    assert dist_mod.mean(torch.tensor(2.5), ctx) == 2.5
    assert dist_mod.agree(ctx, stop=True, elapsed=1.5) == (True, 1.5)
    assert dist_mod.gather_objects({"a": 1}, ctx) == [{"a": 1}]
    assert dist_mod.on_main(lambda: 7, ctx) == 7
    model = torch.nn.Linear(2, 2)
    assert dist_mod.wrap_model(model, ctx, torch.device("cpu")) is model
    assert dist_mod.rank_seed(5, 0) == 5 and dist_mod.rank_seed(5, 1) != dist_mod.rank_seed(5, 2)
    with dist_mod.local_main_first(ctx):
        pass


def test_batcher_shares_are_columns_of_the_global_batch():
    tokens = torch.arange(1000) % 97                                          # (N,)
    full = StreamBatcher(tokens, 6, 7, seed=3)
    shares = [StreamBatcher(tokens, 6, 7, seed=3, streams=r) for r in (range(0, 2), range(2, 4), range(4, 6))]
    for _ in range(full.steps_per_epoch + 5):                                 # across an epoch boundary
        x, y, start = full.next_batch()
        parts = [b.next_batch() for b in shares]
        assert torch.equal(torch.cat([p[0] for p in parts], dim=1), x)
        assert torch.equal(torch.cat([p[1] for p in parts], dim=1), y)
        assert all(p[2] == start for p in parts)
    assert all(b.state_dict() == full.state_dict() for b in shares)           # one global position
    with pytest.raises(UsageError, match="contiguous range"):
        StreamBatcher(tokens, 6, 7, streams=range(4, 8))


def test_token_map_translates_windows():
    tokens = torch.arange(200, dtype=torch.uint8) % 5                         # (N,)
    table = torch.tensor([10, 11, 12, 13, 14])
    plain, mapped = StreamBatcher(tokens, 4, 8), StreamBatcher(tokens, 4, 8, token_map=table)
    x, y, _ = plain.next_batch()
    mx, my, _ = mapped.next_batch()
    assert torch.equal(mx, table[x]) and torch.equal(my, table[y])
    for (x, y, m), (mx, my, mm) in zip(eval_windows(tokens, 3, 16), eval_windows(tokens, 3, 16, token_map=table)):
        assert torch.equal(mx, table[x]) and torch.equal(my, table[y]) and torch.equal(m, mm)


def test_evaluate_loss_through_a_token_map_equals_on_translated_tokens():
    from charlstm.config import ModelConfig
    from charlstm.evaluation import evaluate_loss
    from charlstm.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=12, hidden=8, embed=4, layers=1))
    tokens = torch.randint(0, 5, (300,), dtype=torch.uint8)                  # a 5-character corpus
    table = torch.tensor([1, 3, 4, 8, 11])                                    # its ids in the model's 12
    mapped = evaluate_loss(model, tokens, batch_size=3, seq_len=16, device="cpu", token_map=table)
    copied = evaluate_loss(model, table[tokens.long()], batch_size=3, seq_len=16, device="cpu")
    assert mapped == copied


# --------------------------------------------------------------------------- memory

def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile line")


def test_tokenising_reads_in_chunks_and_shows_progress(tmp_path, monkeypatch, capsys):
    """No read takes more than a chunk of the source; the three passes show tqdm bars on stderr."""
    import builtins

    from charlstm import sources, textstream

    (tmp_path / "d").mkdir()
    text = tiny_text(200)                                                     # about 50 KB, non-ASCII too
    for k in range(3):
        (tmp_path / "d" / f"part{k}.txt").write_text(text, encoding="utf-8")
    reads = []

    class Spy:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            reads.append(len(data))
            return data

        def __getattr__(self, name):                                          # write, close, ...
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(textstream, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(textstream, "PROGRESS_MIN_BYTES", 1)
    monkeypatch.setattr(textstream.console, "stderr_is_terminal", lambda: True)     # bars (a log gets lines)
    for module in (textstream, sources):                                      # the passes, the binary sniff
        monkeypatch.setattr(module, "open", lambda *a, **k: Spy(builtins.open(*a, **k)), raising=False)
    c = load_corpus(str(tmp_path / "d"), data_dir=tmp_path / "data", progress=True)
    # Every read is a chunk, or the 8 KiB binary sniff of a directory's files; three passes in all.
    assert max(reads) <= max(4096, sources.BINARY_SNIFF_BYTES) and sum(reads) >= 3 * 3 * len(text.encode())
    assert c.vocab.decode(c.tokens) == text * 3
    out, err = capsys.readouterr()
    assert out == ""
    assert "hashing corpus" in err and "reading corpus" in err and "encoding corpus" in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="release_pages uses /proc/self/maps and madvise")
def test_release_pages_drops_mapped_corpus_pages_and_nothing_else(tmp_path):
    text = "abcdefghij\n" * (3 * 1024 * 1024 // 11)                           # about 3 MB
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    corpus = load_corpus(str(tmp_path / "c.txt"), data_dir=tmp_path / "data", progress=False)
    tokens = corpus.split(0.1)["train"]
    before = _rss_file_kb()
    checksum = int(tokens[::64].long().sum())                                # touches every page
    touched = _rss_file_kb()
    assert touched - before > 2000
    assert release_pages(tokens) >= tokens.numel() - 4096
    assert _rss_file_kb() < touched - 2000
    assert int(tokens[::64].long().sum()) == checksum                         # read again from the page cache
    anon = torch.arange(100_000, dtype=torch.int32)                          # anonymous memory: never touched
    assert release_pages(anon) == 0 and torch.equal(anon, torch.arange(100_000, dtype=torch.int32))


# --------------------------------------------------------------------------- DDP end to end

def test_two_processes_equal_one_and_checkpoints_move_between_them(work):
    """2 gloo processes == 1 process (same global batch B=4); 2 -> 1 and 1 -> 2 resumes continue exactly."""
    train_here(*TINY, "--max-steps", "9", "--out", "one")
    torchrun(work, 2, *TINY, "--max-steps", "6", "--out", "two")

    for step in (3, 6):
        assert_same_weights(weights(work / "two", step), weights(work / "one", step))
    one, two = (ck.load_trainer_state(work / run / ck.checkpoint_name(6)) for run in ("one", "two"))
    assert two["world_size"] == 2 and len(two["rng_ranks"]) == 2
    assert two["batcher"] == one["batcher"]                                   # the global position
    assert two["hidden"]["h"].shape == one["hidden"]["h"].shape == (2, 4, 16)  # the full (L, B, H) state
    torch.testing.assert_close(two["hidden"]["h"], one["hidden"]["h"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two["hidden"]["c"], one["hidden"]["c"], rtol=1e-5, atol=1e-6)
    m2 = ck.verify_checkpoint(work / "two" / ck.checkpoint_name(6))
    assert m2["world_size"] == 2
    # Only rank 0 evaluated and logged, on the whole validation split: the figures of one process.
    def val_losses(run):
        lines = (work / run / "metrics.jsonl").read_text().splitlines()
        return [(m["step"], m["val_loss"]) for m in map(json.loads, lines) if "val_loss" in m and m["step"] <= 6]

    assert [s for s, _ in val_losses("two")] == [s for s, _ in val_losses("one")] == [3, 6]
    for (_, a), (_, b) in zip(val_losses("two"), val_losses("one")):
        assert a == pytest.approx(b, rel=1e-5)

    # 2 -> 1: the 2-process checkpoint at step 3 resumes in one process and reaches step 6 as "one" did
    # (forked into a run of its own: "two" holds a newer checkpoint, which a resume there would replace).
    train_here("--resume", work / "two" / ck.checkpoint_name(3), "--out", work / "two-to-one", "--threads", "1",
               "--no-progress")
    assert_same_weights(weights(work / "two-to-one", 6), weights(work / "one", 6))

    # 1 -> 2: that run's step-6 checkpoint, written by one process, continues in 2 processes to step 9.
    shutil.copytree(work / "two-to-one", work / "one-to-two")
    torchrun(work, 2, "--resume", work / "one-to-two", "--max-steps", "9", "--threads", "1", "--no-progress")
    assert_same_weights(weights(work / "one-to-two", 9), weights(work / "one", 9))


def test_batch_not_divisible_by_processes_is_a_usage_error(work, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    result = CliRunner().invoke(app, ["train", *TINY, "--device", "cpu", "--max-steps", "1"])
    assert result.exit_code == 2
    assert "--batch-size 4 cannot be split across 3 processes" in result.output
