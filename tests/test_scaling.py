"""Scaling-law fits (graft/scaling.py, graft/scale.py): the golden test on Chinchilla's Figure 4
points against Besiroglu et al.'s replication, the early-stop trap, recovery of known constants,
and `graft scale fit` / `predict` with bad points files refused in one line."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from graft.cli import main
from graft.scaling import Points, bootstrap, fit, objective, read_points

CHINCHILLA = Path(__file__).parent / "data" / "chinchilla_fig4_points.csv"  # tests/data/README.md
# Besiroglu et al. (2024), Table 1: the 240 points left after dropping the 5 highest losses
REPLICATED = {"E": (1.8172, 0.03), "A": (482.01, 124.6), "B": (2085.43, 1293), "alpha": (0.3478, 0.02),
              "beta": (0.3658, 0.02)}


@pytest.fixture(scope="module")
def chinchilla() -> Points:
    pts = read_points(CHINCHILLA)
    return pts.subset(np.sort(np.argsort(pts.loss, kind="stable")[:-5]))


@pytest.fixture(scope="module")
def tight(chinchilla):
    return fit(chinchilla)


def test_chinchilla_fit_lands_within_the_replications_errors(tight):
    f = tight
    for name, (value, se) in REPLICATED.items():
        assert abs(getattr(f, name) - value) <= se, (name, getattr(f, name), value, se)
    assert f.objective == pytest.approx(0.0010183, abs=2e-7)  # the summed Huber loss at its minimum
    n, d = f.frontier(5.76e23)  # Chinchilla's own compute: about 20 tokens per parameter
    assert 15 < d / n < 25 and 6 * n * d == pytest.approx(5.76e23)


def test_averaging_the_loss_with_default_tolerances_stops_early(chinchilla, tight):
    """The trap of Hoffmann et al.'s published fit (Besiroglu et al. §3): the averaged loss has
    gradients below scipy's default tolerance long before the minimum."""
    early = fit(chinchilla, reduction="mean", tight=False)
    theta = np.array([np.log(early.E), np.log(early.A), np.log(early.B), early.alpha, early.beta])
    assert objective(theta, chinchilla)[0] > 1.05 * tight.objective  # the summed loss at the early stop
    assert abs(early.A - REPLICATED["A"][0]) > REPLICATED["A"][1]  # outside the replication's errors


def test_known_constants_are_recovered():
    rng = np.random.default_rng(0)
    n, d = 10 ** rng.uniform(6, 9, 120), 10 ** rng.uniform(8, 11, 120)
    true = dict(E=1.5, A=300.0, B=900.0, alpha=0.3, beta=0.35)
    loss = (true["E"] + true["A"] / n ** true["alpha"] + true["B"] / d ** true["beta"]) * np.exp(rng.normal(0, 1e-3, 120))
    f = fit(Points(n, d, loss))
    for name, value in true.items():
        assert getattr(f, name) == pytest.approx(value, rel=0.1), name


def test_a_loss_without_a_floor_still_has_bootstrap_intervals():
    """Points of A/N^alpha + B/D^beta with no E (graft's world is learnable to zero loss): the fit
    takes E to 0 (in the default sweep exp(e) underflowed to exactly 0.0), and the refits, started
    from it, still move — each constant's interval has width (a start at log 0 = -inf once left every
    refit equal to the fit: zero-width intervals)."""
    rng = np.random.default_rng(1)
    n, d = 10 ** rng.uniform(4, 6, 40), 10 ** rng.uniform(5, 7, 40)
    loss = (600 / n ** 0.8 + 100 / d ** 0.4) * np.exp(rng.normal(0, 0.02, 40))
    pts = Points(n, d, loss)
    best = fit(pts)
    assert best.E < 1e-3 and best.alpha == pytest.approx(0.8, rel=0.15) and best.beta == pytest.approx(0.4, rel=0.15)
    boot = bootstrap(pts, dataclasses.replace(best, E=0.0), samples=20)  # as exp(e) underflows to in a sweep's fit
    for name in ("A", "B", "alpha", "beta"):
        assert np.std([getattr(f, name) for f in boot]) > 0, name


def test_a_bootstrap_refit_that_runs_off_is_left_out_and_counted(tmp_path):
    """A real sweep's points (tests/data/README.md) where a resample's refit sent log A past a float's
    range: the fit and its report are written, the refits that remain and those left out add up to
    --bootstrap, and the report says how many were left out."""
    out = tmp_path / "fit"
    # resample 54 of the seeded 60 ran off on the AMD EPYC (log A 1728)
    assert main(["scale", "fit", str(CHINCHILLA.parent / "wsd_sweep_points.csv"), "--out", str(out),
                 "--bootstrap", "60"]) == 0
    data = json.loads((out / "fit.json").read_text())
    assert len(data["bootstrap"]) + data["bootstrap_diverged"] == 60 and len(data["bootstrap"]) >= 45
    said = "diverged and are left out" in (out / "report.md").read_text()
    assert said == (data["bootstrap_diverged"] > 0)
    assert all(np.isfinite(v).all() for v in data["bootstrap"])


def test_scale_fit_and_predict_through_the_cli(tmp_path, capsys):
    out = tmp_path / "fit"
    assert main(["scale", "fit", str(CHINCHILLA), "--out", str(out), "--drop-highest", "5", "--bootstrap", "40"]) == 0
    data = json.loads((out / "fit.json").read_text())
    assert data["fit"]["points"] == 240 and len(data["bootstrap"]) == 40
    for name, (value, se) in REPLICATED.items():  # bootstrap errors of the replication's size
        got = data["constants"][name]
        assert abs(got["value"] - value) <= se and se / 3 < got["se"] < 3 * se, (name, got)
        assert got["ci95"][0] < got["value"] < got["ci95"][1]
    assert (out / "fit.png").stat().st_size > 10_000 and "| alpha |" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["scale", "predict", str(out), "--flops", "1e21"]) == 0
    text = capsys.readouterr().out
    assert "compute-optimal at C = 1e+21" in text and "N_opt" in text and "tokens_per_param" in text


@pytest.mark.parametrize("content, needle", [
    ("params,loss\n1,2\n", "missing tokens or flops"),
    ("params,tokens,loss\n" + "1e6,1e8,2.0\n" * 9 + "1e6,-1e8,2.0\n", "row 11: tokens=-1e8 must be a positive number"),
    ("params,tokens,loss\n" + "1e6,1e8,x\n" * 10, "row 2: loss='x' is not a number"),
    ("params,tokens,loss\n" + "1e6,1e8,2.0\n" * 3, "3 points for 5 constants"),
])
def test_bad_points_files_are_one_line(tmp_path, capsys, content, needle):
    path = tmp_path / "points.csv"
    path.write_text(content)
    assert main(["scale", "fit", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()
    assert main(["scale", "predict", str(tmp_path / "nowhere"), "--flops", "1e20"]) == 2
    assert "holds no fit.json" in capsys.readouterr().err
