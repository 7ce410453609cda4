"""The `charlstm` command line: parses options, calls library functions, prints.

Every command's work lives in a library module; this file only turns options
into calls. A user's mistake raises ``CharlstmError`` somewhere below and is
printed here as one line on stderr with a non-zero exit status; ``--debug``
(anywhere on the command line) shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from .errors import CharlstmError, NotImplementedYet

DEBUG_ENV = "CHARLSTM_DEBUG"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def report_error(err: BaseException, code: int) -> int:
    """Print one line for a user's mistake (or the traceback under --debug); return the exit code."""
    if debug_enabled():
        import traceback

        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    else:
        print(f"error: {err}", file=sys.stderr)
    return code


class CharlstmGroup(TyperGroup):
    """Click group that turns CharlstmError into one line on stderr and an exit status.

    Living in the group (not only in ``main``) means ``CliRunner`` tests see the
    same behaviour as the console script. ``--debug`` is accepted anywhere.
    """

    def main(self, args=None, *a, **kw):
        args = list(sys.argv[1:] if args is None else args)
        if "--debug" in args:
            args = [x for x in args if x != "--debug"]
            os.environ[DEBUG_ENV] = "1"
        return super().main(args, *a, **kw)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CharlstmError as e:
            ctx.exit(report_error(e, e.exit_code))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            ctx.exit(130)


app = typer.Typer(
    cls=CharlstmGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Character-level language models: LSTM, peephole, coupled, GRU and vanilla RNN cells.",
)

@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors (also accepted after the command)."),
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"


# --------------------------------------------------------------------------- train

