"""The `charlstm` command line: its commands, what they call, what they print.

The options of train, compare-variants, bench and eval --dynamic are generated from the
fields of ModelConfig, TrainConfig, CompareConfig, BenchConfig and DynamicConfig
(cli_options.py: ``field_options``, ``with_options``, ``given``). A user's mistake raises
CharlstmError below and is printed as one line on stderr by CharlstmGroup, as are the
parser's own errors; ``--debug`` (anywhere on the command line) shows the traceback instead.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import torch
import typer
from rich.console import Console

from . import __version__, bench_report, configfile, training
from . import bench as bench_mod
from . import cache as cache_mod
from . import compare as compare_mod
from . import evaluate as eval_mod
from . import info as info_mod
from . import plot as plot_mod
from . import sample as sample_mod
from . import train as train_mod
from . import visualize as vis_mod
from .cli_options import (
    CharlstmGroup,
    FieldOption,
    data_dir_option,
    field_options,
    given,
    opt,
    presets_epilog,
    shown,
    with_options,
)
from .config import PRESETS, BenchConfig, CompareConfig, DynamicConfig, ModelConfig, TrainConfig
from .console import DEBUG_ENV, note
from .datacache import using_data_dir
from .errors import UsageError

app = typer.Typer(
    cls=CharlstmGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Character-level language models: LSTM, peephole, coupled, GRU and vanilla RNN cells.",
)


def _version(value: bool) -> None:
    if value:
        print(f"charlstm {__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug",
                               help="Show Python tracebacks for errors (also accepted after the command)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print charlstm's version and torch's, then exit."),
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"


def _print_table(table) -> None:
    """A rich table on stdout; into a file or a pipe as wide as the table needs, never wrapped."""
    console = Console(file=sys.stdout)
    if not console.is_terminal:
        needed = Console(file=io.StringIO(), width=1000).measure(table).maximum
        console = Console(file=sys.stdout, width=max(needed, 80))
    console.print(table)


# --------------------------------------------------------------------------- train

CONFIG_HELP = ("Settings from a TOML file ({sections}; keys as --print-config writes them); "
               "options given here override it.")
PRINT_CONFIG_HELP = "Print the effective settings as TOML on stdout (what --config reads) and exit."


TRAIN_OPTIONS = [*field_options(ModelConfig, panel="Model"), *field_options(TrainConfig, panel="Training")]


@app.command(epilog=presets_epilog())
@with_options(TRAIN_OPTIONS)
def train(
    preset: str | None = opt(None, "--preset", help=f"Named recipe: {', '.join(PRESETS)} (what each changes: "
                                "below). Explicit options override it.", show="none"),
    resume: Path | None = opt(None, "--resume", help="Continue a run exactly where it stopped."),
    init_from: Path | None = opt(None, "--init-from", help="Start from another run's weights with a fresh optimizer."),
    overwrite: bool = opt(False, "--overwrite", help="Replace the run already in --out/--name (only charlstm's own "
                          "files are removed)."),
    no_progress: bool = opt(False, "--no-progress", help="No progress bar (evaluations, samples and the summary are "
                            "still printed)."),
    config: Path | None = opt(None, "--config", help=CONFIG_HELP.format(sections="[model] and [train]")
                              + " The file may name a preset (preset = \"demo\"); its own values override it."),
    print_config: bool = opt(False, "--print-config", help=PRINT_CONFIG_HELP),
    data_dir: Path | None = data_dir_option(),
    **options,
) -> None:
    """Train a model; writes a run directory with checkpoints and metrics.jsonl."""
    options = given(TRAIN_OPTIONS, options)
    if config is not None:
        file_preset, file_options = configfile.read_train_config(config)
        options = {**file_options, **options}                  # the command line over the file
        if preset is None and resume is None:                   # a resumed run keeps its own settings
            preset = file_preset
    if print_config:
        sys.stdout.write(configfile.train_toml(*training.configs_from_options(options, preset=preset, resume=resume,
                                                                                   init_from=init_from), preset))
        return
    with using_data_dir(data_dir):
        result = train_mod.run_from_cli(options, preset=preset, resume=resume, init_from=init_from,
                                        overwrite=overwrite, progress=not no_progress)
    if result is not None and result.interrupted:
        raise typer.Exit(result.exit_code)


# --------------------------------------------------------------------------- sample

@app.command()
def sample(
    run: Path | None = typer.Argument(None, help="Run directory or checkpoint directory (default: the most recent run "
                                      "under checkpoints/)."),
    prime: str = opt("", "--prime", help="Text to condition on; the output begins with it.", show="''"),
    prime_file: Path | None = opt(None, "--prime-file", help="Read the prime from this UTF-8 file, exactly (a final "
                                  "newline included); instead of --prime, not with it."),
    length: int = opt(500, "--length", help="Characters to generate after the prime."),
    temperature: float = opt(1.0, "--temperature", help="Softmax temperature (> 0)."),
    top_k: int | None = opt(None, "--top-k", help="Sample only from the K most likely characters.", show="off"),
    top_p: float | None = opt(None, "--top-p", help="Nucleus sampling: smallest set with probability >= P.",
                              show="off"),
    greedy: bool = opt(False, "--greedy", help="Always take the most likely character."),
    seed: int | None = opt(None, "--seed", help="Random seed (same seed, same text on the same machine).",
                           show="random"),
    num_samples: int = opt(1, "--num-samples", help="Generate N samples together as a batch."),
    output: Path | None = opt(None, "--output", help="Write the text to FILE instead of stdout."),
    no_stream: bool = opt(False, "--no-stream", help="Print the text at the end instead of as it is generated."),
    unknown: str = opt("error", "--unknown", help="Prime characters outside the vocabulary: error or skip."),
    device: str = opt("auto", "--device", help="auto, cpu or cuda."),
    threads: int | None = opt(None, "--threads", help="Threads while generating.", show="all cores for the native "
                              "step, one for the torch step, whose small operations a second thread mostly waits for"),
    precision: str = opt("fp32", "--precision", help="Weights of the native sampling step: fp32, fp16 (half the bytes "
                         "read per character) or int8 (per-row scales; docs/sampling.md gives the loss change)."),
) -> None:
    """Generate text from a checkpoint."""
    sample_mod.run_from_cli(**locals())


# --------------------------------------------------------------------------- eval

DYNAMIC_OPTIONS = field_options(DynamicConfig, panel="Dynamic evaluation (with --dynamic)")


@app.command("eval")
@with_options(DYNAMIC_OPTIONS)
def eval_(
    run: Path | None = typer.Argument(None, help="Run directory or checkpoint directory."),
    split: str = opt("val", "--split", help="Split of the checkpoint's corpus: train, val or test."),
    text_file: Path | None = opt(None, "--text-file", help="Evaluate on this text file instead of a split."),
    batch_size: int | None = opt(None, "--batch-size", help="Streams evaluated in parallel.", show="the run's"),
    device: str = opt("auto", "--device", help="auto, cpu or cuda."),
    threads: int | None = opt(None, "--threads", help="Torch intra-op threads.", show="torch's"),
    json_out: bool = opt(False, "--json", help="Print one JSON object on stdout."),
    dynamic: bool = opt(False, "--dynamic", help="Also dynamic evaluation (Krause et al. 2018): a gradient step "
                        "after each segment; reported beside the static figure, the model on disk unchanged."),
    eval_chars: int = opt(0, "--eval-chars", help="Score only the first N characters of the split or file (the "
                          "same ones every time); 0: all of it."),
    data_dir: Path | None = data_dir_option(),
    **options,
) -> None:
    """Loss (nats/char) and bits per character of a checkpoint on text."""
    settings = given(DYNAMIC_OPTIONS, options)
    if settings and not dynamic:
        raise UsageError(f"--dynamic-{next(iter(settings)).replace('_', '-')} is an option of --dynamic; add --dynamic")
    with using_data_dir(data_dir):
        eval_mod.run_from_cli(run=run, split=split, text_file=text_file, batch_size=batch_size, device=device,
                              threads=threads, json_out=json_out,
                              dynamic=DynamicConfig(**settings) if dynamic else None, eval_chars=eval_chars)


# --------------------------------------------------------------------------- info

@app.command()
def info(
    run: Path | None = typer.Argument(None, help="Run directory or checkpoint directory."),
    json_out: bool = opt(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """What a checkpoint is: config, parameters, corpus, metrics."""
    info_mod.run_from_cli(**locals())


# --------------------------------------------------------------------------- compare-variants

def _compare_options() -> list[FieldOption]:
    """CompareConfig's own options, then the ModelConfig and TrainConfig fields it passes through."""
    def task_defaults(names) -> dict:
        out = {}
        for name in names:
            values = {task: CompareConfig.task_default(task, name) for task in CompareConfig.TASK_DEFAULTS}
            if len(set(map(repr, values.values()))) > 1:
                out[name] = ", ".join(f"{task} {shown(v) if v is not None else 'none'}" for task, v in values.items())
        return out

    model, train = CompareConfig.MODEL_OPTIONS, CompareConfig.TRAIN_OPTIONS
    return [
        *field_options(CompareConfig, panel="Comparison"),
        *field_options(ModelConfig, model, panel="Model", help=model, show=task_defaults(model)),
        *field_options(TrainConfig, train, panel="Training", help=train, show=task_defaults(train)),
    ]


