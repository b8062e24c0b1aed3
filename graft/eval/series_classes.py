"""Classification of series by a model that answers in text: task `classify` (eval/tasks.py).

`graft eval RUN --task classify --data PATH` (or `eval.tasks: [classify=PATH]`): each recording
of a UEA/UCR `.ts` file (data/ts_file.py), an arrays folder (data/series_arrays.py) or PAMAP2
`.dat` files (a file, a folder or a glob; windows as the run's data.imus / downsample /
window_stride / series.length cut them, data/pamap2.py) is asked `data.class_prompt` and the greedy
answer is compared with its label (case and a final full stop ignored). Metrics: `class_acc`,
`class_f1` (macro over the labels present), `class_recall` (their mean: balanced accuracy) and
`class_recall/<label>`. Lines that cannot be read are skipped and counted (`classify_skipped`).
The built-in sensor world's activities are scored the same way (`class_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from graft.data.pamap2 import Pamap2Source
from graft.data.samples import BadSample
from graft.data.series_arrays import read_folder
from graft.data.skips import SkipLog
from graft.data.ts_file import parse_line, read_ts
from graft.errors import UserError
from graft.eval.vqa import answer, normalise


@dataclass
class Labelled:
    name: str
    items: list[tuple[str, np.ndarray, str]]  # (id, series, label)
    log: SkipLog


def load_series(path: str, cfg) -> Labelled:
    """The labelled recordings of a `.ts` file, PAMAP2 `.dat` files or an arrays folder."""
    log, items, name = SkipLog(), [], Path(path.rstrip("/")).name
    if is_pamap2(path):
        source = Pamap2Source(replace(cfg.data, path=path), cfg.series.length)
        read = [(source.key(i), lambda i=i: source.recording(i)) for i in range(len(source))]
    elif path.endswith(".ts"):
        _, labels, lines = read_ts(Path(path))
        read = [(f"{name}[{i}]", lambda line=line: parse_line(line, labels, cfg.data.max_text_bytes)) for i, line in
                enumerate(lines)]
    else:
        names, labels, load = read_folder(Path(path))
        read = [(f"{name}/{n}", lambda n=n, label=label: (load(n), _known(label))) for n, label in zip(names, labels)]
    for key, get in read:
        try:
            items.append((key, *get()))
        except BadSample as e:
            log.skip(e.reason, key, e.detail)
    return Labelled(name, items, log)


def is_pamap2(path: str) -> bool:
    """A .dat file, a glob of them, or a folder holding them (and not an arrays folder)."""
    p = Path(path)
    return path.endswith(".dat") or (p.is_dir() and any(p.glob("*.dat")) and not any(p.glob("*.csv")))


def _known(label: str | None) -> str:
    if label is None:
        raise BadSample("label_unknown", "no label for this recording")
    return label


def classify_vlm(model, proc, data: Labelled, cfg) -> tuple[dict[str, float], list[dict]]:
    usable, predictions = [], []
    for key, values, label in data.items:
        try:
            usable.append((key, proc.pixels(values), label))  # the processor's checks: shape, gaps
        except BadSample as e:
            data.log.skip(e.reason, key, e.detail)
    if not usable:
        raise UserError(f"--data {data.name}: no usable recording (skipped: {dict(data.log.skipped)})")
    e = cfg.eval
    said = answer(model, proc, [(x, cfg.data.class_prompt) for _, x, _ in usable], e.batch_size, e.max_new_tokens)
    pairs = [(normalise(label), normalise(p)) for (_, _, label), p in zip(usable, said)]
    for (key, _, label), pred, (t, p) in zip(usable, said, pairs):
        predictions.append({"id": key, "prediction": pred, "reference": label, "correct": t == p})
    labels = sorted({t for t, _ in pairs})
    return {"class_acc": sum(t == p for t, p in pairs) / len(pairs)} | class_scores(pairs, labels, "class"), predictions


def class_scores(pairs: list[tuple[str, str]], classes, prefix: str) -> dict[str, float]:
    """Macro-F1 and mean recall over the classes that occur, and each one's recall, from (true,
    predicted) pairs: `<prefix>_f1`, `<prefix>_recall`, `<prefix>_recall/<class>`."""
    out, f1s = {}, []
    for name in classes:
        tp = sum(t == name and p == name for t, p in pairs)
        truth, said = sum(t == name for t, _ in pairs), sum(p == name for _, p in pairs)
        if not truth:
            continue
        out[f"{prefix}_recall/{name}"] = tp / truth
        f1s.append(2 * tp / (truth + said))
    if not f1s:
        return {}
    return {f"{prefix}_f1": sum(f1s) / len(f1s), f"{prefix}_recall": sum(out.values()) / len(out)} | out
