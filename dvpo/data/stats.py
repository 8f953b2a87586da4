"""Counts of what the data pipeline skipped or changed, so nothing disappears unreported."""
from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger(__name__)


class DataStats:
    """``skipped`` counts examples dropped by reason; ``notes`` counts examples kept but altered
    (truncated, ...). The first few positions (``file:line``) of each skip are kept for the report."""

    def __init__(self, name: str):
        self.name = name
        self.read = 0
        self.skipped: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < 3:
            seen.append(where)

    def note(self, reason: str) -> None:
        self.notes[reason] += 1

    @property
    def kept(self) -> int:
        return self.read - sum(self.skipped.values())

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "skipped": dict(self.skipped), "notes": dict(self.notes),
                "skipped_examples": self.examples}

    def report(self) -> None:
        log.info("%s: read %d, kept %d", self.name, self.read, self.kept)
        for reason, n in sorted(self.skipped.items()):
            log.warning("%s: skipped %d (%s), e.g. %s", self.name, n, reason, ", ".join(self.examples[reason]))
        for reason, n in sorted(self.notes.items()):
            log.info("%s: %d %s", self.name, n, reason)
