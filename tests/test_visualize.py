"""Tests of `charlstm visualize`: recording, text features, unit ranking, saturation, the page and its files.

The browser test renders the page in headless Chromium (Debian's ``chromium``
package). No test installs it: `make browser` does (as root, where it is
missing; CI runs it before `make test`), and the test skips with the reason
where no Chromium is on PATH.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from fnmatch import fnmatch
from importlib import resources
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from charlstm import visualize as vis
from charlstm.checkpoint import save_checkpoint
from charlstm.cli import app
from charlstm.config import ModelConfig, TrainConfig
from charlstm.corpus import Vocab
from charlstm.features import FEATURES, pearson, text_features
from charlstm.model import build_model
from charlstm.visualize import page, recording

# A few lines with quotes, brackets, indentation and word starts: every feature moves.
SAMPLE = (
    'def greet(name):\n'
    '    """Say hello."""\n'
    '    if name:\n'
    '        print("hello, " + name)\n'
    "    return {'who': [name, (1, 2)]}\n"
    "She said 'don't go' and left.\n"
    "naïve café 🙂 日本\n"  # astral and non-ASCII characters: one span per code point
)


def make_run(tmp_path: Path, text: str, *, variant: str = "lstm", backend: str = "custom", gru_form: str = "cudnn",
             hidden: int = 6, layers: int = 2, seed: int = 0, name: str = "run", weights: dict | None = None) -> Path:
    """Save a tiny untrained (or hand-weighted) model whose vocabulary is the characters of ``text``."""
    vocab = Vocab.from_text(text)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=len(vocab), variant=variant, backend=backend, gru_form=gru_form,
                      embed=len(vocab) if weights else 5, hidden=hidden, layers=layers)
    model = build_model(cfg)
    if weights:
        sd = model.state_dict()
        sd.update(weights)
        model.load_state_dict(sd)
    run = tmp_path / name
    save_checkpoint(run, step=1, model=model, optimizer=None, model_cfg=model.cfg, train_cfg=TrainConfig(),
                    vocab=vocab, corpus_meta={"name": "test"}, trainer_state={}, is_best=True, keep=1)
    return run


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------- features

def test_text_features_by_hand():
    text = 'a "b(c" (d)\n  e\'s \'f\''
    f = text_features(text)
    assert set(f) == set(FEATURES)
    assert all(v.shape == (len(text),) for v in f.values())
    q = f["inside_quotes"].tolist()
    # opening quote counts as inside, the closing one not; "e's" is an apostrophe, 'f' a quote
    assert [text[t] for t in range(len(text)) if q[t]] == ['"', "b", "(", "c", "'", "f"]
    depth = f["bracket_depth"].tolist()
    assert depth[text.index("(")] == 0  # the bracket inside quotes does not count
    assert depth[text.index("d")] == 1 and depth[text.index(")")] == 0
    pos = f["position_in_line"].tolist()
    assert pos[0] == 1 and pos[text.index("\n")] == 0 and pos[text.index("e")] == 3
    starts = [text[t] for t in range(len(text)) if f["start_of_word"][t]]
    assert starts == ["a", "b", "c", "d", "e", "s", "f"]
    ind = f["indentation"].tolist()
    assert ind[text.index("e")] == 2 and ind[text.index("\n")] == 0 and ind[0] == 0
    assert text_features("\tx")["indentation"].tolist() == [4.0, 4.0]


def test_pearson_matches_the_stdlib_and_zeroes_constants():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(50, 7, generator=g)
    acts[:, 3] = 2.0  # a unit that never moves
    feats = torch.randn(50, 3, generator=g)
    r = pearson(acts, feats)
    assert r.shape == (3, 7)
    for j in range(3):
        for n in range(7):
            if n == 3:
                assert r[j, n] == 0
                continue
            ref = statistics.correlation(feats[:, j].tolist(), acts[:, n].tolist())
            assert float(r[j, n]) == pytest.approx(ref, abs=1e-9)


def fake_recording(text: str, layers: list[dict[str, torch.Tensor]], variant: str = "lstm") -> vis.Recording:
    T = len(text)
    return vis.Recording(text=text, vocab=sorted(set(text)), variant=variant, quantities=tuple(layers[0]),
                         layers=layers, p_next=torch.full((T,), 0.5), top_ids=torch.zeros(T, 1, dtype=torch.long),
                         top_probs=torch.ones(T, 1))


def test_hand_built_unit_is_ranked_first():
    """A unit that follows a feature (with noise) among random units is that feature's top unit."""
    text = (SAMPLE * 3)
    T = len(text)
    feats = text_features(text)
    g = torch.Generator().manual_seed(1)
    layers = [{q: torch.randn(T, 8, generator=g) for q in ("h", "c", "f", "i", "o")} for _ in range(2)]
    layers[1]["c"][:, 5] = 3 * feats["inside_quotes"] + 0.3 * torch.randn(T, generator=g)
    layers[0]["h"][:, 2] = -0.1 * feats["indentation"] + 0.05 * torch.randn(T, generator=g)
    ranking = {f["feature"]: f for f in vis.rank_units(fake_recording(text, layers), top=3)}
    best = ranking["inside_quotes"]["units"][0]
    assert (best["layer"], best["unit"], best["quantity"]) == (1, 5, "c") and best["r"] > 0.9
    best = ranking["indentation"]["units"][0]
    assert (best["layer"], best["unit"], best["quantity"]) == (0, 2, "h") and best["r"] < -0.9
    assert all(len(f["units"]) == 3 and not f["constant"] for f in ranking.values())
    # restricted to one quantity, the c unit is still found; an absent feature is reported constant
    only_c = vis.rank_units(fake_recording(text, layers), quantities=("c",))
    assert {u["quantity"] for f in only_c for u in f["units"]} == {"c"}
    flat = vis.rank_units(fake_recording("abc abc", [{"h": torch.randn(7, 3, generator=g)}], "rnn"))
    assert {f["feature"] for f in flat if f["constant"]} == {"inside_quotes", "bracket_depth", "indentation"}


