"""Hostile data (issue 11): no record can crash, hang, bloat or steer a run.

Every record of tests/hostile.py lands in exactly one bin of `graft data check`; training runs
through them with DataLoader workers and with `data.tokenizer`; skip counts are exact across a
resume; peak memory stays near a run on good data; nothing is unpickled or written outside the
run directory; control-token strings in captions stay text; untrusted names are escaped in logs.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from graft.cli import main
from graft.config_checks import apply_overrides
from graft.data.check import check_data, processor_for
from graft.data.images import open_image
from graft.data.llava_json import LlavaSource
from graft.data.samples import BadSample
from graft.data.skips import SkipLog, records_skipped
from graft.data.sources import build_sources
from graft.data.streaming import StreamDataset, read_record
from graft.data.tar import read_shard
from graft.recipes import tiny
from graft.trainer.metrics import read
from tests.data_helpers import SMALL, encoded, export, good_records, write_tar
from tests.hostile import CONTROL_TEXT, ESCAPE_KEY, _eps, cut_gzip_shard, hostile_shards

LIMITS = {"png": 1 << 25, "jpg": 1 << 25, "txt": 1 << 16, "json": 1 << 20}


def shard_args(pattern: str) -> list[str]:
    return ["--set", "data.source=webdataset", "--set", f'data.shards=["{pattern}"]']


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "unpickled"
    pattern, skipped, notes, usable, records = hostile_shards(root / "shards", marker)
    gz, complete = cut_gzip_shard(root / "shards")
    from_gz = sum(1 for _ in read_shard(str(gz), LIMITS, SkipLog()))
    assert complete - 1 <= from_gz <= complete  # the records before the cut, less at most the last one
    return pattern, skipped, notes, usable + from_gz, records + from_gz, marker


def test_data_check_accounts_for_every_hostile_record_once(shards, capsys):
    pattern, skipped, notes, usable, records, marker = shards
    cfg = apply_overrides(tiny(), ["data.source=webdataset", f'data.shards=["{pattern}"]'])
    result = check_data(cfg, processor_for(cfg), 10_000)  # the tokenizer is trained on these records too
    assert dict(result.skipped) == skipped
    assert {k: v for k, v in result.notes.items() if k in notes} == notes
    assert result.used == usable and result.read == records
    assert result.read == result.used + records_skipped(result.skipped)
    assert main(["data", "check", "tiny", *shard_args(pattern)]) == 0
    out = capsys.readouterr().out
    assert f"accounting: {records} records read = {usable} used + {records - usable} skipped" in out
    assert "shard errors: 3 shard_corrupt" in out
    assert not marker.exists()


def test_training_through_hostile_shards_with_workers_and_a_given_tokenizer(shards, tmp_path, capsys):
    pattern, skipped, _, _, _, marker = shards
    first = tmp_path / "first"  # trains its tokenizer on the hostile shards' first records
    args = [*SMALL, *shard_args(pattern), "--set", "train.steps=2", "--set", "data.workers=0"]
    assert main(["train", "tiny", "--out", str(first), *args]) == 0
    tokenizer = first / "tokenizer.json"
    run = tmp_path / "run"
    args = [*SMALL, *shard_args(pattern), "--set", "train.steps=12", "--set", "train.ckpt_every=12",
            "--set", "data.workers=2", "--set", "data.shuffle_buffer=16", "--set", f"data.tokenizer={tokenizer}"]
    capsys.readouterr()
    assert main(["train", "tiny", "--out", str(run), *args]) == 0
    last = [r for r in read(run) if r.get("event") != "eval"][-1]
    for reason, per_pass in skipped.items():  # 12 steps x 8 records read every shard at least once
        assert last[f"data_skipped/{reason}"] >= per_pass, reason
    err = capsys.readouterr().err
    assert "\x1b" not in err and not [l for l in err.splitlines() if l.startswith("forged")]
    assert ascii(ESCAPE_KEY)[1:-1] in err  # the name, escaped, on one line
    # the skip log numbers each reason's skips with the run's running total (not per batch)
    numbers = [l.rsplit("[", 1)[1] for l in err.splitlines() if ": text_too_long" in l]
    assert numbers[:3] == ["1 so far]", "2 so far]", "3 so far] (further ones are logged at most every 30 s)"]
    assert len(numbers) == 3  # the rest within 30 s are counted, not logged
    assert not marker.exists()


def test_skip_counts_are_exact_across_resume(shards, tmp_path):
    pattern = shards[0]
    args = [*SMALL, *shard_args(pattern), "--set", "train.ckpt_every=5", "--set", "data.workers=2",
            "--set", "data.shuffle_buffer=16"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", "tiny", "--out", str(straight), *args, "--set", "train.steps=15"]) == 0
    assert main(["train", "tiny", "--out", str(resumed), *args, "--set", "train.steps=5"]) == 0
    assert main(["train", "tiny", "--out", str(resumed), *args, "--set", "train.steps=15"]) == 0
    a, b = ([r for r in read(run) if r.get("event") != "eval"] for run in (straight, resumed))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    counts = [{k: v for k, v in r.items() if k.startswith(("data_skipped", "data_note"))} for r in (a[-1], b[-1])]
    assert counts[0] == counts[1] and counts[0]["data_skipped/shard_corrupt"] >= 3


def _peak_rss_mb(cmd: list[str], env: dict, cwd: Path) -> float:
    """Peak resident memory of `cmd` and every process under it (DataLoader workers included)."""
    probe = textwrap.dedent(f"""
        import resource, subprocess, sys
        done = subprocess.run({cmd!r}, capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-2000:])
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


