"""Fault injection (issue 18), bounded in time: kill -9 at random and chosen points of saves and
retention, a second writer while a run trains, readers racing its retention, a full and a read-only
file system (a tmpfs mounted here where the tests run as root; skipped with the reason elsewhere)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import cli

from charlstm import checkpoint as ck
from charlstm import rundir
from charlstm.config import ModelConfig, TrainConfig
from charlstm.corpus import Vocab
from charlstm.model import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "8", "--embed", "4", "--batch-size", "4", "--seq-len", "16", "--threads", "1",
        "--sample-chars", "0", "--no-progress"]




def one_line(r, message: str) -> None:
    """Exit 1 and one `error:` line holding ``message``, no traceback."""
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def assert_sound(run: Path) -> None:
    """Every pointer names a complete checkpoint, and every checkpoint directory with a MANIFEST.json is
    complete. A save's temporary directory (.tmp-ckpt-*) or a deletion's (.old-ckpt-*) may hold anything,
    a half-written MANIFEST.json included: nothing reads it, and the next save clears it away."""
    for which in ck.POINTERS:
        if (run / which).exists():
            target = ck.read_pointer(run, which)
            assert target is not None, f"{run.name}/{which} names no complete checkpoint"
            ck.verify_checkpoint(target)
    for p in run.iterdir():
        if p.name.startswith((".tmp-ckpt-", ".old-ckpt-")):
            continue
        if p.is_dir() and (p / ck.MANIFEST).exists():
            ck.verify_checkpoint(p)                            # raises for a missing or damaged file


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------- kill -9 during saves and retention

# Runs in a subprocess: one torch import, then one forked child per kill. A child saves checkpoints
# in a loop (keep 1: every save also deletes one) until it is killed: by its parent after a random
# delay, or by itself right after the n-th call of a chosen step of a save or a deletion.
CRASHER = r"""
import os, random, shutil, signal, sys, time
from pathlib import Path
import torch
from charlstm import checkpoint as ck
from charlstm import ckptdir
from charlstm.config import ModelConfig, TrainConfig
from charlstm.corpus import Vocab
from charlstm.model import build_model

root, seed, points = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")

def die_after(owner, name, n, before=False):
    real, calls = getattr(owner, name), [0]
    def wrapper(*a, **k):
        calls[0] += 1
        if before and calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*a, **k)
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    setattr(owner, name, wrapper)

