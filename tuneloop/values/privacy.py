"""privacy: personal data kept out of the prediction store and training rows.

`mask_pii` replaces e-mail addresses, phone numbers and payment card numbers
with placeholders. It runs on texts before they are stored (when
`serve.mask_pii`) and on feedback rows before they are exported for
retraining, so a model never learns, and a store never keeps, someone's card.
"""

from __future__ import annotations

import re

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# 13-19 digits, optionally grouped by single spaces or dashes; only a Luhn-valid run is a card
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
# +country code or a leading (area) group, 9-15 digits in all with separators: years and
# scores ("1999-2001", "10 / 10") have too few digits or no phone shape
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w-])")
YEARS = re.compile(r"(?:(?:19|20)\d\d[ .-]?)+")  # "2019 2020 2021" is a list of years, not a phone
PLACEHOLDERS = {"email": "[email]", "card": "[card]", "phone": "[phone]"}


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def digit_count(text: str) -> int:
    return sum(char.isdigit() for char in text)


def is_phone(candidate: str) -> bool:
    return 9 <= digit_count(candidate) <= 15 and not YEARS.fullmatch(candidate)


def mask_pii(text: str) -> str:
    """The text with e-mail addresses, card numbers (Luhn-valid) and phone
    numbers (9-15 digits) replaced by [email], [card] and [phone]."""
    text = EMAIL.sub(PLACEHOLDERS["email"], text)
    text = CARD.sub(lambda m: PLACEHOLDERS["card"] if luhn_valid(re.sub(r"\D", "", m.group())) else m.group(), text)
    return PHONE.sub(lambda m: PLACEHOLDERS["phone"] if is_phone(m.group()) else m.group(), text)
