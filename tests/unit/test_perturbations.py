"""Perturbations as tables: each rewrites a text exactly as promised, the same way every time."""

from __future__ import annotations

import random

import pytest

from tuneloop.tasks.perturbations import (
    FUNCTIONS,
    NEIGHBOURS,
    add_punctuation,
    contract,
    expand,
    lowercase,
    perturbations,
    strip_punctuation,
    typo,
    typos,
    uppercase,
    whitespace,
)
from tuneloop.values.config import PERTURBATIONS, EvaluateConfig

CASES = [
    (lowercase, "Great Film, LOVED it!", "great film, loved it!"),
    (uppercase, "Great film, loved it!", "GREAT FILM, LOVED IT!"),
    (strip_punctuation, "What a film!!!", "What a film"),
    (strip_punctuation, "Was it good?  ", "Was it good"),
    (strip_punctuation, "no punctuation", "no punctuation"),
    (strip_punctuation, "?!", "?!"),  # nothing but punctuation: left alone
    (add_punctuation, "what a film", "what a film."),
    (add_punctuation, "What a film!", "What a film!!"),
    (add_punctuation, "Was it good? ", "Was it good??"),
    (add_punctuation, "", ""),
    (whitespace, "a fine film", " a  fine  film "),
    (contract, "I do not think it is good.", "I don't think it's good."),
    (contract, "It is not what they are selling", "It isn't what they're selling"),
    (contract, "DO NOT watch. I am bored; you cannot stay", "DON'T watch. I'm bored; you can't stay"),
    (contract, "undo nothing, editor", "undo nothing, editor"),  # whole words only
    (expand, "I don't think it's good.", "I do not think it is good."),
    (expand, "It’s fine, they WON'T care", "It is fine, they WILL NOT care"),  # curly apostrophe, upper case
    (expand, "It's been a while, that's been said", "It's been a while, that's been said"),  # 's = has
    (expand, "I'm sure you can't", "I am sure you cannot"),
]


@pytest.mark.parametrize(("perturb", "text", "expected"), CASES, ids=[f"{c[0].__name__}:{c[1]}" for c in CASES])
def test_each_perturbation_rewrites_a_text_as_promised(perturb, text: str, expected: str) -> None:
    assert perturb(text) == expected


def test_expanding_a_contracted_text_gives_the_original_back() -> None:
    text = "She does not care and it is clear they will not come, I am afraid."
    assert expand(contract(text)) == text


TYPO_CASES = [  # pinned: a change here changes every robustness score ever reported
    ("what a film", 0.05, 0, "what a fipm"),
    ("what a film", 0.05, 1, "what a flim"),
    ("I do not think it is good.", 0.05, 0, "I do not think it js good."),
    ("an utterly charming and heartfelt film about growing up", 0.05, 0,
     "an utterly charming adn heaftfelt film about growing up"),
    ("1234 !!", 0.05, 0, "1234 !!"),  # no letters, no typos
]


@pytest.mark.parametrize(("text", "rate", "seed", "expected"), TYPO_CASES)
def test_typos_are_fixed_by_the_text_and_the_seed(text: str, rate: float, seed: int, expected: str) -> None:
    assert typos(text, rate, seed) == expected
    assert typos(text, rate, seed) == expected  # and again: no state carried between calls


def changed_letters(before: str, after: str) -> int:
    """Edit distance (insert, delete, substitute; a swap counts 2), small strings only."""
    row = list(range(len(after) + 1))
    for i, a in enumerate(before, 1):
        prev, row[0] = row[0], i
        for j, b in enumerate(after, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (a != b))
    return row[-1]


@pytest.mark.parametrize(("rate", "edits"), [(0.01, 1), (0.1, 4), (0.2, 8)])
def test_typos_make_the_rate_of_edits_asked_for(rate: float, edits: int) -> None:
    text = "the acting is wonderful and the story moves"  # 37 letters
    typed = typos(text, rate)
    assert 1 <= changed_letters(text, typed) <= 2 * edits  # a swap is two substitutions
    assert typed != text


def test_a_typo_hits_a_neighbouring_key_keeping_its_case() -> None:
    assert NEIGHBOURS["a"] == "sqwz" and NEIGHBOURS["m"] == "njk" and NEIGHBOURS["p"] == "ol"
    typed = typo("DON'T", 0, "neighbour", random.Random(0))
    assert typed[0] in "SFERXC" and typed[1:] == "ON'T"
    assert typo("film", 1, "swap", random.Random(0)) == "flim"
    assert typo("film", 1, "drop", random.Random(0)) == "flm"
    # nothing to swap with before a space: the neighbouring key instead
    assert typo("fi m", 1, "swap", random.Random(0)) in {f"f{key} m" for key in NEIGHBOURS["i"]}


def test_every_perturbation_the_settings_allow_has_a_function() -> None:
    assert list(FUNCTIONS) == list(PERTURBATIONS) == list(EvaluateConfig().perturbations)


def test_perturbations_come_in_the_order_asked_with_the_typo_rate_given() -> None:
    chosen = perturbations(["typos", "lowercase"], typo_rate=0.2)
    assert list(chosen) == ["typos", "lowercase"]
    assert chosen["typos"]("what a film") == typos("what a film", 0.2)


def test_an_unknown_perturbation_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'shout'"):
        perturbations(["shout"], 0.05)
    with pytest.raises(ValueError, match="evaluate.perturbations"):
        EvaluateConfig(perturbations=("lowercase", "lowercase"))
