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

import random

from .scenes import NUMBER_WORDS, Obj, Scene, both_relations


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


def verbose(scene: Scene, rng: random.Random) -> str:
    """Florid prose carrying every fact of the own style, e.g. "Behold, dear viewer, a most wondrous
    tableau! Verily, no fewer than two shapes doth grace this humble canvas. Indeed, at the top left
    there dwelleth, in quiet majesty, a truly large red circle, a marvel to behold! ..." """
    pick = rng.choice
    parts = [pick(OPENERS)]
    parts.append(f"{pick(INTERJECTIONS)}, no fewer than {_count_phrase(scene.count)} doth grace this {pick(CANVASES)}.")
    for o in scene.objects:
        parts.append(
            f"{pick(INTERJECTIONS)}, at the {o.position} {pick(VERBS)}, {pick(EMBELLISHMENTS)}, "
            f"{_a(pick(INTENSIFIERS))} {o.size} {o.color} {o.shape}{pick(FLOURISHES)}!"
        )
    for a, b in _relation_pairs(scene):
        parts.append(f"And mark well, dear viewer, that the {a.shape} doth stand {both_relations(a, b)} the {b.shape}{pick(FLOURISHES)}.")
    parts.append(pick(CLOSERS))
    return " ".join(parts)


def clip_text(scene: Scene) -> str:
    """The compact text the vision tower is trained against: every visual attribute, few tokens."""
    return ", ".join(f"{o.size} {o.color} {o.shape} at the {o.position}" for o in scene.objects)
