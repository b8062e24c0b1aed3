"""graft.data.tar.read_shard: every record of a good shard, in order; any damage counted once as
shard_corrupt with what was lost, the records before it still yielded; bounded memory and time
whatever a member or header claims; untrusted names escaped in the log."""

import bz2
import gzip
import io
import lzma
import pickle
import random
import tarfile
import tracemalloc

import pytest

from graft.data.skips import SkipLog
from graft.data.tar import MAX_HEADER_BYTES, read_shard
from tests.data_helpers import Evil

LIMITS = {"png": 1 << 20, "txt": 1 << 20, "json": 1 << 20}
RECORDS = [(f"r{i}", {"png": b"png %d" % i, "txt": b"caption %d" % i}) for i in range(5)]
CORRUPT = {"shard_corrupt": 1}


class Log(SkipLog):
    """A real SkipLog that also keeps each detail exactly as read_shard wrote it."""

    def __init__(self):
        super().__init__()
        self.details = []

    def skip(self, reason, key, detail=""):
        self.details.append(detail)
        super().skip(reason, key, detail)


def tar_bytes(records, fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for key, members in records:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}" if ext else key)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def member(data: bytes, name: str) -> tarfile.TarInfo:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getmember(name)


def raw_header(kind: bytes, payload: bytes = b"", size: int | None = None) -> bytes:
    """One header block of type `kind` (pax, GNU long name...) and its payload, written by hand."""
    info = tarfile.TarInfo("././@hostile")
    info.type, info.size = kind, len(payload) if size is None else size
    return info.tobuf(tarfile.GNU_FORMAT) + payload + b"\0" * (-len(payload) % 512)


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + len(str(len(body)))
    return str(n + (len(str(n)) > len(str(len(body))))).encode() + body


def read(path, limits=LIMITS):
    log = Log()
    return list(read_shard(str(path), limits, log)), log


def keys(recs) -> list[str]:
    return [r["__key__"] for r in recs]


def test_good_shard_yields_every_record_in_order_reading_only_wanted_members(tmp_path):
    marker = tmp_path / "unpickled"
    evil = pickle.dumps(Evil(marker))
    records = [(key, {**m, "pyd": evil}) for key, m in RECORDS]
    records += [("r4", {"txt": b"a second r4.txt"}), ("r5", {"PNG": b"upper", "json": b"{}"}),
                ("README", {"": b"no extension"}), ("__meta__", {"txt": b"not a record"})]
    path = tmp_path / "good.tar"
    path.write_bytes(tar_bytes(records))
    recs, log = read(path)
    url = str(path)
    expected = [{"__key__": k, "__url__": url, **m, "__unread__": ["pyd"]} for k, m in RECORDS]
    expected += [{"__key__": "r5", "__url__": url, "png": b"upper", "json": b"{}"},
                 {"__key__": "README", "__url__": url, "__unread__": ["(no extension)"]},
                 {"__key__": "__meta__", "__url__": url, "txt": b"not a record"}]
    # r4 keeps its first .txt; .pyd is never read; README and __meta__ are records like any other
    # (counted as skipped by the source that finds no image in them), not lost
    assert recs == expected
    assert not log.skipped and not marker.exists()


@pytest.mark.parametrize("fmt", ["tar.gz", "tar.bz2", "tar.xz"])
def test_compressed_shards_read_like_plain_ones(tmp_path, fmt):
    compress = {"tar.gz": gzip.compress, "tar.bz2": bz2.compress, "tar.xz": lzma.compress}[fmt]
    path = tmp_path / f"good.{fmt}"
    path.write_bytes(compress(tar_bytes(RECORDS)))
    recs, log = read(path)
    assert keys(recs) == [k for k, _ in RECORDS] and recs[3]["png"] == b"png 3" and not log.skipped


