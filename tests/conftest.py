"""Shared pytest fixtures: the read-only shared data directory and a tiny corpus."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# ../shared/data relative to the repository root (never copied into the repo).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A few KB of text with some non-ASCII code points (accents, CJK, an emoji from
# the astral plane, a tab) so that tests exercise more than ASCII.
_TINY_LINES = [
    "First Citizen:",
    "Before we proceed any further, hear me speak.",
    "",
    "All:",
    "Speak, speak.",
    "",
    "def greet(name):\n\treturn f'héllo, {name}!'",
    "Café crème, naïve façade, 日本語のテキスト, emoji 🙂 and ünïcödé.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]


def tiny_text(repeat: int = 40) -> str:
    """The text of `tiny_corpus_file`: a few KB, multi-line, some Unicode."""
    return "\n".join(_TINY_LINES * repeat) + "\n"


@pytest.fixture(autouse=True)
def _clean_charlstm_env():
    """Each test starts and ends without CHARLSTM_* switches (``--debug`` sets CHARLSTM_DEBUG in-process)."""
    names = ("CHARLSTM_DEBUG", "CHARLSTM_TINYSHAKESPEARE_URL", "CHARLSTM_DATA_DIR", "CHARLSTM_CACHE_MAX")
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    yield
    for n in names:
        os.environ.pop(n, None)
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _cpu_unless_the_test_is_about_cuda(request, monkeypatch):
    """The suite states what happens on a CPU (--device auto, the backend auto picks, threads, exact
    figures), so on a machine with a GPU every test runs as on one without, except the tests named
    for CUDA and test_triton.py's, which are about the GPU (benchmarks/gpu_check.py runs those)."""
    if "cuda" in request.node.name.lower() or request.node.module.__name__.endswith("test_triton"):
        return
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")                  # for subprocesses (torchrun, the CLI)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def shared_data() -> Path:
    """Path of ../shared/data (tinyshakespeare.txt lives there); skips when absent."""
    if not (SHARED_DATA / "tinyshakespeare.txt").is_file():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (expected tinyshakespeare.txt there)")
    return SHARED_DATA


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory with the tiny corpus as tiny.txt (data/ and checkpoints/ land here)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(tiny_text(), encoding="utf-8")
    return tmp_path


def cli(*args, **kw):
    """`charlstm ARGS` in-process through typer's CliRunner; an exception other than the exit is raised."""
    from typer.testing import CliRunner

    from charlstm.cli import app

    result = CliRunner().invoke(app, [*map(str, args)], prog_name="charlstm", **kw)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture
def tiny_corpus_file(tmp_path: Path) -> Path:
    """A small UTF-8 text file (about 10 KB, some non-ASCII) in tmp_path."""
    path = tmp_path / "tiny.txt"
    path.write_text(tiny_text(), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- cells
#
# (id, variant, extra ModelConfig fields): every variant and form, several peephole subsets;
# shared by the tests of the cells, the fused loops and the native loops.
CASES = [
    ("rnn", "rnn", {}),
    ("lstm", "lstm", {}),
    ("lstm-nobias", "lstm", {"bias": False}),
    ("peephole-diag-fio", "peephole", {"peephole_form": "diag", "peepholes": "fio"}),
    ("peephole-diag-f", "peephole", {"peephole_form": "diag", "peepholes": "f"}),
    ("peephole-diag-io", "peephole", {"peephole_form": "diag", "peepholes": "io"}),
    ("peephole-diag-none", "peephole", {"peephole_form": "diag", "peepholes": ""}),
    ("peephole-full-fio", "peephole", {"peephole_form": "full", "peepholes": "fio"}),
    ("peephole-full-o", "peephole", {"peephole_form": "full", "peepholes": "o"}),
    ("peephole-full-fi", "peephole", {"peephole_form": "full", "peepholes": "fi"}),
    ("coupled", "coupled", {}),
    ("coupled-nobias", "coupled", {"bias": False}),
    ("gru-cudnn", "gru", {"gru_form": "cudnn"}),
    ("gru-cudnn-nobias", "gru", {"gru_form": "cudnn", "bias": False}),
    ("gru-cho", "gru", {"gru_form": "cho"}),
    ("gru-cho-nobias", "gru", {"gru_form": "cho", "bias": False}),
]
IDS = [c[0] for c in CASES]


def case_config(variant: str, extra: dict, *, E: int = 3, H: int = 4, L: int = 2):
    """The ModelConfig of a case at these sizes."""
    from charlstm.config import ModelConfig

    return ModelConfig(vocab_size=5, variant=variant, embed=E, hidden=H, layers=L, **extra)


def case_spec(variant: str, extra: dict):
    """The cell registry's entry of a case."""
    from charlstm.registry import spec_for

    return spec_for(case_config(variant, extra))


def make_cells(variant, extra, *, E=3, H=4, L=2, dtype=torch.float64, seed=0):
    """L custom cells of a case, parameters spread over (-0.6, 0.6) so that every term matters."""
    torch.manual_seed(seed)
    cfg = case_config(variant, extra, E=E, H=H, L=L)
    spec = case_spec(variant, extra)
    cells = [spec.make_cell(cfg, E if k == 0 else H).to(dtype) for k in range(L)]
    with torch.no_grad():
        for cell in cells:
            for p in cell.parameters():
                p.uniform_(-0.6, 0.6)
    return cells


# --------------------------------------------------------------------------- tiny training runs

# A model and budget small enough for a test: one layer of 16 units, windows of 16 in 4 streams,
# one thread, no samples, no progress bar. Options given after these win (click takes the last).
TINY_RUN = ("--hidden", "16", "--embed", "8", "--layers", "1", "--batch-size", "4", "--seq-len", "16",
            "--sample-chars", "0", "--threads", "1", "--no-progress")


def train_tiny(*args, data="tiny.txt", **invoke_kw):
    """`charlstm train --data DATA` with TINY_RUN, then ``args`` (which override it), in-process; torch's
    thread count is restored afterwards. Returns the CliRunner result."""
    from typer.testing import CliRunner

    from charlstm.cli import app

    before = torch.get_num_threads()
    try:
        return CliRunner().invoke(app, ["train", "--data", str(data), *TINY_RUN, *map(str, args)], **invoke_kw)
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- models and runs for sampling

def tiny_model(case: dict, vocab_size: int = 11, dtype=torch.float64, layers: int = 3):
    """A small model with weights large enough that every gate matters."""
    from charlstm.config import ModelConfig
    from charlstm.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=vocab_size, embed=5, hidden=7, layers=layers, **case))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.7, 0.7)
    return model.to(dtype).eval()