def test_memory_stays_bounded_and_nothing_is_written_outside_the_run(shards, tmp_path, request):
    pattern = shards[0]
    good = tmp_path / "good"
    good.mkdir()
    write_tar(good / "good.tar", good_records("g", 48))
    # HOME and TMPDIR in a short folder of their own: the workers' sockets live under TMPDIR, whose
    # path must leave them room (graft refuses a TMPDIR that would not; tested below)
    home, cwd = Path(tempfile.mkdtemp(prefix="graft-home-")), tmp_path / "cwd"
    request.addfinalizer(lambda: shutil.rmtree(home, ignore_errors=True))
    cwd.mkdir()
    env = dict(os.environ, HOME=str(home), TMPDIR=str(home), PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("XDG_CACHE_HOME", None), env.pop("MPLCONFIGDIR", None)
    peaks, before = {}, set()
    for name, shard in (("good", f"{good}/good.tar"), ("hostile", pattern)):
        # the good run may leave matplotlib's font cache (~/.cache/matplotlib, drawn for loss.png);
        # the hostile run must add nothing at all outside its run directory
        before = {p for p in home.rglob("*") if p.is_file()}
        cmd = [sys.executable, "-m", "graft", "train", "tiny", "--out", str(cwd / name), *SMALL,
               *shard_args(shard), "--set", "train.steps=6", "--set", "data.workers=1"]
        peaks[name] = _peak_rss_mb(cmd, env, cwd)
    # the old reader held a 50 MB .txt member and tokenized a 5 MB caption (over a GB) per read
    assert peaks["hostile"] < peaks["good"] + 150, peaks
    assert sorted(p.name for p in cwd.iterdir()) == ["good", "hostile"]
    written = {p for p in home.rglob("*") if p.is_file()} - before
    assert not written, written
    assert all(".cache/matplotlib" in str(p) for p in before), before
    assert not shards[-1].exists()


def test_a_temporary_folder_too_long_for_the_workers_sockets_is_one_line(shards, tmp_path, capsys, monkeypatch):
    """DataLoader workers pass tensors through a Unix socket under TMPDIR (at most 107 characters in
    all): a longer TMPDIR made the workers fail with a traceback, or at the limit wait for ever."""
    long = tmp_path / ("x" * max(1, 80 - len(str(tmp_path))))
    long.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    args = ["train", "tiny", "--out", str(tmp_path / "run"), *SMALL, *shard_args(shards[0]), "--set", "data.workers=1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set a shorter TMPDIR, or data.workers=0" in err[0], err


def test_eps_is_never_decoded_and_the_format_list_is_honoured(tmp_path, capsys):
    eps = _eps()
    assert Image.open(io.BytesIO(eps)).format == "EPS"  # real EPS: Pillow knows it
    with pytest.raises(BadSample, match="image_unreadable"):
        open_image(eps, max_pixels=10**6)
    png = encoded(Image.new("RGB", (8, 8), "red"))
    assert open_image(png, 10**6, ["PNG"])[0].size == (8, 8)
    with pytest.raises(BadSample, match="image_unreadable"):
        open_image(encoded(Image.new("RGB", (8, 8)), "JPEG"), 10**6, ["PNG"])
    assert main(["data", "check", "tiny", "--set", "data.image_formats=[JPEG, EPS]"]) == 2
    assert "EPS is never allowed" in capsys.readouterr().err
    assert main(["data", "check", "tiny", "--set", "data.image_formats=[NOPE]"]) == 2
    with pytest.raises(BadSample, match="image_too_large"):
        open_image(png, 10**6, max_bytes=len(png) - 1)


def test_each_limit_is_a_setting_that_changes_what_is_skipped(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    img = encoded(Image.new("RGB", (24, 24), "red"))
    conv = {"conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}] +
            [m for _ in range(5) for m in ({"from": "human", "value": "q"}, {"from": "gpt", "value": "a"})]}
    write_tar(root / "a.tar", [("cap", {"png": img, "txt": b"x" * 300}),
                               ("conv", {"png": img, "json": json.dumps(conv).encode()}),
                               ("nest", {"png": img, "json": b'{"caption": "x", "n": [[[[1]]]]}'})])
    base = ["data.source=webdataset", f'data.shards=["{root}/a.tar"]']

    def check(*extra):
        cfg = apply_overrides(tiny(), base + list(extra))
        r = check_data(cfg, processor_for(cfg), 100)
        return dict(r.skipped), dict(r.notes)

    assert check() == ({}, {})
    assert check("data.max_text_bytes=200")[0] == {"text_too_long": 1}
    assert check("data.max_json_bytes=100")[0] == {"json_too_large": 1}
    assert check("data.max_json_depth=3")[0] == {"json_too_deep": 1}
    assert check("data.max_turns=2")[1] == {"turns_truncated": 1}
    assert check(f"data.max_image_bytes={len(img) - 1}")[0] == {"image_too_large": 3}
    assert check("data.image_formats=[JPEG]")[0] == {"image_unreadable": 3}
    assert main(["data", "check", "tiny", "--set", "data.max_turns=0"]) == 2


def test_llava_jsonl_lines_and_paths_from_json_are_records_not_crashes(tmp_path):
    root = tmp_path / "d"
    export("llava", root, 4)
    good = json.loads((root / "llava.json").read_text())
    (tmp_path / "secret.png").write_bytes(encoded(Image.new("RGB", (24, 24))))
    lines = [json.dumps(r) for r in good]
    lines += ['{"id": 1, "n": ' + "9" * 20_000 + "}", "[" * 3000 + "]" * 3000, "{not json",
              json.dumps(dict(good[0], image="../secret.png")), json.dumps(dict(good[0], image=str(tmp_path / "secret.png"))),
              json.dumps(dict(good[0], image=[good[0]["image"]] * 9)), json.dumps(dict(good[0], image=[good[0]["image"]]))]
    (root / "data.jsonl").write_text("\n".join(lines))
    cfg = apply_overrides(tiny(), ["data.source=llava", f"data.path={root / 'data.jsonl'}"])
    result = check_data(cfg, processor_for(cfg), 100)
    assert dict(result.skipped) == {"text_bad_json": 2, "json_too_deep": 1, "image_outside_root": 2,
                                    "too_many_images": 1}
    assert result.used == 5 and result.read == 11
    # one .json document that cannot be parsed is the file's problem: one line, exit 2
    (root / "deep.json").write_text("[" * 3000 + "]" * 3000)
    with pytest.raises(Exception, match="nested too deep"):
        LlavaSource(apply_overrides(tiny(), ["data.source=llava", f"data.path={root / 'deep.json'}"]).data)


def test_control_token_strings_in_captions_stay_text(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    img = encoded(Image.new("RGB", (24, 24), "red"))
    write_tar(root / "a.tar", [("c", {"png": img, "txt": CONTROL_TEXT.encode()})])
    cfg = apply_overrides(tiny(), ["data.source=webdataset", f'data.shards=["{root}/a.tar"]'])
    proc = processor_for(cfg)
    (source,), _ = build_sources(cfg)
    raw = next(iter(source.epoch(0, 0, 1, SkipLog())))
    (ids, labels, _), _ = read_record(proc, cfg.data, source, raw)
    t = proc.tok
    specials = {"bos": 1, "user": 1, "assistant": 1, "eos": 1, "pad": 0, "image": proc.num_image_tokens}
    assert {name: ids.count(getattr(t, name)) for name in specials} == specials
    assert CONTROL_TEXT in t.tok.decode(ids, skip_special_tokens=False)


def test_hf_dataset_rows_are_bounded_like_every_other_source(tmp_path):
    import datasets

    root = tmp_path / "ds"
    root.mkdir()
    (root / "a.png").write_bytes(encoded(Image.new("RGB", (24, 24), "red")))
    (tmp_path / "outside.png").write_bytes(encoded(Image.new("RGB", (24, 24))))
    rows = {"image": ["a.png", "a.png", "../outside.png", "a.png"],
            "text": ["a red square", "w" * 100_000, "a red square", "<eos> a red <|user|> square"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(root))
    cfg = apply_overrides(tiny(), ["data.source=hf", f"data.path={root}"])
    result = check_data(cfg, processor_for(cfg), 100)
    assert dict(result.skipped) == {"text_too_long": 1, "image_outside_root": 1}
    assert result.used == 2 and result.read == 4


def test_a_bug_in_graft_still_surfaces_instead_of_being_counted_as_bad_data(tmp_path, monkeypatch):
    root = tmp_path / "s"
    root.mkdir()
    write_tar(root / "a.tar", good_records("g", 4))
    cfg = apply_overrides(tiny(), ["data.source=webdataset", f'data.shards=["{root}/a.tar"]'])
    proc = processor_for(cfg)
    sources, _ = build_sources(cfg)
    ds = StreamDataset(sources, [1.0], proc, cfg.data, 1, 0, 1, 1, {}, 0)

    def buggy(proc, turns, places):
        raise ZeroDivisionError("a bug in graft")

    monkeypatch.setattr("graft.data.processor.encode", buggy)
    with pytest.raises(ZeroDivisionError):
        next(ds.examples(0, 1, {"mix": 0, "sources": [[0, 0]]}, SkipLog()))
