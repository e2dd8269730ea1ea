"""The errors SupportBot shows to people, and how they are shaped.

Every error a user can cause derives from :class:`SupportBotError`. Its message says *what* went
wrong and *where*; its ``fix`` says what to do about it. Errors that find several problems at once
(a bad FAQ file, a bad configuration) collect them as :class:`Problem` rows and raise once, so a
user fixes everything in one go instead of one error per run.

Hierarchy::

    SupportBotError
    ├── ProblemsError          several problems found at once
    │   ├── ConfigError        settings (env, TOML, CLI flags)
    │   └── IngestError        an FAQ file that cannot be stored
    ├── NotFoundError          an entry, adapter or conversation that does not exist
    └── ModelLoadError         a model or embedder that cannot be loaded
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ConfigError",
    "IngestError",
    "ModelLoadError",
    "NotFoundError",
    "Problem",
    "ProblemsError",
    "SupportBotError",
]


class SupportBotError(Exception):
    """An error meant for a person: what went wrong, where, and the fix."""

    def __init__(self, message: str, *, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.fix}" if self.fix else self.message

    def to_dict(self) -> dict[str, object]:
        return {"error": type(self).__name__, "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class Problem:
    """One problem in a file or configuration: where it is, what is wrong, how to fix it."""

    where: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}"
        return f"{text} (fix: {self.fix})" if self.fix else text

    def to_dict(self) -> dict[str, str]:
        return {"where": self.where, "message": self.message, "fix": self.fix}


class ProblemsError(SupportBotError):
    """Several problems found in one pass, reported together."""

    title = "problems found"

    def __init__(self, problems: Iterable[Problem], *, title: str | None = None) -> None:
        self.problems = list(problems)
        head = title or self.title
        lines = [f"{head} ({len(self.problems)}):"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))

    def to_dict(self) -> dict[str, object]:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "problems": [p.to_dict() for p in self.problems],
        }


class ConfigError(ProblemsError):
    title = "invalid configuration"


class IngestError(ProblemsError):
    title = "the FAQ upload was rejected, nothing was stored"


class NotFoundError(SupportBotError):
    pass


class ModelLoadError(SupportBotError):
    pass
