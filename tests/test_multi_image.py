"""Several images per conversation (issue 13): each image gets its own placeholder run where its
`<image>` marker was, pixel_values follow the runs' order, the checks are per image, and the
sources (LLaVA JSON, numbered webdataset members, an HF list column) feed the trainer with them."""

import json
import random
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from graft.cli import main
from graft.config_checks import apply_overrides
from graft.build import build_stream
from graft.data.check import check_data, processor_for
from graft.data.images import open_image
from graft.data.packing import first_fit, pack
from graft.data.processor import collate
from graft.data.samples import BadSample, conversation_turns, encode, image_runs
from graft.data.shapes import ShapesWorld
from graft.data.skips import SkipLog, StrictError
from graft.data.sources import build_sources
from graft.data.world_source import training_turns
from graft.data.streaming import StreamDataset, fresh_position
from graft.losses import IGNORE
from graft.recipes import RECIPES, tiny
from tests.data_helpers import encoded, write_tar
from tests.helpers import tiny_vlm

COLOURS = ["red", "green", "blue", "yellow", "white", "black"]


def solid(colour: str, size: int = 24) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def turn(user: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]


# id, images (colours), conversation: markers in different turns and places
RECORDS = [
    ("two", ["red", "blue"], turn("<image>\nwhat color is the square?", "red")
     + turn("and here? <image>", "blue")),
    ("three", ["green", "yellow", "white"], turn("first: <image> second: <image>\nwhich is brighter?", "the second")
     + turn("what color is the circle?", "green") + turn("<image> what is this?", "a white square")),
    ("one", ["black"], turn("what color is the cross?\n<image>", "black")),
    ("nomarker", ["red", "green"], turn("how many shapes are there?", "2")),
]


def write_llava(root, records=RECORDS, name="multi.json"):
    root.mkdir(parents=True, exist_ok=True)
    for colour in COLOURS:
        solid(colour).save(root / f"{colour}.png")
    entries = [{"id": key, "image": [f"{c}.png" for c in colours] if len(colours) > 1 else f"{colours[0]}.png",
                "conversations": conv} for key, colours, conv in records]
    (root / name).write_text(json.dumps(entries))
    return root / name


def llava_cfg(path, *extra):
    return apply_overrides(tiny(), ["data.source=llava", f"data.path={path}", "data.workers=0", *extra])


def rows(cfg, proc):
    """(key, row) of every record of one pass, and the skip log."""
    sources, weights = build_sources(cfg)
    ds = StreamDataset(sources, weights, proc, cfg.data, 1, 0, 1, 1, {}, 0)
    log = SkipLog(cfg.data.strict)
    out = [r for r in ds.examples(0, 1, fresh_position(len(sources)), log, epochs=1) if r is not None]
    return out, log


def runs_at(ids, image_id):
    """Start index of each run of image tokens."""
    return [i for i, t in enumerate(ids) if t == image_id and (i == 0 or ids[i - 1] != image_id)]


def test_llava_images_go_where_their_markers_are_with_pixels_in_order(tmp_path):
    cfg = llava_cfg(write_llava(tmp_path / "d"))
    proc = processor_for(cfg)
    tok, n = proc.tok, proc.num_image_tokens
    out, log = rows(cfg, proc)
    by_key = {k.split("id=")[1]: row for k, row in out}
    assert not log.skipped and sorted(by_key) == sorted(key for key, _, _ in RECORDS)
    for key, colours, conv in RECORDS:
        ids, labels, pixels = by_key[key]
        assert image_runs(ids, tok.image, n) == [n] * len(colours)
        assert [p.tolist() for p in pixels] == [proc.pixels(solid(c)).tolist() for c in colours]
        assert all(label == IGNORE for i, label in zip(ids, labels) if i == tok.image)
    # the markers' places: "two" has its second image in the second user turn, after the text
    ids = by_key["two"][0]
    starts = runs_at(ids, tok.image)
    user_turns = [i for i, t in enumerate(ids) if t == tok.user]
    assert starts == [user_turns[0] + 1, user_turns[1] + 1]  # a lone marker: the start of its turn (LLaVA)
    # "three": images 0 and 1 inside the first question's text, image 2 at the start of the third turn
    ids = by_key["three"][0]
    starts = runs_at(ids, tok.image)
    user_turns = [i for i, t in enumerate(ids) if t == tok.user]
    assert tok.decode(ids[user_turns[0] + 1: starts[0]]) == "first:"
    assert tok.decode(ids[starts[0] + n: starts[1]]).strip() == "second:"
    assert user_turns[1] < user_turns[2] == starts[2] - 1
    # a batch stacks the images of all rows in the order of their runs, row after row
    batch = collate([by_key[key] for key, _, _ in RECORDS], tok.pad)
    assert batch["pixel_values"].shape == (8, 3, 24, 24)
    expected = [proc.pixels(solid(c)) for _, colours, _ in RECORDS for c in colours]
    assert torch.equal(batch["pixel_values"], torch.stack(expected))


