"""The human-readable end of a run: a results table on the terminal, report.md and loss.png."""

from __future__ import annotations

import io
from pathlib import Path

from graft import atomic
from graft.trainer.metrics import read


def results_table(results: dict[str, float], first: str = "test") -> str:
    """Markdown table: one row per metric, one column per data set (split or task data) in `results`.

    A key's first segment is a column when it is not itself a metric (`compositional/vqa_acc`,
    `pets/zeroshot_acc`; not `vqa_acc/color`); unprefixed keys form the column named `first`."""
    cells: dict[str, dict[str, float]] = {}
    for key, value in results.items():
        head, _, rest = key.partition("/")
        column, metric = (head, rest) if rest and head not in results else (first, key)
        cells.setdefault(column, {})[metric] = value
    columns = sorted(cells, key=lambda c: c != first)  # the unprefixed column first, then in order
    rows = list(dict.fromkeys(m for c in columns for m in cells[c]))
    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        values = [cells[c].get(row) for c in columns]
        shown = ["-" if v is None else f"{v:.0f}" if row.endswith("_skipped") else f"{v:.3f}" for v in values]
        lines.append(f"| {row} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display needed)."""
    # lazy: matplotlib takes ~0.4 s to import
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib takes ~0.4 s to import
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, dpi: int) -> bytes:
    """The figure as PNG bytes (to write atomically); the figure is closed."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi)
    pyplot().close(fig)
    return png.getvalue()


def plot_loss(run_dir: Path) -> Path | None:
    records = [r for r in read(run_dir) if "loss" in r and r.get("event") != "eval"]
    if not records:
        return None
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    # fixed margins, not tight_layout: the figure and its labels never change size, and tight_layout
    # draws the figure once more to measure them (half of a short run's report time)
    fig.subplots_adjust(left=0.17, right=0.97, bottom=0.14, top=0.96)
    path = run_dir / "loss.png"
    atomic.write_bytes(path, png_bytes(fig, 110))
    return path


def write_report(run_dir: Path, name: str, results: dict[str, float], train_seconds: float | None,
                 first: str = "test") -> Path:
    records = [r for r in read(run_dir) if r.get("event") != "eval" and "loss" in r]
    plot = plot_loss(run_dir)
    lines = [f"# graft run: {name}", ""]
    if records:
        last = records[-1]
        lines += [
            f"- steps: {last['step']}, final training loss {last['loss']:.4f}",
            f"- throughput (last window): {last['samples_per_s']:.1f} samples/s, "
            f"{last['tokens_per_s']:.0f} tokens/s, MFU {100 * last['mfu']:.1f} %, "
            f"data wait {100 * last['data_wait_frac']:.1f} %",
        ]
    if train_seconds is not None:
        lines.append(f"- wall time of this training invocation: {train_seconds:.0f} s")
    table = results_table(results, first) if results else "no evaluation: eval.splits and eval.tasks are empty"
    lines += ["", "## Evaluation", "", table, ""]
    if plot is not None:
        lines += ["## Training loss", "", f"![training loss]({plot.name})", ""]
    path = run_dir / "report.md"
    atomic.write_text(path, "\n".join(lines))
    return path
