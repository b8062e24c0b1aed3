"""The built-in sensor world: recordings of human activities from a wrist-worn IMU, no download.

A recording is `seconds` x `rate` samples of 6 channels — a 3-axis accelerometer (in g) and a
3-axis gyroscope (in rad/s), the layout of PAMAP2's IMUs and sktime's BasicMotions — of one person
doing one activity, or two with a change between them. Recording `index` of `split` is a pure
function of (seed, split, index). The signals are simple physics, not noise with a label:

- posture sets the gravity vector the accelerometer reads at rest (lying: along x; sitting and
  standing: tilted differently towards y);
- walking, running and stairs add a vertical bounce at the step frequency and its harmonic, and an
  arm swing on the gyroscope at half of it; cycling a smooth pedalling rotation; the frequencies and
  amplitudes are the activity's, scaled per person;
- each person (subject) has their own cadence, vigour, sensor bias and a small tilt of the sensor on
  the wrist; every sample has sensor noise, and some recordings a gap where the sensor dropped out
  (NaN, as in PAMAP2's files: the processor fills short gaps and skips recordings with long ones).

Splits: `train` and `val` are subjects 0-7 (disjoint recordings), `test` holds out subjects 8 and 9,
so it measures generalisation to people never seen. Every recording carries a caption, a class label
(its first activity) and one question–answer pair per question type it allows (`QUESTION_TYPES`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graft.data.shapes import QA

SPLITS = ("train", "val", "test")
ACTIVITIES = ("lying", "sitting", "standing", "walking", "running", "cycling", "stairs")
MOVING = frozenset({"walking", "running", "cycling", "stairs"})
QUESTION_TYPES = ("activity", "moving", "changed", "first", "last", "when")
CHANNELS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")
SUBJECTS = {"train": range(0, 8), "val": range(0, 8), "test": range(8, 10)}
ACTIVITY_PROMPT = "what is the person doing?"
RECORDING_PROMPT = "describe the recording."  # the caption request

# posture → gravity in the sensor's frame (unit vector); motion → (step Hz, bounce g, swing rad/s)
GRAVITY = {"lying": (0.95, 0.05, 0.3), "sitting": (0.35, 0.55, 0.75), "standing": (0.1, 0.98, 0.15),
           "walking": (0.1, 0.98, 0.15), "running": (0.2, 0.95, 0.2), "cycling": (0.55, 0.75, 0.35),
           "stairs": (0.1, 0.98, 0.15)}
MOTION = {"walking": (1.8, 0.30, 1.2), "running": (2.8, 1.00, 2.8), "cycling": (1.2, 0.10, 0.6),
          "stairs": (1.5, 0.45, 1.0)}


@dataclass
class Recording:
    values: np.ndarray  # (6, seconds x rate) float32; NaN where the sensor dropped out
    activities: list[tuple[str, float]]  # (activity, start in seconds), in order
    subject: int
    caption: str
    qa: list[QA]
    label: int  # index of the first activity in ACTIVITIES

    def question(self, kind: str) -> QA | None:
        return next((q for q in self.qa if q.kind == kind), None)


class SensorWorld:
    def __init__(self, seconds: int = 8, rate: int = 32, seed: int = 0, change_prob: float = 0.4,
                 gap_prob: float = 0.1):
        self.seconds, self.rate, self.seed = seconds, rate, seed
        self.change_prob, self.gap_prob = change_prob, gap_prob

    @property
    def length(self) -> int:
        return self.seconds * self.rate

    def sample(self, split: str, index: int) -> Recording:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        rng = np.random.default_rng([self.seed, SPLITS.index(split), index])
        subjects = SUBJECTS[split]
        subject = subjects[int(rng.integers(len(subjects)))]
        first = ACTIVITIES[int(rng.integers(len(ACTIVITIES)))]
        activities = [(first, 0.0)]
        if rng.random() < self.change_prob:
            second = ACTIVITIES[(ACTIVITIES.index(first) + 1 + int(rng.integers(len(ACTIVITIES) - 1))) % len(ACTIVITIES)]
            activities.append((second, float(rng.integers(2, self.seconds - 1))))  # whole seconds, 2 .. seconds-2
        values = self._signal(activities, self._person(subject), rng)
        return Recording(values, activities, subject, caption(activities), questions(activities), ACTIVITIES.index(first))

    def _person(self, subject: int) -> dict:
        """A subject's own cadence, vigour, sensor bias and sensor tilt (a rotation about z)."""
        rng = np.random.default_rng([self.seed, 99, subject])
        tilt = rng.uniform(-0.3, 0.3)
        c, s = np.cos(tilt), np.sin(tilt)
        return {"cadence": rng.uniform(0.85, 1.15), "vigour": rng.uniform(0.75, 1.25),
                "bias": rng.normal(0, 0.03, size=6), "rotation": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}

    def _signal(self, activities: list[tuple[str, float]], person: dict, rng: np.random.Generator) -> np.ndarray:
        n, t = self.length, np.arange(self.length) / self.rate
        out = np.zeros((6, n))
        bounds = [round(start * self.rate) for _, start in activities] + [n]
        for (activity, _), a, b in zip(activities, bounds, bounds[1:]):
            out[:, a:b] = _activity(activity, t[a:b], person, rng)
        rot = person["rotation"]
        out[:3], out[3:] = rot @ out[:3], rot @ out[3:]
        out += person["bias"][:, None] + rng.normal(0, 1, size=out.shape) * np.array([0.03] * 3 + [0.05] * 3)[:, None]
        if rng.random() < self.gap_prob:  # the sensor dropped out for a moment
            start, width = int(rng.integers(n - 16)), int(rng.integers(2, 12))
            out[:, start : start + width] = np.nan
        return out.astype(np.float32)


