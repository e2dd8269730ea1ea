"""Robustness benchmark (issue 16): hostile FAQ files, personal data in chat messages.

Sections, each printed next to its target:

``fuzz``
    A seeded mutator damages the demo FAQ written in every format (the same mutator as
    ``tests/test_hostile_files.py``, more cases): how many cases, how many loaded, how many were
    rejected with an ``IngestError``, and how many **crashed** (any other exception; target 0).
``hostile``
    Hand-made hostile files (lone-CR CSV, deep JSON nesting, 5,000-digit numbers, NaN, lone
    surrogates, an XLSX of 2,000,000 rows, a 300 MB-cell XLSX, a zip bomb, a billion-laughs XML,
    binary, empty) each uploaded into a knowledge base of the demo FAQ with the fake embedder, in a
    fresh process: the outcome, seconds, peak RSS above the idle process, and whether the stored
    entries changed (target: every one rejected in <= 10 s, <= 500 MB, nothing changed).
``redaction``
    ``tests/data/redaction.jsonl`` (messages with the personal data they hold, and look-alikes that
    must stay): recall per kind and false-positive rate on the look-alikes, next to the baseline of
    the redaction before issue 16 (e-mail, IBAN, card with spaces or dashes, shaped phones).

    python -m benchmarks.robustness                  # every section (about a minute)
    python -m benchmarks.robustness --only redaction
    python -m benchmarks.robustness --fuzz-cases 20000 --json robustness.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REDACTION_SET = ROOT / "tests" / "data" / "redaction.jsonl"


def redaction_scores(redact: Callable[[str], str], path: Path = REDACTION_SET) -> dict[str, object]:
    """Recall per kind (a value counts as found when it no longer appears in the redacted text) and
    the share of look-alike messages that were changed at all (false positives)."""
    found: dict[str, list[bool]] = defaultdict(list)
    changed: list[tuple[str, str]] = []
    lookalikes = 0
    missed: list[tuple[str, str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        out = redact(item["text"])
        if not item["pii"]:
            lookalikes += 1
            if out != item["text"]:
                changed.append((item["text"], out))
            continue
        for pii in item["pii"]:
            hit = pii["value"] not in out
            found[pii["kind"]].append(hit)
            if not hit:
                missed.append((pii["kind"], out))
    recall = {kind: sum(hits) / len(hits) for kind, hits in sorted(found.items())}
    total = [hit for hits in found.values() for hit in hits]
    return {
        "recall": recall,
        "values": {kind: len(hits) for kind, hits in sorted(found.items())},
        "recall_overall": sum(total) / len(total),
        "lookalikes": lookalikes,
        "false_positive_rate": len(changed) / max(lookalikes, 1),
        "false_positives": changed,
        "missed": missed,
    }


def _baseline_redact() -> Callable[[str], str]:
    """The redaction as it was before issue 16, from git (for the side-by-side figures)."""
    import subprocess
    import types

    try:
        source = subprocess.run(
            ["git", "show", "d01d984:chatbot/redact.py"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return lambda text: text
    module = types.ModuleType("redact_before_issue16")
    exec(compile(source, "redact_before_issue16", "exec"), module.__dict__)
    return module.redact  # type: ignore[no-any-return]


def section_redaction(report: dict[str, object]) -> None:
    from chatbot.redact import redact

    now = redaction_scores(redact)
    before = redaction_scores(_baseline_redact())
    print("\n## redaction (tests/data/redaction.jsonl)")
    print(f"{'kind':<14}{'values':>7}{'recall':>9}{'before':>9}  target")
    targets = {"card": 0.98, "cvv": 0.98, "password": 0.98, "national_id": 0.98}
    for kind, recall in now["recall"].items():  # type: ignore[attr-defined]
        target = targets.get(kind)
        print(
            f"{kind:<14}{now['values'][kind]:>7}{recall:>9.3f}{before['recall'].get(kind, 0.0):>9.3f}"  # type: ignore[index]
            + (f"  >= {target:.2f}" if target else "")
        )
    print(f"{'overall':<14}{'':>7}{now['recall_overall']:>9.3f}{before['recall_overall']:>9.3f}  >= 0.90")
    print(
        f"false positives on {now['lookalikes']} look-alikes: {now['false_positive_rate']:.3f} "
        f"(before {before['false_positive_rate']:.3f}; target <= 0.02)"
    )
    for text, out in now["false_positives"]:  # type: ignore[attr-defined]
        print(f"  changed: {text!r} -> {out!r}")
    for kind, out in now["missed"]:  # type: ignore[attr-defined]
        print(f"  missed {kind}: {out!r}")
    report["redaction"] = {k: v for k, v in now.items() if k not in ("false_positives", "missed")}
    report["redaction_before"] = {k: before[k] for k in ("recall", "recall_overall", "false_positive_rate")}


SECTIONS: dict[str, Callable[[dict[str, object], argparse.Namespace], None]] = {
    "redaction": lambda report, args: section_redaction(report),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    parser.add_argument("--fuzz-cases", type=int, default=3000, help="mutated files per format")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    report: dict[str, object] = {}
    for name in args.only or list(SECTIONS):
        SECTIONS[name](report, args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
