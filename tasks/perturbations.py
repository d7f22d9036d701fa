"""Label-preserving perturbations of a text, for the evaluate stage's robustness scores.

Each perturbation is a pure function from text to text: the same text always gives
the same perturbed text (typos are drawn from a generator seeded by the text itself),
so two runs, and champion and challenger within a run, see identical perturbed rows.
The contraction rules are English; drop `contract` and `expand` from
`evaluate.perturbations` for data in another language.
"""

from __future__ import annotations

import random
import re
from functools import partial
from typing import Callable, Sequence

from tuneloop.values.config import PERTURBATIONS as NAMES

Perturbation = Callable[[str], str]

TRAILING = ".!?…,;:"  # marks strip_punctuation removes from a text's end
REPEATABLE = ".!?"  # add_punctuation repeats these when a text already ends in one

# QWERTY rows; a key's neighbours are its left and right keys, the two above and the two below.
KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")

# (expanded, contracted): `contract` rewrites left to right, `expand` right to left. Negations
# come first so "it is not" becomes "it isn't", not "it's not".
CONTRACTIONS = (
    ("do not", "don't"), ("does not", "doesn't"), ("did not", "didn't"), ("is not", "isn't"),
    ("are not", "aren't"), ("was not", "wasn't"), ("were not", "weren't"), ("have not", "haven't"),
    ("has not", "hasn't"), ("could not", "couldn't"), ("would not", "wouldn't"),
    ("should not", "shouldn't"), ("will not", "won't"), ("cannot", "can't"),
    ("it is", "it's"), ("that is", "that's"), ("there is", "there's"), ("i am", "i'm"),
    ("you are", "you're"), ("we are", "we're"), ("they are", "they're"),
)
# "it's been" is "it has been": expanding 's before these words would change the meaning
HAS_NOT_IS = r"(?!\s+(?:been|got|gotten)\b)"


def keyboard_neighbours() -> dict[str, str]:
    """Each lower-case letter's neighbouring keys on a QWERTY keyboard."""
    out: dict[str, str] = {}
    for r, row in enumerate(KEYBOARD_ROWS):
        for c, key in enumerate(row):
            near = [row[i] for i in (c - 1, c + 1) if 0 <= i < len(row)]
            if r > 0:
                near += [KEYBOARD_ROWS[r - 1][i] for i in (c, c + 1) if i < len(KEYBOARD_ROWS[r - 1])]
            if r + 1 < len(KEYBOARD_ROWS):
                near += [KEYBOARD_ROWS[r + 1][i] for i in (c - 1, c) if 0 <= i < len(KEYBOARD_ROWS[r + 1])]
            out[key] = "".join(near)
    return out


NEIGHBOURS = keyboard_neighbours()


def lowercase(text: str) -> str:
    return text.lower()


def uppercase(text: str) -> str:
    return text.upper()


def strip_punctuation(text: str) -> str:
    """The text without its trailing punctuation (and trailing spaces); unchanged when
    nothing but punctuation would be left."""
    stripped = text.rstrip().rstrip(TRAILING + " ")
    return stripped if any(ch.isalnum() for ch in stripped) else text


def add_punctuation(text: str) -> str:
    """A full stop after a text without end punctuation; its final mark doubled otherwise."""
    body = text.rstrip()
    if not body:
        return text
    return body + (body[-1] if body[-1] in REPEATABLE else ".")


def whitespace(text: str) -> str:
    """Every space doubled, plus a leading and a trailing one."""
    return " " + text.replace(" ", "  ") + " "


def typo(text: str, i: int, kind: str, rng: random.Random) -> str:
    """One edit at letter `i`: swap it with the next letter, drop it, or hit a neighbouring key."""
    if kind == "swap" and i + 1 < len(text) and text[i + 1].isalpha():
        return text[:i] + text[i + 1] + text[i] + text[i + 2:]
    if kind == "drop":
        return text[:i] + text[i + 1:]
    near = NEIGHBOURS.get(text[i].lower())
    if not near:  # a letter off the QWERTY rows (é, ß): drop it instead
        return text[:i] + text[i + 1:]
    key = rng.choice(near)
    return text[:i] + (key.upper() if text[i].isupper() else key) + text[i + 1:]


def typos(text: str, rate: float = 0.05, seed: int = 0) -> str:
    """`rate` of the text's letters mistyped (at least one when it has letters), at
    positions and with edits drawn from a generator seeded by `seed` and the text.

    Edits go right to left so an earlier edit never moves a later position.
    """
    letters = [i for i, ch in enumerate(text) if ch.isalpha()]
    if not letters:
        return text
    rng = random.Random(f"{seed}:{text}")  # str seeds hash with SHA-512: stable across processes
    count = max(1, round(rate * len(letters)))
    out = text
    for i in sorted(rng.sample(letters, count), reverse=True):
        out = typo(out, i, rng.choice(("swap", "drop", "neighbour")), rng)
    return out


def same_case(source: str, replacement: str) -> str:
    """`replacement` written in the case of the matched `source`: UPPER, Capitalised or lower."""
    if source.isupper() and sum(ch.isalpha() for ch in source) > 1:
        return replacement.upper()
    if source[0].isupper():
        return replacement[0].upper() + replacement[1:]
    return replacement


def rewrite(text: str, rules: Sequence[tuple[str, str]]) -> str:
    """Each (pattern, replacement) rule applied in turn, case-insensitively, keeping the match's case."""
    for pattern, replacement in rules:
        text = re.sub(pattern, lambda m, r=replacement: same_case(m.group(0), r), text, flags=re.IGNORECASE)
    return text


def contract(text: str) -> str:
    """"do not" -> "don't", "it is" -> "it's", ... (English)."""
    rules = [(r"\b" + expanded.replace(" ", r"\s+") + r"\b", contracted) for expanded, contracted in CONTRACTIONS]
    return rewrite(text, rules)


def expand(text: str) -> str:
    """"don't" -> "do not", "it's" -> "it is" (not before "been"), ... (English)."""
    rules = []
    for expanded, contracted in CONTRACTIONS:
        pattern = r"\b" + contracted.replace("'", "['’]") + r"\b"
        rules.append((pattern + (HAS_NOT_IS if contracted.endswith("'s") else ""), expanded))
    return rewrite(text, rules)


FUNCTIONS: dict[str, Perturbation] = {
    "lowercase": lowercase, "uppercase": uppercase, "strip_punctuation": strip_punctuation,
    "add_punctuation": add_punctuation, "typos": typos, "whitespace": whitespace,
    "contract": contract, "expand": expand,
}


def perturbations(names: Sequence[str], typo_rate: float, seed: int = 0) -> dict[str, Perturbation]:
    """The named perturbations in order, `typos` at `typo_rate`.

    Raises:
        ValueError: an unknown name.
    """
    unknown = [name for name in names if name not in FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown perturbations {unknown}: use some of {list(NAMES)}")
    return {name: partial(typos, rate=typo_rate, seed=seed) if name == "typos" else FUNCTIONS[name]
            for name in names}