def damaged(case: str, data: bytes) -> tuple[bytes, str]:
    """`data` (the tar of RECORDS) damaged as `case` says, and the detail that must be logged."""
    at = member(data, "r3.png").offset  # r3's first header: r0, r1 are yielded, r2 is still open
    lost = "after 2 records; record 'r2' and the rest of the shard are lost"
    if case == "cut inside a header":
        return data[: at + 100], f"cut inside a header at byte {at} {lost}"
    if case == "cut at a member boundary":
        return data[:at], f"no end-of-archive marker (the shard ends at byte {at}, between members) {lost}"
    if case == "garbage header":
        junk = random.Random(0).randbytes(512)
        return data[:at] + junk + data[at:], f"bad header at byte {at} ('invalid header') {lost}"
    if case == "cut inside data":
        cut = member(data, "r3.png").offset_data + 2
        return data[:cut], ("unreadable (ReadError: 'unexpected end of data') after 3 records; "
                            "record 'r3' and the rest of the shard are lost")
    assert case == "garbage after the end"
    return data + b"garbage", f"garbage after the end-of-archive marker at byte {len(data)} after 5 records; " \
                              "the rest of the shard is lost"


@pytest.mark.parametrize("case", ["cut inside a header", "cut at a member boundary", "garbage header",
                                  "cut inside data", "garbage after the end"])
def test_damage_is_counted_once_after_the_records_before_it(tmp_path, case):
    data, detail = damaged(case, tar_bytes(RECORDS))
    path = tmp_path / "bad.tar"
    path.write_bytes(data)
    recs, log = read(path)
    n = {"cut inside data": 3, "garbage after the end": 5}.get(case, 2)
    assert keys(recs) == [k for k, _ in RECORDS][:n] and recs[-1]["txt"] == b"caption %d" % (n - 1)
    assert log.skipped == CORRUPT and log.details == [detail]


@pytest.mark.parametrize("case", ["truncated", "garbage inside", "garbage after"])
def test_damaged_tar_gz_is_counted_once_after_the_records_before_it(tmp_path, case):
    rng = random.Random(0)
    records = [(f"r{i}", {"png": rng.randbytes(4000), "txt": b"caption"}) for i in range(8)]
    gz = gzip.compress(tar_bytes(records))
    mid = len(gz) // 2
    gz = {"truncated": gz[:mid], "garbage inside": gz[:mid] + b"\xff" * 64 + gz[mid + 64:],
          "garbage after": gz + b"garbage"}[case]
    path = tmp_path / "bad.tar.gz"
    path.write_bytes(gz)
    recs, log = read(path)
    n = len(recs)
    assert keys(recs) == [k for k, _ in records][:n] and recs[-1]["png"] == records[n - 1][1]["png"]
    assert n < len(records) and (case != "garbage after" or n == len(records) - 1)
    assert log.skipped == CORRUPT
    # deflate may decode garbage into bytes that fail as a tar header before the CRC check fails
    why = {"truncated": "unreadable (EOFError: 'Compressed file ended", "garbage inside": "",
           "garbage after": "unreadable (BadGzipFile: 'Not a gzipped file"}[case]
    assert log.details[0].startswith(why) and f"after {n} records; record 'r{n}' and the rest" in log.details[0]


@pytest.mark.parametrize("where", ["nope.tar", ".", "pipe:cat {tmp}/nope.tar"])
def test_a_shard_that_cannot_be_opened_is_missing(tmp_path, where):
    url = where.format(tmp=tmp_path) if where.startswith("pipe:") else tmp_path / where
    recs, log = read(url)
    assert recs == [] and log.skipped == {"shard_missing": 1}


def test_a_member_over_its_limit_is_not_read_and_the_next_records_are(tmp_path):
    big = 50_000_000
    records = [RECORDS[0], ("big", {"png": b"png", "txt": bytes(big)}), RECORDS[1]]
    path = tmp_path / "big.tar"
    path.write_bytes(tar_bytes(records))
    del records
    tracemalloc.start()
    try:
        recs, log = read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert keys(recs) == ["r0", "big", "r1"] and recs[2]["txt"] == b"caption 1" and not log.skipped
    assert recs[1] == {"__key__": "big", "__url__": str(path), "png": b"png", "__oversize__": {"txt": big}}
    assert peak < 5_000_000, peak


