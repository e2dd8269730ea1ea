"""Business hours ("Mon-Fri 09:00-17:00, Sat 10:00-14:00") and whether a time falls inside them.

Used by `chatbot.handoff` to tell a customer, at the moment of a hand-off, whether a person will
read the question soon or only when the team is back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time

__all__ = ["DAYS", "Window", "is_open", "parse_hours"]

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_PART = re.compile(
    r"^(?P<first>[a-z]{3})(?:\s*-\s*(?P<last>[a-z]{3}))?\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})$"
)


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday
    start: time
    end: time


def _time(text: str) -> time:
    hours, minutes = (int(x) for x in text.split(":"))
    if hours == 24 and minutes == 0:
        return time(23, 59, 59)
    if not (0 <= hours < 24 and 0 <= minutes < 60):
        raise ValueError(f"{text!r} is not a time of day")
    return time(hours, minutes)


def parse_hours(spec: str) -> list[Window]:
    """The windows of ``spec``; ``""`` means always open (an empty list). Raises ValueError saying what is wrong."""
    windows = []
    for raw in (p.strip() for p in spec.split(",")):
        if not raw:
            continue
        found = _PART.match(raw.lower())
        if not found:
            raise ValueError(f"{raw!r} is not like 'Mon-Fri 09:00-17:00'")
        first, last = found["first"], found["last"] or found["first"]
        if first not in DAYS or last not in DAYS:
            raise ValueError(f"{raw!r}: days are Mon, Tue, Wed, Thu, Fri, Sat, Sun")
        a, b = DAYS.index(first), DAYS.index(last)
        days = frozenset(range(a, b + 1)) if a <= b else frozenset([*range(a, 7), *range(0, b + 1)])
        start, end = _time(found["start"]), _time(found["end"])
        if end <= start:
            raise ValueError(f"{raw!r}: the end is not after the start")
        windows.append(Window(days, start, end))
    return windows


def is_open(spec: str, now: datetime) -> bool:
    """Whether ``now`` (already in the business's time zone) is inside the hours of ``spec``."""
    windows = parse_hours(spec)
    if not windows:
        return True
    clock = now.time().replace(tzinfo=None)
    return any(now.weekday() in w.days and w.start <= clock < w.end for w in windows)
