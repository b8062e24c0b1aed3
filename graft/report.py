"""The human-readable end of a run: a results table on the terminal, report.md and loss.png."""

from __future__ import annotations

import io
from pathlib import Path

from graft import atomic
from graft.data.shapes import QUESTION_TYPES, SPLITS
from graft.train.metrics import read


def results_table(results: dict[str, float]) -> str:
    """Markdown table: one row per metric, one column per split present in `results`."""
    splits = ["test"] + sorted({k.split("/")[0] for k in results if k.split("/")[0] in SPLITS and k.split("/")[0] != "test"})
    rows = ["vqa_acc"] + [f"vqa_acc/{t}" for t in QUESTION_TYPES] + ["caption_cider", "caption_exact"]
    rows += ["zeroshot_acc", "zeroshot_top5"] + [f"{d}_r@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    lines = ["| metric | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for row in rows:
        cells = []
        for split in splits:
            key = row if split == "test" else f"{split}/{row}"
            cells.append(f"{results[key]:.3f}" if key in results else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_loss(run_dir: Path) -> Path | None:
    records = [r for r in read(run_dir) if "loss" in r and r.get("event") != "eval"]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path, png = run_dir / "loss.png", io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    atomic.write_bytes(path, png.getvalue())
    plt.close(fig)
    return path


def write_report(run_dir: Path, name: str, results: dict[str, float], train_seconds: float | None) -> Path:
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
    lines += ["", "## Evaluation", "", results_table(results), ""]
    if plot is not None:
        lines += ["## Training loss", "", f"![training loss]({plot.name})", ""]
    path = run_dir / "report.md"
    atomic.write_text(path, "\n".join(lines))
    return path