def half_rmtree(path, ignore_errors=False):      # killed halfway through removing a directory
    files = sorted(Path(path).iterdir())
    for f in files[: len(files) // 2]:
        f.unlink()
    os.kill(os.getpid(), signal.SIGKILL)

def child(run, point, n):
    torch.set_num_threads(1)
    if point == "unlink":
        die_after(Path, "unlink", n)                # a deletion: right after its MANIFEST.json went
    elif point == "rename":
        die_after(ck.os, "rename", n)               # a save's rename into place, or a deletion's rename away
    elif point == "replace":
        die_after(ck.os, "replace", n)              # between the two pointers
    elif point == "write":
        die_after(ckptdir, "save_tensors", n, before=True)   # in the middle of writing a checkpoint's files
    elif point == "rmtree" and n > 0:
        real = ck.shutil.rmtree
        calls = [0]
        def rmtree(path, ignore_errors=False):
            calls[0] += 1
            return half_rmtree(path) if calls[0] == n else real(path, ignore_errors=ignore_errors)
        ck.shutil.rmtree = rmtree
    vocab = Vocab(list("abcdefgh"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=len(vocab), hidden=16, embed=4))
    opt = torch.optim.AdamW(model.parameters())
    step = max([s for s, _ in ck.list_checkpoints(run)], default=0)
    while True:
        step += 1
        ck.save_checkpoint(run, step=step, model=model, optimizer=opt, model_cfg=model.cfg, train_cfg=TrainConfig(),
                           vocab=vocab, corpus_meta={}, trainer_state={"step": step, "rng": {"torch_cpu":
                           torch.get_rng_state()}}, is_best=step % 3 == 1, keep=1)

torch.optim.AdamW(build_model(ModelConfig(vocab_size=2, hidden=2, embed=2)).parameters())  # lazy imports, once
rng = random.Random(seed)
for k, spec in enumerate(points):
    point, n = spec.split(":")
    run = root / f"run-{k:02d}-{point}"
    pid = os.fork()
    if pid == 0:
        try:
            child(run, point, int(n))
        finally:
            os._exit(3)                             # never reached: killed
    if point == "random":
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    print(spec, os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, flush=True)
"""


@pytest.fixture
def fast_dir(tmp_path):
    """A directory in memory where there is one (/dev/shm: the fsyncs cost nothing, kill -9 acts the same)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="charlstm-faults-", dir=shm))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_kill_9_at_any_point_of_a_save_or_of_retention_leaves_a_sound_run(fast_dir):
    tmp_path = fast_dir
    chosen = [f"{point}:{n}" for point in ("unlink", "rename", "replace", "write", "rmtree") for n in (2, 4)]
    points = chosen + ["random:0"] * 12
    script = tmp_path / "crasher.py"
    script.write_text(CRASHER)
    out = subprocess.run([sys.executable, str(script), str(tmp_path), "18", ",".join(points)], env=env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    killed = [line.split() for line in out.stdout.splitlines()]
    assert len(killed) == len(points) and all(k == "True" for _, k in killed), out.stdout
    runs = sorted(p for p in tmp_path.iterdir() if p.name.startswith("run-"))
    leftovers = 0
    for run in runs:
        assert_sound(run)
        if ck.list_checkpoints(run):                           # (none when killed within the first save)
            assert ck.load_checkpoint(run, prefer="latest").step >= 1
        leftovers += any(p.name.startswith((".tmp-", ".old-")) or (ck.CKPT_PATTERN.match(p.name) and not
                         (p / ck.MANIFEST).exists()) for p in run.iterdir())
    assert leftovers >= 4                                      # the chosen points did land inside saves and deletions
    # The next save of each run clears what the crash left and goes on.
    torch.manual_seed(0)
    vocab = Vocab(list("abcdefgh"))
    model = build_model(ModelConfig(vocab_size=len(vocab), hidden=16, embed=4))
    for run in runs:
        step = max((s for s, _ in ck.list_checkpoints(run)), default=0) + 1
        ck.save_checkpoint(run, step=step, model=model, optimizer=None, model_cfg=model.cfg, train_cfg=TrainConfig(),
                           vocab=vocab, corpus_meta={}, trainer_state={"step": step}, is_best=False, keep=1)
        assert_sound(run)
        assert not [p.name for p in run.iterdir() if p.name.startswith((".tmp-", ".old-"))]
        assert all((p / ck.MANIFEST).exists() for p in run.glob("ckpt-*"))


# --------------------------------------------------------------------------- a run being trained

def test_a_run_being_trained_has_one_writer_readers_never_fail_and_kill_9_leaves_no_stale_lock(work):
    trainer = subprocess.Popen(
        [sys.executable, "-m", "charlstm", "train", "--data", "tiny.txt", *TINY, "--out", "R", "--max-steps", "100000",
         "--max-time", "40s", "--checkpoint-every", "1", "--keep", "1", "--eval-every", "1000000"],
        cwd=work, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while ck.read_pointer(work / "R", "latest") is None:
            assert trainer.poll() is None and time.monotonic() < deadline, trainer.stderr.read()
            time.sleep(0.05)
        assert (work / "R" / rundir.LOCK).read_text().strip() == str(trainer.pid)
        # A second writer, --overwrite and --resume are refused with the trainer's pid.
        message = f"R is being trained by process {trainer.pid}; wait for it or choose another --out"
        one_line(cli("train", "--data", "tiny.txt", *TINY, "--out", "R", "--max-steps", "5"), message)
        one_line(cli("train", "--data", "tiny.txt", *TINY, "--out", "R", "--max-steps", "5", "--overwrite"), message)
        one_line(cli("train", "--resume", "R", "--max-steps", "5", "--no-progress"), message)
        # Readers racing its retention (a checkpoint every step, one kept) never fail.
        seen, started = set(), time.monotonic()
        while time.monotonic() - started < 4:
            r = cli("info", "R", "--json")
            assert r.exit_code == 0, r.output
            seen.add(json.loads(r.stdout)["step"])
        assert len(seen) >= 3                                  # the run moved on while they read
        r = cli("sample", "R", "--length", "5", "--no-stream")
        assert r.exit_code == 0, r.output
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    # kill -9 leaves the run sound and no stale lock: it resumes at once.
    assert_sound(work / "R")
    latest = ck.resume_checkpoint(work / "R")
    r = cli("train", "--resume", "R", "--max-steps", ck.step_of(latest) + 2, "--no-progress")
    assert r.exit_code == 0, r.output
    assert ck.resume_checkpoint(work / "R").name == ck.checkpoint_name(ck.step_of(latest) + 2)
    assert not (work / "R" / rundir.LOCK).exists()


# --------------------------------------------------------------------------- full and read-only file systems

def _mount_works() -> str | None:
    """None where a tmpfs can be mounted here, else why not."""
    if os.name != "posix" or os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    probe = Path(f"/tmp/charlstm-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            return f"mount -t tmpfs fails here: {r.stderr.strip()}"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    except OSError as e:
        return f"no mount command: {e}"
    finally:
        probe.rmdir()


MOUNT = _mount_works()


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, ro=False) -> a fresh tmpfs under tmp_path; all unmounted at the end."""
    if MOUNT is not None:
        pytest.skip(MOUNT)
    mounted = []

    def mount(size: str, name: str = "fs") -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_earlier_checkpoints(work, tmpfs):
    disk = tmpfs("160k")
    r = cli("train", "--data", "tiny.txt", *TINY, "--out", disk / "R", "--max-steps", "60", "--checkpoint-every",
            "1", "--keep", "100")
    one_line(r, f"no space left in {disk / 'R'} for checkpoint ckpt-")
    assert "it needs about" in r.stderr and "are free (the partial checkpoint was removed, the earlier ones are " \
           "intact); the last checkpoint is" in r.stderr and f"continue with --resume {disk / 'R'}" in r.stderr
    run = disk / "R"
    assert_sound(run)
    saved = [s for s, _ in ck.list_checkpoints(run)]
    assert saved == list(range(1, len(saved) + 1)) and len(saved) >= 2
    assert ck.read_pointer(run, "latest").name == ck.checkpoint_name(saved[-1])
    assert not [p for p in run.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    # compare-variants on that full disk: one line too.
    r = cli("compare-variants", "--data", "tiny.txt", "--variants", "lstm", "--hidden", "8", "--embed", "4",
            "--batch-size", "4", "--seq-len", "16", "--max-steps", "4", "--threads", "1", "--no-progress",
            "--no-plot", "--out", disk / "cmp")
    assert r.exit_code == 1 and "Traceback" not in r.output     # (its runs note their evaluations first)
    assert r.stderr.splitlines()[-1].startswith("error: no space left in ")


def test_read_only_places_are_one_line(work, tmpfs):
    disk = tmpfs("1m")
    assert cli("train", "--data", "tiny.txt", *TINY, "--out", disk / "R", "--max-steps", "2").exit_code == 0
    read_only(disk)
    one_line(cli("train", "--data", "tiny.txt", *TINY, "--out", disk / "new", "--max-steps", "2"),
             f"cannot write in {disk / 'new'} (Read-only file system); choose a writable --out")
    one_line(cli("train", "--resume", disk / "R", "--max-steps", "4", "--no-progress"),
             f"cannot write in {disk / 'R'} (Read-only file system); --resume writes there: copy the run somewhere "
             f"writable, or fork it into a new run with --resume {disk / 'R'} --out NEW")
    one_line(cli("visualize", disk / "R", "--text", "ab"), "Read-only file system; choose a writable place")
    one_line(cli("compare-variants", "--data", "tiny.txt", "--variants", "lstm", "--hidden", "8", "--max-steps", "2",
                 "--no-progress", "--no-plot", "--out", disk / "cmp"), "Read-only file system")
    assert cli("info", disk / "R").exit_code == 0              # reading a read-only run is fine
    r = cli("train", "--resume", disk / "R", "--out", "fork", "--max-steps", "4", "--no-progress")
    assert r.exit_code == 0, r.output                          # and forking it
    assert [s for s, _ in ck.list_checkpoints(work / "fork")] == [2, 4]
    os.chdir(disk)                                             # a read-only working directory
    one_line(cli("train", "--data", work / "tiny.txt", *TINY, "--max-steps", "2"),
             "cannot write in checkpoints/lstm-tiny (Read-only file system)")