COMPARE_OPTIONS = _compare_options()


@app.command("compare-variants")
@with_options(COMPARE_OPTIONS)
def compare_variants(
    no_plot: bool = opt(False, "--no-plot", help="Write the data files but no figures."),
    no_progress: bool = opt(False, "--no-progress", help="No progress bars or per-run messages on stderr."),
    json_out: bool = opt(False, "--json", help="Print one JSON object on stdout (the table is not printed)."),
    config: Path | None = opt(None, "--config", help=CONFIG_HELP.format(sections="the comparison's settings, "
                                                                         "then [model] and [train]")),
    print_config: bool = opt(False, "--print-config", help=PRINT_CONFIG_HELP),
    data_dir: Path | None = data_dir_option(),
    **options,
) -> None:
    """Train several cell variants under one budget and compare them.

    Rerunning the same command reads finished runs back instead of training them again.
    """
    options = given(COMPARE_OPTIONS, options)
    if config is not None:
        options = {**configfile.read_compare_config(config), **options}   # the command line over the file
    settings = compare_mod.settings_from_options(options)
    if print_config:
        sys.stdout.write(configfile.compare_toml(settings))
        return
    with using_data_dir(data_dir):
        summary = compare_mod.run_comparison(settings, progress=not no_progress, plot=not no_plot)
    if json_out:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        _print_table(compare_mod.make_table(summary))
    for name, path in summary["files"].items():
        note(f"{name}: {path}")
    if summary.get("plot_message"):
        note(summary["plot_message"])


