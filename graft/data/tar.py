"""Records of one webdataset tar shard, read in bounded memory, with any damage counted once.

A shard in the img2dataset layout holds members `KEY.jpg|png|webp` + `KEY.txt` and/or `KEY.json`;
consecutive members with the same KEY make one record. graft reads shards here, not with
`webdataset.tarfile_samples`, because that reader takes every selected member whole into memory
(a 2 GB `.txt` costs 2 GB) and inherits a blind spot of `tarfile`'s stream mode: `TarFile.next()`
takes a shard cut inside a header, a garbage header, or one cut at a member boundary for a clean
end, so the rest of the shard is lost and nothing is counted; nor is garbage after the end noticed.

Here `_Header` (our `TarInfo`) notes why the member loop stopped. A zero block is a clean end
provided only zeros follow it; no header at all (no end-of-archive marker), a cut or bad header,
garbage after the end, or any read or decompression error is `shard_corrupt`, logged once with
where it happened and what was lost. The record being assembled then is dropped: it may be
incomplete. Names go into the detail as they are; SkipLog escapes every detail it logs
(`skips.printable`), so a name cannot forge or clear lines.

Memory is bounded whatever the shard holds:
- only extensions in `limits` are read, and a member over `limits[ext]` bytes is skipped unread
  (named in the record's `__oversize__` so that the caller can count the record);
- member data and declared sizes are skipped in bounded chunks, stopping at the end of the data
  (tarfile's own seek would go on reading past the end for as long as a hostile size says);
- compressed shards are decompressed by the stdlib file readers, which bound each read and check
  CRCs, truncation and trailing garbage; tarfile's `r|*` inflates each 10 KiB input chunk whole,
  and 10 KiB of bzip2 can hold gigabytes of zeros;
- pax and GNU long-name headers, which tarfile reads whole and holds until the member they
  describe (global pax headers for good), are refused past MAX_HEADER_BYTES in all; GNU sparse
  members, whose maps tarfile reads without bound, are refused;
- stream mode's list of every member seen is emptied as we go.
Nothing is unpickled: member data are plain bytes.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import suppress

import webdataset
from webdataset.tariterators import base_plus_ext

from graft.data.skips import SkipLog

MAX_HEADER_BYTES = 1 << 20  # pax / GNU long-name header bytes tarfile may hold at once
_CHUNK = 1 << 16
_HELD_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
               tarfile.GNUTYPE_LONGLINK)
# what reading a damaged shard raises (ValueError: a GNU sparse map that is not numbers)
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


def read_shard(url: str, limits: dict[str, int], log: SkipLog) -> Iterator[dict]:
    """Records of one tar shard, in shard order: {"__key__": key, "__url__": url, ext: bytes, ...}.

    Only regular members whose (lowercased) extension is in `limits` are read, the first of each
    extension per record; one over `limits[ext]` bytes is not read but listed in
    `rec["__oversize__"]` ({ext: size}), the others in `rec["__unread__"]` (their extensions).
    Every member but a folder entry belongs to a record, so that each record of the shard is
    yielded and can be counted, whatever its members' names: a name webdataset cannot split into
    KEY.EXT (no extension, a leading dot) is a record of its own. A shard that cannot be opened is
    logged as `shard_missing`; a damaged one as `shard_corrupt`, once, after the records before the
    damage have been yielded.
    """
    try:
        raw = webdataset.gopen(url, "rb")
        head = raw.read(10)  # enough to tell the compression, as tarfile's `r|*` does
        if not head:
            raw.close()  # a failed `pipe:` (curl of a missing url) gives no data and raises here
    except (OSError, ValueError) as e:
        log.skip("shard_missing", url, _error(e))
        return
    if not head:
        log.skip("shard_corrupt", url, "empty (0 bytes)")
        return
    n, rec, problem = 0, None, None
    try:
        with tarfile.open(fileobj=_decompressed(head, raw), mode="r|", tarinfo=_Header) as tf:
            for info in _members(tf):
                if info.isdir():
                    continue  # a folder entry: part of no record
                key, ext = base_plus_ext(info.name)
                if key is None:  # no extension, or one webdataset cannot split (".x.png"): a record alone
                    key, ext = info.name, ""
                if rec is not None and key != rec["__key__"]:
                    yield rec
                    n, rec = n + 1, None
                rec = rec or {"__key__": key, "__url__": url}
                ext = ext.lower()
                if not info.isreg() or ext not in limits:  # a link, or unwanted: counted, never read
                    rec.setdefault("__unread__", []).append(ext or "(no extension)")
                    continue
                if ext in rec or ext in rec.get("__oversize__", ()):
                    continue  # a duplicate: the first one is kept
                if info.size > limits[ext]:
                    rec.setdefault("__oversize__", {})[ext] = info.size
                else:
                    rec[ext] = tf.extractfile(info).read()
            stop, at = getattr(tf, "graft_stop", (None, tf.offset))
            if not isinstance(stop, tarfile.EOFHeaderError):
                problem = _damage(stop, at)
            else:  # a zero block: the archive's own end
                garbage = _first_nonzero(tf.fileobj)  # reading to the end also checks a compressed CRC
                if rec is not None:
                    yield rec
                    n, rec = n + 1, None
                if garbage is not None:
                    problem = f"garbage after the end-of-archive marker at byte {garbage}"
    except _READ_ERRORS as e:
        problem = f"unreadable ({_error(e)})"
    finally:
        with suppress(OSError):
            raw.close()  # a `pipe:` not read to its end may report its exit status here
    if problem:
        lost = f"record {_quote(rec['__key__'])} and the rest of the shard are" if rec else "the rest of the shard is"
        log.skip("shard_corrupt", url, f"{problem} after {n} record{'s' * (n != 1)}; {lost} lost")


class _Header(tarfile.TarInfo):
    """tarfile's header parser, noting on the TarFile why the member loop stopped (next() swallows
    most header errors) and refusing the headers tarfile would read without bound."""

    @classmethod
    def fromtarfile(cls, tf):
        at = tf.fileobj.tell()
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf.graft_stop = (e, at)
            raise

    def _proc_member(self, tf):
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise tarfile.InvalidHeaderError("GNU sparse member")
        if self.type not in _HELD_TYPES:
            tf.graft_held = 0  # a member ends the chain of headers describing it
            return super()._proc_member(tf)
        tf.graft_held = getattr(tf, "graft_held", 0) + self.size
        held = tf.graft_held + sum(len(k) + len(v) for k, v in tf.pax_headers.items())  # + global ones
        if held > MAX_HEADER_BYTES:
            raise tarfile.InvalidHeaderError(f"pax/long-name headers of {held} bytes, over {MAX_HEADER_BYTES}")
        return super()._proc_member(tf)

    def _proc_gnusparse_10(self, next, pax_headers, tf):
        raise tarfile.InvalidHeaderError("GNU sparse 1.0 member")


def _members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members in order; after each, the rest of its data is skipped in bounded reads that stop
    at the end of the stream (ReadError there, as tarfile would raise)."""
    while (info := tf.next()) is not None:
        tf.members.clear()  # stream mode would keep every TarInfo
        yield info
        while (left := tf.offset - tf.fileobj.tell()) > 0:
            if not tf.fileobj.read(min(left, _CHUNK)):
                raise tarfile.ReadError("unexpected end of data")


