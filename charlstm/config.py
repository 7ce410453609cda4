"""Typed configuration: the single source of truth for a model and a training run.

Both dataclasses are stored as JSON in every checkpoint and are all that is
needed to rebuild the model. Values are validated where the dataclass is built.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from . import registry
from .errors import UsageError

VARIANTS = registry.VARIANTS
BACKENDS = ("auto", "cudnn", "custom")
PEEPHOLE_FORMS = registry.forms("peephole")
GRU_FORMS = registry.forms("gru")
INITS = ("uniform", "chrono")
SCHEDULES = ("cosine", "constant", "step")
DEVICES = ("auto", "cpu", "cuda")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise UsageError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)} (got {value!r})")


def _positive(name: str, value, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise UsageError(f"--{name.replace('_', '-')} must be {bound} (got {value})")


class _JsonConfig:
    """to_dict / from_dict for the config dataclasses (unknown keys of older files are ignored)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class ModelConfig(_JsonConfig):
    """Everything needed to rebuild a model (stored in config.json of each checkpoint)."""

    vocab_size: int = 0           # V, set from the corpus vocabulary
    variant: str = "lstm"         # rnn | lstm | peephole | coupled | gru
    backend: str = "auto"         # auto | cudnn | custom (auto: cudnn where the variant has one)
    embed: int = 64               # E, character embedding size
    hidden: int = 256             # H, hidden units per layer
    layers: int = 2               # stacked recurrent layers
    dropout: float = 0.0          # layer dropout between layers and before the head (never recurrent)
    peephole_form: str = "diag"   # diag (one weight per unit) | full (H x H matrix)
    peepholes: str = "fio"        # which gates have peepholes: any subset of f, i, o
    gru_form: str = "cudnn"       # cudnn (torch.nn.GRU's equations) | cho (the seed's / Cho et al.)
    bias: bool = True             # gate biases (off gives the seed's GRU equations to the letter)
    forget_bias: float = 1.0      # initial forget-gate bias (LSTM family), Jozefowicz et al. 2015
    init: str = "uniform"         # uniform(-1/sqrt(H), 1/sqrt(H)) | chrono (Tallec & Ollivier 2018)
    chrono_tmax: int = 0          # T_max for chrono init (0: use the training window length)
    mogrify_rounds: int = 5       # mogrifier: rounds of x and h gating each other (0: the plain lstm)
    mogrify_rank: int = 0         # mogrifier: rank k of the rounds' matrices (0: full rank)

    def __post_init__(self) -> None:
        _choice("variant", self.variant, VARIANTS)
        _choice("backend", self.backend, BACKENDS)
        _choice("peephole_form", self.peephole_form, PEEPHOLE_FORMS)
        _choice("gru_form", self.gru_form, GRU_FORMS)
        _choice("init", self.init, INITS)
        for name in ("embed", "hidden", "layers"):
            _positive(name, getattr(self, name))
        for name in ("mogrify_rounds", "mogrify_rank"):
            _positive(name, getattr(self, name), allow_zero=True)
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1) (got {self.dropout})")
        if self.peepholes and (set(self.peepholes) - set("fio") or len(set(self.peepholes)) != len(self.peepholes)):
            raise UsageError(f"--peepholes must be a subset of 'fio' without repeats (got {self.peepholes!r})")
        # Normalise the gate subset to the canonical order f, i, o.
        # Peephole options only matter for the peephole variant; other variants ignore them.
        self.peepholes = "".join(g for g in "fio" if g in self.peepholes)


def parse_duration(text: str | None) -> float | None:
    """Parse ``90s``, ``10m``, ``1h``, ``1h30m`` or a bare number of seconds; None stays None."""
    if text is None or text == "":
        return None
    s = str(text).strip().lower()
    try:
        return float(s)
    except ValueError:
        pass
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", s)
    if not parts or not any(parts.groups()):
        raise UsageError(f"--max-time takes a duration such as 90s, 10m or 1h (got {text!r})")
    h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
    return h * 3600 + m * 60 + sec


