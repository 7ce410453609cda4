"""The observers `charlstm train` hangs on its Trainer: progress (a bar, or plain lines in a log),
the evaluation notes on stderr, metrics.jsonl, the curves drawn from it and TensorBoard's event
files (the summary table is the command's, in train.py)."""

from __future__ import annotations

import math
import sys
import time

from tqdm import tqdm

from . import configfile, console, plots, rundir
from .config import ModelConfig
from .console import format_time, note
from .curves import draw_run, read_curve
from .errors import CharlstmError
from .trainer import Evaluation, Observer, Trainer, TrainResult
from .trainer_state import LN2

TENSORBOARD_HINT = "pip install 'charlstm[tensorboard]'"


def progress_observer() -> Observer:
    """The training's progress on stderr: a bar on a terminal, a plain line every --log-every steps
    in a file or a pipe (a log gets lines, not redrawn frames)."""
    return ProgressBar() if console.stderr_is_terminal() else LogLines()


class _Eta:
    """The time left, from the budget fraction used since this invocation started (so that its
    figure means the same for a step, an epoch or a time budget)."""

    def __init__(self, trainer: Trainer):
        self.start_time, self.start_frac = trainer.train_time, trainer.budget_used()

    def done_and_left(self, trainer: Trainer) -> tuple[float, str]:
        done = min(trainer.budget_used(), 1.0)
        rate = (done - self.start_frac) / max(trainer.train_time - self.start_time, 1e-9)
        eta = (1.0 - done) / rate if rate > 0 else float("nan")
        return done, format_time(eta) if math.isfinite(eta) else "?"


def _speed(trainer: Trainer) -> str:
    return f"{trainer.chars_seen / max(trainer.train_time, 1e-9):,.0f} chars/s"


class ProgressBar(Observer):
    """A tqdm bar on stderr over the budget (steps, epochs or time, whichever runs out first, so that
    its percentage and ETA mean the same for every budget): step, smoothed loss, chars/s, ETA."""

    def on_start(self, trainer: Trainer) -> None:
        self.eta = _Eta(trainer)
        self.bar = tqdm(total=1.0, initial=self.eta.start_frac, file=sys.stderr, dynamic_ncols=True,
                        desc=trainer.run_dir.name, leave=True, bar_format="{percentage:3.0f}%|{bar}| {desc}")

    def on_step(self, trainer: Trainer) -> None:
        done, left = self.eta.done_and_left(trainer)
        self.bar.update(done - self.bar.n)
        self.bar.set_description_str(f"{trainer.run_dir.name}: step {trainer.steps_done}, loss {trainer.loss_ema:.3f}, "
                                     f"{_speed(trainer)}, ETA {left}", refresh=False)

    def on_loop_end(self, trainer: Trainer) -> None:
        self.bar.close()


class LogLines(Observer):
    """Progress for a log (stderr is a file or a pipe): one plain line every --log-every steps,
    ``lstm-pystdlib: step 200 (20%), loss 2.1345, 45,210 chars/s, ETA 1:23``; the loss is the mean
    training loss of those steps (metrics.jsonl's train_loss at that step)."""

    def on_start(self, trainer: Trainer) -> None:
        self.eta = _Eta(trainer)
        self.window: list[float] = []

    def on_step(self, trainer: Trainer) -> None:
        self.window.append(trainer.last_loss)
        if trainer.steps_done % trainer.train_cfg.log_every:
            return
        done, left = self.eta.done_and_left(trainer)
        note(f"{trainer.run_dir.name}: step {trainer.steps_done} ({100 * done:.0f}%), "
             f"loss {sum(self.window) / len(self.window):.4f}, {_speed(trainer)}, ETA {left}")
        self.window = []


class EvalNotes(Observer):
    """Each evaluation's loss and sample on stderr (through console.note)."""

    def on_eval(self, trainer: Trainer, ev: Evaluation) -> None:
        note(f"step {ev.step}: val loss {ev.loss:.4f} nats/char ({ev.loss / LN2:.4f} bpc) over {ev.chars} chars"
             + ("  (best)" if ev.improved else f"  (best {ev.best_loss:.4f} at step {ev.best_step})"))
        if ev.sample:
            note("-" * 20 + " sample " + "-" * 20 + "\n" + ev.sample + "\n" + "-" * 48)


class MetricsFile(Observer):
    """metrics.jsonl in the run directory: every ``log_every`` steps the mean training loss of those
    steps, and a line per evaluation (with the smoothed training loss)."""

    def on_start(self, trainer: Trainer) -> None:
        self.log = rundir.MetricsLog(trainer.run_dir / rundir.METRICS)
        self.window: list[float] = []

    def on_step(self, trainer: Trainer) -> None:
        self.window.append(trainer.last_loss)
        if trainer.steps_done % trainer.train_cfg.log_every == 0:
            self._flush(trainer)

    def on_eval(self, trainer: Trainer, ev: Evaluation) -> None:
        self._write(trainer, {"train_loss": trainer.loss_ema, "val_loss": ev.loss, "val_bpc": ev.loss / LN2})

    def on_end(self, trainer: Trainer, result: TrainResult | None) -> None:
        if result is not None and self.window:
            self._flush(trainer)
        self.log.close()

    def _flush(self, trainer: Trainer) -> None:
        self._write(trainer, {"train_loss": sum(self.window) / len(self.window)})
        self.window = []

    def _write(self, trainer: Trainer, record: dict) -> None:
        self.log.write({"step": trainer.steps_done, "epoch": round(trainer.epochs_done, 4), "lr": trainer.lr,
                        "chars_per_sec": trainer.chars_per_sec, "elapsed": round(trainer.train_time, 3), **record})


