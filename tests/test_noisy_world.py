"""The noisy-web world (data/noisy_world.py, `data.source=noisy`) and its export to img2dataset
shards with the truth beside each record (data/noisy_export.py, `graft data export-noisy`)."""

import io
import json
import tarfile
from collections import Counter

import pyarrow.parquet as pq
import pytest
from PIL import Image

from graft.data.noisy_world import BOILERPLATE, DEFAULT_NOISE, NOISE_KINDS, NoisyWorld, noise_shares
from graft.data.sources import build_sources
from graft.data.world_source import make_world
from graft.recipes import recipe
from tests.helpers import cli, one_line_error

N = 3000


def pool(*sets):
    cfg = recipe("clip", ["data.source=noisy", *sets])
    return NoisyWorld(make_world(cfg), noise_shares(cfg)), make_world(cfg)


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_each_kind_of_noise_is_what_it_says_at_its_share():
    """Over 3,000 records each kind comes at its share (within 4 standard errors), and each record
    is what its truth says: clean pairs and leaks are the world's own samples, a mismatch another
    scene's caption, a fragment the first words, boilerplate from the list, an exact duplicate an
    earlier record byte for byte, a near duplicate the origin's scene drawn again."""
    noisy, world = pool()
    records = [noisy.record(i) for i in range(N)]
    counts = Counter(r.noise.kind for r in records)
    for kind in (*NOISE_KINDS, "clean"):
        p = DEFAULT_NOISE.get(kind, 1 - sum(DEFAULT_NOISE.values()))
        assert abs(counts[kind] / N - p) < 4 * (p * (1 - p) / N) ** 0.5, (kind, counts[kind])
    for i, r in enumerate(records[:600]):
        split, j = r.noise.origin.split(" #")
        origin = world.sample(split, int(j))
        kind = r.noise.kind
        if kind == "exact_dup":
            first = next(k for k in range(i) if records[k].noise.kind != "exact_dup" and records[k].noise.origin == r.noise.origin
                         and records[k].caption == r.caption)
            assert png(records[first].image) == png(r.image)
            continue
        if kind == "near_dup":
            assert r.caption == origin.caption and png(r.image) != png(origin.image) and int(j) < i
            continue
        assert png(r.image) == png(origin.image)
        assert (split == "test") == (kind == "leak")
        if kind in ("clean", "leak"):
            assert r.caption == origin.caption
        elif kind == "mismatch":
            assert r.caption != origin.caption and r.caption.startswith("a ")
        elif kind == "fragment":
            assert origin.caption.startswith(r.caption + " ") and r.caption
        else:
            assert r.caption in BOILERPLATE


def test_the_pool_is_a_pure_function_of_the_seed_and_the_shares_reach_it():
    a, _ = pool()
    b, _ = pool()
    other_seed, _ = pool("data.seed=1")
    assert [(png(a.record(i).image), a.record(i).caption) for i in range(50)] == \
        [(png(b.record(i).image), b.record(i).caption) for i in range(50)]
    assert [a.record(i).caption for i in range(50)] != [other_seed.record(i).caption for i in range(50)]
    only, _ = pool("data.noise={boilerplate: 1.0}")
    assert all(only.record(i).caption in BOILERPLATE for i in range(100))


def test_a_run_on_the_noisy_source_reads_the_pools_captions():
    """What a dual encoder trains on with data.source=noisy is the pool's record i, caption and image."""
    cfg = recipe("clip", ["data.source=noisy", "data.noise={mismatch: 0.5, boilerplate: 0.5}"])
    source = build_sources(cfg)[0][0]
    noisy, _ = pool("data.noise={mismatch: 0.5, boilerplate: 0.5}")
    for i in range(20):
        example, record = source.example(i), noisy.record(i)
        assert example.turns[-1][1] == record.caption and png(example.images[0]) == png(record.image)


@pytest.mark.parametrize("sets, needle", [
    (["data.source=noisy", "data.noise={typo: 0.1}"], "typo"),
    (["data.source=noisy", "data.noise={mismatch: 1.5}"], "mismatch=1.5"),
    (["data.source=noisy", "data.noise={mismatch: 0.6, fragment: 0.6}"], "sum to 1.2"),
    (["data.noise={mismatch: 0.5}"], "data.noise"),  # the clean world reads no noise
])
def test_bad_noise_settings_are_one_line_errors(capsys, tmp_path, sets, needle):
    one_line_error(cli(capsys, "train", "clip", "--out", tmp_path / "run", *(a for s in sets for a in ("--set", s))), needle)
    assert not (tmp_path / "run").exists()


def test_export_writes_img2dataset_shards_with_the_truth(capsys, tmp_path):
    """Shards of 40 records: KEY.png/.txt/.json per record and a .parquet per shard whose rows are
    the pool's records with their noise and origin; an existing folder is refused."""
    out = tmp_path / "pool"
    code, stdout, _ = cli(capsys, "data", "export-noisy", "--out", out, "--n", 100, "--shard-size", 40)
    assert code == 0 and "data.shards=" in stdout
    assert sorted(p.name for p in out.iterdir()) == [f"0000{i}.{e}" for i in range(3) for e in ("parquet", "tar")]
    noisy, _ = pool()
    rows = [r for i in range(3) for r in pq.read_table(out / f"0000{i}.parquet").to_pylist()]
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(100)]
    for i, row in enumerate(rows):
        record = noisy.record(i)
        assert (row["caption"], row["noise"], row["origin"]) == (record.caption, record.noise.kind, record.noise.origin)
    with tarfile.open(out / "00001.tar") as tar:
        first = {m.name: tar.extractfile(m).read() for m in tar.getmembers()[:3]}
    assert sorted(first) == ["000000040.json", "000000040.png", "000000040.txt"]
    assert first["000000040.txt"].decode() == noisy.record(40).caption
    assert json.loads(first["000000040.json"])["noise"] == noisy.record(40).noise.kind
    assert png(Image.open(io.BytesIO(first["000000040.png"]))) == png(noisy.record(40).image)
    one_line_error(cli(capsys, "data", "export-noisy", "--out", out, "--n", 10), "exists")