def _activity(activity: str, t: np.ndarray, person: dict, rng: np.random.Generator) -> np.ndarray:
    """(6, len(t)): gravity of the posture, plus the motion of the activity at this person's pace."""
    g = np.array(GRAVITY[activity]) / np.linalg.norm(GRAVITY[activity])
    out = np.zeros((6, len(t)))
    out[:3] = g[:, None]
    if activity not in MOTION:
        out[:3] += rng.normal(0, 0.01, size=(3, 1))  # posture varies a little between recordings
        return out
    hz, bounce, swing = MOTION[activity]
    hz, phase = hz * person["cadence"] * rng.uniform(0.93, 1.07), rng.uniform(0, 2 * np.pi)
    bounce, swing = bounce * person["vigour"], swing * person["vigour"]
    step = 2 * np.pi * hz * t + phase
    if activity == "cycling":  # smooth pedalling: the wrist circles, little impact
        out[0] += bounce * np.sin(step)
        out[3], out[4] = swing * np.cos(step), swing * np.sin(step)
        return out
    harmonic = 0.6 if activity == "stairs" else 0.3  # climbing: each step lifts the body, a sharper push
    out[1] += bounce * (np.sin(step) + harmonic * np.sin(2 * step))
    out[0] += 0.4 * bounce * np.sin(step / 2)  # forward-backward with the arm
    out[5] += swing * np.sin(step / 2)  # the arm swings once per two steps
    out[3] += 0.3 * swing * np.sin(step)
    return out


def caption(activities: list[tuple[str, float]]) -> str:
    if len(activities) == 1:
        return f"the person was {activities[0][0]}"
    (a, _), (b, start) = activities
    return f"the person was {a}, then {b} after {start:.0f} seconds"


def questions(activities: list[tuple[str, float]]) -> list[QA]:
    """One question per type the recording allows: what they do (one activity), whether they move
    (throughout), whether the activity changed; with a change, what came first, last, and when."""
    first, last = activities[0][0], activities[-1][0]
    qa = [QA("did the activity change?", "yes" if len(activities) > 1 else "no", "changed")]
    if len(activities) == 1:
        qa += [QA(ACTIVITY_PROMPT, first, "activity"),
               QA("is the person moving?", "yes" if first in MOVING else "no", "moving")]
        return qa
    return qa + [QA("what did the person do first?", first, "first"),
                 QA("what did the person do last?", last, "last"),
                 QA(f"when did the person start {last}?", f"after {activities[1][1]:.0f} seconds", "when")]
