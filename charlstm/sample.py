"""`charlstm sample`: generation from a checkpoint, one character at a time, the state carried.

The prime is read by the model's own ``forward``; after that each new character costs one step of
the stepper ``steppers.make_stepper`` chooses (docs/sampling.md). ``--num-samples N`` runs N
streams as one batch; the same seed gives the same text on the same machine.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .console import note
from .diskfiles import write_text_atomic
from .errors import CharlstmError, UsageError
from .memory import check_fits, estimate_sampling_bytes
from .runtime import check_threads, resolve_device, torch_threads
from .sampling import SamplingOptions, gumbel_noise
from .steppers import make_stepper, read_prime, stepping_threads
from .textfiles import read_text
from .vocab import Vocab, encode_text

CHUNK = 32               # characters generated between two streaming callbacks


def start_token(vocab, generator: torch.Generator) -> tuple[int, bool]:
    """The hidden first input without a prime: a newline where the vocabulary has one (text starts
    after a line break), else a character drawn uniformly, as char-rnn does, which is printed.
    Returns (token id, whether it is part of the output)."""
    if "\n" in vocab.stoi:
        return vocab.stoi["\n"], False
    return int(torch.randint(len(vocab), (1,), generator=generator)), True


@dataclass
class Generation:
    """The texts of one generation and how they were made."""

    texts: list[str]             # one per sample, each beginning with the prime
    prime: str                   # the prime as given
    skipped: list[str]           # distinct prime characters left out (``unknown='skip'``)
    seed: int
    stepper: str                 # 'native step (fp32)', 'fast step (TorchScript)', 'fast step' or 'model.forward'
    generated: int               # characters generated per sample


def generate(model, vocab, *, prime: str = "", length: int = 500, num_samples: int = 1,
             options: SamplingOptions | None = None, seed: int | None = None, unknown: str = "error",
             on_text: Callable[[list[str]], None] | None = None, fast: bool = True, script: bool = True,
             native: bool = True, precision: str = "fp32", threads: int | None = None,
             chunk: int = CHUNK, prime_name: str = "--prime") -> Generation:
    """Generate ``num_samples`` texts of ``length`` characters after ``prime``, as one batch.

    The prime is read once; then one step per character carries the state
    forward under ``torch.inference_mode()``. ``on_text`` receives the new text
    of every sample as it is produced (a list with one string per sample; the
    prime comes first). Characters of the prime outside the vocabulary raise
    CharlstmError naming them (and ``prime_name``, where the prime came from), or are left out with
    ``unknown='skip'``.
    The stepper is ``make_stepper``'s choice (``native``, ``precision``);
    ``threads`` torch threads generate (None: `stepping_threads`' default).
    """
    options = options or SamplingOptions()
    check_request(length, num_samples, unknown)
    ids = encode_text(prime, vocab, unknown, hint=f"remove them from {prime_name} or pass --unknown skip")
    skipped = vocab.unknown(prime) if ids.numel() < len(prime) else []
    if seed is None:
        seed = secrets.randbits(63)
    device = model.head.weight.device
    draws = _Draws(vocab, num_samples, options, torch.Generator(device=device).manual_seed(seed), device, on_text)
    if prime:
        draws.emit([prime] * num_samples)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            ids, lead = draws.start(ids.to(device), length)
            logits, state = read_prime(model, ids, num_samples)
            stepper = make_stepper(model, fast=fast, script=script, native=native, precision=precision,
                                   options=options)
            stepper.load_state(state)
            with torch_threads(stepping_threads(stepper, threads)):
                new = draws.run(stepper, logits, length - len(lead), chunk)
    finally:
        model.train(was_training)
    name = stepper.name + (" (TorchScript)" if getattr(stepper, "scripted", False) else "")
    return Generation(texts=[prime + lead + t for t in new], prime=prime, skipped=skipped, seed=seed, stepper=name,
                      generated=length)


def check_request(length: int, num_samples: int, unknown: str) -> None:
    """UsageError for a negative --length, --num-samples below 1 or an --unknown other than error/skip."""
    if length < 0:
        raise UsageError(f"--length must be >= 0 (got {length})")
    if num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1 (got {num_samples})")
    if unknown not in ("error", "skip"):
        raise UsageError(f"--unknown must be error or skip (got {unknown!r})")


@dataclass
class _Draws:
    """The draws of one generation: ``num_samples`` streams under ``options``, the noise from
    ``generator`` on ``device``, each piece of new text handed to ``on_text``."""

    vocab: Vocab
    num_samples: int
    options: SamplingOptions
    generator: torch.Generator
    device: torch.device
    on_text: Callable[[list[str]], None] | None

    def emit(self, new: list[str]) -> None:
        if self.on_text is not None:
            self.on_text(new)

    def start(self, ids: torch.Tensor, length: int) -> tuple[torch.Tensor, str]:
        """The first input, the prime's ids (N,) or the hidden start token where there is no prime, and
        the text it adds to every sample ('' or the start character when it is drawn and printed)."""
        if ids.numel():
            return ids, ""
        first, shown = start_token(self.vocab, self.generator)
        ids = torch.tensor([first], device=self.device)
        if not (shown and length > 0):
            return ids, ""
        self.emit([self.vocab.chars[first]] * self.num_samples)
        return ids, self.vocab.chars[first]

    def run(self, stepper, logits: torch.Tensor, left: int, chunk: int) -> list[str]:
        """``left`` characters per stream from the pending logits (B, V), ``chunk`` per stepper call;
        the new text of each stream."""
        B, opts = self.num_samples, self.options
        pieces: list[list[str]] = [[] for _ in range(B)]
        while left > 0:
            n = min(chunk, left)
            noise = None if opts.greedy else gumbel_noise(n, B, logits.size(1), self.generator, self.device)
            out, logits = stepper.generate(logits, n, opts, noise)        # (n, B)
            new = [self.vocab.decode(col) for col in out.t().cpu().tolist()]
            for piece, text in zip(pieces, new):
                piece.append(text)
            self.emit(new)
            left -= n
        return ["".join(p) for p in pieces]


# --------------------------------------------------------------------------- command line

def sample_header(i: int, n: int) -> str:
    """The line that opens sample i of n when several are generated."""
    return f"----- sample {i} of {n} -----\n"


def format_samples(texts: list[str]) -> str:
    """All samples as one text: a single sample as it is, several each under a header line."""
    if len(texts) == 1:
        return texts[0]
    return "".join(sample_header(i + 1, len(texts)) + t + "\n" for i, t in enumerate(texts))


class _Stream:
    """Writes sample 1 to stdout as it is produced; the other samples follow when all are done."""

    def __init__(self, n: int, out=None):
        self.n = n
        self.out = out or sys.stdout
        self.started = False

    def __call__(self, new: list[str]) -> None:
        if not self.started:
            self.started = True
            if self.n > 1:
                self.out.write(sample_header(1, self.n))
        self.out.write(new[0])
        self.out.flush()

    def finish(self, texts: list[str]) -> None:
        if not self.started:
            self([texts[0]])
        self.out.write("\n")
        for i, t in enumerate(texts[1:], start=2):
            self.out.write(sample_header(i, self.n) + t + "\n")
        self.out.flush()


def read_prime_file(path: Path) -> str:
    """The text of ``--prime-file``, exactly as the UTF-8 file holds it (a final newline included);
    CharlstmError, one line, for a missing, unreadable, undecodable or non-regular file."""
    return read_text(Path(path), "--prime-file")


def run_from_cli(*, run: Path | None, prime: str, length: int, temperature: float, top_k: int | None,
                 top_p: float | None, greedy: bool, seed: int | None, num_samples: int, output: Path | None,
                 no_stream: bool, unknown: str, device: str, threads: int | None = None, precision: str = "fp32",
                 prime_file: Path | None = None, checkpoints: Path = Path("checkpoints")) -> Generation:
    """`charlstm sample`: load the checkpoint RUN names and print (or write) what it generates.

    ``threads`` torch threads while generating (None: all cores for the native
    step, one for the torch steps; see `stepping_threads` and docs/sampling.md).
    ``prime_file``: the prime read from this UTF-8 file instead of ``prime`` (not both)."""
    check_threads(threads)                  # before the checkpoint is loaded
    prime_name = "--prime"
    if prime_file is not None:
        if prime:
            raise UsageError("give the prime with --prime TEXT or --prime-file FILE, not both")
        prime, prime_name = read_prime_file(prime_file), f"--prime-file {prime_file}"
    return _sample_command(run=run, prime=prime, prime_name=prime_name, length=length, temperature=temperature,
                           top_k=top_k, top_p=top_p, greedy=greedy, seed=seed, num_samples=num_samples, output=output,
                           no_stream=no_stream, unknown=unknown, device=device, threads=threads,
                           precision=precision, checkpoints=checkpoints)


def write_output(path: Path, text: str) -> None:
    """Write the samples to --output: a regular file (or a new one) atomically, anything else (a
    pipe, /dev/stdout, a device) directly, as a shell redirection would; CharlstmError when it fails
    (a full disk, /dev/full), with no temporary file left behind."""
    path = Path(path)
    try:
        if path.exists() and not stat.S_ISREG(path.stat().st_mode):
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
        else:
            write_text_atomic(path, text)
    except OSError as e:
        raise CharlstmError(f"cannot write --output {path}: {e.strerror or e}") from e


def check_top_k(top_k: int | None) -> None:
    """UsageError for --top-k below 1 (leave it out to sample from every character)."""
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k must be >= 1 (got {top_k}); leave it out to sample from every character")


def _sample_command(*, run, prime, prime_name, length, temperature, top_k, top_p, greedy, seed, num_samples, output,
                    no_stream, unknown, device, threads, precision, checkpoints) -> Generation | None:
    check_top_k(top_k)
    options = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    check_request(length, num_samples, unknown)
    if output is not None and Path(output).is_dir():
        raise UsageError(f"--output {output} is a directory; give a file name")
    dev = resolve_device(device)
    ckpt = load_checkpoint(run, map_location=dev, root=checkpoints)   # resolved again if retention removes it
    if run is None:
        note(f"sampling from {ckpt.path} (the most recent run under {checkpoints}/)")
    check_fits(estimate_sampling_bytes(ckpt.model_cfg, num_samples, length, len(prime)),
               f"sampling --num-samples {num_samples} --length {length}",
               "generate fewer samples at a time or shorter ones", dev)
    stream = _Stream(num_samples) if output is None and not no_stream else None
    try:
        gen = generate(ckpt.model, ckpt.vocab, prime=prime, length=length, num_samples=num_samples, options=options,
                       seed=seed, unknown=unknown, on_text=stream, precision=precision, threads=threads,
                       prime_name=prime_name)
        _deliver(gen, output, stream)
        _closing_notes(gen, seed_given=seed is not None)
    except BrokenPipeError:
        # The reader went away (`charlstm sample | head`): stop quietly, as other Unix tools do.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout without a file descriptor
            pass
        return None
    return gen


def _deliver(gen: Generation, output: Path | None, stream: _Stream | None) -> None:
    """The samples to --output (with a note), or the end of the streamed text, or all of it to stdout."""
    if output is not None:
        write_output(Path(output), format_samples(gen.texts))
        note(f"wrote {len(gen.texts)} sample(s), {sum(len(t) for t in gen.texts):,} characters, to {output}")
    elif stream is not None:
        stream.finish(gen.texts)
    else:
        sys.stdout.write(format_samples(gen.texts) + ("\n" if len(gen.texts) == 1 else ""))
        sys.stdout.flush()


def _closing_notes(gen: Generation, *, seed_given: bool) -> None:
    """The notes after the text (each on a line of its own, the text's line ended): characters left
    out of the prime, and the seed drawn where none was given."""
    if gen.skipped:
        shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in gen.skipped)
        note(f"left out of the prime {len(gen.skipped)} character(s) not in the vocabulary: {shown}")
    if not seed_given:
        note(f"seed {gen.seed} (pass --seed {gen.seed} to get this text again)")