@pytest.mark.timeout(120)  # a hang guard: tarfile's own seek would read past the end 10 KiB at a time, for ever
def test_a_size_claiming_a_petabyte_ends_at_the_end_of_the_data(tmp_path):
    path = tmp_path / "claims.tar"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(tarfile.TarInfo("r0.txt"))
        info = tarfile.TarInfo("r1.txt")
        info.size = 1 << 50
        tf.addfile(info)  # the header only: the data it claims never comes
    path.write_bytes(buf.getvalue())
    recs, log = read(path)
    assert keys(recs) == ["r0"] and log.skipped == CORRUPT
    assert log.details == ["unreadable (ReadError: 'unexpected end of data') after 1 record; "
                           "record 'r1' and the rest of the shard are lost"]


@pytest.mark.parametrize("case", ["pax holding 8 MiB", "pax claiming 4 GiB", "long name + pax chain",
                                  "global pax headers adding up"])
def test_huge_headers_are_refused_unread(tmp_path, case):
    half = raw_header(tarfile.XHDTYPE, b"a" * (MAX_HEADER_BYTES // 2 + 1000))
    hostile = {
        "pax holding 8 MiB": raw_header(tarfile.XHDTYPE, pax_record("comment", "x" * (8 << 20))),
        "pax claiming 4 GiB": raw_header(tarfile.XHDTYPE, size=4 << 30),
        "long name + pax chain": raw_header(tarfile.GNUTYPE_LONGNAME, b"n" * (MAX_HEADER_BYTES // 2)) + half,
        "global pax headers adding up": b"".join(
            raw_header(tarfile.XGLTYPE, pax_record(f"k{i}", "g" * (MAX_HEADER_BYTES // 3))) + raw_header(b"0")
            for i in range(4)),
    }[case]
    data = tar_bytes(RECORDS[:3])
    at = member(data, "r2.png").offset
    path = tmp_path / "hostile.tar"
    path.write_bytes(data[:at] + hostile + data[at:])
    tracemalloc.start()
    try:
        recs, log = read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the global headers come with empty members of their own (a record "././@hostile"): r1 is
    # complete before them; elsewhere the damage comes while r1 could still get members
    assert keys(recs) == (["r0", "r1"] if case.startswith("global") else ["r0"]) and log.skipped == CORRUPT
    assert "pax/long-name headers of" in log.details[0]
    assert peak < 5_000_000, peak


def test_names_in_the_log_are_escaped_and_cut(tmp_path):
    evil = "evil\n\x1b[2J" + "x" * 200
    data = tar_bytes([RECORDS[0], (evil, {"png": b"png", "txt": b"caption"})])
    last = member(data, f"{evil}.txt")
    path = tmp_path / "evil.tar"
    path.write_bytes(data[: last.offset_data + 512])  # no end-of-archive marker: the evil record is lost
    recs, log = read(path)
    assert keys(recs) == ["r0"] and log.skipped == CORRUPT
    detail = log.examples[0][2]  # as SkipLog keeps it for the log line
    assert detail.isprintable() and "\x1b" not in detail and len(detail) <= 200
    assert "record 'evil\\n\\x1b[2Jxxx" in detail and "\n" not in detail


def test_directories_links_and_devices_are_never_read(tmp_path):
    """A folder entry is part of no record; links and devices belong to their key's record (so that
    a record of nothing else is still counted) but are never followed or read."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, kind, link in [("r0.png", tarfile.DIRTYPE, ""), ("r0.txt", tarfile.REGTYPE, ""),
                                 ("r1.png", tarfile.SYMTYPE, "/etc/passwd"), ("r1.txt", tarfile.LNKTYPE, "r0.txt"),
                                 ("r1.json", tarfile.FIFOTYPE, ""), ("r2.png", tarfile.CHRTYPE, ""),
                                 ("r2.txt", tarfile.REGTYPE, "")]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            data = name.encode() if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path = tmp_path / "links.tar"
    path.write_bytes(buf.getvalue())
    recs, log = read(path)
    url = str(path)
    assert recs == [{"__key__": "r0", "__url__": url, "txt": b"r0.txt"},
                    {"__key__": "r1", "__url__": url, "__unread__": ["png", "txt", "json"]},
                    {"__key__": "r2", "__url__": url, "__unread__": ["png"], "txt": b"r2.txt"}] and not log.skipped
