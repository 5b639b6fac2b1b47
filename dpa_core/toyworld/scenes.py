"""Scenes: what an image shows, as data. Everything the world says about an image (captions,
questions, answers) is derived from a Scene, and the drawing is derived from the same Scene."""

from __future__ import annotations

import random
from dataclasses import dataclass

from dpa_core.errors import DPAInputError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 25),
    "purple": (135, 55, 185),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZE_WORDS = ("small", "large")
# A 3x3 grid of cells; the name of a cell is its position word.
POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
ALL_POSITIONS = tuple(p for row in POSITIONS for p in row)
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = ("one", "two", "three", "four")
# Words that carry visual content; everything else in a caption is style or grammar.
# By class, for the image-reliance diagnostic's per-class means (dpa_core/reliance.py): "object" is the
# generic noun, which a caption's count decides ("one shape", "two shapes").
CONTENT_WORD_CLASSES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLORS),
    "shape": SHAPES,
    "size": SIZE_WORDS,
    "position": tuple(sorted({w for p in (*ALL_POSITIONS, *RELATIONS) for w in p.split()} - {"of"})),
    "count": NUMBER_WORDS,
    "object": ("shape", "shapes"),
}
CONTENT_WORDS = frozenset(w for words in CONTENT_WORD_CLASSES.values() for w in words)


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    row: int
    col: int
    dx: int  # pixel jitter of the centre; not part of the content
    dy: int

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]

    @property
    def name(self) -> str:
        """Unique within a scene, because colours and shapes are each used once per scene."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # in reading order (row, then column)

    @property
    def count(self) -> int:
        return len(self.objects)

    def key(self) -> tuple:
        """The content of the scene, jitter excluded: two scenes with one key show the same thing."""
        return tuple((o.shape, o.color, o.size, o.row, o.col) for o in self.objects)


def relation(a: Obj, b: Obj) -> str | None:
    """The one relation of a to b when they share a row or a column; None for diagonal pairs,
    where both a horizontal and a vertical relation would be true and a question would be ambiguous."""
    if a.row == b.row:
        return "left of" if a.col < b.col else "right of"
    if a.col == b.col:
        return "above" if a.row < b.row else "below"
    return None


def both_relations(a: Obj, b: Obj) -> str:
    """Everything true about where a is relative to b, e.g. "above and left of"."""
    parts = []
    if a.row != b.row:
        parts.append("above" if a.row < b.row else "below")
    if a.col != b.col:
        parts.append("left of" if a.col < b.col else "right of")
    return " and ".join(parts)


def aligned_pairs(scene: Scene) -> list[tuple[Obj, Obj]]:
    """Ordered pairs (a, b) with an unambiguous relation."""
    return [(a, b) for a in scene.objects for b in scene.objects if a is not b and relation(a, b)]


def sample_scene(rng: random.Random, max_objects: int, max_jitter: int) -> Scene:
    n = rng.randint(1, max_objects)
    shapes = rng.sample(SHAPES, n)
    colors = rng.sample(sorted(COLORS), n)
    cells = sorted(rng.sample(range(9), n))
    objects = tuple(
        Obj(shape=s, color=c, size=rng.choice(SIZE_WORDS), row=cell // 3, col=cell % 3,
            dx=rng.randint(-max_jitter, max_jitter), dy=rng.randint(-max_jitter, max_jitter))
        for s, c, cell in zip(shapes, colors, cells)
    )
    return Scene(objects)


def sample_scenes(rng: random.Random, n: int, max_objects: int, max_jitter: int,
                  exclude: set | None = None, unique: bool = False) -> list[Scene]:
    """n scenes, none whose content key is in `exclude`; with unique=True also pairwise different
    in content (a benchmark should not ask the same thing twice)."""
    seen = set(exclude or ())
    scenes = []
    for _attempt in range(100 * n + 1000):
        if len(scenes) == n:
            break
        scene = sample_scene(rng, max_objects, max_jitter)
        if scene.key() in seen:
            continue
        if unique:
            seen.add(scene.key())
        scenes.append(scene)
    if len(scenes) < n:
        raise DPAInputError(
            f"cannot draw {n} different scenes with at most {max_objects} objects per scene.",
            fix="raise max_objects or ask for fewer benchmark images.",
        )
    return scenes
