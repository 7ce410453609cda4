"""The data and input side of issues 18 and 19: the user data cache (`charlstm cache`), the token
cache's integrity, portable runs, non-regular files, bounded memory, validation, bounded evaluation."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CASES, TINY_RUN, tiny_text, train_tiny
from typer.testing import CliRunner

from charlstm import checkpoint as ck
from charlstm import datacache, memory, runtime, sources, textfiles, tokencache
from charlstm.cli import app
from charlstm.config import DynamicConfig, ModelConfig, TrainConfig
from charlstm.corpus import TINYSHAKESPEARE_URL_ENV, encode_text, load_corpus, locate_data, same_source, stored_path
from charlstm.errors import CharlstmError, UsageError
from charlstm.evaluate import file_tokens
from charlstm.evaluation import eval_slice, evaluate_loss, slow_eval_note
from charlstm.model import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = list(TINY_RUN)


def invoke(*args, **kw):
    return CliRunner().invoke(app, [*map(str, args)], **kw)


@pytest.fixture(autouse=True)
def _own_data_cache(tmp_path, monkeypatch):
    """Every test here has its own user cache (XDG_CACHE_HOME) and no CHARLSTM_DATA_DIR / cap of the caller's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(datacache.DATA_DIR_ENV, raising=False)
    monkeypatch.delenv(datacache.CACHE_MAX_ENV, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A working directory holding tiny.txt and a run trained on it with a relative --data."""
    work = tmp_path_factory.mktemp("inputs")
    (work / "tiny.txt").write_text(tiny_text(), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("XDG_CACHE_HOME", str(work / "xdg"))
        mp.delenv(datacache.DATA_DIR_ENV, raising=False)
        r = train_tiny("--max-steps", "4", "--eval-every", "4", "--out", "run")
        assert r.exit_code == 0, r.output
    return work


# --------------------------------------------------------------------------- the user cache

def test_the_data_cache_is_the_users_and_can_be_moved(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    if sys.platform.startswith("linux"):
        assert datacache.data_dir() == tmp_path / "c" / "charlstm" / "data"
    monkeypatch.setenv(datacache.DATA_DIR_ENV, str(tmp_path / "elsewhere"))
    assert datacache.data_dir() == tmp_path / "elsewhere"
    with datacache.using_data_dir(tmp_path / "for-one-command"):
        assert datacache.data_dir() == tmp_path / "for-one-command"
    assert datacache.data_dir() == tmp_path / "elsewhere"


def test_the_tests_never_touch_the_real_user_cache(monkeypatch):
    # conftest's pytest_configure points XDG_CACHE_HOME at a temporary directory (or the native-kernel cache
    # a developer names); the data cache follows it, so ~/.cache/charlstm/data is never written by a test.
    monkeypatch.undo()                                      # the session's environment, not this module's
    monkeypatch.delenv(datacache.DATA_DIR_ENV, raising=False)
    real = Path.home() / ".cache" / "charlstm"
    assert os.environ.get("XDG_CACHE_HOME") and Path(os.environ["XDG_CACHE_HOME"]) != Path.home() / ".cache"
    assert real not in datacache.data_dir().parents


def test_a_second_working_directory_reuses_the_download_and_the_token_cache(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv(TINYSHAKESPEARE_URL_ENV, (shared_data / "tinyshakespeare.txt").as_uri())
    args = ["train", "--data", "tinyshakespeare", *TINY, "--max-steps", "2", "--val-frac", "0.01", "--out", "run"]
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        r = invoke(*args)
        assert r.exit_code == 0, r.output
        assert not (tmp_path / name / "data").exists()                    # nothing cached in the working directory
        # the second directory may not download or encode again: no network, no encoder
        monkeypatch.setenv(TINYSHAKESPEARE_URL_ENV, "http://127.0.0.1:9/unreachable")
        monkeypatch.setattr(tokencache, "build", lambda *a, **k: pytest.fail("encoded again"))
    listing = json.loads(invoke("cache", "--json").stdout)
    assert listing["data_dir"] == str(tmp_path / "xdg" / "charlstm" / "data")
    assert [e["kind"] for e in listing["entries"]] == ["download", "tokens"]
    assert listing["entries"][1]["name"] == "tinyshakespeare" and listing["cap_bytes"] == 2 * 1024 ** 3


def test_data_dir_option_and_env_move_the_cache(tiny_corpus_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("train", "--data", tiny_corpus_file, *TINY, "--max-steps", "1", "--out", "run",
               "--data-dir", "mine")
    assert r.exit_code == 0, r.output
    assert list((tmp_path / "mine" / "tokens").glob("*.bin")) and datacache.DATA_DIR_ENV not in os.environ
    assert not (tmp_path / "xdg" / "charlstm" / "data").exists()
    monkeypatch.setenv(datacache.DATA_DIR_ENV, str(tmp_path / "mine"))
    assert len(datacache.entries()) == 1
    r = invoke("eval", "run", "--json", "--data-dir", "mine")
    assert r.exit_code == 0, r.output


def _three_corpora(tmp_path) -> list[Path]:
    files = []
    for k in range(3):
        path = tmp_path / f"c{k}.txt"
        path.write_text(f"corpus {k}\n" + tiny_text(10), encoding="utf-8")
        files.append(path)
    return files


def test_token_caches_are_pruned_least_recently_used_first(tmp_path, monkeypatch, capsys):
    data = tmp_path / "d"
    data.mkdir()
    (data / "tinyshakespeare.txt").write_text("a download is never pruned", encoding="utf-8")
    a, b, c = _three_corpora(tmp_path)
    size = len(load_corpus(str(a), data_dir=data, progress=False).tokens)
    monkeypatch.setenv(datacache.CACHE_MAX_ENV, str(2 * size + 4096))       # room for two entries
    shas = {}
    for t, path in ((100, a), (200, b)):
        shas[path] = load_corpus(str(path), data_dir=data, progress=False).sha256
        os.utime(data / "tokens" / f"{shas[path]}.json", (t, t))              # a used at 100, b at 200
    load_corpus(str(a), data_dir=data, progress=False)                         # a is used again: b is the oldest
    shas[c] = load_corpus(str(c), data_dir=data, progress=False).sha256
    keys = {e.key for e in datacache.entries(data) if e.kind == "tokens"}
    assert keys == {shas[a], shas[c]}
    assert (data / "tinyshakespeare.txt").is_file()
    assert "removed 1 least recently used token cache(s)" in capsys.readouterr().err


def test_cache_sizes_parse_and_a_bad_cap_is_one_line(monkeypatch):
    assert datacache.parse_size("2G") == 2 * 1024 ** 3 and datacache.parse_size("500M") == 500 * 1024 ** 2
    assert datacache.parse_size("1.5GiB") == int(1.5 * 1024 ** 3) and datacache.parse_size("4096") == 4096
    assert datacache.parse_size("none") is None
    monkeypatch.setenv(datacache.CACHE_MAX_ENV, "lots")
    with pytest.raises(UsageError, match="CHARLSTM_CACHE_MAX takes a size"):
        datacache.cap_bytes()


def test_cache_command_lists_clears_and_prunes(tmp_path, monkeypatch):
    data = tmp_path / "d"
    a, b, _ = _three_corpora(tmp_path)
    for path in (a, b):
        load_corpus(str(path), data_dir=data, progress=False)
    (data / "tinyshakespeare.txt").write_text("x", encoding="utf-8")
    (data / "tokens" / "killed.bin.tmp-host-1").write_bytes(b"x")
    os.utime(data / "tokens" / "killed.bin.tmp-host-1", (1, 1))               # a killed writer's leftover
    table = invoke("cache", "--data-dir", data, env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert "download" in table.stdout and str(a) in table.stdout and "last used" in table.stdout
    listed = json.loads(invoke("cache", "list", "--json", "--data-dir", data).stdout)
    assert len(listed["entries"]) == 3 and listed["token_bytes"] > 0
    r = invoke("cache", "prune", "--max-size", "0", "--data-dir", data)
    assert r.exit_code == 0 and "removed 2 token cache(s)" in r.stdout
    load_corpus(str(a), data_dir=data, progress=False)
    r = invoke("cache", "clear", "--tokens", "--data-dir", data)
    assert r.exit_code == 0 and "removed token caches" in r.stdout
    assert [e.kind for e in datacache.entries(data)] == ["download"]
    r = invoke("cache", "clear", "--data-dir", data)
    assert r.exit_code == 0 and datacache.entries(data) == [] and "downloads and token caches" in r.stdout
    assert "empty" in invoke("cache", "--data-dir", data).stdout
    assert invoke("cache", "prune", "--max-size", "many", "--data-dir", data).exit_code == 2


def test_an_older_versions_data_download_is_copied_not_fetched(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    shutil.copy(shared_data / "tinyshakespeare.txt", tmp_path / "data" / "tinyshakespeare.txt")
    monkeypatch.setenv(TINYSHAKESPEARE_URL_ENV, "http://127.0.0.1:9/unreachable")
    c = load_corpus("tinyshakespeare", progress=False)
    assert c.sha256 == sources.TINYSHAKESPEARE_SHA256
    assert (datacache.data_dir() / "tinyshakespeare.txt").is_file()
    assert "no longer caches under ./data" in capsys.readouterr().err


# --------------------------------------------------------------------------- token cache integrity

def _cache_bin(data: Path, sha: str) -> Path:
    return data / "tokens" / f"{sha}.bin"


@pytest.mark.parametrize("damage", ["ids changed at the same size", "an id past the vocabulary"])
def test_a_damaged_token_cache_is_found_and_rebuilt(tiny_corpus_file, tmp_path, damage, capsys):
    data = tmp_path / "d"
    first = load_corpus(str(tiny_corpus_file), data_dir=data, progress=False)
    expected, sha, V = first.vocab.decode(first.tokens), first.sha256, len(first.vocab)
    bin_path = _cache_bin(data, sha)
    raw = bytearray(bin_path.read_bytes())
    del first
    if damage.startswith("ids"):
        for i in range(100, 100 + 640):
            raw[i] = (raw[i] + 1) % V                                          # 640 other, valid ids
    else:
        raw[5] = 255                                                           # no such character
    bin_path.write_bytes(bytes(raw))
    tokencache._VERIFIED.clear()                                               # as a new process would
    again = load_corpus(str(tiny_corpus_file), data_dir=data, progress=False)
    assert again.vocab.decode(again.tokens) == expected
    assert "does not match its stored sha256 (damaged); rebuilding it" in capsys.readouterr().err
    header = json.loads((data / "tokens" / f"{sha}.json").read_text())
    assert header["format"] == 2 and len(header["ids_sha256"]) == 64


def test_the_ids_are_hashed_once_per_process(tiny_corpus_file, tmp_path, monkeypatch):
    data = tmp_path / "d"
    load_corpus(str(tiny_corpus_file), data_dir=data, progress=False)          # written and known good
    calls = []
    real = tokencache._ids_sha256
    monkeypatch.setattr(tokencache, "_ids_sha256", lambda p: calls.append(p) or real(p))
    load_corpus(str(tiny_corpus_file), data_dir=data, progress=False)
    assert calls == []
    tokencache._VERIFIED.clear()
    load_corpus(str(tiny_corpus_file), data_dir=data, progress=False)
    load_corpus(str(tiny_corpus_file), data_dir=data, progress=False)
    assert len(calls) == 1


def test_eval_gives_the_same_figure_after_the_cache_is_damaged(trained, monkeypatch):
    monkeypatch.chdir(trained)
    monkeypatch.setenv("XDG_CACHE_HOME", str(trained / "xdg"))
    before = json.loads(invoke("eval", "run", "--json").stdout)
    (bin_path,) = (trained / "xdg" / "charlstm" / "data" / "tokens").glob("*.bin")
    raw = bytearray(bin_path.read_bytes())
    raw[-300:] = bytes(raw[-299:] + raw[-300:-299])                              # shifted by one: same size
    bin_path.write_bytes(bytes(raw))
    tokencache._VERIFIED.clear()
    r = invoke("eval", "run", "--json")
    assert r.exit_code == 0 and "damaged" in r.stderr
    assert json.loads(r.stdout)["loss_nats"] == before["loss_nats"]


# --------------------------------------------------------------------------- portable runs

def test_a_run_stores_the_absolute_source(trained):
    meta = json.loads((ck.read_pointer(trained / "run", "latest") / "config.json").read_text())["corpus"]
    assert meta["name"] == "tiny.txt" and meta["path"] == str(trained / "tiny.txt")
    assert stored_path(meta) == str(trained / "tiny.txt")


def test_eval_of_a_relative_data_run_from_another_directory(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(trained / "xdg"))
    monkeypatch.chdir(trained)
    here = json.loads(invoke("eval", "run", "--json").stdout)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    r = invoke("eval", trained / "run", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["loss_nats"] == here["loss_nats"] and "changed" not in r.stderr
    assert invoke("eval", trained / "run", "--dynamic", "--dynamic-stat-segments", "2", "--json").exit_code == 0


def test_a_moved_project_finds_its_data_relative_to_the_working_directory(trained, tmp_path, monkeypatch):
    moved = tmp_path / "moved"
    shutil.copytree(trained, moved, ignore=shutil.ignore_patterns("xdg"))
    meta = {"name": "tiny.txt", "path": str(tmp_path / "gone" / "tiny.txt"), "sha256": "x"}
    monkeypatch.chdir(moved)
    assert locate_data("tiny.txt", meta) == "tiny.txt"                           # the stored path is gone
    assert locate_data("tiny.txt", {"path": str(moved / "tiny.txt")}) == "tiny.txt"        # here: as given
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert locate_data("tiny.txt", {"path": str(moved / "tiny.txt")}) == str(moved / "tiny.txt")
    assert locate_data("pystdlib", meta) == "pystdlib"


def test_same_source_decides_by_path_or_sha256(trained, tmp_path, monkeypatch):
    meta = json.loads((ck.read_pointer(trained / "run", "latest") / "config.json").read_text())["corpus"]
    monkeypatch.chdir(tmp_path)
    assert same_source(meta, str(trained / "tiny.txt"))                          # the same file, absolute
    assert not same_source(meta, "tiny.txt")                                      # nothing of that name here
    (tmp_path / "copy.txt").write_bytes((trained / "tiny.txt").read_bytes())
    assert same_source(meta, "copy.txt")                                          # the same bytes elsewhere
    (tmp_path / "other.txt").write_text(tiny_text() + "more", encoding="utf-8")
    assert not same_source(meta, "other.txt") and not same_source(meta, "pystdlib")
    assert same_source({"name": "pystdlib", "sha256": "x"}, "pystdlib")
    old = {k: v for k, v in meta.items() if k != "path"}                       # a run written before "path"
    old["source"] = f"file {trained / 'tiny.txt'}"
    assert stored_path(old) == str(trained / "tiny.txt") and same_source(old, str(trained / "tiny.txt"))
    assert stored_path({"source": f"directory {tmp_path} (3 text files)"}) == str(tmp_path)


# --------------------------------------------------------------------------- non-regular files

def _fifo(tmp_path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def test_eval_of_a_fifo_is_refused_at_once_not_a_hang(trained, tmp_path):
    fifo = _fifo(tmp_path)
    done = subprocess.run([sys.executable, "-m", "charlstm", "eval", str(trained / "run"), "--text-file", str(fifo)],
                          capture_output=True, text=True, timeout=120, cwd=trained,
                          env={**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(trained / "xdg")})
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: --text-file {fifo} is a FIFO (named pipe), not a regular file; " \
                                  "give a UTF-8 text file"


def test_every_input_option_refuses_non_regular_files(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(trained)
    fifo = _fifo(tmp_path)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        cases = [
            (["eval", "run", "--text-file", "/dev/zero"], "/dev/zero is a character device"),
            (["eval", "run", "--text-file", sock_path], "is a socket"),
            (["visualize", "run", "--text-file", fifo], "is a FIFO"),
            (["train", "--data", fifo, *TINY, "--max-steps", "1", "--out", tmp_path / "r"], "is a FIFO"),
            (["train", "--data", "/dev/zero", *TINY, "--max-steps", "1", "--out", tmp_path / "r"],
             "is a character device"),
        ]
        for args, message in cases:
            r = invoke(*args)
            assert r.exit_code == 1, (args, r.output)
            assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    finally:
        sock.close()
    with pytest.raises(CharlstmError, match="is a FIFO"):
        textfiles.read_text(fifo, "--prime-file")


def test_text_is_decoded_in_chunks_with_the_right_offsets(tmp_path):
    text = ("é日🙂abc" * 3000)
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(textfiles.iter_text(path, "--text-file", chunk_bytes=7))         # splits every multi-byte char
    assert "".join(pieces) == text and len(pieces) > 100
    raw = text.encode("utf-8")
    path.write_bytes(raw[:5001] + b"\xff" + raw[5001:])
    bad = 5001
    with pytest.raises(CharlstmError, match=f"offset {bad}"):
        list(textfiles.iter_text(path, "--text-file", chunk_bytes=1000))


# --------------------------------------------------------------------------- eval --text-file in bounded memory

def test_a_text_file_is_scored_chunk_by_chunk_with_the_figure_of_the_whole(trained, tmp_path, monkeypatch):
    ckpt = ck.load_checkpoint(trained / "run")
    text = (tiny_text(30) + "ΩΩ unknown ☃ characters\n") * 3
    path = tmp_path / "other.txt"
    path.write_text(text, encoding="utf-8")
    whole = encode_text(text, ckpt.vocab, "skip")
    expected = evaluate_loss(ckpt.model, whole, batch_size=3, seq_len=16, device="cpu")
    monkeypatch.setattr(textfiles, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(textfiles.iter_text, "__defaults__", (1000,))
    tokens, notes = file_tokens(ckpt, path)
    assert tokens.dtype == ckpt.vocab.dtype and torch.equal(tokens.long(), whole)
    assert notes["unknown_chars"] == len(text) - whole.numel() and notes["unknown"] == ["Ω", "☃"]
    assert evaluate_loss(ckpt.model, tokens, batch_size=3, seq_len=16, device="cpu") == expected
    leftovers = list((datacache.data_dir() / "tokens").glob("eval-*"))
    assert leftovers == []                                                     # the ids file is gone
    limited, _ = file_tokens(ckpt, path, limit=500)
    assert torch.equal(limited.long(), whole[:501])


# --------------------------------------------------------------------------- memory

@pytest.mark.parametrize("case", [c for _, _, c in [(i, v, dict(variant=v, **x)) for i, v, x in CASES]],
                         ids=[i for i, _, _ in CASES])
@pytest.mark.parametrize("backend", ["auto", "custom"])
def test_parameter_count_is_the_models(case, backend):
    cfg = ModelConfig(hidden=12, embed=5, layers=2, backend=backend, **case)
    try:
        model = build_model(dataclasses.replace(cfg, vocab_size=29))
    except UsageError:
        pytest.skip("no such backend for this variant")
    assert memory.parameter_count(cfg, 29) == model.num_parameters()


def test_the_estimates_refuse_what_cannot_fit(monkeypatch):
    big = memory.estimate_training_bytes(ModelConfig(hidden=20000), TrainConfig(), 65)
    assert big > 100 * 1024 ** 3                          # ~4.8e9 parameters x 6 copies x 4 bytes
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 8 * 1024 ** 3)
    with pytest.raises(CharlstmError, match=r"training this model .* needs about 114\.8 GiB but only 8\.0 GiB"):
        memory.check_training(ModelConfig(hidden=20000), TrainConfig(), 65)
    memory.check_training(ModelConfig(), TrainConfig(), 65)                    # the defaults fit
    assert memory.estimate_sampling_bytes(ModelConfig(vocab_size=65), 10 ** 9, 500) > 10 ** 12
    assert memory.available_bytes() is None or memory.available_bytes() > 0


def test_sample_bench_and_compare_refuse_with_the_figure(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(trained)
    r = invoke("sample", "run", "--num-samples", "1000000000", "--length", "10")
    assert r.exit_code == 1 and r.stderr.startswith("error: sampling --num-samples 1000000000 --length 10 needs about")
    assert "of memory is available" in r.stderr and r.stderr.count("\n") == 1
    r = invoke("bench", "--hidden", "200000", "--layers", "1", "--measures", "train", "--variants", "lstm",
               "--backends", "custom", "--peak-size", "0")
    assert r.exit_code == 1 and "this benchmark needs about" in r.stderr, r.output
    r = invoke("compare-variants", "--data", "tiny.txt", "--hidden", "100000", "--variants", "lstm",
               "--max-steps", "1", "--out", tmp_path / "cmp", "--no-progress")
    assert r.exit_code == 1 and "training 1 run(s) at a time needs about" in r.stderr, r.output


def test_an_allocation_failure_anywhere_is_one_line(trained, monkeypatch):
    monkeypatch.chdir(trained)
    from charlstm import evaluate

    def fail(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 123456789012 bytes.")

    monkeypatch.setattr(evaluate, "evaluate_loss", fail)
    r = invoke("eval", "run")
    assert r.exit_code == 1 and r.stderr.startswith("error: out of memory: ") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.output
    assert memory.out_of_memory_message(ValueError("other")) is None
    assert memory.out_of_memory_message(MemoryError()).startswith("out of memory: MemoryError")


# --------------------------------------------------------------------------- validation

FLOAT_FIELDS = [(cls, f.name) for cls in (ModelConfig, TrainConfig, DynamicConfig) for f in dataclasses.fields(cls)
                if "float" in str(f.type)]


@pytest.mark.parametrize("cls, name", FLOAT_FIELDS, ids=[f"{c.__name__}.{n}" for c, n in FLOAT_FIELDS])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_refused_in_every_float_setting(cls, name, value):
    with pytest.raises(UsageError, match=r"must be a finite number|must be"):
        cls(**{name: value})


def test_a_stored_config_with_nan_still_loads():
    # Before this check, --clip nan reached config.json as NaN; such checkpoints still load.
    assert math.isnan(TrainConfig.from_dict({**TrainConfig().to_dict(), "clip": math.nan}).clip)


@pytest.mark.parametrize("args, message", [
    (["--lr", "inf"], "--lr must be a finite number (got inf)"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number (got nan)"),
    (["--clip", "nan"], "--clip must be a finite number (got nan)"),
    (["--max-time", "inf"], "--max-time must be a finite number (got inf)"),
    (["--sample-chars", "-1"], "--sample-chars must be >= 0 (got -1)"),
    (["--eval-chars", "-5"], "--eval-chars must be >= 0 (got -5)"),
])
def test_train_refuses_bad_floats_and_counts_in_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    r = invoke("train", "--data", "pystdlib", *args, "--max-steps", "1", "--out", "run")
    assert r.exit_code == 2 and r.stderr == f"error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_threads_past_the_cores_are_capped_with_a_note(trained, monkeypatch, capsys):
    cores = runtime.cpu_cores()
    assert runtime.usable_threads(cores + 100) == cores
    err = capsys.readouterr().err
    assert f"--threads {cores + 100} is more than the {cores} CPU core(s) here; using {cores}" in err
    assert runtime.usable_threads(None) is None and runtime.usable_threads(1) == 1
    with pytest.raises(UsageError):
        runtime.usable_threads(0)
    monkeypatch.chdir(trained)
    r = invoke("eval", "run", "--threads", "999")
    assert r.exit_code == 0 and "is more than the" in r.stderr


# --------------------------------------------------------------------------- bounded evaluation

def test_eval_chars_scores_the_first_n_characters_of_the_split(trained, monkeypatch):
    monkeypatch.chdir(trained)
    monkeypatch.setenv("XDG_CACHE_HOME", str(trained / "xdg"))
    r = invoke("eval", "run", "--eval-chars", "100", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    ckpt = ck.load_checkpoint(trained / "run")
    val = load_corpus(str(trained / "tiny.txt"), progress=False).split(ckpt.train_cfg.val_frac)["val"]
    loss, count = evaluate_loss(ckpt.model, val[:101], batch_size=ckpt.train_cfg.batch_size,
                                seq_len=ckpt.train_cfg.seq_len, device="cpu")
    assert out["chars"] == count == 100 and out["loss_nats"] == loss and out["eval_chars"] == 100
    assert "the first 100 characters of its val split" in invoke("eval", "run", "--eval-chars", "100").stdout
    whole = json.loads(invoke("eval", "run", "--eval-chars", "100000000", "--json").stdout)
    assert whole["chars"] == val.numel() - 1                                   # past the end: the whole split
    t = json.loads(invoke("eval", "run", "--text-file", "tiny.txt", "--eval-chars", "50", "--json").stdout)
    assert t["chars"] == 50
    assert invoke("eval", "run", "--eval-chars", "-1").exit_code == 2


def test_eval_slice_and_the_slow_evaluation_note():
    t = torch.arange(10)
    assert torch.equal(eval_slice(t, 3), t[:4]) and eval_slice(t, 0) is t and eval_slice(t, 9) is t
    assert slow_eval_note(5.0, 10 ** 6, 0) is None and slow_eval_note(60.0, 10 ** 6, 1000) is None
    note = slow_eval_note(60.0, 12_000_000, 0)
    assert "took 60 s" in note and "--eval-chars 1000000" in note
    assert TrainConfig().eval_chars == 0
    help_text = invoke("train", "--help", env={"COLUMNS": "300"}).stdout
    assert "--eval-chars" in help_text and "--data-dir" in help_text


def test_evaluation_shows_progress_on_a_terminal(trained, monkeypatch, capsys):
    from charlstm import evaluation

    ckpt = ck.load_checkpoint(trained / "run")
    tokens = encode_text(tiny_text(), ckpt.vocab)
    monkeypatch.setattr(evaluation, "PROGRESS_MIN_CHARS", 10)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    quiet = evaluate_loss(ckpt.model, tokens, batch_size=4, seq_len=16, device="cpu")
    assert capsys.readouterr().err == ""
    shown = evaluate_loss(ckpt.model, tokens, batch_size=4, seq_len=16, device="cpu", progress=True)
    assert shown == quiet and "evaluating" in capsys.readouterr().err
