"""The checkpoint format: safetensors without pickle, atomic saves, pointers, loading and its errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from charlstm import checkpoint as ck
from charlstm import ckptdir
from charlstm.config import ModelConfig, TrainConfig
from charlstm.corpus import Vocab
from charlstm.errors import CharlstmError
from charlstm.model import build_model

VOCAB = Vocab(sorted(set("hello world, 日本 🙂\n")))


def _tiny(variant: str = "lstm", backend: str = "auto"):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=len(VOCAB), variant=variant, backend=backend, hidden=12, embed=6))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, len(VOCAB), (9, 3))                      # (T, B)
    logits, _ = model(x)
    logits.logsumexp(-1).mean().backward()
    opt.step()
    return model, opt


def _save(run: Path, step: int, model, opt, *, is_best=False, keep=3, extra_state=None):
    state = {"step": step, "rng": {"torch_cpu": torch.get_rng_state()}, "hidden": None,
             "metrics": {"val_loss": 1.5}, **(extra_state or {})}
    return ck.save_checkpoint(run, step=step, model=model, optimizer=opt, model_cfg=model.cfg, train_cfg=TrainConfig(),
                              vocab=VOCAB, corpus_meta={"name": "t", "sha256": "0" * 64}, trainer_state=state,
                              is_best=is_best, keep=keep)


# --------------------------------------------------------------------------- safetensors files

def test_tensor_files_round_trip_and_load_with_the_safetensors_library(tmp_path, monkeypatch):
    from safetensors import safe_open

    monkeypatch.setitem(sys.modules, "numpy", None)               # written and read without NumPy

    tensors = {
        "f32": torch.randn(3, 4), "bf16": torch.randn(5, dtype=torch.bfloat16),
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "i64": torch.arange(7), "u8": torch.get_rng_state(), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5), "empty": torch.empty(0, 4), "strided": torch.randn(4, 6)[:, ::2],
    }
    path = tmp_path / "t.safetensors"
    ck.save_tensors(path, tensors, {"k": "v"})
    back, meta = ck.load_tensors(path)
    assert meta == {"k": "v"}
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(str(path), framework="pt") as f:          # the reference reader agrees
        assert set(f.keys()) == set(tensors)
        for name in tensors:
            assert torch.equal(f.get_tensor(name), tensors[name]), name


def _old_hand_written_save(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """The writer charlstm used before the safetensors library wrote its files (kept to check that what
    it wrote still loads): an 8-byte little-endian header length, a compact JSON header padded with
    spaces to 8 bytes, the tensors' bytes in name order."""
    import ctypes
    import struct

    codes = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        nbytes = t.numel() * t.element_size()
        blobs.append(ctypes.string_at(t.data_ptr(), nbytes) if nbytes else b"")
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_files_of_the_old_hand_written_writer_still_load(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4), "bf16": torch.randn(5, dtype=torch.bfloat16), "i64": torch.arange(7),
        "u8": torch.get_rng_state(), "bool": torch.tensor([True, False]), "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }
    path = tmp_path / "old.safetensors"
    _old_hand_written_save(path, tensors, {"format": "charlstm-checkpoint"})
    back, meta = ck.load_tensors(path)
    assert meta == {"format": "charlstm-checkpoint"} and set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    # tests/fixtures/run-v1 was written by that writer (main at f2108d6): it verifies and loads.
    fixture = Path(__file__).parent / "fixtures" / "run-v1"
    loaded = ck.load_checkpoint(fixture)
    assert loaded.step == 3 and loaded.config["format_version"] == 1
    opt_tensors, _ = ck.load_tensors(fixture / "ckpt-000003" / "optimizer.safetensors")
    assert opt_tensors and all(t.dtype == torch.float32 for t in opt_tensors.values())


@pytest.mark.parametrize("damage", ["empty", "short", "header", "truncated"])
def test_malformed_tensor_files_give_a_clear_error(tmp_path, damage):
    path = tmp_path / "t.safetensors"
    ck.save_tensors(path, {"a": torch.randn(100)})
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "short": data[:5], "header": data[:8] + b"{not json" + data[17:],
                      "truncated": data[:-10]}[damage])
    with pytest.raises(CharlstmError, match="not a valid safetensors file"):
        ck.load_tensors(path)


