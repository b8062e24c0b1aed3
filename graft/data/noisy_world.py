"""The noisy-web world (`data.source=noisy`): the built-in world's training pool as scraped
image–alt-text pairs are, with each record's ground truth kept beside it.

Record i starts as training sample i of the world (data/shapes.py) and, with the shares of
`data.noise` (default `DEFAULT_NOISE`), becomes one of:

    clean        the sample's image and its caption
    mismatch     the image with the caption of another training scene (a different caption)
    fragment     the image with its caption cut to its first words (at least one, not all)
    boilerplate  the image with alt-text that says nothing of it ("click to enlarge")
    near_dup     an earlier record's scene drawn again with small shifts, other sizes and colour
                 shades (data/restyle.py's renderer), with that scene's caption
    exact_dup    an earlier record again, image and caption byte for byte
    leak         a `test` scene and its caption: the evaluation split inside the training pool

`Noise.origin` names what a record was made from ("train #12", "test #3"), so a filter's
precision and recall can be measured against the truth (`graft data export-shapes` writes it into
each record's .json and the shard's .parquet). The draws are a pure function of (data.seed, i):
the pool is as deterministic as the world, and a source like it (indexed, exact resume).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image

from graft.config import Config
from graft.data.restyle import draw
from graft.data.samples import ONE_IMAGE, Example
from graft.data.shapes import CAPTION_PROMPT, ShapesWorld
from graft.errors import UserError

NOISE_KINDS = ("mismatch", "fragment", "boilerplate", "near_dup", "exact_dup", "leak")
# Six in ten records noisy: DataComp's pools keep about a third after CLIP-score filtering.
DEFAULT_NOISE = {"mismatch": 0.3, "fragment": 0.1, "boilerplate": 0.1, "near_dup": 0.05, "exact_dup": 0.05, "leak": 0.02}
BOILERPLATE = ("image", "photo", "click to enlarge", "untitled", "stock photo", "thumbnail", "img_0042.jpg",
               "download", "see more", "picture of the day")
LEAK_POOL = 1000  # leaked scenes are drawn from the first test scenes (the ones evaluation reads)


@dataclass(frozen=True)
class Noise:
    kind: str  # "clean" or one of NOISE_KINDS
    origin: str  # the world sample the image came from: "train #12", "test #3"


@dataclass(frozen=True)
class WebRecord:
    image: Image.Image
    caption: str
    noise: Noise


def noise_shares(cfg: Config) -> dict[str, float]:
    """`data.noise` checked (known kinds, shares in [0, 1] summing to at most 1), or the default."""
    shares = dict(cfg.data.noise) or dict(DEFAULT_NOISE)
    for kind, share in shares.items():
        if kind not in NOISE_KINDS:
            raise UserError(f"data.noise: {kind!r} is not a kind of noise ({', '.join(NOISE_KINDS)})")
        if not 0 <= share <= 1:
            raise UserError(f"data.noise: {kind}={share} must be a share in [0, 1]")
    if sum(shares.values()) > 1 + 1e-9:
        raise UserError(f"data.noise: the shares sum to {sum(shares.values()):g}, more than 1")
    return shares


class NoisyWorld:
    """Record i of the noisy pool (see the module docstring)."""

    def __init__(self, world: ShapesWorld, shares: dict[str, float]):
        self.world, self.shares = world, shares

    def kind(self, index: int) -> str:
        u, edge = random.Random(f"noisy/{self.world.seed}/{index}/kind").random(), 0.0
        for kind in NOISE_KINDS:
            edge += self.shares.get(kind, 0.0)
            if u < edge:
                return kind
        return "clean"

    def record(self, index: int) -> WebRecord:
        kind = self.kind(index)
        rng = random.Random(f"noisy/{self.world.seed}/{index}")
        if kind == "exact_dup" and index > 0:
            copy = self.record(rng.randrange(index))  # an earlier index: the chain ends at a non-copy
            return WebRecord(copy.image, copy.caption, Noise(kind, copy.noise.origin))
        if kind == "near_dup" and index > 0:
            j = rng.randrange(index)
            s = self.world.sample("train", j)
            return WebRecord(draw(s.objects, self.world.image_size, self.world.grid, rng), s.caption,
                             Noise(kind, f"train #{j}"))
        if kind == "leak":
            j = rng.randrange(LEAK_POOL)
            s = self.world.sample("test", j)
            return WebRecord(s.image, s.caption, Noise(kind, f"test #{j}"))
        s = self.world.sample("train", index)
        caption = s.caption
        if kind == "mismatch":
            while caption == s.caption:  # another scene's caption; each try a new scene
                caption = self.world.sample("train", rng.randrange(1 << 30)).caption
        elif kind == "fragment":
            words = caption.split()
            caption = " ".join(words[:rng.randrange(1, len(words))])  # captions have four words or more
        elif kind == "boilerplate":
            caption = rng.choice(BOILERPLATE)
        elif kind != "clean":
            kind = "clean"  # a copy asked of record 0 has nothing earlier to copy
        return WebRecord(s.image, caption, Noise(kind, f"train #{index}"))


class NoisySource:
    """`data.source=noisy`: the pool's records as (image, caption) examples; a VLM reads each as a
    caption request and its caption."""

    indexed = True

    def __init__(self, world: ShapesWorld, cfg: Config, split: str = "train"):
        if split != "train":
            raise UserError(f"data.source=noisy has only a training pool (asked for {split!r}); "
                            "eval.splits name the clean world's splits")
        self.pool = NoisyWorld(world, noise_shares(cfg))

    def epoch(self, epoch: int, slot: int, nslots: int, log=None):
        return range(slot, 1 << 62, nslots)

    def key(self, index: int) -> str:
        return f"noisy #{index}"

    def example(self, index: int) -> Example:
        r = self.pool.record(index)
        return Example(self.key(index), [r.image], [(CAPTION_PROMPT, r.caption)], ONE_IMAGE)
