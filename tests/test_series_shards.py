"""Series in webdataset shards (`data.source=series_shards`, data/series_shards.py): `.npy` members
opened without pickle, `.cls` labels, every record used or skipped with its reason, and the shard's
arrays are what a run reads."""

import io
import json

import numpy as np
import torch

from graft.config_checks import apply_overrides
from graft.data.samples import BadSample
from graft.data.sensors import SensorWorld
from graft.data.series_shards import SeriesShards
from graft.data.skips import SkipLog
from graft.data.streaming import read_record
from graft.recipes import sensors_vlm
from tests.data_helpers import Evil, write_tar
from tests.helpers import cli
from tests.test_series import built


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def series_shard(path, marker) -> list[np.ndarray]:
    """A shard of 8 usable records (6 with .cls, one (L, C) with a caption, one of 100 steps) and
    one of each way a series record can be bad; the usable recordings, in order."""
    world = SensorWorld()
    good = [world.sample("train", i).values for i in range(8)]
    good = [np.nan_to_num(x) for x in good]
    records = [(f"rec{i}", {"npy": npy(x), "cls": b"walking"}) for i, x in enumerate(good[:6])]
    records += [("turned", {"npy": npy(good[6].T), "txt": b"a person walking"}),
                ("short", {"npy": npy(good[7][:, :100]), "cls": b"lying"})]
    lying_header = npy(np.zeros((6, 256), np.float32)).replace(b"(6, 256)", b"(6, 99999)")
    records += [
        ("pickled", {"npy": npy(np.array([Evil(marker)], dtype=object), allow_pickle=True), "cls": b"x"}),
        ("liar", {"npy": lying_header, "cls": b"x"}),  # a header that claims 2.4 MB for 6 KB of data
        ("text", {"npy": npy(np.array(["a", "b"])), "cls": b"x"}),
        ("nonpy", {"cls": b"walking"}),
        ("gap", {"npy": npy(np.array([[0, 1]] * 3, dtype=np.int64)), "1.npy": npy(good[0]), "cls": b"x"}),
        ("latin1", {"npy": npy(good[0]), "cls": "café".encode("latin-1")}),
    ]
    write_tar(path, records)
    return good


def test_every_series_record_is_used_or_skipped_and_nothing_is_unpickled(capsys, tmp_path):
    series_shard(tmp_path / "s-0.tar", tmp_path / "unpickled")
    code, out, _ = cli(capsys, "data", "check", "sensors_vlm", "--set", "data.source=series_shards", "--set",
                       f"data.shards=[{tmp_path / 's-0.tar'}]", "--set", "eval.splits=[]")
    assert code == 0 and "14 records read = 8 used + 6 skipped" in out, out
    for reason, n in (("series_bad", 3), ("series_missing", 1), ("series_members", 1), ("text_not_utf8", 1)):
        assert f"{reason:<30}{n}" in out, (reason, out)
    assert not (tmp_path / "unpickled").exists()


def test_the_shards_arrays_are_what_a_run_reads(capsys, tmp_path):
    good = series_shard(tmp_path / "s-0.tar", tmp_path / "unpickled")
    cfg, _, proc = built(apply_overrides(sensors_vlm(), ["series.layers=1", "lm.layers=1", "data.source=series_shards",
                                                         f"data.shards=[{tmp_path / 's-0.tar'}]", "eval.splits=[]"]))
    source = SeriesShards(cfg.data.shards[0], 0, cfg.data)
    rows = {}
    for raw in source.epoch(0, 0, 1, SkipLog()):
        try:
            rows[raw["__key__"]] = read_record(proc, cfg.data, source, raw)[0]
        except BadSample:  # the bad records, counted by the test above
            continue
    assert torch.equal(rows["rec3"][2][0], torch.from_numpy(good[3]))
    assert torch.equal(rows["turned"][2][0], torch.from_numpy(good[6]))  # (L, C) read as (C, L)
    assert rows["short"][2][0].shape == (6, 96) and proc.tok.decode([t for t in rows["rec0"][1] if t >= 0]) == "walking"
    code, _, _ = cli(capsys, "train", "sensors_vlm", "--out", tmp_path / "run", "--set", "data.source=series_shards",
                     "--set", f"data.shards=[{tmp_path / 's-0.tar'}]", "--set", "eval.splits=[]",
                     "--set", "train.steps=3", "--set", "train.batch_size=4", "--set", "series.layers=1")
    assert code == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in entry for entry in log)