def test_one_image_records_encode_as_before(tmp_path):
    """One image with its marker in the first turn, or no marker: ids and labels bit for bit those
    of the layout from before several images (a frozen copy of it here)."""
    _, proc = tiny_vlm()
    t = proc.tok

    def before(turns):
        ids, labels = [t.bos], [IGNORE]
        for i, (question, answer) in enumerate(turns):
            prompt = [t.user] + ([t.image] * proc.num_image_tokens if i == 0 else []) + t.encode(question) + [t.assistant]
            reply = t.encode(answer) + [t.eos]
            if i > 0 and len(ids) + len(prompt) + len(reply) > proc.max_seq_len:
                break
            ids += prompt + reply
            labels += [IGNORE] * len(prompt) + reply
        return ids, labels

    world = ShapesWorld(image_size=32)
    for i in range(40):
        turns = training_turns(world.sample("train", i), random.Random(i), 1 + i % 6, 0.5)
        messages = [m for j, (q, a) in enumerate(turns) for m in turn(("<image>\n" if j == 0 else "") + q, a)]
        parsed, places = conversation_turns(messages)
        assert parsed == turns and places == [(0, 0)]
        assert proc.conversation(turns, places) == proc.conversation(turns) == before(turns)
        assert encode(proc, turns, places)[:2] == tuple(x[: proc.max_seq_len] for x in before(turns))
    assert proc.prompt("what color is the circle?") == proc.prompt("what color is the circle?", images=1)
    assert proc.prompt("q", images=2).count(t.image) == 2 * proc.num_image_tokens


def test_mismatched_markers_and_the_cap_are_skipped_and_counted(tmp_path):
    records = RECORDS + [
        ("mismatch", ["red", "blue"], turn("<image> one marker", "x")),
        ("toomany", ["red", "blue"], turn("<image> <image> <image> three markers", "x")),
        ("answer", ["red"], turn("what is written?", "the text <image> here")),  # plain text in an answer
        ("flood", ["red"], turn("<image> " * 100_000, "x")),  # read in linear time, then refused
    ]
    path = write_llava(tmp_path / "d", records)
    cfg = llava_cfg(path)
    result = check_data(cfg, processor_for(cfg), 100)
    assert dict(result.skipped) == {"placeholder_mismatch": 3} and result.used == 5
    _, log = rows(cfg, processor_for(cfg))
    details = {key.split("id=")[1]: detail for _, key, detail in log.examples}
    assert details == {"mismatch": "1 <image> markers for 2 images", "toomany": "3 <image> markers for 2 images",
                       "flood": "100000 <image> markers for 1 images"}
    # data.max_images: the 3-image record is over a cap of 2, the 2-image ones are not
    capped = llava_cfg(path, "data.max_images=2")
    result = check_data(capped, processor_for(capped), 100)
    assert dict(result.skipped) == {"placeholder_mismatch": 3, "too_many_images": 1} and result.used == 4
    assert check_data(llava_cfg(path, "data.max_images=1"), processor_for(capped), 100).used == 2


def test_each_image_is_checked_and_the_error_names_the_record_image_and_counts(tmp_path):
    path = write_llava(tmp_path / "d")
    cfg = llava_cfg(path)
    proc = processor_for(cfg)

    class Broken(type(proc)):  # drops one placeholder of the second image of a question
        def _question(self, question, offsets):
            ids = super()._question(question, offsets)
            runs = runs_at(ids, self.tok.image)
            return ids[: runs[1]] + ids[runs[1] + 1:] if len(runs) > 1 else ids

    broken = Broken(proc.tok, proc.image_size, proc.num_image_tokens, proc.max_seq_len)
    _, log = rows(cfg, broken)
    n = proc.num_image_tokens
    assert dict(log.skipped) == {"placeholder_mismatch": 2}  # the records with two images in one question
    details = {key.split("id=")[1]: detail for _, key, detail in log.examples}
    assert details["three"].startswith(f"image 1: {n - 1} placeholders found, {n} expected")
    assert sorted(details) == ["nomarker", "three"]
    with pytest.raises(StrictError, match=r"multi.json\[\d\] id=(three|nomarker) \(placeholder_mismatch: image 1: "):
        rows(llava_cfg(path, "data.strict=true"), broken)


