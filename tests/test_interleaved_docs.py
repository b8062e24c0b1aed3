"""Interleaved web documents (`data.source=interleaved`, OBELICS / MMC4 layouts): every text segment is
an answer, the images before it open its turn; bad documents are skipped and counted, never read
further than needed; JSON Lines and tar shards train through the real pipeline."""

import json
import pickle

import pytest
from PIL import Image

from graft.cli import main
from graft.config_checks import apply_overrides
from graft.data.check import check_data, processor_for
from graft.data.interleaved import interleave, positions
from graft.data.samples import BadSample, image_runs
from graft.data.skips import SkipLog
from graft.data.sources import build_sources
from graft.data.streaming import StreamDataset, fresh_position
from graft.data.tokenizer import ChatTokenizer
from graft.errors import UserError
from graft.losses import IGNORE
from graft.recipes import tiny
from graft.trainer.metrics import read
from tests.data_helpers import Evil, encoded, png_header_only, write_tar
from tests.hostile import CONTROL_TEXT, _eps

TEXTS = ["a zebra stands near the lighthouse", "the violin is red", "a glacier, blue and cold"]


def solid(colour: str) -> Image.Image:
    return Image.new("RGB", (24, 24), colour)


def doc(*parts) -> dict:
    """OBELICS layout from parts in document order: a str is a text segment, a 1-tuple (ref,) an image."""
    return {"texts": [p if isinstance(p, str) else None for p in parts],
            "images": [p[0] if isinstance(p, tuple) else None for p in parts]}


# text, image, text, image, text, then an image that would not be found if it were ever looked at
GOOD = doc(TEXTS[0], ("red.png",), TEXTS[1], ("blue.png",), TEXTS[2], ("never-read.png",))
MMC4 = {"text_list": TEXTS[:2], "image_info": [{"image_name": "red.png", "matched_text_index": 1},
                                               {"image_name": "blue.png", "matched_text_index": 1}]}


def write_jsonl(root, lines: list, name: str = "docs.jsonl"):
    root.mkdir(parents=True, exist_ok=True)
    for colour in ("red", "blue"):
        solid(colour).save(root / f"{colour}.png")
    data = b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)
    (root / name).write_bytes(data)
    return root / name


def configured(*sets: str):
    return apply_overrides(tiny(), ["data.source=interleaved", "data.workers=0", *sets])


def rows(cfg, proc):
    """(key, row) of every usable record of one pass, and the skip log."""
    sources, weights = build_sources(cfg)
    ds = StreamDataset(sources, weights, proc, cfg.data, 1, 0, 1, 1, {}, 0)
    log = SkipLog()
    return [r for r in ds.examples(0, 1, fresh_position(len(sources)), log, epochs=1) if r is not None], log


def test_a_document_becomes_answers_with_the_images_before_them(tmp_path):
    path = write_jsonl(tmp_path, [GOOD, MMC4])
    cfg = configured(f"data.path={path}")
    source = build_sources(cfg)[0][0]
    ex = source.example(0)
    assert ex.images == [tmp_path / "red.png", tmp_path / "blue.png"]  # the last image is dropped, unread
    assert ex.turns == [("", text) for text in TEXTS] and ex.places == [(1, 0), (2, 0)]
    mmc4 = source.example(1)  # both images before sentence 1, in their order
    assert mmc4.turns == [("", t) for t in TEXTS[:2]] and mmc4.places == [(1, 0), (1, 0)]
    assert [p.name for p in mmc4.images] == ["red.png", "blue.png"]
    # a blank segment is no turn: its images wait for the next text
    assert interleave(positions(doc(("a",), "  ", ("b",), "x"))) == ([("", "x")], [(0, 0), (0, 0)], ["a", "b"])

    proc = processor_for(cfg)
    tok, n = proc.tok, proc.num_image_tokens
    out, log = rows(cfg, proc)
    assert not log.skipped
    by_key = {key: row for key, row in out}
    ids, labels, pixels = by_key["docs.jsonl:1"]
    assert image_runs(ids, tok.image, n) == [n, n]
    users = [i for i, t in enumerate(ids) if t == tok.user]
    starts = [i for i, t in enumerate(ids) if t == tok.image and ids[i - 1] != tok.image]
    assert ids[users[0]: users[0] + 2] == [tok.user, tok.assistant]  # the first text: no image, no question
    assert starts == [users[1] + 1, users[2] + 1]  # each image opens the turn of the text after it
    assert ids[starts[1] + n] == tok.assistant  # an empty question: the placeholders, then the answer
    supervised = [i for i, label in zip(ids, labels) if label != IGNORE]
    assert supervised == [i for text in TEXTS for i in tok.encode(text) + [tok.eos]]  # the loss is on all text
    assert {i for i, label in zip(ids, labels) if label == IGNORE} == {tok.bos, tok.user, tok.assistant, tok.image}
    assert [p.tolist() for p in pixels] == [proc.pixels(solid(c)).tolist() for c in ("red", "blue")]
    two = by_key["docs.jsonl:2"][0]  # two images with no text between them: one run each
    assert image_runs(two, tok.image, n) == [n, n]


