"""`charlstm bench`'s report as a table: the figures of ``bench.run_bench`` and the lines under them."""

from __future__ import annotations

from rich.table import Table


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def make_table(report: dict) -> Table:
    """A rich Table of the report's results."""
    peak = report["peak"]
    m = report["machine"]
    parts = [f"{m['cpu']}, {m['threads']} thread(s), torch {m['torch']}"]
    if peak["square"]:
        n = peak["square"]["shape"][0]
        parts.append(f"mm peak {peak['square']['gflops']:.1f} GFLOP/s ({n}x{n}x{n})")
    for p in peak["recurrent"]:
        B, H, H4 = p["shape"]
        parts.append(f"{p['gflops']:.1f} at {B}x{H} by {H}x{H4}")
    table = Table(title="charlstm bench: " + "; ".join(parts), title_justify="left")
    for name, justify in (("variant", "left"), ("backend", "left"), ("H", "right"), ("L", "right"),
                          ("B", "right"), ("T", "right"),
                          ("train chars/s", "right"), ("x nn.LSTM", "right"), ("GFLOP/s", "right"),
                          ("% mm peak", "right"),
                          ("sample 1 chars/s", "right"), ("x nn.LSTM", "right"),
                          ("sample B chars/s", "right"), ("x nn.LSTM", "right")):
        table.add_column(name, justify=justify)

    def cells(fig: dict | None, *, with_flops: bool) -> list[str]:
        if fig is None:
            return ["-", "-"] + (["-", "-"] if with_flops else [])
        out = [_fmt_rate(fig["chars_per_s"]), f"{fig['ratio_to_nn_lstm']:.2f}"]
        if with_flops:
            frac = fig.get("fraction_of_mm_peak")
            out += [f"{fig['gflops']:.1f}", "-" if frac is None else f"{100 * frac:.0f}%"]
        return out

    for r in report["results"]:
        table.add_row(r["variant"], r["backend"], str(r["hidden"]), str(r["layers"]), str(r["batch_size"]),
                      str(r["seq_len"]),
                      *cells(r.get("train"), with_flops=True),
                      *cells(r.get("sample"), with_flops=False),
                      *cells(r.get("sample_batch"), with_flops=False))
    return table


def table_footer(report: dict) -> list[str]:
    """Lines printed under the table: the sampling reference and the method."""
    lines = [f"native kernels: {report['machine'].get('native', 'not recorded')}"]
    for b in report["baselines"]:
        ref = [f"{k.replace('_chars_per_s', '').replace('_', ' ').replace('onednn', 'oneDNN')} "
               f"{_fmt_rate(v)} chars/s"
               for k, v in b.items() if k.endswith("_chars_per_s") and k.startswith("sample")]
        if ref:
            lines.append(f"sampling ratios are to the faster nn.LSTM stepped through model.forward "
                         f"(H={b['hidden']} L={b['layers']} B={b['batch_size']}): " + ", ".join(ref))
    steppers = {r[m]["stepper"] for r in report["results"] for m in ("sample", "sample_batch") if m in r}
    if steppers:
        st = report["settings"]["sample_threads"]
        lines.append("sampler stepper: " + ", ".join(sorted(steppers))
                     + (f", {st} thread(s) while sampling" if st else
                        ", threads as charlstm sample: all cores for the native step, 1 for the torch steps"))
    s = report["settings"]
    clock = "wall-clock time" if s["clock"] == "wall" else "this process's CPU time"
    lines.append(f"{clock}; medians of {s['repeats']} interleaved rounds after {s['warmup']} warm-up round(s); "
                 "ratios are medians of per-round ratios; training FLOPs = 6 x weights x chars, sampling 2 x"
                 + ("; training under bf16 autocast" if s.get("bf16") else ""))
    lines.extend(report["skipped"])
    return lines
