"""Bad data never crashes or stalls a run: every bad case of issue 3 is skipped and counted by reason,
strict mode stops at the first one, and unusable data stops `graft data check` (exit 1) and the
trainer (exit 2, with the counts) instead of training on nothing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from graft.cli import main
from graft.config_checks import apply_overrides
from graft.data.check import check_data, processor_for
from graft.data.images import open_image
from graft.data.samples import BadSample
from graft.recipes import tiny
from graft.trainer.metrics import read
from tests.data_helpers import BAD_EXPECTED, NOTES_EXPECTED, SMALL, bad_shards, export, llava_json, png_header_only


def shard_args(pattern: str) -> list[str]:
    return ["--set", "data.source=webdataset", "--set", f'data.shards=["{pattern}"]']


def test_one_pass_counts_every_bad_case_by_reason(tmp_path, capsys):
    pattern, usable = bad_shards(tmp_path / "shards", tmp_path / "unpickled")
    cfg = apply_overrides(tiny(), ["data.source=webdataset", f'data.shards=["{pattern}"]'])
    result = check_data(cfg, processor_for(cfg), 10_000)
    assert dict(result.skipped) == BAD_EXPECTED
    assert dict(result.notes) == NOTES_EXPECTED  # valid odd images are converted and used, not skipped
    assert result.used == usable and result.ok
    assert main(["data", "check", "tiny", *shard_args(pattern)]) == 0
    out = capsys.readouterr().out
    assert "image_too_large" in out and "verdict: usable" in out
    assert not (tmp_path / "unpickled").exists()


def test_training_runs_through_every_bad_case_and_reports_counts(tmp_path, capsys):
    pattern, _ = bad_shards(tmp_path / "shards", tmp_path / "unpickled")
    run = tmp_path / "run"
    args = ["train", "tiny", "--out", str(run), *SMALL, *shard_args(pattern), "--set", "train.steps=8",
            "--set", "train.ckpt_every=8", "--set", "data.workers=2", "--set", "data.shuffle_buffer=16"]
    assert main(args) == 0
    records = [r for r in read(run) if r.get("event") != "eval"]
    assert [r["step"] for r in records] == list(range(1, 9))
    last = records[-1]
    for reason, per_pass in BAD_EXPECTED.items():  # 8 steps x 8 records read every shard at least once
        assert last[f"data_skipped/{reason}"] >= per_pass, reason
    for note in NOTES_EXPECTED:
        assert last[f"data_note/{note}"] >= 1, note
    assert last["data_skipped"] == sum(v for k, v in last.items() if k.startswith("data_skipped/image")
                                       or k.startswith("data_skipped/text") or k in (
                                           "data_skipped/empty_answer", "data_skipped/placeholder_mismatch"))
    out = capsys.readouterr()
    summary = next(line for line in out.out.splitlines() if line.startswith("data: "))
    assert f"{last['data_skipped']} skipped" in summary  # the end-of-run summary = the last metrics record
    assert "skipped image_truncated" in out.out
    assert out.err.count("skipped") < 100  # logging is rate-limited, not one line per record
    meta = json.loads((run / "checkpoints" / "step_00000008" / "meta.json").read_text())
    assert meta["data"]["ranks"][0]["skipped"]["image_unreadable"] == last["data_skipped/image_unreadable"]
    assert not (tmp_path / "unpickled").exists()


def test_strict_mode_stops_at_the_first_bad_record(tmp_path, capsys):
    pattern, _ = bad_shards(tmp_path / "shards", tmp_path / "unpickled")
    args = ["train", "tiny", "--out", str(tmp_path / "run"), *SMALL, *shard_args(pattern),
            "--set", "data.strict=true", "--set", "data.workers=0", "--set", "train.steps=4"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("graft: error: bad record") and "data.strict" in err


def test_unusable_data_is_refused_by_check_and_trainer(tmp_path, capsys):
    export("llava", tmp_path / "good", 16)
    records = json.loads((tmp_path / "good" / "llava.json").read_text())
    for r in records:
        for m in r["conversations"]:
            if m["from"] == "gpt":
                m["value"] = " "  # every answer empty: the loss would have nothing to learn from
    llava_json(tmp_path / "good" / "empty.json", records)
    empty = ["--set", "data.source=llava", "--set", f"data.path={tmp_path / 'good' / 'empty.json'}",
             "--set", "data.workers=0"]
    assert main(["data", "check", "tiny", *empty]) == 1
    assert "UNUSABLE" in capsys.readouterr().out

    run = tmp_path / "run"
    assert main(["train", "tiny", "--out", str(run), *SMALL, *empty]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "data check failed: 0 of" in err and "empty_answer=" in err
    assert not (run / "checkpoints").exists()

    good = ["--set", "data.source=llava", "--set", f"data.path={tmp_path / 'good' / 'llava.json'}"]
    assert main(["data", "check", "tiny", *good]) == 0
    # a context too short for any answer: every answer token would be masked
    assert main(["data", "check", "tiny", *good, "--set", "lm.max_seq_len=12"]) == 1
    assert "answer_truncated" in capsys.readouterr().out


def test_missing_shards_stop_the_trainer_with_counts(tmp_path, capsys):
    args = ["train", "tiny", "--out", str(tmp_path / "run"), *SMALL, *shard_args(f"{tmp_path}/none-{{0..3}}.tar"),
            "--set", "data.workers=2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "ran out of usable records" in err and "shard_missing=4" in err


def test_image_size_is_judged_from_the_header_before_decoding():
    with pytest.raises(BadSample, match="image_too_large"):
        open_image(png_header_only(3000, 3000), max_pixels=1_000_000)
    with pytest.raises(BadSample, match="image_truncated"):  # the same bytes, allowed: decoding fails
        open_image(png_header_only(3000, 3000), max_pixels=10_000_000)
    sources = Path(__file__).parent.parent / "graft"
    assert not [p for p in sources.rglob("*.py") if "MAX_IMAGE_PIXELS = None" in p.read_text()]


@pytest.mark.slow  # starts processes
def test_two_ranks_sum_their_counts_and_save_both_positions(tmp_path):
    """torchrun, 2 processes on gloo: each rank streams its own shards; metrics sum both ranks' skips."""
    pattern, _ = bad_shards(tmp_path / "shards", tmp_path / "unpickled")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "graft",
           "train", "tiny", "--out", str(run), *SMALL, *shard_args(pattern), "--set", "train.steps=4",
           "--set", "data.workers=1", "--set", "train.ckpt_every=4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = json.loads((run / "checkpoints" / "step_00000004" / "meta.json").read_text())["data"]["ranks"]
    assert len(ranks) == 2 and all(r["used"] == 4 * 8 for r in ranks)
    last = [r for r in read(run) if r.get("event") != "eval"][-1]
    for reason in {k for r in ranks for k in r["skipped"]}:
        assert last[f"data_skipped/{reason}"] == sum(r["skipped"].get(reason, 0) for r in ranks), reason
    # 4 shard URLs over 2 slots: each rank reads its own two, so both ranks meet different problems
    assert ranks[0]["skipped"] != ranks[1]["skipped"]