def test_an_hf_chat_template_gives_each_image_its_placeholders(tmp_path):
    from hf_models import make_lm

    from graft.data.hf_tokenizer import HFChatTokenizer, TemplateProcessor

    ex = interleave(positions(MMC4))
    proc = TemplateProcessor(HFChatTokenizer.load(make_lm("qwen2", tmp_path / "qwen2")), 24, 9, 512)
    ids, labels, _ = proc.encode_conversation(ex[0], ex[1])
    assert image_runs(ids, proc.tok.image, 9) == [9, 9]
    supervised = proc.tok.tok.decode([i for i, label in zip(ids, labels) if label != IGNORE])
    assert [s.strip() for s in supervised.split("<|im_end|>")] == [*TEXTS[:2], ""]


def hostile_lines(root) -> tuple[list, dict]:
    """(JSONL lines, skips expected of one pass): one per way a document can be unusable."""
    (root / "eps.png").write_bytes(_eps())
    (root / "bomb.png").write_bytes(png_header_only(50_000, 50_000))
    nine = [("missing.png",)] * 9  # more than data.max_images=8: refused before any path is looked at
    lines = [
        {"texts": ["a", None], "images": [None]},  # lists of different lengths
        {"texts": ["a", "b"], "images": [None, "red.png"]},  # a position with both
        {"texts": ["a", None], "images": [None, None]},  # a position with neither
        {"texts": [None, 7], "images": ["red.png", None]},  # a text that is not a string
        {"texts": "a", "images": []},
        [GOOD],  # not an object
        {"text_list": ["a"], "image_info": [{"image_name": "red.png", "matched_text_index": 3}]},
        {"texts": [None, "b"], "images": [{"not": "a path"}, None]},
        doc("only text"), doc("text first", ("red.png",)),  # no image before the last text
        doc(("red.png",), ("blue.png",)),  # no text
        doc(*nine, "nine images"),
        doc(("../outside.png",), "up and out"), doc(("/etc/passwd",), "absolute"),
        doc(("nowhere.png",), "a missing file"),
        doc(("eps.png",), "an EPS file"), doc(("bomb.png",), "a decompression bomb"),
        b"{not json", b'{"texts": [1' + b"9" * 50_000 + b"]}", b"[" * 5000 + b"]" * 5000,
        doc(("red.png",), "x" * 70_000),  # over data.max_text_bytes
        doc(("red.png",), "a \ud800 b"),  # a lone surrogate escape
        json.dumps(doc(("red.png",), "caf\u00e9"), ensure_ascii=False).encode("latin-1"),  # not UTF-8
        json.dumps(doc(("red.png",), "y" * (2 << 20))).encode(),  # a 2 MiB line: never read
    ]
    skipped = {"bad_document": 8, "image_missing": 2, "text_missing": 1, "too_many_images": 1,
               "image_outside_root": 2, "image_not_found": 1, "image_unreadable": 1, "image_too_large": 1,
               "text_bad_json": 2, "json_too_deep": 1, "text_too_long": 1, "text_not_utf8": 2, "json_too_large": 1}
    return lines, skipped


def good_docs(k: int) -> list:
    """k usable documents, one holding control-token strings, which stay text."""
    out = [doc(TEXTS[i % 3], (("red.png", "blue.png")[i % 2],), TEXTS[(i + 1) % 3], ("blue.png",), TEXTS[(i + 2) % 3])
           for i in range(k - 1)]
    return out + [doc(("red.png",), CONTROL_TEXT, ("blue.png",), "the end", "after the end")]


def test_hostile_documents_are_skipped_and_counted_and_good_ones_train(tmp_path):
    lines, skipped = hostile_lines(tmp_path)
    good = good_docs(8)
    path = write_jsonl(tmp_path, [*lines[:12], *good, *lines[12:]])
    cfg = configured(f"data.path={path}")
    proc = processor_for(cfg)
    result = check_data(cfg, proc, 1000)
    assert dict(result.skipped) == skipped
    assert result.used == len(good) and result.read == len(good) + len(lines)
    out, _ = rows(cfg, proc)
    tok = proc.tok
    for _, (ids, _, pixels) in out:  # the template's control tokens only: one <eos> per text, no image from text
        assert ids.count(tok.bos) == 1 and ids.count(tok.eos) == ids.count(tok.user) == 3
        assert ids.count(tok.image) == proc.num_image_tokens * len(pixels)

    run = tmp_path / "run"  # a short run: the loss falls on the 8 documents, the skips are in metrics.jsonl
    sets = [f"data.path={path}", "data.source=interleaved", "data.workers=0", "data.min_good_fraction=0.2",
            "train.steps=30", "train.batch_size=4", "train.log_every=1", "train.ckpt_every=30",
            "train.progress=false", "eval.splits=", "train.peak_flops=1e11"]
    assert main(["train", "tiny", "--out", str(run), *[x for kv in sets for x in ("--set", kv)]]) == 0
    metrics = [r for r in read(run) if r.get("event") != "eval"]
    assert sum(r["loss"] for r in metrics[-5:]) / 5 < 0.6 * metrics[0]["loss"]  # 6.7 -> 2.9 when measured
    for reason, per_pass in skipped.items():  # 120 documents used: every line was read at least once
        assert metrics[-1][f"data_skipped/{reason}"] >= per_pass, reason
    meta = json.loads((run / "checkpoints" / "step_00000030" / "meta.json").read_text())
    assert meta["data"]["ranks"][0]["used"] == 120
    assert len(ChatTokenizer.load(run / "tokenizer.json").encode(" lighthouse")) <= 2  # trained on the documents


