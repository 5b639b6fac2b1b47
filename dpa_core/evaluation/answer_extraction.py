"""Turn a model's free-text reply into an option letter (multiple choice) or a match verdict (short answer).

Pure string logic, no model: the same rules score the built-in benchmarks and are checked against
VLMEvalKit's own exact-matching extraction (tests/test_evaluation_vlmeval.py).

Multiple choice, in order (the first rule that gives exactly one option wins):
  1. the whole reply is a letter marker: "B", "(B)", "B.", "b)", "[B]";
  2. an explicit statement: "The answer is B", "Answer: (C)", "option D", "correct choice is A.";
  3. a leading letter marker followed by text: "B. red circle", "(B) red circle", "B: ...";
  4. the option's text: the reply equals one option's text, or contains exactly one option's text
     (case, punctuation and a leading article ignored; "red" inside "red circle" is not a second hit);
  5. exactly one distinct option letter stands alone among the reply's words ("I pick C here");
     a capital "A" before a lower-case word is read as the article ("A red circle"), not option A.
Anything else (no hit, or several different options) is unparsed: scored wrong and flagged.
"""

from __future__ import annotations

import ast
import re
import unicodedata

# Rule 1: nothing but one letter, optionally bracketed and/or followed by one punctuation mark.
_BARE_LETTER = re.compile(r"^[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[.:,;!]?$")
# Rule 2: "answer/option/choice ... is/: X". The letter must be upper case: "the answer is a red
# circle" uses "a" as an article, not as option A.
_STATED_PREFIX = r"(?i:\b(?:answer|option|choice)s?\b(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?)\s*[:\-]?\s*"
_STATED_LETTER = re.compile(_STATED_PREFIX + r"[\(\[]?([A-Z])(?![A-Za-z])")
# A lower-case letter counts only when nothing but punctuation follows it ("Answer: c.").
_STATED_LOWER_LETTER = re.compile(_STATED_PREFIX + r"[\(\[]?([a-z])\s*[\)\]]?\s*[.,;!]?\s*$")
# Words after which a capital "A" is still an option letter ("A or B"), not an article.
_CONNECTIVES = frozenset({"or", "and", "nor", "is", "was", "vs", "versus", "seems", "looks"})
# Rule 3: the reply starts with a letter marker: "(B) ...", "B. ...", "B) ...", "B: ...".
_LEADING_LETTER = re.compile(r"^[\(\[]\s*([A-Z])\s*[\)\]]|^([A-Z])\s*[.:)](?=\s|$)")
_ARTICLES = ("a ", "an ", "the ")


def normalize_text(text: object) -> str:
    """Lower case, no punctuation, single spaces: the form in which option texts are compared."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") or ch in "$^`|~<>+=" else ch for ch in text)
    return " ".join(text.split())


def _strip_article(text: str) -> str:
    for article in _ARTICLES:
        if text.startswith(article):
            return text[len(article):]
    return text


def _contains_phrase(haystack: str, needle: str) -> bool:
    """Whole-word containment on normalized strings ("red" is in "a red circle", not in "reddish")."""
    return bool(needle) and f" {needle} " in f" {haystack} "


def _match_option_text(reply: str, options: dict[str, str]) -> str | None:
    norm_reply = _strip_article(normalize_text(reply))
    if not norm_reply:
        return None
    norm_options = {k: _strip_article(normalize_text(v)) for k, v in options.items()}
    exact = [k for k, v in norm_options.items() if v and v == norm_reply]
    if len(exact) == 1:
        return exact[0]
    hits = [k for k, v in norm_options.items() if _contains_phrase(norm_reply, v)]
    # An option text that is part of another hit ("red" in "red circle") is not a separate answer.
    hits = [k for k in hits if not any(o != k and norm_options[k] != norm_options[o]
                                       and _contains_phrase(norm_options[o], norm_options[k]) for o in hits)]
    return hits[0] if len(hits) == 1 else None


def _lone_letters(reply: str, options: dict[str, str]) -> set[str]:
    words = re.sub(r"[^A-Za-z0-9]+", " ", reply).split()
    # "A" or "I" before a lower-case word is an article or pronoun ("A red circle"), not an option.
    return {w for i, w in enumerate(words) if w in options and not _is_article(w, words[i + 1:i + 2])}


def _is_article(word: str, following: list[str]) -> bool:
    return word in ("A", "I") and bool(following) and following[0][0].islower() and following[0] not in _CONNECTIVES


def extract_option(reply: object, options: dict[str, str]) -> str | None:
    """The option letter a reply picks, or None if it cannot be told (see the module docstring)."""
    if reply is None:
        return None
    text = " ".join(str(reply).split())
    if not text or not options:
        return None
    bare = _BARE_LETTER.match(text)
    if bare and bare.group(1).upper() in options:
        return bare.group(1).upper()
    stated = {m.group(1) for m in _STATED_LETTER.finditer(text) if m.group(1) in options}
    stated |= {m.group(1).upper() for m in _STATED_LOWER_LETTER.finditer(text) if m.group(1).upper() in options}
    if len(stated) == 1:
        return stated.pop()
    leading = _LEADING_LETTER.match(text)
    if leading:
        letter = leading.group(1) or leading.group(2)
        if letter in options:
            return letter
    by_text = _match_option_text(text, options)
    if by_text is not None:
        return by_text
    lone = _lone_letters(text, options)
    if len(lone) == 1:
        return lone.pop()
    return None


def parse_answer_list(answer: object) -> list[str]:
    """Short-answer ground truth: one string, or a Python-literal list of accepted strings
    (VLMEvalKit writes DocVQA-style answers as "['a', 'b']")."""
    text = str(answer).strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, (list, tuple)) and parsed:
            return [str(a) for a in parsed]
    return [text]


def match_short_answer(reply: object, answers: list[str]) -> tuple[bool, str | None]:
    """(correct, extracted) for an open question: the reply is normalized; it is correct when it
    equals an accepted answer or contains one as whole words. An empty reply is unparsed (None)."""
    norm_reply = normalize_text(reply if reply is not None else "")
    if not norm_reply:
        return False, None
    norm_answers = [normalize_text(a) for a in answers]
    correct = any(a and (norm_reply == a or _contains_phrase(norm_reply, a)) for a in norm_answers)
    return correct, norm_reply
