"""Time series as a modality: the built-in sensor world, the series processor's checks, series tokens
in the VLM (their own batch key, placeholder and modality id), the settings that refuse series, and
a run on the sensor world that learns the activities of people it never saw."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from PIL import Image

from graft.api import load
from graft.build import assemble, build_processor, resolve, tokenizer_for
from graft.config_checks import apply_overrides
from graft.data.samples import BadSample, Example
from graft.data.sensors import ACTIVITIES, ACTIVITY_PROMPT, QUESTION_TYPES, SUBJECTS, SensorWorld
from graft.data.series_processor import fill_gaps
from graft.data.streaming import read_record
from graft.eval.vqa import answer
from graft.models.modality import SERIES, TEXT, TIME_SERIES
from graft.recipes import sensors_vlm
from tests.helpers import SMALL_LM, cli, one_line_error, world_batches


def small(*overrides: str):
    return apply_overrides(sensors_vlm(), ["series.layers=1", "lm.layers=1", "lm.hidden_size=32",
                                           "lm.intermediate_size=64", "series.hidden_size=32", *overrides])


def built(cfg):
    tok = tokenizer_for(cfg)
    cfg, _ = resolve(cfg, tok)
    model = assemble(cfg, tok)
    return cfg, model, build_processor(cfg, tok, model)


def test_the_sensor_world_is_a_pure_function_and_holds_out_people():
    world = SensorWorld(seed=3)
    a, b = world.sample("train", 17), world.sample("train", 17)
    assert np.array_equal(a.values, b.values, equal_nan=True) and a.qa == b.qa and a.caption == b.caption
    assert not np.array_equal(a.values, world.sample("val", 17).values, equal_nan=True)
    assert a.values.shape == (6, 256) and a.values.dtype == np.float32
    test_people = {world.sample("test", i).subject for i in range(60)}
    train_people = {world.sample("train", i).subject for i in range(60)}
    assert test_people == set(SUBJECTS["test"]) and not test_people & train_people
    recs = [world.sample("train", i) for i in range(300)]
    assert {r.activities[0][0] for r in recs} == set(ACTIVITIES)
    assert {q.kind for r in recs for q in r.qa} == set(QUESTION_TYPES)
    assert 0 < sum(np.isnan(r.values).any() for r in recs) < 100  # some recordings have a gap
    # the physics: at rest the accelerometer reads ~1 g of gravity; running shakes it far more than lying
    spread = {name: np.mean([np.nanstd(r.values[:3], axis=1).sum() for r in recs
                             if r.activities == [(name, 0.0)]]) for name in ("lying", "running")}
    assert spread["running"] > 5 * spread["lying"]


def test_short_gaps_are_filled_and_bad_series_skipped_with_a_reason():
    row = np.array([0, 1, np.nan, np.nan, 4, 5], dtype=np.float32)
    assert np.allclose(fill_gaps(row, max_gap=2), [0, 1, 2, 3, 4, 5])
    with pytest.raises(BadSample, match="gap of 2 steps > series.max_gap=1"):
        fill_gaps(row, max_gap=1)
    cfg, _, proc = built(small())
    good = SensorWorld().sample("train", 0).values
    assert torch.equal(proc.pixels(good.T), torch.from_numpy(good))  # (L, C) is read too

    class Source:  # records of the given arrays, with one question each
        def __init__(self, items):
            self.items = items

        def example(self, i):
            return Example(f"#{i}", [self.items[i]], [("what is the person doing?", "walking")], [(0, 0)])

    nan_run = good.copy()
    nan_run[2, 10:40] = np.nan
    bad = {"inf": np.where(np.arange(256) == 5, np.inf, good), "shape": good[:5], "short": good[:, :15],
           "long": np.concatenate([good, good], 1),
           "gap": nan_run, "not an array": b"\x89PNG\r\n", "all nan": np.full_like(good, np.nan)}
    source = Source(list(bad.values()))
    for i, name in enumerate(bad):
        with pytest.raises(BadSample) as e:
            read_record(proc, cfg.data, source, i)
        assert e.value.reason == "series_bad", name


def test_series_tokens_have_their_own_key_placeholder_and_modality_id():
    cfg, model, proc = built(small("lm.modality_norms=true"))
    batch = world_batches(cfg, proc).batch(0, 0)
    n = len(batch["series_values"])
    assert "pixel_values" not in batch and batch["series_values"].shape == (n, 6, 256)
    slots = batch["input_ids"] == proc.placeholder
    assert proc.placeholder != proc.tok.image and int(slots.sum()) == n * model.num_image_tokens == n * 17
    layout = model.lm_inputs(batch["input_ids"], batch["series_values"], None, None)["layout"]
    assert torch.equal(layout.modality_ids, slots.long() * SERIES) and SERIES != TEXT
    # the series tokens, and only they, go through the LM's modules of the other modality
    logits, _ = model(batch["input_ids"], series_values=batch["series_values"])
    with torch.no_grad():
        for layer in model.lm.layers:
            layer.input_layernorm_image.weight.mul_(3.0)
    changed, _ = model(batch["input_ids"], series_values=batch["series_values"])
    first_series = int(slots[0].nonzero()[0])
    assert torch.equal(logits[0, :first_series], changed[0, :first_series])  # causal: text before the series
    assert not torch.allclose(logits[0, first_series:], changed[0, first_series:])
    with pytest.raises(TypeError, match="pixel_values or series_values"):
        model(batch["input_ids"], audio_values=batch["series_values"])
    assert TIME_SERIES.inputs == "series_values" and proc.tok.decode([proc.placeholder]) == ""


def test_a_shorter_recording_has_fewer_tokens_and_the_same_logits_alone_or_beside_a_longer_one():
    """Per-item token counts: a recording of 100 steps has the statistics token + 6 patches (the
    4 steps after its last patch dropped), its run of placeholders is cut to 7, the batch carries
    `series_counts`, and padding it beside a full one changes none of its logits."""
    cfg, model, proc = built(small())
    world = SensorWorld()
    short, full = world.sample("train", 1).values[:, :100], world.sample("train", 2).values
    text = proc.text_row([("what is the person doing?", "walking")], [(0, 0)])[0]
    rows = [proc.row(text, [x]) for x in (short, full)]
    assert rows[0][0].count(proc.placeholder) == 7 and rows[0][2][0].shape == (6, 96)
    assert rows[1][0].count(proc.placeholder) == model.num_image_tokens == 17 and len(rows[0][1]) == len(rows[0][0])
    model.eval()
    with torch.no_grad():
        both = proc.collate(rows)
        assert both["series_counts"].tolist() == [7, 17] and both["series_values"].shape == (2, 6, 256)
        together = model(**both)[0]
        alone = model(**proc.collate(rows[:1]))[0]
    n = len(rows[0][0])
    torch.testing.assert_close(together[0, :n], alone[0], atol=1e-5, rtol=0)
    said = answer(model, proc, [(short, "what is the person doing?")], 1, 4)  # prompt cut to 7 placeholders too
    assert len(said) == 1 and isinstance(said[0], str)
    for bad_counts in (torch.tensor([6, 17]), torch.tensor([7, 16])):  # counts that do not fit the placeholders
        with pytest.raises(ValueError, match="item placeholders and item features differ"):
            model(**(both | {"series_counts": bad_counts}))


def test_a_connector_that_merges_tokens_reads_one_length_only(capsys, tmp_path):
    cfg, model, proc = built(small("connector.kind=resampler"))
    with pytest.raises(BadSample, match="100 steps, not series.length=256 .connector.kind=resampler"):
        proc.pixels(SensorWorld().sample("train", 1).values[:, :100])
    folder = tmp_path / "data"
    folder.mkdir()
    np.save(folder / "series.npy", np.zeros((2, 6, 128)))
    (folder / "labels.txt").write_text("a\nb\n")
    one_line_error(cli(capsys, "train", "sensors_vlm", "--out", tmp_path / "run", "--dry-run", "--set",
                       "data.source=arrays", "--set", f"data.path={folder}", "--set", "eval.splits=[]", "--set",
                       "connector.kind=resampler"), "holds 128 steps (connector.kind=resampler reads one length)")


@pytest.mark.parametrize("args,needle", [
    (["--set", "vision.image_size=64"], "vision.image_size=64 is not read: data.source=sensors gives series"),
    (["--set", "lm.image_attention=bidirectional"], "lm.image_attention=bidirectional is not available with series"),
    (["--set", "connector.kind=pixel_shuffle"], "needs a square patch grid; the tower gives 17 patches"),
    (["--set", "eval.splits=[compositional]"], "unknown split 'compositional' (valid: train, val, test)"),
    (["--set", "series.length=100"], "series.length=100"),
    (["--set", "series.patch=512"], "series.patch=512 is longer than series.length=256"),
    (["--set", "data.class_prompt=which?"], "data.class_prompt is read by data.source=ts, arrays or pamap2 and the classify task"),
])
def test_settings_that_cannot_act_on_series_are_refused(capsys, tmp_path, args, needle):
    one_line_error(cli(capsys, "train", "sensors_vlm", "--out", tmp_path / "run", "--dry-run", *args), needle)


def test_series_settings_are_refused_on_image_data(capsys, tmp_path):
    one_line_error(cli(capsys, "train", "tiny", "--out", tmp_path / "run", "--dry-run", "--set", "series.patch=8"),
                   "series.patch=8 is not read: data.source=shapes gives image items")


def test_sensors_vlm_learns_the_activities_of_people_it_never_saw(capsys, tmp_path):
    """130 steps of batch 32, small LM. Chance is 1/7 for an activity; a model blind to the series could
    at best name the commonest one (0.26 of these 50 questions; 0.22 for the first activity), and answer
    "no" to "did it change?" (0.54). Measured on AMD EPYC, one thread, seeds 0/1/2: activity 0.60/0.78/0.56
    (F1 0.64/0.77/0.57), changed 0.98/0.96/0.98, first 0.40/0.42/0.44. Captions of 30 test recordings:
    CIDEr-D 4.7/4.5/4.7, exact 0.37/0.40/0.40 (the commonest caption said of every one: 1.83, 0.17)."""
    code, out, _ = cli(capsys, "train", "sensors_vlm", "--out", tmp_path / "run", "--set", "train.steps=130",
                       "--set", "train.batch_size=32", "--set", "series.layers=1", *SMALL_LM,
                       "--set", "eval.vqa_per_type=50", "--set", "eval.captions=30")
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert metrics["vqa_acc/activity"] >= 0.45 and metrics["activity_f1"] >= 0.45
    assert metrics["caption_cider"] >= 3.5 and metrics["caption_exact"] >= 0.3  # blind: at most 1.83 and 0.17
    assert metrics["vqa_acc/changed"] >= 0.85 and metrics["vqa_acc/first"] >= 0.3
    lines = (tmp_path / "run" / "eval_sensors_test.jsonl").read_text().splitlines()
    assert len(lines) == 50 * len(QUESTION_TYPES) + 30
    # asked through the API with an array, and by `graft generate --series` from .npy and .csv files
    values = SensorWorld().sample("test", 0).values
    said = load(tmp_path / "run").generate(values, ACTIVITY_PROMPT)
    assert said in ACTIVITIES
    np.save(tmp_path / "rec.npy", values)
    (tmp_path / "rec.csv").write_text("\n".join(",".join(repr(float(v)) for v in step) for step in values.T))
    for file in ("rec.npy", "rec.csv"):
        code, out, err = cli(capsys, "generate", tmp_path / "run", "--series", tmp_path / file, "--prompt", ACTIVITY_PROMPT)
        assert code == 0 and out.strip() == said, err
    png = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(png)
    one_line_error(cli(capsys, "generate", tmp_path / "run", "--image", png, "--prompt", "hi"), "reads series items")
    one_line_error(cli(capsys, "export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "hf"),
                   "has series items (data.source=sensors)")


def basic_motions() -> Path:
    """sktime's copy of BasicMotions (4 activities, 6 channels of a smart watch, 100 steps, 40 + 40
    recordings): read from its files, sktime is not imported."""
    found = importlib.util.find_spec("sktime")
    if found is None:
        pytest.skip("sktime (the test extra) is not installed")
    return Path(found.submodule_search_locations[0], "datasets", "data", "BasicMotions")


TS_SETTINGS = ["--set", "data.source=ts", "--set", "series.length=100", "--set", "series.patch=10", "--set",
               "series.stride=10", "--set", "eval.splits=[]"]


def test_a_vlm_learns_basic_motions_from_its_ts_files(capsys, tmp_path):
    """Real data: 60 steps of batch 16, small LM, on BasicMotions_TRAIN.ts, scored on BasicMotions_TEST.ts
    (10 per class: chance and any blind answer 0.25). Measured on AMD EPYC, one thread: accuracy 0.975
    (seeds 0, 1 and 2)."""
    d = basic_motions()
    code, _, _ = cli(capsys, "train", "sensors_vlm", "--out", tmp_path / "run", *TS_SETTINGS,
                     "--set", f"data.path={d / 'BasicMotions_TRAIN.ts'}",
                     "--set", f"eval.tasks=[classify={d / 'BasicMotions_TEST.ts'}]", "--set", "train.steps=60",
                     "--set", "train.batch_size=16", "--set", "series.layers=1", *SMALL_LM)
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert metrics["class_acc"] >= 0.75 and metrics["classify_skipped"] == 0
    assert {k.split("/")[1] for k in metrics if k.startswith("class_recall/")} == {
        "standing", "running", "walking", "badminton"}
    predictions = (tmp_path / "run" / "eval_classify.jsonl").read_text().splitlines()
    assert len(predictions) == 40


TS_HEADER = "# a comment\n@problemName toy\n@dimensions 2\n@seriesLength 100\n@classLabel true up down\n@data\n"


def ts_line(label: str, first=None) -> str:
    values = [np.sin(np.arange(100) / 5), np.cos(np.arange(100) / 5)]
    dims = [",".join(f"{v:.4f}" for v in row) for row in values]
    if first is not None:
        dims[0] = first
    return ":".join(dims) + f":{label}\n"


def test_every_line_of_a_ts_file_is_used_or_skipped_with_its_reason(capsys, tmp_path):
    gap = ",".join(["?"] * 3 + ["0.5"] * 97)
    lines = [ts_line("up"), ts_line("down", first=gap), ts_line("sideways"), ts_line("up", first="1,2,x"),
             ts_line("up", first="1,2,3"), "0.1,0.2:up\n", ts_line("down")]
    path = tmp_path / "toy.ts"
    path.write_text(TS_HEADER + "".join(lines))
    code, out, _ = cli(capsys, "data", "check", "sensors_vlm", *TS_SETTINGS, "--set", f"data.path={path}",
                       "--set", "series.channels=2", "--set", "data.min_good_fraction=0.4")
    assert code == 0
    assert "7 records read = 3 used + 4 skipped" in out, out
    assert "label_unknown                 1" in out and "series_bad                    3" in out, out


@pytest.mark.parametrize("text,needle", [
    ("@problemName x\n", "has no @data line"),
    ("@timeStamps true\n@classLabel true a\n@data\n", "has time stamps"),
    ("@dimensions 2\n@seriesLength 100\n@classLabel false\n@data\n", "declares no class labels"),
    ("@dimensions 3\n@seriesLength 100\n@classLabel true a b\n@data\n", "series.channels=2, but"),
])
def test_a_ts_file_graft_cannot_read_is_named_in_one_line(capsys, tmp_path, text, needle):
    path = tmp_path / "bad.ts"
    path.write_text(text)
    one_line_error(cli(capsys, "train", "sensors_vlm", "--out", tmp_path / "run", "--dry-run", *TS_SETTINGS,
                       "--set", f"data.path={path}", "--set", "series.channels=2"), needle)


def test_ts_runs_evaluate_by_task_and_image_runs_do_not_classify_series(capsys, tmp_path):
    path = tmp_path / "toy.ts"
    path.write_text(TS_HEADER + ts_line("up"))
    one_line_error(cli(capsys, "train", "sensors_vlm", "--out", tmp_path / "a", "--dry-run", *TS_SETTINGS[:-2],
                       "--set", f"data.path={path}", "--set", "series.channels=2"), "data.source=ts has no built-in world")
    one_line_error(cli(capsys, "train", "tiny", "--out", tmp_path / "b", "--dry-run", "--set",
                       f"eval.tasks=[classify={path}]"), "classify scores a run that reads series items; this run reads image")


def world_arrays(folder: Path, split: str, n: int, csv_files: bool = False) -> list[str]:
    """The sensor world's one-activity recordings of `split` as an arrays folder; their labels."""
    world, recs = SensorWorld(), []
    for i in range(4 * n):
        rec = world.sample(split, i)
        if len(rec.activities) == 1 and not np.isnan(rec.values).any():
            recs.append(rec)
        if len(recs) == n:
            break
    folder.mkdir()
    labels = [rec.activities[0][0] for rec in recs]
    if not csv_files:
        np.save(folder / "series.npy", np.stack([rec.values for rec in recs]))
        (folder / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
        return labels
    for i, rec in enumerate(recs):
        rows = "\n".join(",".join(f"{v:.5f}" for v in step) for step in rec.values.T)
        (folder / f"rec{i:03d}.csv").write_text("ax,ay,az,gx,gy,gz\n" + rows + "\n")
    (folder / "labels.csv").write_text("".join(f"rec{i:03d}.csv,{label}\n" for i, label in enumerate(labels)))
    return labels


def world_ts(path: Path, split: str, n: int, seed: int) -> None:
    """The sensor world's one-activity recordings of `split` as a .ts file of unequal lengths: each
    cut to a random window of 96-256 steps (3-8 s)."""
    rng, world, lines = np.random.default_rng(seed), SensorWorld(), []
    for i in range(6 * n):
        if len(lines) == n:
            break
        rec = world.sample(split, i)
        if len(rec.activities) == 1:
            steps = int(rng.integers(96, 257))
            start = int(rng.integers(0, 257 - steps))
            window = rec.values[:, start:start + steps]
            dims = (",".join("?" if np.isnan(v) else f"{v:.4f}" for v in row) for row in window)
            lines.append(":".join(dims) + f":{rec.activities[0][0]}\n")
    path.write_text(f"@problemName sensors\n@dimensions 6\n@equalLength false\n@classLabel true "
                    f"{' '.join(ACTIVITIES)}\n@data\n" + "".join(lines))


@pytest.mark.slow
def test_a_vlm_learns_from_recordings_of_different_lengths(capsys, tmp_path):
    """Per-item token counts end to end: 400 training recordings of 3-8 s in a .ts file (7 to 17
    series tokens each), scored on 60 recordings of 3-8 s of the held-out people (chance 1/7; the
    commonest label alone under 0.3). Measured on AMD EPYC, one thread, seeds 0-4: 0.82, 0.73, 0.93,
    0.98, 0.85."""
    world_ts(tmp_path / "train.ts", "train", 400, seed=0)
    world_ts(tmp_path / "test.ts", "test", 60, seed=1)
    metrics = trained_classifier(capsys, tmp_path, "ts", tmp_path / "train.ts", tmp_path / "test.ts")
    assert metrics["class_acc"] >= 0.6 and metrics["classify_skipped"] == 0, metrics


def trained_classifier(capsys, tmp_path: Path, source: str, train: Path, test: Path) -> dict:
    """The eval metrics of a small VLM trained 150 steps of batch 16 on `train` (data.source=`source`)
    and scored by the classify task on `test`."""
    code, _, _ = cli(capsys, "train", "sensors_vlm", "--out", tmp_path / "run", "--set", f"data.source={source}",
                     "--set", f"data.path={train}", "--set", "eval.splits=[]",
                     "--set", f"eval.tasks=[classify={test}]", "--set", "train.steps=150",
                     "--set", "train.batch_size=16", "--set", "series.layers=1", *SMALL_LM)
    assert code == 0
    return json.loads((tmp_path / "run" / "eval.json").read_text())


def test_a_vlm_learns_from_numpy_arrays_and_classifies_csv_files_of_unseen_people(capsys, tmp_path):
    """Trained on 400 of the world's training recordings saved as series.npy + labels.txt, scored on
    60 recordings of the held-out people saved as CSV files (chance 1/7; the commonest label alone
    under 0.3). Measured on AMD EPYC, one thread, seeds 0-4: 0.98, 1.00, 0.73, 0.90, 0.97."""
    world_arrays(tmp_path / "train", "train", 400)
    world_arrays(tmp_path / "test", "test", 60, csv_files=True)
    metrics = trained_classifier(capsys, tmp_path, "arrays", tmp_path / "train", tmp_path / "test")
    assert metrics["class_acc"] >= 0.6 and metrics["classify_skipped"] == 0, metrics


def test_every_file_of_an_arrays_folder_is_used_or_skipped(capsys, tmp_path):
    folder = tmp_path / "csv"
    world_arrays(folder, "train", 6, csv_files=True)
    (folder / "rec001.csv").write_text("a,b\nx,y\n")  # not numbers
    (folder / "rec002.csv").write_text("1,2,3\n4,5\n")  # ragged
    (folder / "labels.csv").write_text((folder / "labels.csv").read_text().replace("rec003.csv,", "other.csv,"))
    code, out, _ = cli(capsys, "data", "check", "sensors_vlm", "--set", "data.source=arrays", "--set",
                       f"data.path={folder}", "--set", "eval.splits=[]")
    assert code == 0 and "6 records read = 3 used + 3 skipped" in out, out
    assert "series_bad                    2" in out and "label_unknown                 1" in out, out


@pytest.mark.parametrize("make,needle", [
    (lambda d: None, "holds neither series.npy + labels.txt nor *.csv files + labels.csv"),
    (lambda d: np.save(d / "series.npy", np.array([{"a": 1}], dtype=object)), "is not a numeric NumPy array"),
    (lambda d: np.save(d / "series.npy", np.zeros((2, 6, 256))), "has series.npy but no labels.txt"),
    (lambda d: (np.save(d / "series.npy", np.zeros((2, 6, 256))), (d / "labels.txt").write_text("a\n")),
     "has 1 lines for 2 series"),
    (lambda d: (np.save(d / "series.npy", np.zeros((1, 6, 300))), (d / "labels.txt").write_text("a\n")),
     "series.npy holds 300 steps"),
    (lambda d: (np.save(d / "series.npy", np.zeros((1, 5, 256))), (d / "labels.txt").write_text("a\n")),
     "holds series of (5, 256)"),
])
def test_an_arrays_folder_graft_cannot_read_is_named_in_one_line(capsys, tmp_path, make, needle):
    folder = tmp_path / "data"
    folder.mkdir()
    make(folder)
    one_line_error(cli(capsys, "train", "sensors_vlm", "--out", tmp_path / "run", "--dry-run", "--set",
                       "data.source=arrays", "--set", f"data.path={folder}", "--set", "eval.splits=[]"), needle)
