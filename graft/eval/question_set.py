"""One question of a user's VQA data and a set of them, whatever the format they were read from
(eval/questions.py: LLaVA JSON, VLMEvalKit TSV; eval/vqav2.py: VQAv2)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from graft.data.skips import SkipLog


@dataclass
class Question:
    id: str
    image: bytes | Path
    question: str
    answer: str  # the reference: free text, or an option letter (VQAv2: the most common human answer)
    options: dict[str, str] | None = None  # letter → option text, for multiple choice
    answers: list[str] | None = None  # VQAv2: the human answers, scored by soft accuracy
    kind: str | None = None  # VQAv2: the answer_type (yes/no, number, other), for per-type accuracy


@dataclass
class QuestionSet:
    name: str
    items: object  # a callable giving Question per usable record
    log: SkipLog