# --------------------------------------------------------------------------- bench

BENCH_OPTIONS = field_options(BenchConfig)


@app.command()
@with_options(BENCH_OPTIONS)
def bench(
    json_out: bool = opt(False, "--json", help="Print one JSON object on stdout instead of the table."),
    **options,
) -> None:
    """Throughput of variants and backends, side by side: training and sampling chars/s,
    as ratios to nn.LSTM and as GFLOP/s against this machine's torch.mm peak."""
    report = bench_mod.run_bench(BenchConfig(**given(BENCH_OPTIONS, options)), progress=True)
    if json_out:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    console = Console(width=max(160, Console().width))
    console.print(bench_report.make_table(report))
    for line in bench_report.table_footer(report):
        console.print(line, highlight=False)


# --------------------------------------------------------------------------- visualize

@app.command()
def visualize(
    run: Path | None = typer.Argument(None, help="Run directory or checkpoint directory (default: the most recent run "
                                      "under checkpoints/)."),
    text: str | None = opt(None, "--text", help="The text to run the model over."),
    text_file: Path | None = opt(None, "--text-file", help="Read the text from this UTF-8 file instead."),
    html: Path | None = opt(None, "--html", help="Write the self-contained page here (overwritten), when no other "
                            "output is asked or when given.",
                            show="<run>/visualize.html, or visualize-2.html... if that exists"),
    unit: str | None = opt(None, "--unit", help="Print the text coloured by unit LAYER:INDEX (both from 0), "
                           "e.g. 0:17."),
    quantity: str | None = opt(None, "--quantity", help="c, h, f, i, o (LSTM family), z, r (gru). With --unit: what "
                                  "colours the text (default c, else h). With --find-units: rank only this quantity "
                                  "(default: all)."),
    scale: str = opt("unit", "--scale", help="Colours of h and c with --unit: unit (divided by the unit's max "
                     "|value|) or fixed (h as is, tanh of c)."),
    find_units: bool = opt(False, "--find-units", help="Rank units by correlation with text features (quotes, "
                           "brackets, position in line, word starts, indentation)."),
    top: int = opt(5, "--top", help="Units listed per feature."),
    saturation: bool = opt(False, "--saturation", help="Gate saturation table (fraction of steps < 0.1 and > 0.9) "
                           "and plot (with the plot extra)."),
    plot: Path | None = opt(None, "--plot", help="Saturation plot file (.png or .svg), or a stem for both; never "
                               "overwriting.", show="<run>/saturation.png and .svg"),
    json_out: bool = opt(False, "--json", help="Print the --find-units / --saturation results as one JSON object "
                         "on stdout."),
    unknown: str = opt("error", "--unknown", help="Characters outside the vocabulary: error (list them) or skip "
                       "(drop them)."),
    max_chars: int = opt(2000, "--max-chars", help="Record at most this many characters (the page grows with it)."),
    device: str = opt("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """See what the cells have learned: colour a text by any unit, gate or cell; find units that track features."""
    vis_mod.run_from_cli(run=run, text=text, text_file=text_file, html=html, unit=unit, quantity=quantity,
                         scale=scale, find_units=find_units, top=top, saturation_table=saturation, plot=plot,
                         json_out=json_out, unknown=unknown, max_chars=max_chars, device=device)


# --------------------------------------------------------------------------- plot

@app.command()
def plot(
    runs: list[Path] = typer.Argument(..., help="Run directories (or a checkpoint inside one); a compare-variants "
                                      "directory stands for its runs.", show_default=False, metavar="RUN"),
    out: Path | None = opt(None, "--out", help="The figure: NAME.png, NAME.svg or NAME; both NAME.png and NAME.svg "
                           "are written (replaced if there).", show="curves-by-step or curves-by-time, here"),
    x: str = opt("step", "--x", help="What the horizontal axis shows: step (optimizer steps) or time (training "
                 "time, evaluation and saving excluded)."),
    title: str | None = opt(None, "--title", help="The figure's title.", show="Training curves of N runs"),
) -> None:
    """Training curves of one or more runs, overlaid: validation loss (markers) and training loss (thin
    lines) in nats/char, from each run's metrics.jsonl. Prints the files written."""
    plot_mod.run_from_cli(runs, out=out, x=x, title=title)


# --------------------------------------------------------------------------- cache

cache_app = typer.Typer(help="List, clear and prune the data cache: downloads and token caches (docs/data.md).",
                        context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(cache_app, name="cache")


@cache_app.callback(invoke_without_command=True)
def cache(ctx: typer.Context, data_dir: Path | None = data_dir_option(),
          json_out: bool = opt(False, "--json", help="Print one JSON object on stdout.")) -> None:
    """What the data cache holds: downloads and token caches, their sizes and last use (also `cache list`)."""
    if ctx.invoked_subcommand is None:
        cache_mod.list_command(data_dir, json_out)


@cache_app.command("list")
def cache_list(data_dir: Path | None = data_dir_option(),
               json_out: bool = opt(False, "--json", help="Print one JSON object on stdout.")) -> None:
    """What the data cache holds: downloads and token caches, their sizes and last use."""
    cache_mod.list_command(data_dir, json_out)


@cache_app.command("clear")
def cache_clear(downloads: bool = opt(False, "--downloads", help="Remove the downloads (tinyshakespeare)."),
                tokens: bool = opt(False, "--tokens", help="Remove the token caches (rebuilt on the next use)."),
                data_dir: Path | None = data_dir_option()) -> None:
    """Remove downloads and token caches (both unless --downloads or --tokens chooses)."""
    cache_mod.clear_command(data_dir, downloads, tokens)


@cache_app.command("prune")
def cache_prune(max_size: str | None = opt(None, "--max-size", help="Keep the token caches within SIZE (2G, 500M, "
                                           "none), least recently used removed first.",
                                           show="CHARLSTM_CACHE_MAX, else 2G"),
                data_dir: Path | None = data_dir_option()) -> None:
    """Remove least recently used token caches past the cap (downloads stay)."""
    cache_mod.prune_command(data_dir, max_size)


# --------------------------------------------------------------------------- entry point

def main() -> None:
    """Console-script entry point."""
    app(prog_name="charlstm")


if __name__ == "__main__":  # pragma: no cover
    main()
