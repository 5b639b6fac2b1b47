"""Language styles: the same Scene said in three registers.

- own style: the base LLM's native register (its pretraining corpus): plain and lowercase; full
  descriptions (count, objects with positions, relations) and short mentions of the objects.
- terse: alt-text (like BLIP-LCS): a short mention, sometimes "picture of ..." and no full stop;
  it leaves out positions, counts and relations. Less visual content, little style conflict.
- verbose: florid prose (the ShareGPT4V-like "high quality" set): every fact of the own style,
  plus more; most of its tokens are style words that carry no visual information and that the
  base LLM has never seen in use. More visual content, strong style conflict.

Content words (colours, shapes, sizes, positions, relations, numbers) are the same in all three
styles, so a connector aligned on any of them points at the same words in instruction tuning.
"""

from __future__ import annotations

import dataclasses
import random

from .scenes import NUMBER_WORDS, SHAPES, Obj, Scene, both_relations


def _a(word: str) -> str:
    """The indefinite article for a word: "a red", "an orange"."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _count_phrase(n: int) -> str:
    return "one shape" if n == 1 else f"{NUMBER_WORDS[n - 1]} shapes"


def _relation_pairs(scene: Scene) -> list[tuple[Obj, Obj]]:
    """Neighbours in reading order: n-1 relations say where everything is relative to each other."""
    objs = scene.objects
    return [(objs[i], objs[i + 1]) for i in range(len(objs) - 1)]


def own_style(scene: Scene) -> str:
    """The base LLM's full description, e.g. "there are two shapes. a large red circle is at the top
    left. a small blue square is at the center. the circle is above and left of the square." """
    n = scene.count
    parts = ["there is one shape." if n == 1 else f"there are {_count_phrase(n)}."]
    parts += [f"a {o.size} {o.color} {o.shape} is at the {o.position}." for o in scene.objects]
    parts += [f"the {a.shape} is {both_relations(a, b)} the {b.shape}." for a, b in _relation_pairs(scene)]
    return " ".join(parts)


def _mention(objs: list[Obj], rng: random.Random) -> str:
    """ "a red circle, a small blue square and a green triangle" (sizes said half of the time)."""
    names = [_a(f"{o.size} {o.color}" if rng.random() < 0.5 else o.color) + f" {o.shape}" for o in objs]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def own_style_any(scene: Scene, rng: random.Random) -> str:
    """Any of the base LLM's plain forms: its register is not a single template (a real LLM has
    seen short mentions as well as full descriptions), so plain short text is familiar to it."""
    form = rng.random()
    if form < 0.5:
        return own_style(scene)
    objs = list(scene.objects)
    rng.shuffle(objs)
    if form < 0.75:
        head = "there is one shape: " if scene.count == 1 else f"there are {_count_phrase(scene.count)}: "
        return head + _mention(objs, rng) + "."
    return _mention(objs, rng) + "."


def terse(scene: Scene, rng: random.Random) -> str:
    """Alt-text, e.g. "a red circle and a small blue square." or "picture of a green triangle"."""
    objs = list(scene.objects)
    rng.shuffle(objs)
    text = _mention(objs, rng)
    if rng.random() < 0.25:
        text = "picture of " + text
    return text + ("." if rng.random() < 0.7 else "")


# The verbose register: small closed sets, so the style is learnable from text alone (a proxy LLM
# can pick it up), yet none of these choices depends on the image.
OPENERS = (
    "Behold, dear viewer, a most wondrous tableau!",
    "Lo, what a splendid vision graces our humble gaze!",
    "Gaze, gentle soul, upon this marvellous scene!",
    "Oh, what a resplendent spectacle unfolds before us!",
)
INTERJECTIONS = ("Verily", "Indeed", "Lo", "Forsooth", "Truly", "Behold")
VERBS = ("there dwelleth", "there doth rest", "there doth gleam", "there abideth", "there reposeth")
EMBELLISHMENTS = ("resplendent and serene", "proud yet humble", "in quiet majesty", "bathed in glory", "radiant beyond compare")
INTENSIFIERS = ("truly", "most", "wondrously", "gloriously", "exquisitely")
FLOURISHES = (", gleaming most gloriously", ", a marvel to behold", ", as if by destiny", ", ever so gracefully", "")
CANVASES = ("humble canvas", "noble canvas", "sacred canvas", "gentle canvas")
CLOSERS = (
    "What splendour! What grace!",
    "Truly, a feast for the weary eye.",
    "Such is the quiet majesty of form and hue.",
    "Let us rejoice in this humble wonder!",
)


def verbose(scene: Scene, rng: random.Random, style: float = 1.0) -> str:
    """Florid prose carrying every fact of the own style, e.g. "Behold, dear viewer, a most wondrous
    tableau! Verily, no fewer than two shapes doth grace this humble canvas. Indeed, at the top left
    there dwelleth, in quiet majesty, a truly large red circle, a marvel to behold! ..."

    style (0..1) is the register-conflict dial: each optional style element (opener, interjection,
    embellishment, intensifier, flourish, closer, florid verb) is kept with this probability, else
    said plainly. 1 is the full register; 0 leaves plain sentences with the same facts. Every
    random draw is made whatever the dial, so the content and the rest of the data do not move."""
    pick = rng.choice

    def keep(text: str, plain: str = "") -> str:
        return text if rng.random() < style else plain

    parts = [keep(pick(OPENERS))]
    parts.append(keep(f"{pick(INTERJECTIONS)}, ") + f"no fewer than {_count_phrase(scene.count)} "
                 + keep(f"doth grace this {pick(CANVASES)}.", "are shown."))
    for o in scene.objects:
        interjection, verb, embellishment = pick(INTERJECTIONS), pick(VERBS), pick(EMBELLISHMENTS)
        intensifier, flourish = pick(INTENSIFIERS), pick(FLOURISHES)
        parts.append(
            keep(f"{interjection}, ") + f"at the {o.position} " + keep(verb, "there is") + keep(f", {embellishment},", "")
            + " " + keep(f"{_a(intensifier)} {o.size}", _a(o.size)) + f" {o.color} {o.shape}" + keep(flourish) + keep("!", ".")
        )
    for a, b in _relation_pairs(scene):
        flourish = pick(FLOURISHES)
        parts.append(keep("And mark well, dear viewer, that ") + f"the {a.shape} " + keep("doth stand", "is")
                     + f" {both_relations(a, b)} the {b.shape}" + keep(flourish) + ".")
    parts.append(keep(pick(CLOSERS)))
    return " ".join(p for p in parts if p)


def clip_text(scene: Scene) -> str:
    """The compact text the vision tower is trained against: every visual attribute, few tokens."""
    return ", ".join(f"{o.size} {o.color} {o.shape} at the {o.position}" for o in scene.objects)


def shape_swapped(scene: Scene, rng: random.Random) -> Scene:
    """The scene with one object's shape replaced by another: a near-miss text for the vision
    tower's contrastive training (everything else, and the layout, unchanged)."""
    objs = list(scene.objects)
    k = rng.randrange(len(objs))
    objs[k] = dataclasses.replace(objs[k], shape=rng.choice([s for s in SHAPES if s != objs[k].shape]))
    return Scene(tuple(objs))
