"""What the docs promise, checked: the standalone loader of docs/checkpoint-format.md computes what
`charlstm eval` reports; docs/data.md's stream split is eval_windows'; no doc points outside the repository."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_text
from typer.testing import CliRunner

from charlstm.batches import eval_windows
from charlstm.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def loader():
    """The namespace of docs/checkpoint-format.md's standalone loader."""
    doc = (ROOT / "docs" / "checkpoint-format.md").read_text(encoding="utf-8")
    code = doc.split("# --- begin standalone loader ---")[1].split("# --- end standalone loader ---")[0]
    namespace: dict = {}
    exec(compile(code, "checkpoint-format.md", "exec"), namespace)
    return namespace


def invoke(*args):
    result = CliRunner().invoke(app, [*map(str, args)])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained lstm runs (cudnn and custom backends) with 5 streams."""
    work = tmp_path_factory.mktemp("docs")
    (work / "tiny.txt").write_text(tiny_text(), encoding="utf-8")
    out = {}
    for backend in ("cudnn", "custom"):
        invoke("train", "--data", work / "tiny.txt", "--backend", backend, "--hidden", "16", "--embed", "8",
               "--batch-size", "5", "--seq-len", "16", "--max-steps", "4", "--eval-every", "4",
               "--sample-chars", "0", "--threads", "1", "--device", "cpu", "--no-progress", "--out", work / backend)
        out[backend] = work / backend
    return out


@pytest.mark.parametrize("batch_size", [None, 1, 3, 7])
@pytest.mark.parametrize("backend", ["cudnn", "custom"])
def test_the_documented_loader_computes_what_eval_reports(runs, tmp_path, backend, batch_size):
    # characters outside the vocabulary (left out by both; \r among them: CRLF is not turned into LF),
    # and a length whose N - 1 is not a multiple of any B tried, so that the first streams are longer
    vocab = set(tiny_text())
    end = 700
    while True:
        text = tiny_text()[:400] + "\r\n Ωmega ☃ " + tiny_text()[400:end]
        kept = sum(c in vocab for c in text)
        if all((kept - 1) % b for b in (3, 5, 7)):
            break
        end += 1
    path = tmp_path / "text.txt"
    path.write_bytes(text.encode("utf-8"))
    args = ["--batch-size", batch_size] if batch_size else []
    report = json.loads(invoke("eval", runs[backend], "--text-file", path, "--json", "--device", "cpu",
                               *args).stdout)
    assert report["chars"] == kept - 1 and report["unknown_chars"] == len(text) - kept
    figure = loader()["nats_per_char"](runs[backend], path.read_bytes().decode("utf-8"), batch_size)
    assert figure == pytest.approx(report["loss_nats"], abs=1e-6)


def test_data_md_states_which_streams_get_the_extra_target():
    """docs/data.md's example (N = 11, B = 3: 4, 3, 3 targets from tokens 0, 4, 7) is eval_windows'."""
    text = (ROOT / "docs" / "data.md").read_text(encoding="utf-8")
    assert "the **first r streams** score q + 1 targets" in text
    assert "streams score 4, 3 and\n3 targets and start at tokens 0, 4 and 7" in text
    tokens = torch.arange(11)
    (x, y, mask), = list(eval_windows(tokens, 3, 16))
    lengths = mask.sum(0).tolist()
    assert lengths == [4, 3, 3]
    assert x[0].tolist() == [0, 4, 7] and [int(y[n - 1, b]) for b, n in enumerate(lengths)] == [4, 7, 10]


def test_no_doc_links_or_points_outside_the_repository():
    """No link to ../ and no path of a development machine (/work, /root, /home) in the docs."""
    bad = re.compile(r"\]\(\.\./|(?<![\w.])\.\./shared|/(?:work|root|home)/")
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in DOCS
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if bad.search(line)]
    assert not found, "\n".join(found)
    for p in DOCS:                                      # every relative link names a file of the repository
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", p.read_text(encoding="utf-8")):
            if "://" not in target:
                assert (p.parent / target).resolve().is_relative_to(ROOT), (p.name, target)
                assert (p.parent / target).exists(), f"{p.relative_to(ROOT)} links to a missing {target}"


def test_the_readme_first_screen_installs_demos_and_trains_on_your_own_text():
    first = "\n".join((ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:25])
    for command in ("make demo", "pip install .", "charlstm train --data my_text.txt", "charlstm sample"):
        assert command in first, f"the README's first screen lacks {command!r}"
    assert first.index("make demo") < first.index("pip install .") < first.index("charlstm train --data")
