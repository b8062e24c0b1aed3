"""graft from Python: the same recipes, trainer, evaluation tasks and generation as the CLI.

    import graft
    cfg = graft.recipe("shapes_vqa", {"train.steps": 400})
    graft.train(cfg, "runs/py")                       # trains, evaluates, writes the run directory
    run = graft.load("runs/py")                       # its latest checkpoint
    run.evaluate("shapes", "compositional")           # any task of the registry, e.g. ("vqa", "qa.json")
    run.generate(image, "what color is the circle?")  # a PIL image or a path

Overrides are the `--set` keys, validated the same way (a bad key or value raises UserError).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from graft import recipes
from graft.build import build_processor, load_run
from graft.config import Config
from graft.data.processor import load_image
from graft.data.sources import source_kind
from graft.designs import GENERATES, design
from graft.errors import UserError
from graft.eval.harness import evaluate
from graft.eval.vqa import answer
from graft.models.modality import IMAGES, TIME_SERIES
from graft.rundir import RunDir
from graft.trainer.loop import train as train_loop


def recipe(name: str, overrides: dict | None = None) -> Config:
    """The recipe's config with `{"section.key": value}` overrides applied and validated."""
    text = lambda v: v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip()  # noqa: E731
    return recipes.recipe(name, [f"{k}={text(v)}" for k, v in (overrides or {}).items()])


def train(cfg: Config, out: str | Path) -> dict[str, float]:
    """Train (or resume) into the run directory `out`; returns the final evaluation."""
    return train_loop(cfg, out)


class Run:
    """A trained run, loaded from its latest checkpoint."""

    def __init__(self, path: str | Path):
        self.dir = RunDir(path)
        self.cfg, tok, self.model, self.checkpoint = load_run(self.dir)
        self.processor = build_processor(self.cfg, tok, self.model)

    def evaluate(self, task: str, data: str) -> dict[str, float]:
        """Metrics of one task (eval/tasks.py) on one data set; predictions to RUN/eval_<task>.jsonl."""
        return evaluate(self.model, self.processor, self.cfg, [(task, data)], out=self.dir.path)

    def require_images(self, what: str) -> None:
        """A one-line error where the run's items are not images (a series run: `generate` with an array)."""
        modality = source_kind(self.cfg).modality
        if modality is not IMAGES:
            raise UserError(f"{what} reads images; {self.dir.path} reads {modality.name} items (data.source="
                            f"{self.cfg.data.source}): ask it with --series FILE")

    def require_series(self, what: str) -> None:
        """A one-line error where the run's items are not series."""
        modality = source_kind(self.cfg).modality
        if modality is not TIME_SERIES:
            raise UserError(f"{what} reads a series; {self.dir.path} reads {modality.name} items (data.source="
                            f"{self.cfg.data.source})")

    def generate(self, image, prompt: str, max_new_tokens: int = 32) -> str:
        """The VLM's greedy answer to `prompt` about `image` (a PIL image or a file path; for a
        series run, a (channels, length) array)."""
        if not design(self.cfg.model).can(GENERATES):
            raise UserError(f"{self.dir.path} holds a {self.cfg.model} model, which does not generate text")
        image = load_image(image) if isinstance(image, (str, Path)) else image
        return answer(self.model, self.processor, [(image, prompt)], 1, max_new_tokens)[0]


def load(path: str | Path) -> Run:
    return Run(path)