def test_turns_past_the_context_go_with_their_images(tmp_path):
    _, proc = tiny_vlm()
    n, tok = proc.num_image_tokens, proc.tok
    turns = [("what color is the square?", "red"), ("what color is the circle?", "blue")]
    places = [(0, 0), (1, 0)]
    full, _ = proc.conversation(turns, places)
    proc.max_seq_len = len(full) - 1  # the second turn (and its image) no longer fits
    (ids, labels), truncated, kept = proc.text_row(turns, places)
    assert truncated and kept == 1 and image_runs(ids, tok.image, n) == [n]
    assert ids == full[: len(ids)] and ids[-1] == tok.eos
    proc.max_seq_len = 2 * n  # both images in the first question: they alone do not fit
    with pytest.raises(BadSample) as err:
        proc.text_row([("which is bigger?", "the first")], [(0, 0), (0, 0)])
    assert err.value.reason == "answer_truncated"
    proc.max_seq_len = len(proc.conversation(turns, [(1, 0)])[0]) - 1  # the only image is in the dropped turn
    with pytest.raises(BadSample, match="no turn with an image"):
        proc.text_row(turns, [(1, 0)])


def conversations(proc, n):
    """(ids, labels, [pixels]) with 0 to 3 images each, in different turns and places."""
    world, items = ShapesWorld(image_size=32), []
    for i in range(n):
        samples = [world.sample("train", 10 * i + k) for k in range(i % 4)]
        turns = [(qa.question, qa.answer) for qa in world.sample("train", 10 * i).qa[: 1 + i % 3]]
        places = [(min(k, len(turns) - 1), 0 if k % 2 == 0 else 4) for k in range(len(samples))]
        ids, labels = proc.conversation(turns, places)
        items.append((ids, labels, [proc.pixels(s.image) for s in samples]))
    return items


def test_packed_multi_image_rows_give_each_conversation_its_own_logits():
    torch.manual_seed(0)
    model, proc = tiny_vlm()
    items = conversations(proc, 9)
    assert {len(pix) for _, _, pix in items} == {0, 1, 2, 3}
    packed = pack(items, proc.tok.pad, max_len=128, image_size=32)
    assert packed["pixel_values"].shape[0] == sum(len(pix) for _, _, pix in items)
    logits, _ = model(**packed)
    rows = first_fit([len(ids) for ids, _, _ in items], 128)
    assert len(rows) < len(items)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            alone, _ = model(**collate([items[i]], proc.tok.pad, 32))
            n = len(items[i][0])
            torch.testing.assert_close(logits[r, at:at + n], alone[0], rtol=1e-4, atol=1e-5)
            at += n


def test_a_batch_without_images_skips_the_vision_tower():
    model, proc = tiny_vlm()
    ids, labels = proc.conversation([("what color is the circle?", "red")], places=[])
    batch = collate([(ids, labels, [])], proc.tok.pad, 32)
    assert batch["pixel_values"].shape == (0, 3, 32, 32)
    logits, losses = model(**batch)
    assert logits.shape[:2] == (1, len(ids)) and torch.isfinite(losses["lm"])
    with pytest.raises(ValueError, match=r"row 0 has 3 placeholder tokens, not a multiple of"):
        bad = batch["input_ids"].clone()
        bad[0, 1:4] = proc.tok.image
        model(bad, batch["pixel_values"])


def test_numbered_webdataset_members_and_hf_image_lists(tmp_path):
    import datasets

    png = {c: encoded(solid(c)) for c in COLOURS}
    conv = lambda *markers: json.dumps({"conversations": turn(" ".join(markers) + " which is red?", "the first")}).encode()
    write_tar(tmp_path / "a.tar", [
        ("two", {"0.png": png["red"], "1.jpg": encoded(solid("blue"), "JPEG"), "json": conv("<image>", "<image>")}),
        ("one", {"png": png["green"], "txt": b"a green square"}),
        ("gap", {"0.png": png["red"], "2.png": png["blue"], "txt": b"x"}),
        ("both", {"png": png["red"], "0.png": png["blue"], "txt": b"x"}),
        ("nine", {**{f"{i}.png": png["red"] for i in range(9)}, "txt": b"x"}),
    ])
    cfg = apply_overrides(tiny(), ["data.source=webdataset", f'data.shards=["{tmp_path}/a.tar"]', "data.shuffle_buffer=0"])
    proc = processor_for(cfg)
    out, log = rows(cfg, proc)
    assert dict(log.skipped) == {"image_members": 2, "too_many_images": 1}
    by_key = {key.rsplit(":", 1)[1]: row for key, row in out}
    assert {k: len(row[2]) for k, row in by_key.items()} == {"two": 2, "one": 1}
    assert [p.tolist() for p in by_key["two"][2]] == [proc.pixels(solid("red")).tolist(),
                                                       proc.pixels(open_image(encoded(solid("blue"), "JPEG"), 10**6)[0]).tolist()]
    assert check_data(apply_overrides(cfg, ["data.max_images=9"]), proc, 100).used == 3  # "nine" fits a cap of 9

    root = tmp_path / "hf"
    root.mkdir()
    features = datasets.Features({"images": datasets.List(datasets.Image()), "text": datasets.Value("string")})
    images = [[solid("red"), solid("blue")], [solid("green")], [solid("red")] * 3]
    ds = datasets.Dataset.from_dict({"images": images, "text": ["two images", "a green square", "three"]},
                                    features=features)
    ds.save_to_disk(str(root))
    hf = apply_overrides(tiny(), ["data.source=hf", f"data.path={root}", "data.image_column=images", "data.max_images=2"])
    out, log = rows(hf, processor_for(hf))
    assert dict(log.skipped) == {"too_many_images": 1}
    by_key = {key.rsplit("[", 1)[1]: row for key, row in out}
    assert {k: len(row[2]) for k, row in by_key.items()} == {"0]": 2, "1]": 1}
    assert torch.equal(by_key["0]"][2][1], proc.pixels(solid("blue")))