def test_saturation_fractions_by_hand():
    T, H = 10, 2
    f = torch.full((T, H), 0.5)
    f[:3, 0] = 0.05   # unit 0: 3 of 10 steps left-saturated
    f[:, 1] = 0.95    # unit 1: always right-saturated
    layers = [{"h": torch.zeros(T, H), "c": torch.zeros(T, H), "f": f, "i": torch.full((T, H), 0.5), "o": 1 - f}]
    sat = vis.saturation(fake_recording("x" * T, layers))
    by = {(d["layer"], d["gate"]): d for d in sat}
    assert set(by) == {(0, "f"), (0, "i"), (0, "o")}
    assert by[(0, "f")]["left"] == pytest.approx(0.15) and by[(0, "f")]["right"] == pytest.approx(0.5)
    assert by[(0, "f")]["per_unit_left"] == [0.3, 0.0] and by[(0, "f")]["units_mostly_right"] == 1
    assert by[(0, "o")]["per_unit_right"] == [0.3, 0.0] and by[(0, "i")]["left"] == 0


# ---------------------------------------------------------------------------- recording

CONFIGS = [
    ("rnn", "cudnn", "cudnn"), ("rnn", "custom", "cudnn"),
    ("lstm", "cudnn", "cudnn"), ("lstm", "custom", "cudnn"),
    ("peephole", "custom", "cudnn"), ("coupled", "custom", "cudnn"),
    ("gru", "cudnn", "cudnn"), ("gru", "custom", "cudnn"), ("gru", "custom", "cho"),
]


