"""VQAv2: its questions/annotations layout, and the official soft accuracy over 10 human answers.

Scoring follows the official evaluation (GT-Vision-Lab/VQA, `vqaEval.py`), behaviour for behaviour:

- Newlines and tabs become spaces and the ends are stripped, in the prediction and every human answer.
- Only when the human answers differ (after that) are they and the prediction normalised: listed
  punctuation removed or turned into a space, a full stop not followed by a digit dropped, lower
  case, number words to digits, articles dropped, apostrophe-less contractions restored. When all
  humans agree the comparison is exact ("Yes" scores 0 against ten "yes"), as in the reference.
- Accuracy = mean over the human answers of min(1, #other human answers equal to the prediction / 3):
  1, 2, 3, 4 of 10 matching score 0.3, 0.6, 0.9, 1.0. (The reference drops answers equal to this
  one as records, {answer, answer_id, confidence}; with distinct answer_ids that is "the other 9".)

Layout: `--data` is a folder with one `*questions*.json` and one `*annotations*.json`, or the
questions JSON itself with the annotations as the one `*annotations*.json` beside it;
`eval.vqa_annotations` names the annotations file instead. Images are looked up under
`eval.image_root` (default: the questions file's folder) as `COCO_<data_subtype>_<id:012d>.jpg`,
`<id:012d>.jpg`, `<id>.jpg`, then `<id>.png`. Both files are read through the data limits; a
record missing a field, or an image missing, is skipped and counted; a question without an
annotation is an error naming both.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from graft.data.limits import image_path, read_document
from graft.data.samples import BadSample
from graft.data.skips import SkipLog, printable
from graft.errors import UserError
from graft.eval.labelled import image_folder
from graft.eval.question_set import Question, QuestionSet

# ---- the official answer normalisation -----------------------------------------------------------

PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # not "." (handled apart), "'", ":", "#", "$", "%", "&", "*"
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# The contracted forms the reference restores; each is reached from every spelling of it with one
# apostrophe dropped ("dont" → "don't"; "couldnt've" and "couldn'tve" → "couldn't've"). Its keys
# with capitals (Im, Ive, Id've) never meet the lower-cased text, and let's/she's map to themselves:
# both left out, as they change nothing.
CONTRACTED = ["'ow's'at", "'twas", "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "isn't", "it'd", "it'd've", "it'll", "ma'am", "might've", "mightn't", "mightn't've", "must've", "mustn't", "needn't", "not've", "o'clock", "oughtn't", "shan't", "she'd've", "should've", "shouldn't", "shouldn't've", "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've", "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'd've", "y'all'll", "you'd", "you'd've", "you'll", "you're", "you've"]
CONTRACTIONS = {full[:i] + full[i + 1:]: full for full in CONTRACTED for i, c in enumerate(full) if c == "'"}
CONTRACTIONS["somebody'd"] = "somebodyd"  # sic: the reference maps this one the other way round
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_FULL_STOP = re.compile(r"\.(?!\d)")  # the reference's "(?!<=\d)" is a lookahead that always holds


def _punctuation(text: str) -> str:
    """Each listed mark is removed where it touches a space (or anywhere, once the text holds a
    digit,digit comma: "1,000" → "1000"), else turned into a space ("cat,dog" → "cat dog"); then full
    stops not followed by a digit go ("yes." → "yes", "2.5" stays). Decided on the input text."""
    out = text
    for p in PUNCTUATION:
        touching = p + " " in text or " " + p in text or _DIGIT_COMMA_DIGIT.search(text)
        out = out.replace(p, "" if touching else " ")
    return _FULL_STOP.sub("", out, count=32)  # the reference passes re.UNICODE (= 32) as the count


def _words(text: str) -> str:
    """Lower case, number words → digits, articles dropped, contractions restored, single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalise_answer(text: str) -> str:
    """The official normalisation of one answer (applied only when the human answers differ)."""
    return _words(_punctuation(text))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def soft_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one prediction: mean over answers i of min(1, #{j != i : answers[j] == prediction} / 3)."""
    pred, human = _clean(prediction), [_clean(a) for a in answers]
    if len(set(human)) > 1:
        pred, human = normalise_answer(pred), [normalise_answer(a) for a in human]
    same = sum(a == pred for a in human)
    return sum(min(1.0, (same - (a == pred)) / 3) for a in human) / len(human)


# ---- the layout: questions JSON + annotations JSON ---------------------------------------------


def load_vqav2(path: Path, cfg) -> QuestionSet:
    """`path`: a folder holding the questions and annotations JSON, or the questions JSON itself."""
    questions = _one(path, "*questions*.json") if path.is_dir() else path
    doc = read_document(questions, "--data")
    if not isinstance(doc, dict) or not isinstance(doc.get("questions"), list):
        raise UserError(f"--data {questions}: expected an object with a `questions` list (VQAv2) "
                        "or a list of records (LLaVA)")
    subtype = doc.get("data_subtype")
    root, d, log = image_folder(cfg, questions), cfg.data, SkipLog()
    where, annotations = _annotations(questions, cfg.eval.vqa_annotations)
    _check_answered(doc["questions"], annotations, where)  # before any answer is generated

    def items():
        for n, rec in enumerate(doc["questions"]):
            try:
                yield _question(rec, annotations, subtype, root, d)
            except BadSample as err:
                qid = rec.get("question_id") if isinstance(rec, dict) else None
                log.skip(err.reason, f"{questions.name}[{n}] question_id={printable(str(qid), 40)}", err.detail)

    return QuestionSet(questions.name, items, log)


def _one(folder: Path, pattern: str, hint: str = "") -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        names = ", ".join(f.name for f in found[:4]) or "none"
        raise UserError(f"--data {folder}: expected one {pattern} there (VQAv2 layout), found {names}{hint}")
    return found[0]


def _annotations(questions: Path, named: str | None) -> tuple[Path, dict]:
    """(the annotations file, its annotations by question_id); `named` (eval.vqa_annotations) wins."""
    key = "eval.vqa_annotations" if named else "--data"
    hint = "; or name one with eval.vqa_annotations"
    path = Path(named) if named else _one(questions.parent, "*annotations*.json", hint)
    if not path.is_file():
        raise UserError(f"{key}: VQAv2 annotations file not found: {path}")
    doc = read_document(path, key)
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
        raise UserError(f"{key}: {path}: expected an object with an `annotations` list (VQAv2 annotations)")
    by_id = {a["question_id"]: a for a in doc["annotations"] if isinstance(a, dict) and _is_id(a.get("question_id"))}
    return path, by_id


def _check_answered(records: list, annotations: dict, where: Path) -> None:
    for rec in records:
        qid = rec.get("question_id") if isinstance(rec, dict) else None
        if _is_id(qid) and qid not in annotations:
            raise UserError(f"{where}: no annotation for question_id {printable(str(qid), 40)}")


def _is_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _question(rec, annotations: dict, subtype, root: Path, d) -> Question:
    """One question joined with its human answers (BadSample when a field is missing)."""
    if not isinstance(rec, dict) or not _is_id(rec.get("question_id")):
        raise BadSample("text_missing", "no question_id")
    if not isinstance(rec.get("question"), str) or not rec["question"].strip():
        raise BadSample("text_missing", "no question")
    if not isinstance(rec.get("image_id"), int) or isinstance(rec["image_id"], bool):
        raise BadSample("image_missing", "no integer image_id")
    ann = annotations[rec["question_id"]]
    human = ann.get("answers")
    if not (isinstance(human, list) and human and all(isinstance(a, dict) and isinstance(a.get("answer"), str)
                                                      for a in human)):
        raise BadSample("text_missing", "the annotation has no `answers` list of {answer: text}")
    if not isinstance(ann.get("answer_type"), str):
        raise BadSample("text_missing", "the annotation has no answer_type")
    answers = [a["answer"] for a in human]
    if len(rec["question"]) + sum(map(len, answers)) > d.max_text_bytes:
        raise BadSample("text_too_long", f"over data.max_text_bytes={d.max_text_bytes}")
    image = _image(root, subtype, rec["image_id"])
    common = Counter(answers).most_common(1)[0][0]
    return Question(str(rec["question_id"]), image, rec["question"].strip(), common, answers=answers,
                    kind=printable(ann["answer_type"], 40))


def _image(root: Path, subtype, image_id: int) -> Path:
    names = [f"{image_id:012d}.jpg", f"{image_id}.jpg", f"{image_id}.png"]
    names = [f"COCO_{subtype}_{image_id:012d}.jpg"] * isinstance(subtype, str) + names
    for name in names:
        if (path := image_path(root, name)).is_file():
            return path
    raise BadSample("image_not_found", f"none of {', '.join(names)}")
