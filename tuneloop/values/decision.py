"""One shape for every decision tuneloop makes: promote, drift, rollback, retrain.

A decision is a pure function's answer: yes or no, and every check behind it with
its reason, so a "no" always says why and a "yes" says what it rested on. Gains
against a margin are judged by one helper with one float tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

TOLERANCE = 1e-9  # 0.82 - 0.80 is 0.01999...: a gain equal to its margin reaches it


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool  # the check's condition holds (for drift: this signal drifted)
    reason: str


@dataclass(frozen=True)
class Decision:
    """What was decided (`action`), whether to do it (`yes`), and why.

    `note` is the one reason when no check could be made (too few rows, no
    previous version); `marks` prefix each check's reason by its outcome.
    """

    action: str  # "promote" | "drift" | "estimated drop" | "rollback" | "retrain"
    yes: bool
    checks: tuple[Check, ...] = ()
    note: str = ""
    marks: tuple[str, str] = ("PASS ", "FAIL ")
    choice: str | None = None  # which candidate a yes is for (promotion: challenger or base_probe)

    @property
    def reasons(self) -> list[str]:
        lines = [(self.marks[0] if c.passed else self.marks[1]) + c.reason for c in self.checks]
        return [self.note, *lines] if self.note else lines

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_dict(self) -> dict:
        out = {self.action: self.yes, "reasons": self.reasons,
               "checks": [{"name": c.name, "passed": c.passed, "reason": c.reason} for c in self.checks]}
        if self.choice is not None:
            out["candidate"] = self.choice
        return out


def all_of(action: str, checks: list[Check] | tuple[Check, ...]) -> Decision:
    """Yes when every check passed (promotion)."""
    return Decision(action, all(c.passed for c in checks), tuple(checks))


def clears(gain: float, low: float, margin: float) -> bool:
    """A gain clears its margin when it reaches it and its interval's low end lies
    above zero (superiority, margin >= 0) or above the margin (non-inferiority,
    margin < 0)."""
    return gain >= margin - TOLERANCE and low > min(0.0, margin)
