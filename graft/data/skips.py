"""Why records were skipped: counts by reason, rate-limited logging, and strict mode.

Bad data never crashes or stalls a run: each bad record is counted under one reason below and
the stream moves on (no sleep, no retry). The counts go into every `metrics.jsonl` record as
`data_skipped/<reason>` (cumulative, summed over ranks) and are printed at the end of the run.
With `data.strict=true` the first bad record stops the run instead, naming the record.

Notes are not skips: the record was used, but something about it is worth knowing (an image
converted to RGB, a conversation cut to fit the context).
"""

from __future__ import annotations

import sys
import time
from collections import Counter

REASONS = {
    "shard_missing": "a shard could not be opened (counted once per shard per epoch)",
    "shard_corrupt": "a tar shard is truncated or corrupt; records after the damage are lost",
    "image_missing": "the record has no image (no .jpg/.png/.webp, or no `image` field)",
    "image_not_found": "the image file the record names does not exist",
    "image_empty": "zero-byte image",
    "image_unreadable": "not an image (e.g. HTML or text saved as .jpg)",
    "image_truncated": "the image data ends early or is corrupt",
    "image_too_large": "over data.max_image_pixels, judged from the header before decoding",
    "text_missing": "no caption or conversation",
    "text_not_utf8": "the caption is not UTF-8",
    "text_bad_json": "the .json text is not valid JSON",
    "bad_conversation": "messages are not user/assistant turns",
    "empty_answer": "an assistant turn or caption is empty",
    "placeholder_mismatch": "image placeholders in the text do not match the image features",
    "answer_truncated": "no answer token fits in lm.max_seq_len (the loss would be empty)",
}
SHARD_REASONS = ("shard_missing", "shard_corrupt")  # not records: left out of the usable fraction
NOTES = {
    "converted_cmyk": "CMYK image converted to RGB",
    "converted_16bit": "16-bit image scaled to 8 bits",
    "converted_alpha": "transparent image composited onto black",
    "converted_palette": "palette image expanded to RGB",
    "sequence_truncated": "usable, but turns past lm.max_seq_len were dropped",
}
_FIRST_LOGGED = 3  # per reason; after that at most one line per reason every _LOG_EVERY_S
_LOG_EVERY_S = 30.0


class StrictError(Exception):
    """Raised on the first bad record when data.strict is set."""


class SkipLog:
    """Counts skipped records and notes; logs a few of each reason, then at most one line per 30 s."""

    def __init__(self, strict: bool = False, where: str = "data", quiet: bool = False):
        self.strict, self.where, self.quiet = strict, where, quiet
        self.skipped, self.notes = Counter(), Counter()
        self._last_logged: dict[str, float] = {}

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        if self.strict:
            raise StrictError(f"bad record {key} ({reason}{': ' + detail if detail else ''}); "
                              "set data.strict=false to skip and count bad records instead")
        self.skipped[reason] += 1
        n, now = self.skipped[reason], time.monotonic()
        if self.quiet:
            return
        if n <= _FIRST_LOGGED or now - self._last_logged.get(reason, 0.0) >= _LOG_EVERY_S:
            self._last_logged[reason] = now
            more = " (further ones are logged at most every 30 s)" if n == _FIRST_LOGGED else ""
            print(f"graft {self.where}: skipped {key}: {reason}{' ' + detail if detail else ''} "
                  f"[{n} so far]{more}", file=sys.stderr, flush=True)

    def note(self, name: str) -> None:
        self.notes[name] += 1

    def take(self) -> tuple[Counter, Counter]:
        """Counts since the last take (for shipping from a DataLoader worker to the trainer)."""
        out = (self.skipped, self.notes)
        self.skipped, self.notes = Counter(), Counter()
        return out


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
