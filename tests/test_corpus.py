"""Corpus sources, UTF-8 decoding, vocabulary, token cache and splits (offline, fast)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import sysconfig
import threading
from pathlib import Path

import pytest
import torch
from conftest import tiny_text

from charlstm import sources, textstream, tokencache
from charlstm.corpus import (
    TINYSHAKESPEARE_SHA256,
    TINYSHAKESPEARE_URL_ENV,
    Vocab,
    encode_text,
    load_corpus,
    pystdlib_files,
)
from charlstm.errors import CharlstmError, UsageError


def load(source, tmp_path, **kw):
    return load_corpus(str(source), data_dir=tmp_path / "data", progress=False, **kw)


def decoded(c) -> str:
    return c.vocab.decode(c.tokens)


# --------------------------------------------------------------------------- text files


def test_text_file_round_trip(tiny_corpus_file, tmp_path):
    c = load(tiny_corpus_file, tmp_path)
    raw = tiny_corpus_file.read_bytes()
    assert decoded(c) == raw.decode("utf-8")
    assert c.sha256 == hashlib.sha256(raw).hexdigest()
    assert c.name == str(tiny_corpus_file)
    assert c.tokens.dtype == torch.uint8 and c.tokens.dim() == 1
    assert c.vocab.chars == sorted(set(raw.decode("utf-8")))
    meta = c.meta()
    assert meta["n_chars"] == len(raw.decode("utf-8")) and meta["sha256"] == c.sha256
    json.dumps(meta)  # JSON-safe


def test_unicode_round_trip_astral_nul_tab(tmp_path):
    text = "a\x00b\tc\r\nd é 日本語 𝔘𝔫𝔦 🙂🙃 \U0010fffd end\n" * 5
    path = tmp_path / "u.txt"
    path.write_bytes(text.encode("utf-8"))
    c = load(path, tmp_path)
    assert decoded(c) == text
    assert len(c.tokens) == len(text)            # one token per code point, astral included
    assert "🙂" in c.vocab.chars and "\x00" in c.vocab.chars
    back = Vocab.from_json(json.loads(json.dumps(c.vocab.to_json())))
    assert back == c.vocab
    assert back.decode(back.encode(text)) == text


def test_chunk_boundaries_inside_multibyte_characters(tmp_path, monkeypatch):
    text = "日本語🙂é" * 50 + "abc\n" + "x" * 30
    path = tmp_path / "u.txt"
    path.write_bytes(text.encode("utf-8"))
    monkeypatch.setattr(textstream, "CHUNK_BYTES", 7)  # cuts inside 3- and 4-byte sequences
    c = load(path, tmp_path)
    assert decoded(c) == text


def test_long_text_in_utf32_slices(tmp_path, monkeypatch):
    text = "".join(chr(0x4E00 + (i * 37) % 500) for i in range(3000)) + "\nabc🙂\n"
    path = tmp_path / "u.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(tokencache, "UTF32_SLICE_CHARS", 64)  # bincount and encoding in slices
    c = load(path, tmp_path)
    assert decoded(c) == text and c.tokens.dtype == torch.int16


def test_large_vocabulary_uses_int16(tmp_path):
    text = "".join(chr(cp) for cp in range(0x4E00, 0x4E00 + 400)) + "\n"
    path = tmp_path / "cjk.txt"
    path.write_text(text, encoding="utf-8")
    c = load(path, tmp_path)
    assert c.tokens.dtype == torch.int16 and len(c.vocab) == 401
    assert decoded(c) == text


# --------------------------------------------------------------------------- bad input


def test_invalid_utf8_names_file_and_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"hello w\xc3\xb6rld\n" + b"ok " * 10 + b"\xff tail\n")
    with pytest.raises(CharlstmError) as e:
        load(path, tmp_path)
    msg = str(e.value)
    assert str(path) in msg and "byte offset 43" in msg and "--invalid-utf8 replace" in msg


def test_invalid_utf8_offset_across_chunks(tmp_path, monkeypatch):
    path = tmp_path / "bad.txt"
    data = "é".encode() * 20 + b"\xe6\x97" + b"abc"  # truncated 3-byte sequence at byte 40
    path.write_bytes(data)
    monkeypatch.setattr(textstream, "CHUNK_BYTES", 5)
    with pytest.raises(CharlstmError, match="byte offset 40"):
        load(path, tmp_path)


def test_truncated_sequence_at_end_of_file(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"abc\xe6\x97")
    with pytest.raises(CharlstmError, match="byte offset 3"):
        load(path, tmp_path)


def test_invalid_utf8_replace(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ab\xffcd\n")
    c = load(path, tmp_path, invalid_utf8="replace")
    assert decoded(c) == "ab\ufffdcd\n"
    assert c.meta()["invalid_utf8"] == "replace"
    with pytest.raises(CharlstmError, match="invalid UTF-8"):  # strict again: the replaced cache is not used
        load(path, tmp_path)
    with pytest.raises(UsageError):
        load(path, tmp_path, invalid_utf8="ignore")


def test_empty_file_states_minimum(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(CharlstmError) as e:
        load(path, tmp_path)
    assert "no text" in str(e.value) and "4,097" in str(e.value)


def test_missing_path(tmp_path):
    with pytest.raises(CharlstmError) as e:
        load(tmp_path / "nope.txt", tmp_path)
    assert "no such file or directory" in str(e.value) and "pystdlib" in str(e.value)


# --------------------------------------------------------------------------- directories


def test_directory_sorted_binary_skipped_with_warning(tmp_path, capsys):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_text("bravo\n", encoding="utf-8")
    (root / "a.md").write_text("alpha no newline", encoding="utf-8")
    (root / "sub" / "c.py").write_text("charlie = 'ç'\n", encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "sub" / "blob.bin").write_bytes(bytes(range(256)))
    (root / ".git" / "HEAD").write_text("ref: x\n", encoding="utf-8")
    (root / ".hidden").write_text("secret\n", encoding="utf-8")
    c = load(root, tmp_path)
    # sorted by relative path; a newline joins a file that does not end with one
    assert decoded(c) == "alpha no newline\nbravo\ncharlie = 'ç'\n"
    assert c.n_files == 3
    err = capsys.readouterr().err
    assert "warning: skipped 2 binary file(s)" in err and "image.png" in err and "blob.bin" in err
    assert sorted(Path(p).name for p in c.skipped) == ["blob.bin", "image.png"]


def test_directory_without_text_files(tmp_path):
    root = tmp_path / "bin"
    root.mkdir()
    (root / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(CharlstmError, match="no text files.*1 binary"):
        load(root, tmp_path)


# --------------------------------------------------------------------------- built-in corpus


def _fake_stdlib(root: Path) -> None:
    files = {
        "abc.py": "x = 1\n",
        "zz.py": "z = 26\n",
        "pkg/__init__.py": "",
        "pkg/mod.py": "def f():\n    return 'ü'\n",
        "test/test_abc.py": "TEST\n",
        "pkg/tests/t.py": "TEST\n",
        "idlelib/idle_test/t.py": "TEST\n",
        "lib2to3/tests/data.py": "TEST\n",
        "site-packages/thirdparty.py": "TEST\n",
        "__pycache__/abc.py": "TEST\n",
        "notes.txt": "not python\n",
        "_sysconfigdata__linux.py": "BUILD\n",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")


def test_pystdlib_selection_is_sorted_excludes_tests_and_caps(tmp_path):
    root = tmp_path / "lib"
    _fake_stdlib(root)
    rel = [p.relative_to(root).as_posix() for p in pystdlib_files(root)]
    assert rel == ["abc.py", "pkg/__init__.py", "pkg/mod.py", "zz.py"]
    # the cap stops at the first file that would go past it
    capped = [p.relative_to(root).as_posix() for p in pystdlib_files(root, cap_bytes=8)]
    assert capped == ["abc.py", "pkg/__init__.py"]


def test_pystdlib_comes_from_sysconfig(tmp_path, monkeypatch):
    root = tmp_path / "lib"
    _fake_stdlib(root)
    real = sysconfig.get_paths
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {**real(*a, **k), "stdlib": str(root)})
    c = load("pystdlib", tmp_path)
    assert c.name == "pystdlib" and str(root) in c.source
    assert decoded(c) == "x = 1\ndef f():\n    return 'ü'\nz = 26\n"
    assert c.sha256 == hashlib.sha256(decoded(c).encode()).hexdigest()


def test_pystdlib_missing_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(tmp_path / "void")})
    with pytest.raises(CharlstmError, match="standard library sources were not found"):
        load("pystdlib", tmp_path)


@pytest.fixture(scope="module")
def real_pystdlib(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("stdlib-data")
    return load_corpus("pystdlib", data_dir=data_dir, progress=False), data_dir


def test_pystdlib_real_interpreter(real_pystdlib):
    c, data_dir = real_pystdlib
    files = pystdlib_files()
    assert files and all(f.suffix == ".py" for f in files)
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.parts)
    assert sum(f.stat().st_size for f in files) <= sources.PYSTDLIB_CAP_BYTES
    assert 2_000_000 < len(c.tokens) <= sources.PYSTDLIB_CAP_BYTES
    assert c.tokens.dtype == torch.uint8 or len(c.vocab) > 256
    again = load_corpus("pystdlib", data_dir=data_dir, progress=False)
    assert again.sha256 == c.sha256 and torch.equal(again.tokens, c.tokens)
    assert "\n" in c.vocab.chars and "def" in c.vocab.decode(c.tokens[:20000])


# --------------------------------------------------------------------------- tinyshakespeare


@pytest.fixture
def http_server():
    """Serve a directory on 127.0.0.1; yields a function dir -> base URL."""
    servers = []

    def serve(directory: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_tinyshakespeare_download_from_local_server(shared_data, tmp_path, monkeypatch, http_server):
    base = http_server(shared_data)
    monkeypatch.setenv(TINYSHAKESPEARE_URL_ENV, f"{base}/tinyshakespeare.txt")
    c = load("tinyshakespeare", tmp_path)
    assert c.name == "tinyshakespeare" and c.sha256 == TINYSHAKESPEARE_SHA256
    assert len(c.tokens) == 1_115_394 and len(c.vocab) == 65
    cached = tmp_path / "data" / "tinyshakespeare.txt"
    assert cached.read_bytes() == (shared_data / "tinyshakespeare.txt").read_bytes()
    # downloaded once: a second load works with the server gone
    monkeypatch.setenv(TINYSHAKESPEARE_URL_ENV, "http://127.0.0.1:9/unreachable")
    again = load("tinyshakespeare", tmp_path)
    assert torch.equal(again.tokens, c.tokens)
    # the split is nanoGPT's: train = int(0.9 n)
    s = c.split()
    assert len(s["train"]) == int(0.9 * 1_115_394) and len(s["val"]) == 1_115_394 - int(0.9 * 1_115_394)


def test_tinyshakespeare_file_url(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv(TINYSHAKESPEARE_URL_ENV, (shared_data / "tinyshakespeare.txt").as_uri())
    c = load("tinyshakespeare", tmp_path)
    assert c.sha256 == TINYSHAKESPEARE_SHA256


def test_tinyshakespeare_checksum_mismatch(tmp_path, monkeypatch, http_server):
    served = tmp_path / "www"
    served.mkdir()
    (served / "input.txt").write_text("not shakespeare\n", encoding="utf-8")
    monkeypatch.setenv(TINYSHAKESPEARE_URL_ENV, f"{http_server(served)}/input.txt")
    with pytest.raises(CharlstmError) as e:
        load("tinyshakespeare", tmp_path)
    assert "sha256" in str(e.value) and TINYSHAKESPEARE_SHA256 in str(e.value)
    assert not list((tmp_path / "data").glob("tinyshakespeare*"))  # nothing kept


def test_tinyshakespeare_http_error(tmp_path, monkeypatch, http_server):
    monkeypatch.setenv(TINYSHAKESPEARE_URL_ENV, f"{http_server(tmp_path)}/no/such/input.txt")
    with pytest.raises(CharlstmError, match="could not download tinyshakespeare .*HTTP 404"):
        load("tinyshakespeare", tmp_path)
    assert not list((tmp_path / "data").glob("tinyshakespeare*"))


def test_tinyshakespeare_offline_says_to_pass_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv(TINYSHAKESPEARE_URL_ENV, "http://127.0.0.1:9/input.txt")  # discard port: refused
    with pytest.raises(CharlstmError) as e:
        load("tinyshakespeare", tmp_path)
    assert "could not download" in str(e.value) and "--data" in str(e.value) and "offline" in str(e.value)


def test_tinyshakespeare_damaged_cache_is_fetched_again(shared_data, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tinyshakespeare.txt").write_text("damaged", encoding="utf-8")
    monkeypatch.setenv(TINYSHAKESPEARE_URL_ENV, (shared_data / "tinyshakespeare.txt").as_uri())
    assert load("tinyshakespeare", tmp_path).sha256 == TINYSHAKESPEARE_SHA256


# --------------------------------------------------------------------------- token cache


def test_cache_reused_and_memory_mapped(tiny_corpus_file, tmp_path, monkeypatch):
    first = load(tiny_corpus_file, tmp_path)
    bin_path = tmp_path / "data" / "tokens" / f"{first.sha256}.bin"
    header = json.loads((tmp_path / "data" / "tokens" / f"{first.sha256}.json").read_text())
    assert bin_path.stat().st_size == len(first.tokens) and header["dtype"] == "uint8"
    assert bin_path.read_bytes() == bytes(first.tokens.tolist())

    def no_rebuild(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(tokencache, "build", no_rebuild)
    second = load(tiny_corpus_file, tmp_path)
    assert torch.equal(second.tokens, first.tokens) and second.vocab == first.vocab


def test_changed_source_invalidates_cache(tiny_corpus_file, tmp_path):
    first = load(tiny_corpus_file, tmp_path)
    tiny_corpus_file.write_text(tiny_text() + "a new line with ß\n", encoding="utf-8")
    second = load(tiny_corpus_file, tmp_path)
    assert second.sha256 != first.sha256
    assert decoded(second) == tiny_corpus_file.read_text(encoding="utf-8")
    assert "ß" in second.vocab.chars and "ß" not in first.vocab.chars


def test_damaged_cache_is_rebuilt(tiny_corpus_file, tmp_path):
    first = load(tiny_corpus_file, tmp_path)
    expected = decoded(first)
    bin_path = tmp_path / "data" / "tokens" / f"{first.sha256}.bin"
    del first
    bin_path.write_bytes(b"\x00" * 10)  # truncated
    assert decoded(load(tiny_corpus_file, tmp_path)) == expected


# --------------------------------------------------------------------------- splits


def test_splits_contiguous_val_last(tiny_corpus_file, tmp_path):
    c = load(tiny_corpus_file, tmp_path)
    n = len(c.tokens)
    s = c.split()
    assert len(s["train"]) == int(0.9 * n) and len(s["test"]) == 0
    assert torch.equal(torch.cat([s["train"], s["val"]]), c.tokens)
    s = c.split(val_frac=0.1, test_frac=0.2)
    assert torch.equal(torch.cat([s["train"], s["test"], s["val"]]), c.tokens)
    assert len(s["train"]) == int(0.7 * n) and len(s["val"]) == n - int(0.9 * n)
    assert len(c.split(val_frac=0.0)["val"]) == 0
    for bad in ((1.0, 0.0), (-0.1, 0.0), (0.5, 0.5)):
        with pytest.raises(UsageError):
            c.split(*bad)


# --------------------------------------------------------------------------- vocabulary


def test_vocab_encode_unknown_and_decode_range():
    v = Vocab.from_text("hello world\n")
    assert v.decode(v.encode("hello")) == "hello"
    assert v.unknown("héllo 日") == ["é", "日"]
    with pytest.raises(CharlstmError, match="U\\+00E9"):
        v.encode("héllo")
    ids = encode_text("héllo 🙂", v, unknown="skip")
    assert ids.dtype == torch.long and v.decode(ids) == "hllo "
    with pytest.raises(ValueError):
        v.decode([len(v)])
    with pytest.raises(ValueError):
        v.decode([-1])


def test_vocab_from_json_rejects_damage():
    for bad in ("abc", ["ab"], ["b", "a"], ["a", "a"], [1]):
        with pytest.raises(CharlstmError, match="vocabulary"):
            Vocab.from_json(bad)


# --------------------------------------------------------------------------- through the CLI


def run_train(tmp_path, monkeypatch, *args: str):
    """`charlstm train ARGS` in tmp_path through CliRunner; skips while train is not built."""
    from typer.testing import CliRunner

    from charlstm import cli

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.app, ["train", *args, "--max-steps", "1", "--out", str(tmp_path / "run")],
                                prog_name="charlstm")
    if "not implemented yet" in result.stderr:
        pytest.skip("charlstm train is not implemented yet")
    assert "Traceback" not in result.output
    return result


def test_cli_missing_path(tmp_path, monkeypatch):
    result = run_train(tmp_path, monkeypatch, "--data", "/missing/corpus.txt")
    assert result.exit_code == 1
    assert "error: --data /missing/corpus.txt: no such file or directory" in result.stderr


def test_cli_invalid_utf8(tmp_path, monkeypatch):
    (tmp_path / "bad.txt").write_bytes(b"abc\xffdef\n")
    result = run_train(tmp_path, monkeypatch, "--data", "bad.txt")
    assert result.exit_code == 1
    assert "bad.txt: invalid UTF-8 at byte offset 3" in result.stderr
    assert "--invalid-utf8 replace" in result.stderr


def test_cli_empty_corpus(tmp_path, monkeypatch):
    (tmp_path / "empty.txt").write_bytes(b"")
    result = run_train(tmp_path, monkeypatch, "--data", "empty.txt")
    assert result.exit_code == 1
    assert "contains no text" in result.stderr and "4,097" in result.stderr


def test_cli_too_short_and_binary_in_directory(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("short text\n" * 5, encoding="utf-8")
    (tmp_path / "d" / "logo.png").write_bytes(b"\x89PNG\x00\x00")
    result = run_train(tmp_path, monkeypatch, "--data", "d", "--batch-size", "4", "--seq-len", "16")
    assert result.exit_code == 1
    assert "warning: skipped 1 binary file(s)" in result.stderr and "logo.png" in result.stderr
    assert "the train split has 49 characters" in result.stderr and "at least 65" in result.stderr


def test_unwritable_cache_keeps_tokens_in_memory(tiny_corpus_file, tmp_path, capsys):
    not_a_dir = tmp_path / "data-is-a-file"
    not_a_dir.write_text("x", encoding="utf-8")
    c = load_corpus(str(tiny_corpus_file), data_dir=not_a_dir, progress=False)
    assert decoded(c) == tiny_corpus_file.read_text(encoding="utf-8")
    assert "warning: cannot write the token cache" in capsys.readouterr().err