@pytest.mark.parametrize("variant,backend,gru_form", CONFIGS, ids=[f"{v}-{b}-{g}" for v, b, g in CONFIGS])
def test_recorded_h_equals_the_models_forward(variant, backend, gru_form, monkeypatch):
    monkeypatch.setattr(recording, "CHUNK", 16)  # many chunk boundaries: the state must be carried across them
    text = SAMPLE
    vocab = Vocab.from_text(text)
    torch.manual_seed(3)
    model = build_model(ModelConfig(vocab_size=len(vocab), variant=variant, backend=backend, gru_form=gru_form,
                                    embed=5, hidden=6, layers=2)).eval()
    ids = torch.tensor(vocab.encode(text))
    rec = vis.record(model, ids, vocab.chars)
    T, L = len(text), 2
    assert rec.text == text and rec.quantities == vis.quantities_for(variant)
    assert all(layer[q].shape == (T, 6) for layer in rec.layers for q in rec.quantities)
    with torch.no_grad():
        logits, state = model(ids.view(-1, 1))  # the model's own forward, whole text at once
        torch.testing.assert_close(model.head(rec.layers[-1]["h"]), logits[:, 0], atol=1e-5, rtol=1e-4)
        for k in range(L):
            torch.testing.assert_close(rec.layers[k]["h"][-1], state.h[k, 0], atol=1e-5, rtol=1e-4)
            if state.c is not None:
                torch.testing.assert_close(rec.layers[k]["c"][-1], state.c[k, 0], atol=1e-5, rtol=1e-4)
        if backend == "cudnn":
            # the cuDNN-backed module's own output sequence, against the custom twin's recorded h
            out, _ = model.rnn(model.embedding(ids.view(-1, 1)))  # (T, 1, H)
            torch.testing.assert_close(rec.layers[-1]["h"], out[:, 0], atol=1e-5, rtol=1e-4)
            assert any("custom cells" in n for n in rec.notes)
        probs = torch.softmax(logits[:, 0].double(), -1).float()
    for layer in rec.layers:
        for gate in vis.GATES[variant]:
            assert 0.0 <= float(layer[gate].min()) and float(layer[gate].max()) <= 1.0
    if variant == "coupled":
        torch.testing.assert_close(rec.layers[0]["i"], 1 - rec.layers[0]["f"])
    torch.testing.assert_close(rec.p_next[:-1], probs[torch.arange(T - 1), ids[1:]])
    assert torch.isnan(rec.p_next[-1])
    assert rec.top_ids.shape == (T, 5) and bool((rec.top_probs[:, :-1] >= rec.top_probs[:, 1:]).all())
    torch.testing.assert_close(rec.top_probs[:, 0], probs.max(-1).values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (cuDNN kernels)")
@pytest.mark.parametrize("variant", ["lstm", "gru", "rnn"])
def test_recording_on_cuda_matches_the_cudnn_kernels(variant, monkeypatch):
    """On a GPU, nn.LSTM/GRU/RNN run cuDNN's kernels: the custom twin's recorded h must still match them.
    cuDNN's recurrent kernels take TF32 products by default (allow_tf32), 5e-4 off on an H200: off here."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    text = SAMPLE * 3
    vocab = Vocab.from_text(text)
    torch.manual_seed(4)
    model = build_model(ModelConfig(vocab_size=len(vocab), variant=variant, backend="cudnn",
                                    embed=16, hidden=32, layers=2)).cuda().eval()
    ids = torch.tensor(vocab.encode(text), device="cuda")
    rec = vis.record(model, ids, vocab.chars)
    with torch.no_grad():
        out, hn = model.rnn(model.embedding(ids.view(-1, 1)))  # (T, 1, H)
    hn = hn[0] if isinstance(hn, tuple) else hn
    torch.testing.assert_close(rec.layers[-1]["h"], out[:, 0].float().cpu(), atol=2e-4, rtol=1e-3)
    for k in range(2):
        torch.testing.assert_close(rec.layers[k]["h"][-1], hn[k, 0].float().cpu(), atol=2e-4, rtol=1e-3)


def quote_lstm_weights(vocab: Vocab, H: int = 4) -> dict:
    """nn.LSTM weights (one layer, one-hot embedding) whose unit 0 holds quote parity in its cell:
    on '"' the forget gate closes and the input gate opens only when h_0 is low (outside quotes),
    so C_0 flips between about 0 and about 1; on any other character it keeps its value."""
    V = len(vocab)
    q = vocab.stoi['"']
    g = torch.Generator().manual_seed(0)
    w_ih = 0.3 * torch.randn(4 * H, V, generator=g)  # rows: i, f, g, o blocks of H
    w_hh = 0.3 * torch.randn(4 * H, H, generator=g)
    b = torch.zeros(4 * H)
    i, f, c, o = 0, H, 2 * H, 3 * H  # unit 0's row in each block
    w_ih[[i, f, c, o]] = 0.0
    w_hh[[i, f, c, o]] = 0.0
    b[i], w_ih[i, q], w_hh[i, 0] = -10.0, 20.0, -30.0   # open only on '"' with h_0 low
    b[f], w_ih[f, q] = 10.0, -20.0                       # keep, except on '"'
    b[c] = 10.0                                          # candidate 1
    b[o] = 10.0                                          # always show the cell
    return {"embedding.weight": torch.eye(V), "rnn.weight_ih_l0": w_ih, "rnn.weight_hh_l0": w_hh,
            "rnn.bias_ih_l0": b, "rnn.bias_hh_l0": torch.zeros(4 * H)}


def test_hand_weighted_lstm_quote_unit_is_found(tmp_path):
    """Through the command line: a cuDNN-layout LSTM built by hand to count quotes is ranked first."""
    g = torch.Generator().manual_seed(5)
    words = ["alpha", "beta", "gamma", "delta", "x", "yo", "zed"]
    parts = []
    for _ in range(60):
        w = words[int(torch.randint(len(words), (1,), generator=g))]
        parts.append(f'"{w}"' if float(torch.rand(1, generator=g)) < 0.4 else w)
    text = " ".join(parts) + "\n"
    vocab = Vocab.from_text(text)
    run = make_run(tmp_path, text, backend="cudnn", hidden=4, layers=1, weights=quote_lstm_weights(vocab))
    text_file = tmp_path / "quotes.txt"
    text_file.write_text(text, encoding="utf-8")
    result = invoke("visualize", run, "--text-file", text_file, "--find-units", "--json", "--top", "3")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    features = {f["feature"]: f for f in data["features"]}
    best = features["inside_quotes"]["units"][0]
    assert (best["layer"], best["unit"]) == (0, 0) and best["quantity"] in ("c", "h") and best["r"] > 0.99
    assert data["chars"] == len(text) and data["variant"] == "lstm"


# ---------------------------------------------------------------------------- the page

def page_of(tmp_path: Path, text: str, **run_kw) -> tuple[str, Path]:
    run = make_run(tmp_path, text, **run_kw)
    out = tmp_path / "page.html"
    result = invoke("visualize", run, "--text", text, "--html", out)
    assert result.exit_code == 0, result.output
    return out.read_text(encoding="utf-8"), out


def embedded_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="charlstm-data">(.*?)</script>', page, re.S)
    assert m is not None
    return json.loads(m.group(1))


def test_page_is_self_contained_and_holds_the_recording(tmp_path):
    # The text itself names an address and tries to close the script: neither may leak into the page.
    text = SAMPLE + "see http://example.com/x </script><b>&amp;\n"
    page, _ = page_of(tmp_path, text)
    lower = page.lower()
    for bad in ("http:", "https:", "//", "src=", "href=", "url(", "@import", "<link", "<img", "<iframe",
                "fetch(", "xmlhttprequest", "<b>"):
        assert bad not in lower, f"the page contains {bad!r}"
    assert lower.count("</script>") == 2  # the data element and the program, nothing from the text
    data = embedded_data(page)
    assert base64.urlsafe_b64decode(data["text_b64"]).decode("utf-8") == text
    assert data["hidden"] == 6 and len(data["layers"]) == 2
    assert set(data["layers"][0]) == {"h", "c", "f", "i", "o"}
    assert len(data["top_ids"]) == len(text) and len(data["top_ids"][0]) == 5
    assert data["p_next"][-1] is None and all(0 <= p <= 1 for p in data["p_next"][:-1])
    assert [f["feature"] for f in data["features"]] == list(FEATURES)


def test_quantized_traces_decode_to_the_recording():
    text = SAMPLE
    g = torch.Generator().manual_seed(2)
    c = 5 * torch.randn(len(text), 3, generator=g)
    layers = [{"h": torch.tanh(c), "c": c}]
    enc = vis.quantize(c)
    raw = torch.tensor(list(base64.urlsafe_b64decode(enc["b64"])), dtype=torch.float32).view(3, len(text))  # (H, T)
    lo, hi = torch.tensor(enc["lo"]), torch.tensor(enc["hi"])
    decoded = lo[:, None] + (hi - lo)[:, None] * raw / 255
    assert float((decoded.T - c).abs().max()) <= float((hi - lo).max()) / 255 / 2 + 1e-4
    assert vis.build_page(fake_recording(text, layers, "rnn"), [], meta={}).count("charlstm-data") >= 1


# ---------------------------------------------------------------------------- the page's files

ROOT = Path(__file__).resolve().parents[1]
ASSET_DIR = ROOT / "charlstm" / "assets"


def test_page_assets_are_package_resources_inlined_into_the_page():
    for name in page.ASSETS:
        resource = resources.files("charlstm") / "assets" / name
        assert resource.is_file(), f"charlstm/assets/{name} is not reachable through importlib.resources"
        assert resource.read_text(encoding="utf-8") == (ASSET_DIR / name).read_text(encoding="utf-8")
    html, css, js = (page.read_asset(name) for name in page.ASSETS)
    assert html.count(page.STYLE_TAG) == 1 and html.count(page.SCRIPT_TAG) == 1
    assert "//" not in css and "//" not in js  # the page may hold no '//' at all (see the test above)
    template = page.page_template()
    assert f"<style>\n{css}</style>" in template and f"<script>\n{js}</script>" in template
    assert page.STYLE_TAG not in template and page.SCRIPT_TAG not in template
    assert template.count("__TITLE__") == 1 and template.count("__DATA__") == 1


def test_pyproject_package_data_lists_every_asset():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    setuptools_conf = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    patterns = setuptools_conf["package-data"]["charlstm"]
    assets = sorted(p.relative_to(ROOT / "charlstm").as_posix() for p in ASSET_DIR.iterdir() if p.is_file())
    assert {f"assets/{name}" for name in page.ASSETS} <= set(assets)
    for rel in assets:
        assert any(fnmatch(rel, pattern) for pattern in patterns), f"charlstm/{rel} matches no package-data pattern"
    if isinstance(setuptools_conf.get("packages"), list):  # packages listed by hand: the subpackage must be there
        assert "charlstm.visualize" in setuptools_conf["packages"]


@pytest.mark.skipif(find_spec("setuptools") is None, reason="building the wheel needs setuptools")
def test_the_wheel_ships_the_assets_and_every_subpackage(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "charlstm", src / "charlstm", ignore=shutil.ignore_patterns("__pycache__"))
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")], cwd=src, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    names = set(zipfile.ZipFile(tmp_path / "dist" / done.stdout.strip().splitlines()[-1]).namelist())
    for name in page.ASSETS:
        assert f"charlstm/assets/{name}" in names
    for init in (ROOT / "charlstm").rglob("__init__.py"):
        rel = init.relative_to(ROOT).as_posix()
        assert rel in names, f"the wheel lacks {rel}: add its package to pyproject.toml"


# ---------------------------------------------------------------------------- the page in a real browser

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """A headless-capable Chromium from PATH; skips, saying why and how to get one, where there is none."""
    exe = _find_chromium()
    if exe is None:
        pytest.skip(f"no headless Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)}); "
                    "`make browser` installs Debian's chromium when run as root, as CI does")
    return exe


def chromium_run(exe: str, url: str, *extra: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", *extra, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def read_png(path: Path) -> tuple[int, int, list[bytes], int]:
    """Width, height, rows of RGB(A) bytes and bytes per pixel of an 8-bit PNG, decoded with the standard library."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0, "unexpected PNG layout"
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        filt = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if filt == 1:
                line[x] = (line[x] + a) & 255
            elif filt == 2:
                line[x] = (line[x] + b) & 255
            elif filt == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif filt == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows, bpp


def test_page_renders_coloured_text_in_chromium(tmp_path, chromium):
    page, path = page_of(tmp_path, SAMPLE * 2, hidden=8)
    url = path.resolve().as_uri() + "#layer=0&unit=1&q=h&scale=unit"
    shot = tmp_path / "shot.png"
    done = chromium_run(chromium, url, "--window-size=800,500", f"--screenshot={shot}")
    assert shot.is_file(), f"chromium wrote no screenshot: {done.stderr[-2000:]}"
    width, height, rows, bpp = read_png(shot)
    assert (width, height) == (800, 500)
    coloured = 0
    for row in rows:
        for x in range(0, len(row), bpp):
            r, g, b = row[x], row[x + 1], row[x + 2]
            if max(r, g, b) - min(r, g, b) > 60:  # clearly red or blue, not grey, white or black
                coloured += 1
    assert coloured > 2000, f"only {coloured} coloured pixels: the script did not colour the text"
    # The script ran: every character is a span with a background colour. A copy of the page
    # that hovers over character 4 ('g' of greet) shows the tooltip with the top-5 predictions.
    hover = tmp_path / "hover.html"
    hover.write_text(page.replace("</body>", "<script>document.querySelector('[data-t=\"4\"]')"
                                  ".dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));</script></body>"),
                     encoding="utf-8")
    dom = chromium_run(chromium, hover.resolve().as_uri(), "--dump-dom").stdout
    spans = re.findall(r'<span data-t="\d+"[^>]* style="background-color: rgb\(\d+, \d+, \d+\);', dom)
    assert len(spans) == len(SAMPLE * 2)
    tip = re.search(r'<div id="tip" style="display: block;.*?</div></div>', dom)
    assert tip is not None, "hovering a character shows no tooltip"
    assert "top 5 predictions" in tip.group(0) and 'next "r"  p = ' in tip.group(0)
    assert tip.group(0).count('class="bar"') == 5


# ---------------------------------------------------------------------------- command line

def test_cli_unit_prints_the_text_coloured(tmp_path):
    run = make_run(tmp_path, SAMPLE)
    result = invoke("visualize", run, "--text", "print(name)", "--unit", "1:2", "--quantity", "f")
    assert result.exit_code == 0, result.output
    assert "print(name)" in result.stdout and "layer 1, unit 2, f" in result.stdout
    assert not list(run.glob("*.html"))  # only the page when asked or when nothing else is
    model = build_model(ModelConfig(vocab_size=3, hidden=4, layers=1, embed=2))
    rec = vis.record(model, torch.tensor([0, 1, 2, 1]), list("abc"))
    text = vis.render_terminal(rec, 0, 3, "c")
    assert text.plain == "abcb" and len({str(s.style) for s in text.spans}) > 1


def test_cli_default_page_never_overwrites(tmp_path):
    run = make_run(tmp_path, SAMPLE)
    for _ in range(2):
        result = invoke("visualize", run, "--text", "if name:\n    print")
        assert result.exit_code == 0, result.output
    assert (run / "visualize.html").is_file() and (run / "visualize-2.html").is_file()
    assert "visualize-2.html" in result.stdout


def test_cli_saturation_table_json_and_plot(tmp_path):
    run = make_run(tmp_path, SAMPLE, variant="gru")
    result = invoke("visualize", run, "--text", SAMPLE, "--saturation", "--json", "--plot", tmp_path / "sat.svg")
    from charlstm.plots import have_matplotlib

    if not have_matplotlib():
        assert result.exit_code == 1 and "matplotlib" in result.stderr
        result = invoke("visualize", run, "--text", SAMPLE, "--saturation", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {(d["layer"], d["gate"]) for d in data["saturation"]} == {(0, "z"), (0, "r"), (1, "z"), (1, "r")}
    assert all(0 <= d["left"] <= 1 and 0 <= d["right"] <= 1 for d in data["saturation"])
    if have_matplotlib():
        assert (tmp_path / "sat.svg").is_file() and not (tmp_path / "sat.png").exists()
    table = invoke("visualize", run, "--text", SAMPLE, "--saturation", "--find-units")
    assert table.exit_code == 0 and "gate saturation" in table.stdout and "inside_quotes" in table.stdout


@pytest.mark.parametrize("args,code,message", [
    (["--text", "ab", "--text-file", "x.txt"], 2, "exactly one of --text"),
    ([], 2, "exactly one of --text"),
    (["--text", "hello ~~ world"], 1, "'~'"),
    (["--text", "name", "--quantity", "c"], 2, "no 'c'"),
    (["--text", "name", "--unit", "2:0"], 2, "layers 0..1"),
    (["--text", "name", "--unit", "zero"], 2, "LAYER:INDEX"),
    (["--text", "name", "--json"], 2, "--find-units"),
    (["--text", "name", "--text-file", "nope.txt"], 2, "exactly one"),
    (["--text-file", "nope.txt"], 1, "no such file"),
])
def test_cli_errors_are_one_clear_line(tmp_path, args, code, message):
    run = make_run(tmp_path, SAMPLE, variant="gru")
    result = invoke("visualize", run, *args)
    assert result.exit_code == code, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_cli_unknown_skip_drops_characters(tmp_path):
    run = make_run(tmp_path, SAMPLE)
    result = invoke("visualize", run, "--text", "name ~~ name", "--unknown", "skip", "--find-units", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["chars"] == len("name  name")
    assert "dropped 2" in result.stderr