def tiny_vocab():
    """The vocabulary of `tiny_text` (Unicode included)."""
    from charlstm.corpus import Vocab

    return Vocab.from_text(tiny_text())


def text_model(case: dict | None = None, dtype=torch.float32):
    """A small model over the tiny corpus's vocabulary."""
    return tiny_model(case or dict(variant="lstm"), len(tiny_vocab()), dtype=dtype, layers=2)


def save_run(run_dir: Path, case: dict | None = None, step: int = 10, model=None) -> Path:
    """A run directory with one checkpoint of a small model (default `text_model`) over the tiny
    corpus's vocabulary."""
    from charlstm import checkpoint as ck
    from charlstm.config import TrainConfig

    model = (model or text_model(case)).float()
    return ck.save_checkpoint(run_dir, step=step, model=model, optimizer=None, model_cfg=model.cfg,
                              train_cfg=TrainConfig(data="tiny.txt"), vocab=tiny_vocab(),
                              corpus_meta={"name": "tiny.txt", "source": "test", "sha256": "0" * 64},
                              trainer_state={"step": step, "metrics": {}}, is_best=True, keep=3)


def draw(stepper, logits, n: int, opts, generator):
    """``stepper.generate`` with the chunk's noise drawn from ``generator`` as charlstm sample draws it."""
    from charlstm.sampling import gumbel_noise

    noise = None if opts.greedy else gumbel_noise(n, logits.size(0), logits.size(1), generator, logits.device)
    return stepper.generate(logits, n, opts, noise)


_SAVED_CACHE_HOME: list = []


def pytest_configure(config):
    """The native kernels compile into a temporary cache, not the user's ~/.cache (before collection,
    which may load them), unless CHARLSTM_TEST_NATIVE_CACHE names a directory to reuse between runs."""
    _SAVED_CACHE_HOME.append(os.environ.get("XDG_CACHE_HOME"))
    reuse = os.environ.get("CHARLSTM_TEST_NATIVE_CACHE")
    os.environ["XDG_CACHE_HOME"] = reuse or tempfile.mkdtemp(prefix="charlstm-test-cache-")


def pytest_unconfigure(config):
    ours = os.environ.get("XDG_CACHE_HOME", "")
    if not os.environ.get("CHARLSTM_TEST_NATIVE_CACHE") and Path(ours).name.startswith("charlstm-test-cache-"):
        shutil.rmtree(ours, ignore_errors=True)
    before = _SAVED_CACHE_HOME.pop() if _SAVED_CACHE_HOME else None
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(autouse=True)
def _curves_only_where_tested(request, monkeypatch):
    """Drawing a run's curves takes about half a second per run: the tests that look at them
    (test_curves, test_train) draw them, the others' runs skip the drawing."""
    if request.module.__name__ not in ("test_curves", "test_train"):
        from charlstm.observers import Curves

        monkeypatch.setattr(Curves, "draw", lambda self, trainer: None)