@dataclass
class TrainConfig(_JsonConfig):
    """Options of a training run (stored in config.json beside the ModelConfig)."""

    data: str = "pystdlib"        # pystdlib | tinyshakespeare | a text file | a directory
    invalid_utf8: str = "strict"  # strict (error naming file and offset) | replace (U+FFFD)
    val_frac: float = 0.1         # validation split: the last fraction of the corpus
    test_frac: float = 0.0        # optional test split, between train and val
    seq_len: int = 128            # T, truncated-BPTT window
    batch_size: int = 32          # B, parallel contiguous streams
    lr: float = 3e-3              # peak learning rate (AdamW)
    schedule: str = "cosine"      # cosine (with warmup) | constant | step (char-rnn style decay)
    warmup: int = 100             # warmup steps (linear) for every schedule
    min_lr_frac: float = 0.1      # cosine schedule: the final lr as a fraction of --lr
    lr_decay: float = 0.97        # step schedule: multiply lr by this ...
    lr_decay_every: int = 500     # ... every this many steps
    weight_decay: float = 0.0     # AdamW decoupled weight decay (not on biases, embeddings, norms)
    beta2: float = 0.99           # AdamW second-moment decay (beta1 is 0.9)
    clip: float = 1.0             # gradient clipping by global norm (0 disables)
    max_steps: int | None = None  # budget: optimizer steps
    max_epochs: float | None = None  # budget: passes over the training split
    max_time: float | None = None    # budget: seconds of training
    clock: str = "wall"           # what --max-time counts: wall (seconds of training steps) | cpu (CPU seconds of this process)
    eval_every: int = 500         # evaluate on the whole validation split every N steps (and at the end)
    checkpoint_every: int = 500   # save a checkpoint every N steps (and at the end)
    keep: int = 3                 # keep this many latest checkpoints (plus the best)
    log_every: int = 10           # write a metrics.jsonl line every N steps (mean train loss since the last)
    sample_chars: int = 200       # length of the sample printed at each evaluation
    seed: int = 1337              # RNG seed (same seed, same run on the same machine)
    device: str = "auto"          # auto | cpu | cuda
    threads: int | None = None    # torch intra-op threads (None: torch's default)
    bf16: bool = True             # bf16 autocast on CUDA (ignored on CPU)
    name: str | None = None       # run name (default: derived from variant and data)
    out: str | None = None        # run directory (default: checkpoints/<name>)

    def __post_init__(self) -> None:
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("device", self.device, DEVICES)
        _choice("clock", self.clock, ("wall", "cpu"))
        _choice("invalid_utf8", self.invalid_utf8, ("strict", "replace"))
        for name in ("seq_len", "batch_size", "lr", "eval_every", "checkpoint_every", "keep", "log_every",
                     "lr_decay_every"):
            _positive(name, getattr(self, name))
        for name in ("max_steps", "max_epochs", "max_time", "threads"):
            _positive(name, getattr(self, name))
        for name in ("warmup", "weight_decay", "clip"):
            _positive(name, getattr(self, name), allow_zero=True)
        if not 0.0 < self.beta2 < 1.0:
            raise UsageError(f"--beta2 must be in (0, 1) (got {self.beta2})")
        if not 0.0 <= self.min_lr_frac <= 1.0:
            raise UsageError(f"--min-lr-frac must be in [0, 1] (got {self.min_lr_frac})")
        if not 0.0 < self.lr_decay <= 1.0:
            raise UsageError(f"--lr-decay must be in (0, 1] (got {self.lr_decay})")
        if not 0.0 <= self.val_frac < 1.0 or not 0.0 <= self.test_frac < 1.0 or self.val_frac + self.test_frac >= 1.0:
            raise UsageError("--val-frac and --test-frac must be in [0, 1) and sum to less than 1")


# Named recipes: values below explicit options, above the dataclass defaults.
PRESETS: dict[str, dict] = {
    # About two CPU minutes on two cores; recognisable Python on the built-in corpus. Small
    # batches and a high rate: in two minutes more updates beat larger ones (measured against
    # B 32, T 128, lr 3e-3 at equal time: val 2.27 vs 3.05 nats/char on a busy machine).
    "demo": {
        "data": "pystdlib",
        "variant": "lstm", "layers": 2, "hidden": 256, "embed": 64, "dropout": 0.0,
        "batch_size": 16, "seq_len": 64, "lr": 6e-3, "schedule": "cosine", "warmup": 20,
        "max_time": 120.0, "eval_every": 400, "checkpoint_every": 400, "sample_chars": 200,
        "val_frac": 0.02,   # 120k characters: a few seconds per evaluation, not half a minute
    },
    # The README's 10-minute CPU quality recipe on tinyshakespeare (see docs/training.md): the
    # baseline script's model, window and batch, with lr 1e-2 cosine to 0, weight decay 0.3 on
    # the weight matrices, gradient clipping at 5 rather than 1, no dropout (5 epochs in 10
    # minutes; dropout between layers slows nn.LSTM by 13%, weight decay costs nothing) and
    # forget bias 0. Measured on the quiet 2-core machine against the baseline script's 1.4690
    # nats/char: see docs/training.md.
    "shakespeare": {
        "data": "tinyshakespeare",
        "variant": "lstm", "layers": 2, "hidden": 384, "embed": 64, "dropout": 0.0, "forget_bias": 0.0,
        "batch_size": 32, "seq_len": 128, "lr": 1e-2, "schedule": "cosine", "warmup": 100, "min_lr_frac": 0.0,
        "weight_decay": 0.3, "clip": 5.0, "max_time": 600.0, "eval_every": 100000, "checkpoint_every": 1000, "sample_chars": 300,
    },
}