def describe_model(cfg: ModelConfig, params: int | None = None) -> str:
    """'lstm 2 \u00d7 256 (layers \u00d7 hidden), embedding 64, 1,234,567 parameters' (for titles)."""
    text = f"{cfg.variant} {cfg.layers} \u00d7 {cfg.hidden} (layers \u00d7 hidden), embedding {cfg.embed}"
    return text + (f", {params:,} parameters" if params else "")


class Curves(Observer):
    """curves.png and curves.svg in the run directory, drawn from its metrics.jsonl (a resumed run's
    history included) at every evaluation and at the end; where matplotlib is missing, one note.

    A draw at an evaluation is skipped when drawing would take more than a tenth of
    the time since the last one (a draw takes about half a second: evaluations less
    than five seconds apart, as in a tiny run, are drawn at the end); the end always
    draws. Drawing never stops training: a failure is one note and no more curves.
    """

    SHARE = 0.1        # drawing may take at most this fraction of the time between draws
    FIRST_COST = 0.5   # seconds a draw is taken to cost until one is timed

    def on_start(self, trainer: Trainer) -> None:
        self.enabled = plots.have_matplotlib()
        self.drawn_size, self.cost, self.last = -1, self.FIRST_COST, time.perf_counter()
        if not self.enabled:
            note(f"note: no {rundir.CURVES}.png: drawing needs matplotlib, an optional extra: "
                 f"pip install 'charlstm[plot]' (metrics.jsonl has the numbers)")

    def on_eval(self, trainer: Trainer, ev: Evaluation) -> None:
        if time.perf_counter() - self.last >= self.cost / self.SHARE:
            self.draw(trainer)

    def on_end(self, trainer: Trainer, result: TrainResult | None) -> None:
        self.draw(trainer)

    def draw(self, trainer: Trainer) -> None:
        """Draw now, unless matplotlib is missing or metrics.jsonl has not changed since the last draw."""
        metrics = trainer.run_dir / rundir.METRICS
        if not self.enabled or not metrics.is_file() or metrics.stat().st_size == self.drawn_size:
            return
        started = time.perf_counter()
        try:
            size = metrics.stat().st_size
            curve = read_curve(trainer.run_dir)
            if not curve.empty:
                draw_run(curve, trainer.run_dir / rundir.CURVES, title=trainer.run_dir.name,
                         subtitle=f"{describe_model(trainer.model_cfg, trainer.params)}; corpus {trainer.corpus.name}")
        except (CharlstmError, OSError, ValueError, RuntimeError) as e:
            self.enabled = False
            note(f"note: could not draw {trainer.run_dir / rundir.CURVES}.png ({e}); training goes on without it")
            return
        self.drawn_size, self.last = size, time.perf_counter()
        self.cost = self.last - started


def summary_writer_class():
    """torch.utils.tensorboard's SummaryWriter; CharlstmError with the install hint where the
    tensorboard package is missing (--tensorboard fails at once, before any work)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CharlstmError(f"--tensorboard needs the tensorboard package, an optional extra: {TENSORBOARD_HINT}"
                            ) from None
    return SummaryWriter


def _preformatted(text: str) -> str:
    """Text as a Markdown code block (TensorBoard's text tab renders Markdown): whitespace kept."""
    return "\n".join("    " + line for line in text.split("\n"))


class TensorBoard(Observer):
    """--tensorboard: event files under RUN/tensorboard/ for `tensorboard --logdir`: the scalars of
    metrics.jsonl (loss/train every --log-every steps, loss/val and bpc/val at each evaluation, lr,
    chars_per_sec), the sample printed at each evaluation and the run's settings as text. A resumed
    run drops the events after its checkpoint's step (as metrics.jsonl does)."""

    def __init__(self) -> None:
        self.writer_class = summary_writer_class()
        self.writer = None

    def on_start(self, trainer: Trainer) -> None:
        self.window: list[float] = []
        self.writer = self.writer_class(log_dir=str(trainer.run_dir / rundir.TENSORBOARD),
                                        purge_step=trainer.steps_done or None)
        if trainer.steps_done == 0:
            settings = configfile.train_toml(trainer.model_cfg, trainer.train_cfg, trainer.extra_config["preset"])
            self.writer.add_text("settings", _preformatted(settings), 0)

    def on_step(self, trainer: Trainer) -> None:
        self.window.append(trainer.last_loss)
        if trainer.steps_done % trainer.train_cfg.log_every == 0:
            self._flush(trainer)

    def on_eval(self, trainer: Trainer, ev: Evaluation) -> None:
        self.writer.add_scalar("loss/val", ev.loss, ev.step)
        self.writer.add_scalar("bpc/val", ev.loss / LN2, ev.step)
        if ev.sample:
            self.writer.add_text("sample", _preformatted(ev.sample), ev.step)
        self.writer.flush()

    def on_end(self, trainer: Trainer, result: TrainResult | None) -> None:
        if self.writer is None:
            return
        if result is not None and self.window:
            self._flush(trainer)
        self.writer.close()

    def _flush(self, trainer: Trainer) -> None:
        step = trainer.steps_done
        self.writer.add_scalar("loss/train", sum(self.window) / len(self.window), step)
        self.writer.add_scalar("lr", trainer.lr, step)
        if trainer.chars_per_sec:
            self.writer.add_scalar("chars_per_sec", trainer.chars_per_sec, step)
        self.window = []