def test_optimizer_state_round_trips_without_pickle():
    model, opt = _tiny()
    tensors, structure = ck.optimizer_to_files(opt)
    json.dumps(structure)                                       # JSON-safe
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt2.load_state_dict(ck.optimizer_from_files(tensors, structure))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k])


# --------------------------------------------------------------------------- save, load, pointers

def test_save_load_gives_identical_logits_and_greedy_text(tmp_path):
    model, opt = _tiny("peephole")
    path = _save(tmp_path / "run", 5, model, opt, is_best=True)
    assert sorted(p.name for p in path.iterdir()) == sorted(ck.CKPT_FILES + (ck.MANIFEST,))
    assert not any(p.suffix in (".pt", ".pth", ".pkl", ".bin") for p in path.iterdir())
    loaded = ck.load_checkpoint(tmp_path / "run")
    assert loaded.path == path and loaded.step == 5 and loaded.vocab == VOCAB
    assert loaded.model_cfg.variant == "peephole" and not loaded.model.training
    assert loaded.config["versions"]["torch"] == torch.__version__
    assert loaded.metrics == {"val_loss": 1.5}
    model.eval()
    x = torch.randint(0, len(VOCAB), (11, 2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x)[0], model(x)[0], rtol=0, atol=0)

    def greedy(m, n=20):
        idx, state, out = torch.zeros(1, 1, dtype=torch.long), None, []
        with torch.no_grad():
            for _ in range(n):
                logits, state = m(idx, state)
                idx = logits[-1:].argmax(-1)
                out.append(int(idx))
        return out

    assert greedy(loaded.model) == greedy(model)


def test_a_cudnn_checkpoint_loads_on_the_custom_backend(tmp_path):
    model, opt = _tiny("lstm", "cudnn")
    _save(tmp_path / "run", 1, model, opt)
    custom = ck.load_checkpoint(tmp_path / "run", backend="custom")
    assert custom.model_cfg.backend == "custom"
    x = torch.randint(0, len(VOCAB), (6, 2))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(custom.model(x)[0], model(x)[0])


def test_resolve_pointers_and_fallbacks(tmp_path):
    model, opt = _tiny()
    run = tmp_path / "run"
    first = _save(run, 10, model, opt, is_best=True)
    second = _save(run, 20, model, opt)
    assert ck.resolve_checkpoint(run) == first                    # best
    assert ck.resolve_checkpoint(run, prefer="latest") == second
    assert ck.resolve_checkpoint(run / "latest") == second        # a pointer file
    assert ck.resolve_checkpoint(second) == second                # a checkpoint directory
    assert ck.resolve_checkpoint(None, root=tmp_path) == first    # the most recent run under root
    (run / "best").write_text("ckpt-999999\n")                    # a pointer to nothing: fall back
    assert ck.resolve_checkpoint(run) == second
    (run / "latest").write_text("garbage")
    assert ck.resolve_checkpoint(run) == second                   # newest complete ckpt-* directory
    with pytest.raises(CharlstmError, match="does not exist"):
        ck.resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CharlstmError, match="holds no charlstm checkpoint"):
        ck.resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(CharlstmError, match="no training runs"):
        ck.resolve_checkpoint(None, root=tmp_path / "empty")


def test_keep_prunes_old_checkpoints_but_never_the_best(tmp_path):
    model, opt = _tiny()
    run = tmp_path / "run"
    for step in (1, 2, 3, 4, 5):
        _save(run, step, model, opt, is_best=(step == 2), keep=2)
    assert [s for s, _ in ck.list_checkpoints(run)] == [2, 4, 5]
    assert ck.resolve_checkpoint(run).name == "ckpt-000002"


# --------------------------------------------------------------------------- crashes and damage