def test_documents_in_tar_shards(tmp_path):
    red, blue = encoded(solid("red")), encoded(solid("blue"), "JPEG")
    marked = json.dumps(doc(TEXTS[0], ("x",), TEXTS[1], ("x",), TEXTS[2], ("x",))).encode()
    one = json.dumps(doc((True,), TEXTS[1])).encode()  # any non-null entry marks an image
    marker = tmp_path / "unpickled"
    write_tar(tmp_path / "a.tar", [
        ("good", {"json": marked, "0.png": red, "1.jpg": blue, "2.png": b"the last image: never decoded"}),
        ("plain", {"json": one, "png": red}),
        # 10 images, 8 before the text: members 0-7 are read, 8 is noted unread (there are more), 9 never
        ("ten", {"json": json.dumps(doc(*[("x",)] * 8, TEXTS[0], ("x",), ("x",))).encode(),
                 **{f"{i}.png": red for i in range(10)}}),
        ("nine", {"json": json.dumps(doc(*[("x",)] * 9, TEXTS[0])).encode(), **{f"{i}.png": b"junk" for i in range(9)}}),
    ])
    write_tar(tmp_path / "b.tar", [
        ("short", {"json": marked, "0.png": red}),  # 3 images in the document, 1 member
        ("gap", {"json": marked, "0.png": red, "2.png": red, "3.png": red}),
        ("both", {"json": one, "png": red, "0.png": red}),
        ("caption", {"png": red, "txt": b"a caption is not a document"}),
        ("noimage", {"json": json.dumps(doc(TEXTS[0])).encode()}),
        ("pickle", {"json": one, "png": red, "pyd": pickle.dumps(Evil(marker))}),
    ])
    cfg = configured(f'data.shards=["{tmp_path}/{{a,b}}.tar"]', "data.shuffle_buffer=0")
    proc = processor_for(cfg)
    out, log = rows(cfg, proc)
    assert dict(log.skipped) == {"too_many_images": 1, "placeholder_mismatch": 1, "image_members": 2,
                                 "text_missing": 1, "image_missing": 1}
    by_key = {key.rsplit(":", 1)[1]: row for key, row in out}
    assert {k: len(row[2]) for k, row in by_key.items()} == {"good": 2, "plain": 1, "ten": 8, "pickle": 1}
    ids, labels, pixels = by_key["good"]
    assert image_runs(ids, proc.tok.image, proc.num_image_tokens) == [proc.num_image_tokens] * 2
    assert [i for i, label in zip(ids, labels) if label != IGNORE] == [
        i for text in TEXTS for i in proc.tok.encode(text) + [proc.tok.eos]]
    assert pixels[0].equal(proc.pixels(solid("red"))) and not marker.exists()


def test_keys_the_source_does_not_read_are_refused_in_one_line(tmp_path, capsys):
    path = write_jsonl(tmp_path, [GOOD])
    refused = {
        (): "set one of them, not neither",
        (f"data.path={path}", "data.shards=a.tar"): "not both",
        ("data.shards=a.tar", f"data.image_root={tmp_path}"): "data.image_root is not read",
        (f"data.path={path}", "data.shuffle_buffer=10"): "data.shuffle_buffer is not read",
        (f"data.path={path}", "data.weights=[2]"): "data.weights is not read",
        (f"data.path={path}", "data.text_column=body"): "data.text_column is not read",
        (f"data.path={path}", "data.caption_prompt=describe"): "data.caption_prompt is not read",
    }
    for sets, message in refused.items():
        with pytest.raises(UserError, match=message) as err:
            configured(*sets)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="data.path: not found"):
        build_sources(configured(f"data.path={tmp_path}/none.jsonl"))
    with pytest.raises(BadSample, match="bad_document"):
        positions({"texts": [None], "images": [None]})
    args = ["--set", "data.source=interleaved", "--set", f"data.path={path}", "--set", "data.image_column=img"]
    assert main(["train", "tiny", "--out", str(tmp_path / "run"), *args]) == 2
    assert "data.image_column is not read by data.source=interleaved" in capsys.readouterr().err.strip().splitlines()[-1]