@app.command()
def train(
    data: Optional[str] = typer.Option(None, "--data", help="pystdlib (built in), tinyshakespeare (downloaded once), a text file, or a directory of text files.  [default: pystdlib, or the preset's]"),
    preset: Optional[str] = typer.Option(None, "--preset", help="Named recipe: demo (about 2 CPU minutes), shakespeare (the README's 10-minute CPU recipe). Explicit options override it."),
    variant: Optional[str] = typer.Option(None, "--variant", help="rnn, lstm, peephole, coupled or gru.  [default: lstm]"),
    backend: Optional[str] = typer.Option(None, "--backend", help="auto (cudnn where the variant has one, else custom), cudnn or custom.  [default: auto]"),
    peephole_form: Optional[str] = typer.Option(None, "--peephole-form", help="Peephole form: diag (one weight per unit) or full (H x H).  [default: diag]"),
    peepholes: Optional[str] = typer.Option(None, "--peepholes", help="Gates with peepholes: any subset of fio.  [default: fio]"),
    gru_form: Optional[str] = typer.Option(None, "--gru-form", help="GRU equations: cudnn (torch.nn.GRU) or cho (the seed's).  [default: cudnn]"),
    layers: Optional[int] = typer.Option(None, "--layers", help="Stacked recurrent layers.  [default: 2]"),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="Hidden units per layer.  [default: 256]"),
    embed: Optional[int] = typer.Option(None, "--embed", help="Character embedding size.  [default: 64]"),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Dropout between layers and before the head (never recurrent).  [default: 0.0]"),
    forget_bias: Optional[float] = typer.Option(None, "--forget-bias", help="Initial forget-gate bias for the LSTM family.  [default: 1.0]"),
    init: Optional[str] = typer.Option(None, "--init", help="uniform (PyTorch's) or chrono (Tallec & Ollivier).  [default: uniform]"),
    chrono_tmax: Optional[int] = typer.Option(None, "--chrono-tmax", help="T_max of chrono initialisation (0: the training window length).  [default: 0]"),
    no_bias: bool = typer.Option(False, "--no-bias", help="Cells without biases (the seed's GRU equations to the letter)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Truncated-BPTT window T.  [default: 128]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Parallel contiguous streams B.  [default: 32]"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (AdamW).  [default: 3e-3]"),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="cosine (with warmup), constant, or step (char-rnn style decay).  [default: cosine]"),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear warmup steps.  [default: 100]"),
    min_lr_frac: Optional[float] = typer.Option(None, "--min-lr-frac", help="cosine: final learning rate as a fraction of --lr.  [default: 0.1]"),
    lr_decay: Optional[float] = typer.Option(None, "--lr-decay", help="step schedule: multiply the learning rate by this...  [default: 0.97]"),
    lr_decay_every: Optional[int] = typer.Option(None, "--lr-decay-every", help="...every this many steps.  [default: 500]"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (not on biases or embeddings).  [default: 0.0]"),
    beta2: Optional[float] = typer.Option(None, "--beta2", help="AdamW's second-moment decay (0.99 suits small batches of characters; torch's default is 0.999).  [default: 0.99]"),
    clip: Optional[float] = typer.Option(None, "--clip", help="Clip gradients to this global norm (0 disables).  [default: 1.0]"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Budget: optimizer steps."),
    max_epochs: Optional[float] = typer.Option(None, "--max-epochs", help="Budget: passes over the training split."),
    max_time: Optional[str] = typer.Option(None, "--max-time", help="Budget: wall time, e.g. 90s, 10m, 1h."),
    clock: Optional[str] = typer.Option(None, "--clock", help="What --max-time counts: wall (time of training steps) or cpu (this process's CPU time; for benchmarks on a shared machine).  [default: wall]"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate on the whole validation split every N steps.  [default: 500]"),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Save a checkpoint every N steps.  [default: 500]"),
    keep: Optional[int] = typer.Option(None, "--keep", help="Keep the N latest checkpoints plus the best.  [default: 3]"),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Write a metrics.jsonl line every N steps.  [default: 10]"),
    sample_chars: Optional[int] = typer.Option(None, "--sample-chars", help="Length of the sample printed at each evaluation (0: none).  [default: 200]"),
    val_frac: Optional[float] = typer.Option(None, "--val-frac", help="Validation split: the last fraction of the corpus.  [default: 0.1]"),
    test_frac: Optional[float] = typer.Option(None, "--test-frac", help="Test split, just before the validation split (for `charlstm eval --split test`).  [default: 0.0]"),
    invalid_utf8: Optional[str] = typer.Option(None, "--invalid-utf8", help="strict (error) or replace (U+FFFD) for undecodable bytes.  [default: strict]"),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory.  [default: checkpoints/<name>]"),
    name: Optional[str] = typer.Option(None, "--name", help="Run name (the directory under checkpoints/).  [default: VARIANT-DATA, numbered if taken]"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out/--name (only charlstm's own files are removed)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue a run exactly where it stopped."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from another run's weights with a fresh optimizer."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed.  [default: 1337]"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda.  [default: auto]"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch.  [default: torch's]"),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast on CUDA (ignored on CPU).  [default: --bf16]"),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar (evaluations, samples and the summary are still printed)."),
) -> None:
    """Train a model; writes a run directory with checkpoints and metrics.jsonl."""
    try:
        from . import train as train_mod
    except ImportError as e:  # pragma: no cover - only before the trainer exists
        raise NotImplementedYet("charlstm train") from e
    flags = ("flags", "train_mod", "preset", "resume", "init_from", "no_bias", "overwrite", "no_progress")
    options = {k: v for k, v in locals().items() if k not in flags and v is not None}
    if no_bias:
        options["bias"] = False
    result = train_mod.run_from_cli(options, preset=preset, resume=resume, init_from=init_from,
                                    overwrite=overwrite, progress=not no_progress)
    if result is not None and result.interrupted:
        raise typer.Exit(result.exit_code)


# --------------------------------------------------------------------------- sample

@app.command()
def sample(
    run: Optional[Path] = typer.Argument(None, help="Run directory or checkpoint directory (default: the most recent run under checkpoints/)."),
    prime: str = typer.Option("", "--prime", help="Text to condition on; the output begins with it."),
    length: int = typer.Option(500, "--length", help="Characters to generate after the prime."),
    temperature: float = typer.Option(1.0, "--temperature", help="Softmax temperature (> 0)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample only from the K most likely characters."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling: smallest set with probability >= P."),
    greedy: bool = typer.Option(False, "--greedy", help="Always take the most likely character."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (same seed, same text on the same machine)."),
    num_samples: int = typer.Option(1, "--num-samples", help="Generate N samples together as a batch."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write the text to FILE instead of stdout."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Print the text at the end instead of as it is generated."),
    unknown: str = typer.Option("error", "--unknown", help="Prime characters outside the vocabulary: error or skip."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads while generating (default: all cores for the native LSTM step, one for the torch step, whose small operations a second thread mostly waits for)."),
    precision: str = typer.Option("fp32", "--precision", help="Weights of the native LSTM step: fp32, or fp16 (half the bytes read per character; logits within ~0.003 of fp32)."),
) -> None:
    """Generate text from a checkpoint."""
    try:
        from . import sample as sample_mod
    except ImportError as e:
        raise NotImplementedYet("charlstm sample") from e
    sample_mod.run_from_cli(**{k: v for k, v in locals().items() if k != "sample_mod"})


# --------------------------------------------------------------------------- eval

@app.command("eval")
def eval_(
    run: Optional[Path] = typer.Argument(None, help="Run directory or checkpoint directory."),
    split: str = typer.Option("val", "--split", help="Split of the checkpoint's corpus: train, val or test."),
    text_file: Optional[Path] = typer.Option(None, "--text-file", help="Evaluate on this text file instead of a split."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Streams evaluated in parallel (default: the run's)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch intra-op threads (default: torch's)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Loss (nats/char) and bits per character of a checkpoint on text."""
    try:
        from . import evaluate as eval_mod
    except ImportError as e:
        raise NotImplementedYet("charlstm eval") from e
    eval_mod.run_from_cli(**{k: v for k, v in locals().items() if k != "eval_mod"})


# --------------------------------------------------------------------------- info

@app.command()
def info(
    run: Optional[Path] = typer.Argument(None, help="Run directory or checkpoint directory."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """What a checkpoint is: config, parameters, corpus, metrics."""
    try:
        from . import info as info_mod
    except ImportError as e:
        raise NotImplementedYet("charlstm info") from e
    info_mod.run_from_cli(**{k: v for k, v in locals().items() if k != "info_mod"})


# --------------------------------------------------------------------------- compare-variants

@app.command("compare-variants")
def compare_variants(
    task: str = typer.Option("corpus", "--task", help="corpus (language modelling on --data) or long-gap (recall a key after G distractors)."),
    variants: str = typer.Option("rnn,lstm,peephole,coupled,gru", "--variants", help="Comma-separated cell variants to compare."),
    seeds: str = typer.Option("1", "--seeds", help="Comma-separated seeds; each variant is trained once per seed (mean ± std)."),
    gaps: str = typer.Option("5,20,50,100", "--gaps", help="long-gap: comma-separated gap lengths G."),
    keys: int = typer.Option(8, "--keys", help="long-gap: number of keys K to recall (chance is 1/K)."),
    distractors: int = typer.Option(8, "--distractors", help="long-gap: size of the distractor alphabet."),
    eval_size: int = typer.Option(1000, "--eval-size", help="long-gap: held-out sequences that accuracy is measured on."),
    match_params: bool = typer.Option(False, "--match-params", help="Size each variant's hidden layer so its parameter count is within 2% of an lstm of --hidden units."),
    data: str = typer.Option("pystdlib", "--data", help="corpus: pystdlib, tinyshakespeare, a text file or a directory (as for train)."),
    val_frac: float = typer.Option(0.1, "--val-frac", help="corpus: validation split, the last fraction of the corpus."),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="Hidden units per layer (the reference size under --match-params).  [default: corpus 256, long-gap 64]"),
    layers: Optional[int] = typer.Option(None, "--layers", help="Stacked recurrent layers.  [default: corpus 2, long-gap 1]"),
    embed: Optional[int] = typer.Option(None, "--embed", help="Character embedding size.  [default: corpus 64, long-gap 16]"),
    dropout: float = typer.Option(0.0, "--dropout", help="Dropout between layers and before the head."),
    backend: str = typer.Option("auto", "--backend", help="auto (cudnn where the variant has one, else custom), cudnn or custom."),
    peephole_form: str = typer.Option("diag", "--peephole-form", help="Peephole form: diag or full."),
    peepholes: str = typer.Option("fio", "--peepholes", help="Gates with peepholes: any subset of fio."),
    gru_form: str = typer.Option("cudnn", "--gru-form", help="GRU equations: cudnn or cho."),
    init: str = typer.Option("uniform", "--init", help="uniform (PyTorch's) or chrono (Tallec & Ollivier; T_max = the sequence length in long-gap)."),
    forget_bias: float = typer.Option(1.0, "--forget-bias", help="Initial forget-gate bias for the LSTM family."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="corpus: truncated-BPTT window T.  [default: 128]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Streams (corpus) or sequences (long-gap) per step.  [default: 32]"),
    lr: float = typer.Option(3e-3, "--lr", help="Learning rate (AdamW for corpus with the train schedule; constant Adam for long-gap)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="corpus: cosine, constant or step.  [default: train's, cosine]"),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="corpus: linear warmup steps.  [default: train's, 100]"),
    clip: float = typer.Option(1.0, "--clip", help="Clip gradients to this global norm (0 disables)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Budget per run: optimizer steps.  [default: corpus 500, long-gap 1000, unless --max-time is given]"),
    max_time: Optional[str] = typer.Option(None, "--max-time", help="Budget per run: wall time, e.g. 60s, 2m (with --max-steps, the first reached stops)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate every N steps for the learning curves.  [default: a tenth of --max-steps, else 100]"),
    jobs: int = typer.Option(1, "--jobs", help="Runs trained at the same time, in separate processes, threads split among them."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads in all (split among --jobs).  [default: torch's]"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    out: Optional[Path] = typer.Option(None, "--out", help="Comparison directory; one run directory per variant and seed inside.  [default: checkpoints/compare-<data> or checkpoints/compare-long-gap]"),
    no_plot: bool = typer.Option(False, "--no-plot", help="Write the data files but no figures."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars or per-run messages on stderr."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout (the table is not printed)."),
) -> None:
    """Train several cell variants under one budget and compare them.

    Rerunning the same command reads finished runs back instead of training them again.
    """
    from . import compare as compare_mod

    compare_mod.run_from_cli(**{k: v for k, v in locals().items() if k != "compare_mod"})


# --------------------------------------------------------------------------- bench

@app.command()
def bench(
    variants: str = typer.Option("lstm,peephole,coupled,gru", "--variants", help="Comma-separated variants (rnn, lstm, peephole, coupled, gru); a form after a colon: gru:cho, peephole:full."),
    backends: str = typer.Option("cudnn,custom", "--backends", help="Comma-separated backends: cudnn (torch.nn modules), custom (our cells, fused loop), basic (our cells, plain unbind loop)."),
    hidden: str = typer.Option("256", "--hidden", help="Hidden sizes H, comma-separated (every combination of the size options is measured)."),
    layers: str = typer.Option("2", "--layers", help="Layer counts L, comma-separated."),
    batch_size: str = typer.Option("32", "--batch-size", help="Streams B (training batch and batched sampling), comma-separated."),
    seq_len: str = typer.Option("128", "--seq-len", help="Training windows T, comma-separated."),
    embed: int = typer.Option(64, "--embed", help="Embedding size E."),
    vocab: int = typer.Option(65, "--vocab", help="Vocabulary size V (random tokens)."),
    peephole_form: str = typer.Option("diag", "--peephole-form", help="Form of the peephole variant: diag or full."),
    gru_form: str = typer.Option("cudnn", "--gru-form", help="Form of the gru variant: cudnn or cho."),
    measures: str = typer.Option("train,sample,sample-batch", "--measures", help="What to time: train (fwd+bwd+AdamW), sample (one stream), sample-batch (B streams)."),
    sample_length: int = typer.Option(256, "--sample-length", help="Characters generated per sampling measurement."),
    sample_threads: Optional[int] = typer.Option(None, "--sample-threads", help="Threads while sampling (default: charlstm sample's, all cores for the native step, 1 for the torch step)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch.  [default: torch's]"),
    repeats: int = typer.Option(5, "--repeats", help="Timed rounds; figures are medians over them."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed rounds before the timed ones."),
    peak_size: int = typer.Option(2048, "--peak-size", help="n of the n x n x n torch.mm product that gives the peak (0: skip it)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights and random tokens."),
    clock: str = typer.Option("wall", "--clock", help="wall (elapsed time) or cpu (this process's CPU time: steadier on a busy shared machine, use with --threads 1)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of the table."),
) -> None:
    """Throughput of variants and backends, side by side: training and sampling chars/s,
    as ratios to nn.LSTM and as GFLOP/s against this machine's torch.mm peak."""
    from . import bench as bench_mod

    bench_mod.run_from_cli(**{k: v for k, v in locals().items() if k != "bench_mod"})


# --------------------------------------------------------------------------- visualize

@app.command()
def visualize(
    run: Optional[Path] = typer.Argument(None, help="Run directory or checkpoint directory (default: the most recent run under checkpoints/)."),
    text: Optional[str] = typer.Option(None, "--text", help="The text to run the model over."),
    text_file: Optional[Path] = typer.Option(None, "--text-file", help="Read the text from this UTF-8 file instead."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write the self-contained page here (overwritten). Default when no other output is asked: <run>/visualize.html, or visualize-2.html... if that exists."),
    unit: Optional[str] = typer.Option(None, "--unit", help="Print the text coloured by unit LAYER:INDEX (both from 0), e.g. 0:17."),
    quantity: Optional[str] = typer.Option(None, "--quantity", help="c, h, f, i, o (LSTM family), z, r (gru). With --unit: what colours the text (default c, else h). With --find-units: rank only this quantity (default: all)."),
    scale: str = typer.Option("unit", "--scale", help="Colours of h and c with --unit: unit (divided by the unit's max |value|) or fixed (h as is, tanh of c)."),
    find_units: bool = typer.Option(False, "--find-units", help="Rank units by correlation with text features (quotes, brackets, position in line, word starts, indentation)."),
    top: int = typer.Option(5, "--top", help="Units listed per feature."),
    saturation: bool = typer.Option(False, "--saturation", help="Gate saturation table (fraction of steps < 0.1 and > 0.9) and plot (with the plot extra)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Saturation plot file (.png or .svg), or a stem for both. Default: <run>/saturation.png and .svg, never overwriting."),
    json_out: bool = typer.Option(False, "--json", help="Print the --find-units / --saturation results as one JSON object on stdout."),
    unknown: str = typer.Option("error", "--unknown", help="Characters outside the vocabulary: error (list them) or skip (drop them)."),
    max_chars: int = typer.Option(2000, "--max-chars", help="Record at most this many characters (the page grows with it)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """See what the cells have learned: colour a text by any unit, gate or cell; find units that track features."""
    from . import visualize as vis_mod

    vis_mod.run_from_cli(run=run, text=text, text_file=text_file, html=html, unit=unit, quantity=quantity,
                         scale=scale, find_units=find_units, top=top, saturation_table=saturation, plot=plot,
                         json_out=json_out, unknown=unknown, max_chars=max_chars, device=device)


# --------------------------------------------------------------------------- entry point

def main() -> None:
    """Console-script entry point."""
    app(prog_name="charlstm")


if __name__ == "__main__":  # pragma: no cover
    main()