def test_dual_encoder_pairs_stay_one_image(tmp_path):
    path = write_llava(tmp_path / "d")
    cfg = apply_overrides(RECIPES["clip"](), ["data.source=llava", f"data.path={path}", "data.workers=0"])
    proc = processor_for(cfg)
    out, log = rows(cfg, proc)
    assert dict(log.skipped) == {"too_many_images": 3} and len(out) == 1
    assert proc.collate([row for _, row in out])["pixel_values"].shape[0] == 1


def test_template_processor_places_two_images(tmp_path):
    from hf_models import make_lm

    from graft.data.hf_tokenizer import HFChatTokenizer, TemplateProcessor

    tok = HFChatTokenizer.load(make_lm("qwen2", tmp_path / "qwen2"))
    proc = TemplateProcessor(tok, 24, 9, 512)
    turns, places = conversation_turns(turn("<image>\n<image>\nwhich is bigger?", "the first")
                                       + turn("this: <image> or that: <image>?", "blue <image>"))
    ids, labels, truncated = encode(proc, turns, places)
    assert image_runs(ids, tok.image, 9) == [9] * 4 and not truncated
    text = tok.tok.decode(ids)
    assert text.count("<image>" * 9) == 4 and "user\n<image>\n<image>\nwhich" in text.replace("<image>" * 9, "<image>")
    assert "this: " + "<image>" * 9 + " or that: " + "<image>" * 9 + "?" in text
    supervised = tok.tok.decode([i for i, label in zip(ids, labels) if label != IGNORE])
    assert supervised.replace("<|im_end|>", "|").replace("\n", "") == "the first|blue <image>|"  # text, not a slot
    prompt = proc.prompt("which is bigger?", images=2)
    assert ids[: len(prompt)] == prompt
    assert proc.prompt("which is bigger?") == proc.prompt("which is bigger?", images=1)
    short = TemplateProcessor(tok, 24, 9, len(ids) - 1)
    (cut, _), truncated, kept = short.text_row(turns, places)
    assert truncated and kept == 2 and cut == ids[: len(cut)]  # the last turn went, with its images


def test_train_on_multi_image_llava_json_through_the_cli(tmp_path):
    path = write_llava(tmp_path / "d", RECORDS * 4)
    sets = ["data.source=llava", f"data.path={path}", "data.workers=0", "train.batch_size=4", "data.shuffle_buffer=0"]
    cfg = apply_overrides(tiny(), sets)
    proc = processor_for(cfg)
    stream = build_stream(cfg, proc, SimpleNamespace(rank=0, world_size=1, device="cpu"))
    batch = stream.batch(0, 0)
    records = {key: (colours, conv) for key, colours, conv in RECORDS}
    keys = [k.split("id=")[1] for k in stream.last_keys]
    assert batch["pixel_values"].shape[0] == sum(len(records[k][0]) for k in keys)
    for k, row in zip(keys, batch["input_ids"].tolist()):
        text = proc.tok.decode(row)
        answers = [m["value"] for m in records[k][1] if m["from"] == "gpt"]
        assert all(a in text for a in answers), (k, text)
        assert image_runs(row, proc.tok.image, proc.num_image_tokens) == [proc.num_image_tokens] * len(records[k][0])
    stream.close()
    run = tmp_path / "run"
    args = [x for kv in [*sets, "train.steps=2", "train.log_every=1", "train.progress=false", "eval.splits=",
                         "train.peak_flops=1e11"] for x in ("--set", kv)]
    assert main(["train", "tiny", "--out", str(run), *args]) == 0
    meta = json.loads((run / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["data"]["ranks"][0]["used"] == 8