def _decompressed(head: bytes, raw):
    """The tar byte stream of `raw`, whose first bytes `head` were read to tell the compression."""
    stream = _Prefixed(head, raw)
    if head.startswith(b"\x1f\x8b\x08"):
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if head[:3] == b"BZh" and head[4:10] == b"1AY&SY":
        return bz2.BZ2File(stream)
    if head.startswith((b"\xfd7zXZ", b"\x5d\x00\x00\x80")):  # .xz, legacy .lzma
        return lzma.LZMAFile(stream)
    return stream


class _Prefixed:
    """`raw` with `head`, its first bytes, put back in front (all the readers need is `read(n)`)."""

    def __init__(self, head: bytes, raw):
        self.head, self.raw = head, raw

    def read(self, size: int) -> bytes:
        out, self.head = self.head[:size], self.head[size:]
        return out or self.raw.read(size)


def _first_nonzero(stream) -> int | None:
    """Offset of the first non-zero byte from here to the end of `stream` (None: only zeros)."""
    while chunk := stream.read(_CHUNK):
        if rest := chunk.lstrip(b"\0"):
            return stream.tell() - len(rest)
    return None


def _damage(stop: Exception | None, at: int) -> str:
    if isinstance(stop, tarfile.EmptyHeaderError):
        return f"no end-of-archive marker (the shard ends at byte {at}, between members)"
    if isinstance(stop, tarfile.TruncatedHeaderError):
        return f"cut inside a header at byte {at}"
    return f"bad header at byte {at} ({_quote(str(stop))})"


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {_quote(str(e))}"


def _quote(text: str, cut: int = 80) -> str:
    """An untrusted name or message, quoted and cut to `cut` chars (SkipLog escapes what it logs)."""
    return f"'{text[:cut]}'" + ("..." if len(text) > cut else "")
