"""Why records were skipped: counts by reason, rate-limited logging, and strict mode.

Bad data never crashes or stalls a run: each bad record is counted under one reason below and
the stream moves on (no sleep, no retry). The counts go into every `metrics.jsonl` record as
`data_skipped/<reason>` (cumulative, summed over ranks) and are printed at the end of the run.
With `data.strict=true` the first bad record stops the run instead, naming the record.

Keys and details come from the data, so they are escaped (`printable`) before any line is printed.
Workers only count (`SkipLog`); the process that owns the counts prints them (`SkipReporter`), each
numbered with the running total of its reason, which survives a resume.

Notes are not skips: the record was used, but something about it is worth knowing (an image
converted to RGB, a conversation cut to fit the context).
"""

from __future__ import annotations

import sys
import time
from collections import Counter

REASONS = {
    "shard_missing": "a shard could not be opened (counted once per shard per epoch)",
    "shard_corrupt": "a tar shard is truncated, cut inside a header or has garbage; records after the damage are lost",
    "image_missing": "the record has no image (no .jpg/.png/.webp, or no `image` field)",
    "image_members": "webdataset image members other than one KEY.jpg or KEY.0.jpg, KEY.1.jpg, ... without a gap",
    "image_not_found": "the image file the record names does not exist",
    "image_outside_root": "the image path from the data leaves data.image_root (absolute, or .. out of it)",
    "image_empty": "zero-byte image",
    "image_unreadable": "not an image in data.image_formats (e.g. HTML saved as .jpg, an EPS file)",
    "image_truncated": "the image data ends early or is corrupt",
    "image_too_large": "over data.max_image_pixels (judged from the header) or data.max_image_bytes",
    "too_many_images": "more images than data.max_images (a dual encoder's pair: more than one)",
    "series_bad": "a series that is not a finite (channels, steps) array of series.channels x at most series.length "
                  "steps (a .npy member: numbers, its header true to its data), or has a gap (NaN) over series.max_gap steps",
    "series_missing": "a series shard's record has no .npy member",
    "series_members": "series members other than one KEY.npy or KEY.0.npy, KEY.1.npy, ... without a gap",
    "series_too_large": "a .npy member over data.max_image_bytes",
    "label_unknown": "a class label the file's header does not declare (.ts)",
    "text_missing": "no caption or conversation",
    "text_not_utf8": "the caption is not UTF-8 (or holds a lone surrogate escape)",
    "text_too_long": "caption or conversation over data.max_text_bytes",
    "text_bad_json": "the .json text is not valid JSON (or holds an integer of over 4300 digits)",
    "json_too_large": "a .json member or JSONL line over data.max_json_bytes",
    "json_too_deep": "JSON nested deeper than data.max_json_depth",
    "text_control_token": "a control-token string in the text that the chat template would not keep as text",
    "bad_conversation": "messages are not user/assistant turns",
    "bad_document": "an interleaved document's texts and images are not parallel lists, one of the two per position",
    "empty_answer": "an assistant turn or caption is empty",
    "placeholder_mismatch": "<image> markers and images differ in number, or an image's placeholders do not match its features",
    "answer_truncated": "no answer token (or no turn with an image) fits in lm.max_seq_len",
}
SHARD_REASONS = ("shard_missing", "shard_corrupt")  # not records: left out of the usable fraction
NOTES = {
    "converted_cmyk": "CMYK image converted to RGB",
    "converted_16bit": "16-bit image scaled to 8 bits",
    "converted_alpha": "transparent image composited onto black",
    "converted_palette": "palette image expanded to RGB",
    "sequence_truncated": "usable, but turns past lm.max_seq_len were dropped",
    "turns_truncated": "usable, but turns past data.max_turns were dropped",
}
_FIRST_LOGGED = 3  # per reason; after that at most one line per reason every _LOG_EVERY_S
_LOG_EVERY_S = 30.0


class StrictError(Exception):
    """Raised on the first bad record when data.strict is set."""


def printable(text: str, limit: int = 200) -> str:
    """An untrusted string (a tar member name, a path from JSON) made safe to print on one line:
    control and non-ASCII characters escaped, so data cannot forge log lines or move the cursor."""
    out = ascii(str(text))[1:-1]
    return out if len(out) <= limit else out[: limit - 3] + "..."


class SkipLog:
    """Counts skipped records and notes since the last `take`, with the first few skips of each
    reason as examples (key and detail escaped). It prints nothing itself: `SkipReporter` does, with
    running totals, in the process that owns the counts."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.skipped, self.notes = Counter(), Counter()
        self.examples: list[tuple[str, str, str]] = []  # (reason, key, detail)

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        if self.strict:
            raise StrictError(f"bad record {printable(key)} ({reason}{': ' + printable(detail) if detail else ''}); "
                              "set data.strict=false to skip and count bad records instead")
        self.skipped[reason] += 1
        if self.skipped[reason] <= _FIRST_LOGGED:
            self.examples.append((reason, printable(key), printable(detail)))

    def note(self, name: str) -> None:
        assert name in NOTES, name
        self.notes[name] += 1

    def take(self) -> tuple[Counter, Counter, list]:
        """Counts and examples since the last take (for shipping from a DataLoader worker)."""
        out = (self.skipped, self.notes, self.examples)
        self.skipped, self.notes, self.examples = Counter(), Counter(), []
        return out


class SkipReporter:
    """Prints skips with the running total per reason: the first few of each reason one by one,
    then at most one line per reason every 30 s. `totals` is the cumulative count (restored from
    a checkpoint on resume, so the numbers run on across restarts)."""

    def __init__(self, where: str, totals: Counter):
        self.where, self.totals, self._last = where, totals, {}

    def add(self, skipped: Counter, examples: list[tuple[str, str, str]]) -> None:
        """Count a worker's skips since its last report; `examples` are the first of them, in order."""
        now = time.monotonic()
        for reason, n in skipped.items():
            before = self.totals[reason]
            self.totals[reason] += n
            mine = [e for e in examples if e[0] == reason]
            for k, (_, key, detail) in enumerate(mine):
                if before + k + 1 <= _FIRST_LOGGED:
                    self._print(reason, key, detail, before + k + 1)
                    self._last[reason] = now
            if self.totals[reason] > _FIRST_LOGGED and mine and now - self._last.get(reason, -1e9) >= _LOG_EVERY_S:
                self._print(reason, mine[-1][1], mine[-1][2], self.totals[reason])
                self._last[reason] = now

    def _print(self, reason: str, key: str, detail: str, number: int) -> None:
        more = f" (further ones are logged at most every {_LOG_EVERY_S:.0f} s)" if number == _FIRST_LOGGED else ""
        print(f"graft {self.where}: skipped {key}: {reason}{' ' + detail if detail else ''} "
              f"[{number} so far]{more}", file=sys.stderr, flush=True)


def records_skipped(counts: Counter) -> int:
    return sum(n for reason, n in counts.items() if reason not in SHARD_REASONS)


def summary(skipped: Counter, notes: Counter, used: int) -> str:
    """Lines for the end of a run / `graft data check`: counts by reason with their meaning."""
    bad = records_skipped(skipped)
    total = used + bad
    lines = [f"data: {used} records used, {bad} skipped" + (f" ({bad / total:.1%})" if total else "")]
    for reason in REASONS:
        if skipped[reason]:
            lines.append(f"  skipped {reason:22s} {skipped[reason]:8d}  {REASONS[reason]}")
    for name in NOTES:
        if notes[name]:
            lines.append(f"  note    {name:22s} {notes[name]:8d}  {NOTES[name]}")
    return "\n".join(lines)