def test_a_crash_in_the_middle_of_a_save_leaves_a_loadable_run(tmp_path, monkeypatch):
    model, opt = _tiny()
    run = tmp_path / "run"
    good = _save(run, 10, model, opt, is_best=True)
    real = ck.save_tensors

    def crash(path, tensors, metadata=None):
        if Path(path).name == "optimizer.safetensors":
            Path(path).write_bytes(b"half a file")
            raise OSError("simulated crash: disk full")
        return real(path, tensors, metadata)

    monkeypatch.setattr(ckptdir, "save_tensors", crash)
    with pytest.raises(OSError, match="simulated crash"):
        _save(run, 20, model, opt, is_best=True)
    monkeypatch.setattr(ckptdir, "save_tensors", real)
    assert not (run / "ckpt-000020").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]
    for which in ("best", "latest"):
        assert ck.resolve_checkpoint(run, prefer=which) == good
    assert ck.load_checkpoint(run).step == 10

    # kill -9 during a save leaves a hidden temporary directory: it is ignored, then cleaned by the next save.
    leftover = run / ".tmp-ckpt-000030-99999-1"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    assert ck.load_checkpoint(run).step == 10
    _save(run, 40, model, opt)
    assert not leftover.exists()
    assert ck.load_checkpoint(run).step == 10 and ck.resolve_checkpoint(run, prefer="latest").name == "ckpt-000040"


def _mtimes(path: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in path.iterdir()}


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated"),
    ("flip", "does not match its sha256"),
    ("delete", "missing"),
    ("config_json", "not readable JSON"),
    ("foreign", "not a charlstm checkpoint"),
    ("newer", "format version 99"),
])
def test_damaged_or_foreign_checkpoints_give_clear_errors_and_stay_untouched(tmp_path, damage, message):
    model, opt = _tiny()
    path = _save(tmp_path / "run", 3, model, opt, is_best=True)
    weights = path / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        (path / "trainer_state.json").unlink()
    elif damage == "config_json":
        (path / "config.json").write_text("{ half")
    elif damage == "foreign":
        (path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    elif damage == "newer":
        cfg = json.loads((path / "config.json").read_text())
        cfg["format_version"] = 99
        (path / "config.json").write_text(json.dumps(cfg))
    before = _mtimes(path)
    with pytest.raises(CharlstmError, match=message):
        ck.load_checkpoint(path)
    assert _mtimes(path) == before


def test_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(CharlstmError, match="holds no charlstm checkpoint"):
        ck.load_checkpoint(tmp_path / "x")


def test_an_incompatible_checkpoint_is_reported(tmp_path):
    """Weights that do not fit the config (rewritten consistently, so only the shapes disagree)."""
    model, opt = _tiny()
    path = _save(tmp_path / "run", 3, model, opt)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model"]["hidden"] = 13
    (path / "config.json").write_text(json.dumps(cfg))
    manifest = json.loads((path / ck.MANIFEST).read_text())
    manifest["files"]["config.json"] = {"bytes": (path / "config.json").stat().st_size,
                                        "sha256": ckptdir._sha256(path / "config.json")}
    (path / ck.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CharlstmError, match="incompatible"):
        ck.load_checkpoint(path)


def test_no_pickle_is_used_anywhere():
    """torch.save / torch.load never appear in the package (the format is safetensors + JSON)."""
    root = Path(ck.__file__).parent
    for py in root.glob("*.py"):
        text = py.read_text(encoding="utf-8")
        assert "torch.save(" not in text and "torch.load(" not in text and "import pickle" not in text, py.name


@pytest.mark.parametrize("backend", ["cudnn", "custom"])
def test_the_documented_standalone_loader_matches_charlstm(tmp_path, backend):
    """docs/checkpoint-format.md's loader (torch + safetensors only) scores text as charlstm does."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "checkpoint-format.md").read_text(encoding="utf-8")
    code = doc.split("# --- begin standalone loader ---")[1].split("# --- end standalone loader ---")[0]
    namespace: dict = {}
    exec(compile(code, "checkpoint-format.md", "exec"), namespace)
    model, opt = _tiny("lstm", backend)
    _save(tmp_path / "run", 7, model, opt, is_best=True)
    text = "hello world, 日本 🙂\nhello"
    ids = torch.tensor(VOCAB.encode(text)).unsqueeze(1)               # (T, 1)
    model.eval()
    with torch.no_grad():
        logits, _ = model(ids[:-1])
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, len(VOCAB)), ids[1:].reshape(-1)).item()
    assert namespace["nats_per_char"](tmp_path / "run", text, batch_size=1) == pytest.approx(expected, rel=1e-5)
