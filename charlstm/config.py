"""Typed configuration: every setting's default and help text, in one place.

``ModelConfig`` and ``TrainConfig`` are stored as JSON in every checkpoint and
are all that is needed to rebuild a model; ``CompareConfig`` (compare-variants)
is composed of them; ``BenchConfig`` is what `charlstm bench` measures. Each
field carries its help text (``setting``), and the command line builds its
options from these fields, so ``--help`` and the code cannot disagree. Values
are validated where a dataclass is built.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from . import registry
from .errors import UsageError

VARIANTS = registry.VARIANTS
BACKENDS = ("auto", "cudnn", "custom")
PEEPHOLE_FORMS = registry.forms("peephole")
GRU_FORMS = registry.forms("gru")
INITS = ("uniform", "chrono")
SCHEDULES = ("cosine", "constant", "step")
DEVICES = ("auto", "cpu", "cuda")
CLOCKS = ("wall", "cpu")
TASKS = ("corpus", "long-gap")
BENCH_BACKENDS = ("cudnn", "custom", "basic")   # basic: the custom cells through the plain unbind loop
BENCH_MEASURES = ("train", "sample", "sample-batch")


def setting(default=dataclasses.MISSING, help: str = "", *, factory=dataclasses.MISSING,
            flag: str | None = None, shown: str | None = None, text: str | None = None):
    """A dataclass field with its help text and how the command line spells, shows and reads it.

    ``flag``: the option's declaration when it is not ``--<field-name>``: ``--no-bias`` (an
    inverted switch), ``--bf16/--no-bf16``, ``--keys``; ``""`` for a field without an option.
    ``shown``: the default as ``--help`` shows it where the value alone would mislead (None).
    ``text``: what the option takes when it is not the field's type: ``duration`` (90s, 10m,
    1h), ``names`` or ``ints`` (comma-separated lists).
    """
    metadata = {"help": help, "flag": flag, "shown": shown, "text": text}
    return field(default=default, default_factory=factory, metadata=metadata)


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise UsageError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)} (got {value!r})")


_STORED = contextvars.ContextVar("charlstm_config_stored", default=False)   # True while from_dict builds


def _flag(f: dataclasses.Field) -> str:
    """The option that sets a field: its own flag, else --field-name."""
    flag = (f.metadata.get("flag") or "").split("/")[0]
    return flag or "--" + f.name.replace("_", "-")


def _check_finite(obj) -> None:
    """UsageError naming the option of any float field that is NaN or infinite (every float setting
    of every config, in one place). Stored configs (``from_dict``) are read as they were written."""
    if _STORED.get():
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{_flag(f)} must be a finite number (got {value})")


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
        """The config stored as ``d`` (a checkpoint's config.json): validated as when it was written
        (a NaN an older version let through stays readable)."""
        known = {f.name for f in dataclasses.fields(cls)}
        token = _STORED.set(True)
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        finally:
            _STORED.reset(token)


@dataclass
class ModelConfig(_JsonConfig):
    """Everything needed to rebuild a model (stored in config.json of each checkpoint)."""

    vocab_size: int = setting(0, "V, set from the corpus vocabulary.", flag="")
    variant: str = setting("lstm", f"{', '.join(VARIANTS[:-1])} or {VARIANTS[-1]}.")
    backend: str = setting("auto", "auto (the faster on the device at hand: custom on a CPU with the native "
                                   "kernels, torch.nn's module on CUDA where the variant has one), cudnn or custom.")
    embed: int = setting(64, "Character embedding size E.")
    hidden: int = setting(256, "Hidden units per layer H.")
    layers: int = setting(2, "Stacked recurrent layers.")
    dropout: float = setting(0.0, "Dropout between layers and before the head (never recurrent).")
    peephole_form: str = setting("diag", "Peephole form: diag (one weight per unit) or full (H x H).")
    peepholes: str = setting("fio", "Gates with peepholes: any subset of fio.")
    gru_form: str = setting("cudnn", "GRU equations: cudnn (torch.nn.GRU's) or cho (Cho et al.'s, the seed's).")
    bias: bool = setting(True, "Cells without biases (the seed's GRU equations to the letter).", flag="--no-bias")
    forget_bias: float = setting(1.0, "Initial forget-gate bias of the LSTM family (Jozefowicz et al. 2015).")
    init: str = setting("uniform", "uniform (PyTorch's, +-1/sqrt(H)) or chrono (Tallec & Ollivier 2018).")
    chrono_tmax: int = setting(0, "T_max of chrono initialisation (0: the training window length).")
    mogrify_rounds: int = setting(5, "Mogrifier: rounds in which x and h gate each other (0: the plain lstm).")
    mogrify_rank: int = setting(0, "Mogrifier: rank k of the rounds' matrices (0: full rank).")

    def __post_init__(self) -> None:
        _check_finite(self)
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


def parse_list(text: str, option: str, kind: str = "names") -> list:
    """'a,b, c' -> ['a', 'b', 'c']; with kind 'ints', integers. UsageError naming ``option`` otherwise."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise UsageError(f"{option} needs at least one value")
    if kind != "ints":
        return items
    try:
        return [int(t) for t in items]
    except ValueError:
        raise UsageError(f"{option} takes integers separated by commas, e.g. 1,2,3 (got {text!r})") from None


@dataclass
class TrainConfig(_JsonConfig):
    """Options of a training run (stored in config.json beside the ModelConfig)."""

    data: str = setting("pystdlib", "pystdlib (built in), tinyshakespeare (downloaded once), a text file, "
                                    "or a directory of text files.")
    invalid_utf8: str = setting("strict", "strict (an error naming file and byte offset) or replace (U+FFFD) "
                                          "for undecodable bytes.")
    val_frac: float = setting(0.1, "Validation split: the last fraction of the corpus.")
    test_frac: float = setting(0.0, "Test split, just before the validation split (for `charlstm eval --split test`).")
    seq_len: int = setting(128, "Truncated-BPTT window T.")
    batch_size: int = setting(32, "Parallel contiguous streams B.")
    lr: float = setting(3e-3, "Peak learning rate (AdamW).")
    schedule: str = setting("cosine", "cosine (with warmup), constant, or step (char-rnn style decay).")
    warmup: int = setting(100, "Linear warmup steps (every schedule).")
    min_lr_frac: float = setting(0.1, "cosine: the final learning rate as a fraction of --lr.")
    lr_decay: float = setting(0.97, "step schedule: multiply the learning rate by this...")
    lr_decay_every: int = setting(500, "...every this many steps.")
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay (not on biases, embeddings, norms).")
    beta2: float = setting(0.99, "AdamW's second-moment decay (0.99 suits small batches of characters; "
                                 "torch's default is 0.999; beta1 is 0.9).")
    clip: float = setting(1.0, "Clip gradients to this global norm (0 disables).")
    state_reset: float = setting(0.0, "Zero each stream's carried state with this probability at every window "
                                      "(0: never, truncated BPTT as usual; 1: every window from zeros).")
    max_steps: int | None = setting(None, "Budget: optimizer steps (with no budget at all: one epoch).",
                                    shown="none")
    max_epochs: float | None = setting(None, "Budget: passes over the training split.", shown="none")
    max_time: float | None = setting(None, "Budget: time of training, e.g. 90s, 10m, 1h.", shown="none",
                                     text="duration")
    clock: str = setting("wall", "What --max-time counts: wall (time of training steps) or cpu (this "
                                 "process's CPU time; for benchmarks on a shared machine).")
    eval_every: int = setting(500, "Evaluate on the validation split every N steps (and at the end).")
    eval_chars: int = setting(0, "Score only the first N characters of the validation split at each evaluation "
                                 "(the same ones every time); 0: the whole split.")
    checkpoint_every: int = setting(500, "Save a checkpoint every N steps (and at the end).")
    keep: int = setting(3, "Keep the N latest checkpoints plus the best.")
    log_every: int = setting(10, "Write a metrics.jsonl line every N steps (mean train loss since the last); "
                                 "where stderr is not a terminal, a plain progress line too.")
    sample_chars: int = setting(200, "Length of the sample printed at each evaluation (0: none).")
    tensorboard: bool = setting(False, "Also write the scalars and samples for `tensorboard --logdir` under "
                                       "RUN/tensorboard/ (an optional extra: pip install 'charlstm[tensorboard]').",
                                flag="--tensorboard/--no-tensorboard")
    seed: int = setting(1337, "Random seed (same seed, same run on the same machine).")
    device: str = setting("auto", "auto, cpu or cuda.")
    threads: int | None = setting(None, "CPU threads for torch.",
                                  shown="torch's; one for a model too small to share its time steps")
    bf16: bool = setting(True, "bf16 autocast on CUDA (ignored on CPU).", flag="--bf16/--no-bf16")
    name: str | None = setting(None, "Run name (the directory under checkpoints/).",
                               shown="VARIANT-DATA, numbered if taken")
    out: str | None = setting(None, "Run directory.", shown="checkpoints/<name>")

    def __post_init__(self) -> None:
        _check_finite(self)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("device", self.device, DEVICES)
        _choice("clock", self.clock, CLOCKS)
        _choice("invalid_utf8", self.invalid_utf8, ("strict", "replace"))
        for name in ("seq_len", "batch_size", "lr", "eval_every", "checkpoint_every", "keep", "log_every",
                     "lr_decay_every"):
            _positive(name, getattr(self, name))
        for name in ("max_steps", "max_epochs", "max_time", "threads"):
            _positive(name, getattr(self, name))
        for name in ("warmup", "weight_decay", "clip", "sample_chars", "eval_chars"):
            _positive(name, getattr(self, name), allow_zero=True)
        if not 0.0 < self.beta2 < 1.0:
            raise UsageError(f"--beta2 must be in (0, 1) (got {self.beta2})")
        if not 0.0 <= self.state_reset <= 1.0:
            raise UsageError(f"--state-reset must be in [0, 1] (got {self.state_reset})")
        if not 0.0 <= self.min_lr_frac <= 1.0:
            raise UsageError(f"--min-lr-frac must be in [0, 1] (got {self.min_lr_frac})")
        if not 0.0 < self.lr_decay <= 1.0:
            raise UsageError(f"--lr-decay must be in (0, 1] (got {self.lr_decay})")
        if not 0.0 <= self.val_frac < 1.0 or not 0.0 <= self.test_frac < 1.0 or self.val_frac + self.test_frac >= 1.0:
            raise UsageError("--val-frac and --test-frac must be in [0, 1) and sum to less than 1")


# Named recipes: values below explicit options, above the dataclass defaults.
PRESETS: dict[str, dict] = {
    # About two CPU minutes on two cores; recognisable Python on the built-in corpus. Small
    # batches and a high rate: in two minutes more updates beat larger ones (docs/performance.md,
    # "Measurements behind smaller choices").
    "demo": {
        "data": "pystdlib",
        "variant": "lstm", "layers": 2, "hidden": 256, "embed": 64, "dropout": 0.0,
        "batch_size": 16, "seq_len": 64, "lr": 6e-3, "schedule": "cosine", "warmup": 20,
        "max_time": 120.0, "eval_every": 400, "checkpoint_every": 400, "sample_chars": 200,
        "val_frac": 0.02,   # 120k characters: a few seconds per evaluation, not half a minute
    },
    # The README's 10-minute CPU quality recipe on tinyshakespeare (see docs/training.md): the
    # coupled-gate lstm 2 x 512 (2.50M parameters; three gate blocks, so wider than the lstm's 440
    # in the same budget), window 128, lr 1e-2 cosine to 0, weight decay 0.5 on the weight
    # matrices, gradient clipping at 5 rather than 1, no dropout (it lost at every size screened),
    # forget bias 0, and a tenth of the carried states zeroed before each window (windowed
    # evaluation starts from zeros). Why, and what it reaches: docs/training.md.
    "shakespeare": {
        "data": "tinyshakespeare",
        "variant": "coupled", "layers": 2, "hidden": 512, "embed": 64, "dropout": 0.0, "forget_bias": 0.0,
        "batch_size": 32, "seq_len": 128, "lr": 1e-2, "schedule": "cosine", "warmup": 100, "min_lr_frac": 0.0,
        "weight_decay": 0.5, "clip": 5.0, "state_reset": 0.1, "max_time": 600.0, "eval_every": 100000,
        "checkpoint_every": 1000, "sample_chars": 300,
    },
}
PRESET_HELP = {
    "demo": "about 2 CPU minutes on the built-in corpus",
    "shakespeare": "the README's 10-minute CPU recipe",
}


def preset_changes(name: str) -> dict:
    """The settings a preset gives a value other than the dataclasses' default: {field: value}."""
    defaults = {**ModelConfig().to_dict(), **TrainConfig().to_dict()}
    return {k: v for k, v in PRESETS[name].items() if defaults.get(k) != v}


# --------------------------------------------------------------------------- eval --dynamic

DYNAMIC_RULES = ("rms", "sgd")


@dataclass
class DynamicConfig(_JsonConfig):
    """Dynamic evaluation (`charlstm eval --dynamic`, Krause et al. 2018; docs/dynamic-eval.md): after
    scoring each segment, one gradient step on it, pulled back towards the trained weights.

    The defaults start from Krause et al.'s reference implementation (dynamiceval.py: rms, segments
    of 5, decay 2e-3) with the learning rate tuned on tinyshakespeare's validation split
    (docs/dynamic-eval.md has the grid)."""

    rule: str = setting("rms", "rms (the paper's: steps scaled by the training gradients' RMS) or sgd.",
                        flag="--dynamic-rule")
    segment: int = setting(5, "Characters per segment (one step after each).", flag="--dynamic-segment")
    lr: float = setting(2e-4, "Learning rate of the steps (eta).", flag="--dynamic-lr")
    decay: float = setting(2e-3, "Pull back towards the trained weights per step (lambda).", flag="--dynamic-decay")
    epsilon: float = setting(2e-5, "The rms rule's epsilon.", flag="--dynamic-epsilon")
    stat_segments: int = setting(0, "Training segments the rms rule's statistics are taken over (0: the whole "
                                    "training split).", flag="--dynamic-stat-segments")

    def __post_init__(self) -> None:
        _check_finite(self)
        _choice("dynamic_rule", self.rule, DYNAMIC_RULES)
        _positive("dynamic_segment", self.segment)
        for name in ("lr", "decay", "epsilon"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UsageError(f"--dynamic-{name} must be a number >= 0 (got {value})")
        _positive("dynamic_stat_segments", self.stat_segments, allow_zero=True)


# --------------------------------------------------------------------------- compare-variants

def _shared(cls: type, name: str) -> dataclasses.Field:
    """The field ``name`` of ModelConfig or TrainConfig (CompareConfig passes it through)."""
    return next(f for f in dataclasses.fields(cls) if f.name == name)


@dataclass
class CompareConfig:
    """`charlstm compare-variants`: what is compared (its own fields) and the model and
    training settings every run shares (a ModelConfig and a TrainConfig, the variant and
    seed set per run)."""

    task: str = setting("corpus", "corpus (language modelling on --data) or long-gap (recall a key after "
                                  "G distractors).")
    variants: list[str] = setting(factory=lambda: list(VARIANTS), help="Cell variants to compare, "
                                  "comma-separated.", text="names")
    seeds: list[int] = setting(factory=lambda: [1], help="Seeds, comma-separated; each variant is trained "
                               "once per seed (mean ± std).", text="ints")
    gaps: list[int] = setting(factory=lambda: [5, 20, 50, 100], help="long-gap: gap lengths G, "
                              "comma-separated.", text="ints")
    num_keys: int = setting(8, "long-gap: number of keys K to recall (chance is 1/K).", flag="--keys")
    num_distractors: int = setting(8, "long-gap: size of the distractor alphabet.", flag="--distractors")
    eval_size: int = setting(1000, "long-gap: held-out sequences that accuracy is measured on.")
    match_params: bool = setting(False, "Size each variant's hidden layer so its parameter count is within "
                                        "2% of an lstm of --hidden units.")
    eval_every: int | None = setting(None, "Evaluate every N steps for the learning curves.",
                                     shown="a tenth of --max-steps, else 100")
    jobs: int = setting(1, "Runs trained at the same time, in separate processes, threads split among them.")
    out: Path | None = setting(None, "Comparison directory; one run directory per variant and seed inside.",
                               shown="checkpoints/compare-<data> or checkpoints/compare-long-gap")
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # The ModelConfig and TrainConfig fields a comparison takes from the command line, with
    # what their help says here (None: the field's own help).
    MODEL_OPTIONS: ClassVar[dict[str, str | None]] = {
        "hidden": "Hidden units per layer (the reference size under --match-params).",
        "layers": None, "embed": None, "dropout": None, "backend": None, "peephole_form": None,
        "peepholes": None, "gru_form": None,
        "init": "uniform (PyTorch's) or chrono (Tallec & Ollivier; T_max = the sequence length in long-gap).",
        "forget_bias": None,
    }
    TRAIN_OPTIONS: ClassVar[dict[str, str | None]] = {
        "data": "corpus: pystdlib, tinyshakespeare, a text file or a directory (as for train).",
        "val_frac": "corpus: validation split, the last fraction of the corpus.",
        "seq_len": "corpus: truncated-BPTT window T.",
        "batch_size": "Streams (corpus) or sequences (long-gap) per step.",
        "lr": "Learning rate (AdamW with the train schedule for corpus; constant Adam for long-gap).",
        "schedule": "corpus: cosine, constant or step.",
        "warmup": "corpus: linear warmup steps.",
        "min_lr_frac": None, "weight_decay": None, "beta2": None, "clip": None, "state_reset": None,
        "max_steps": "Budget per run: optimizer steps (with --max-time alone, no step limit).",
        "max_time": "Budget per run: time of training, e.g. 60s, 2m (with --max-steps, the first reached stops).",
        "clock": None,
        "eval_chars": None,
        "threads": "CPU threads in all (split among --jobs).",
        "device": None,
    }
    # Where a task's default differs from ModelConfig's or TrainConfig's.
    TASK_DEFAULTS: ClassVar[dict[str, dict]] = {
        "corpus": {"max_steps": 500},
        "long-gap": {"hidden": 64, "layers": 1, "embed": 16, "max_steps": 1000},
    }
    # Options the long-gap task does not use (its sequences are G + 2 long, its rate constant).
    CORPUS_ONLY: ClassVar[tuple[str, ...]] = ("seq_len", "schedule", "warmup", "min_lr_frac", "weight_decay", "beta2",
                                              "clock", "eval_chars", "state_reset")

    def __post_init__(self) -> None:
        _check_finite(self)
        _choice("task", self.task, TASKS)
        if not self.variants:
            raise UsageError("--variants needs at least one variant")
        for v in self.variants:
            if v not in VARIANTS:
                raise UsageError(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
        if len(set(self.variants)) != len(self.variants):
            raise UsageError("--variants lists a variant twice")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UsageError("--seeds needs one or more distinct integers, e.g. 1,2,3")
        if self.task == "long-gap" and (not self.gaps or len(set(self.gaps)) != len(self.gaps)):
            raise UsageError("--gaps needs one or more distinct integers, e.g. 5,20,50,100")
        if self.train.max_steps is None and self.train.max_time is None:
            raise UsageError("a comparison needs a budget: --max-steps and/or --max-time")
        for name in ("jobs", "eval_size", "eval_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        self.out = Path(self.out if self.out is not None else Path("checkpoints") / self.default_name())

    @classmethod
    def task_default(cls, task: str, name: str):
        """The default of a shared model or training setting under ``task``."""
        if name in cls.TASK_DEFAULTS[task]:
            return cls.TASK_DEFAULTS[task][name]
        owner = ModelConfig if name in cls.MODEL_OPTIONS else TrainConfig
        return _shared(owner, name).default

    def default_name(self) -> str:
        """The comparison's directory name under checkpoints/ when --out is not given."""
        if self.task == "long-gap":
            return "compare-long-gap"
        data = self.train.data
        return f"compare-{Path(data).stem if ('/' in data or os.sep in data or '.' in data) else data}"

    def model_config(self, variant: str, hidden: int | None = None, vocab_size: int = 0) -> ModelConfig:
        """The ModelConfig of one variant (``hidden`` overrides --hidden, e.g. under --match-params)."""
        return dataclasses.replace(self.model, vocab_size=vocab_size, variant=variant,
                                   hidden=hidden or self.model.hidden)

    def to_dict(self) -> dict:
        """One flat dict (summary.json's settings): own fields, then the shared ones."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "train")}
        d = {**own, **{k: getattr(self.model, k) for k in self.MODEL_OPTIONS},
             **{k: getattr(self.train, k) for k in self.TRAIN_OPTIONS}}
        if self.task == "long-gap":
            d.update({k: None for k in self.CORPUS_ONLY})
        d["out"] = str(self.out)
        return d


# --------------------------------------------------------------------------- bench

@dataclass
class BenchConfig:
    """`charlstm bench`: what to measure and how (the sizes' defaults are train's)."""

    variants: list[str] = setting(factory=lambda: ["lstm", "peephole", "coupled", "gru"],
                                  help=f"Variants, comma-separated ({', '.join(VARIANTS)}); a form "
                                       "after a colon: gru:cho, peephole:full.", text="names")
    backends: list[str] = setting(factory=lambda: ["cudnn", "custom"],
                                  help="Backends, comma-separated: cudnn (torch.nn modules), custom (our cells, "
                                       "fused loop), basic (our cells, plain unbind loop).", text="names")
    hidden: list[int] = setting(factory=lambda: [ModelConfig.hidden], help="Hidden sizes H, comma-separated "
                                "(every combination of the size options is measured).", text="ints")
    layers: list[int] = setting(factory=lambda: [ModelConfig.layers], help="Layer counts L, comma-separated.",
                                text="ints")
    batch_size: list[int] = setting(factory=lambda: [TrainConfig.batch_size], help="Streams B (training batch "
                                    "and batched sampling), comma-separated.", text="ints")
    seq_len: list[int] = setting(factory=lambda: [TrainConfig.seq_len], help="Training windows T, "
                                 "comma-separated.", text="ints")
    embed: int = setting(ModelConfig.embed, "Embedding size E.")
    vocab: int = setting(65, "Vocabulary size V (random tokens).")
    peephole_form: str = setting(ModelConfig.peephole_form, "Form of the peephole variant: diag or full.")
    gru_form: str = setting(ModelConfig.gru_form, "Form of the gru variant: cudnn or cho.")
    device: str = setting("auto", "auto, cpu or cuda.")
    threads: int | None = setting(None, "CPU threads for torch.", shown="torch's")
    repeats: int = setting(5, "Timed rounds; figures are medians over them.")
    warmup: int = setting(2, "Untimed rounds before the timed ones.")
    sample_length: int = setting(256, "Characters generated per sampling measurement.")
    sample_threads: int | None = setting(None, "Threads while sampling.", shown="charlstm sample's: all cores "
                                         "for the native step, 1 for the torch step")
    measures: list[str] = setting(factory=lambda: list(BENCH_MEASURES), help="What to time, comma-separated: "
                                  "train (fwd+bwd+AdamW), sample (one stream), sample-batch (B streams).",
                                  text="names")
    peak_size: int = setting(2048, "n of the n x n x n torch.mm product that gives the peak (0: skip it).")
    seed: int = setting(0, "Seed of the weights and random tokens.")
    clock: str = setting("wall", "wall (elapsed time) or cpu (this process's CPU time: steadier on a busy "
                                 "shared machine, use with --threads 1).")
    bf16: bool = setting(False, "Time training under bf16 autocast, as `train` runs on CUDA by default (CUDA "
                                "only).", flag="--bf16/--no-bf16")

    def __post_init__(self) -> None:
        _check_finite(self)
        _choice("device", self.device, DEVICES)
        _choice("peephole_form", self.peephole_form, PEEPHOLE_FORMS)
        _choice("gru_form", self.gru_form, GRU_FORMS)
        for v in self.variants:
            base, colon, form = v.partition(":")
            if base not in VARIANTS:
                raise UsageError(f"--variants: unknown variant {v!r} (choose from {', '.join(VARIANTS)}; "
                                 "a form after a colon: gru:cho, peephole:full)")
            forms = registry.forms(base)
            if colon and form not in forms:
                raise UsageError(f"--variants: {v!r} has no form {form!r}"
                                 + (f" (forms: {', '.join(forms)})" if forms else ""))
        for name, choices in (("backends", BENCH_BACKENDS), ("measures", BENCH_MEASURES)):
            for value in getattr(self, name):
                if value not in choices:
                    raise UsageError(f"--{name}: unknown {name[:-1]} {value!r} (choose from {', '.join(choices)})")
        if not self.variants or not self.backends or not self.measures:
            raise UsageError("--variants, --backends and --measures each need at least one value")
        for name in ("hidden", "layers", "batch_size", "seq_len"):
            for n in getattr(self, name):
                if n < 1:
                    raise UsageError(f"--{name.replace('_', '-')} values must be >= 1 (got {n})")
        for name in ("embed", "vocab", "repeats", "sample_length"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.vocab < 2:
            raise UsageError(f"--vocab must be >= 2 (got {self.vocab})")
        if self.warmup < 0 or self.peak_size < 0:
            raise UsageError("--warmup and --peak-size must be >= 0")
        _choice("clock", self.clock, CLOCKS)
        if self.clock == "cpu" and self.device == "cuda":
            raise UsageError("--clock cpu measures CPU time and only makes sense with --device cpu")
        for name in ("threads", "sample_threads"):
            n = getattr(self, name)
            if n is not None and n < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {n})")
