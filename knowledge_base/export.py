"""Write FAQ entries in the formats :mod:`knowledge_base.loaders` reads, so export → load round-trips.

Tables (CSV, TSV, XLSX) have the columns ``id, category, question, alt_questions, answer, tags,
enabled``; JSON and JSONL records have the same keys, with lists for ``alt_questions`` and ``tags``.
CSV and TSV are written as UTF-8 with a BOM, which Excel needs to show accents, and every cell that
a spreadsheet would run as a formula is neutralised by :func:`spreadsheet_safe` (a leading ``'``);
the loader removes that quote again, so an export loads back unchanged. Markdown groups
entries by category (uncategorised ones first) and writes the metadata lines the loader documents;
an ``ID:`` line only where the id is not the one derived from the question.

What a round trip keeps: every field above. It does not keep ``source`` (the loader sets it to the
file's name), timestamps or hit counts (the store's business), or ``extra``. Separators cannot occur
inside values in table cells: an alternative question containing ``|`` or a tag containing ``,`` or
``;`` comes back split (JSON keeps them).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path

from knowledge_base.atomic import atomic_path
from knowledge_base.entry import FAQEntry, content_id
from knowledge_base.errors import SupportBotError

__all__ = ["COLUMNS", "EXPORT_FORMATS", "FORMULA_START", "export_entries", "render_entries", "spreadsheet_safe"]

COLUMNS = ("id", "category", "question", "alt_questions", "answer", "tags", "enabled")

#: File suffix → format name accepted by :func:`render_entries`.
EXPORT_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".md": "markdown",
    ".markdown": "markdown",
    ".xlsx": "xlsx",
}


#: What a spreadsheet may read as the start of a formula (the OWASP "CSV injection" list): a cell
#: like ``=HYPERLINK("http://evil", "Click")`` or ``=cmd|' /C calc'!A0`` runs when the file is opened.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """``text`` with a ``'`` in front when it starts like a formula: spreadsheets show the text as
    typed and hide the quote; everything else is returned as it is."""
    return "'" + text if text.startswith(FORMULA_START) else text


def export_entries(entries: Sequence[FAQEntry], path: Path) -> None:
    """Write ``entries`` to ``path`` in the format its suffix names, atomically."""
    path = Path(path)
    data = render_entries(entries, path.suffix)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def render_entries(entries: Sequence[FAQEntry], fmt: str) -> bytes:
    """The file contents for ``fmt``: a format name ("csv", "markdown", ...) or a suffix (".md")."""
    key = fmt.lower()
    name = EXPORT_FORMATS.get(key if key.startswith(".") else f".{key}", key)
    if name in ("csv", "tsv"):
        return _render_table_text(entries, "\t" if name == "tsv" else ",")
    if name == "json":
        return (json.dumps([_record(e) for e in entries], ensure_ascii=False, indent=2) + "\n").encode()
    if name == "jsonl":
        return "".join(json.dumps(_record(e), ensure_ascii=False) + "\n" for e in entries).encode()
    if name == "markdown":
        return _render_markdown(entries).encode()
    if name == "xlsx":
        return _render_xlsx(entries)
    raise SupportBotError(f"cannot export to '{fmt}'", fix=f"use one of: {', '.join(sorted(set(EXPORT_FORMATS)))}")


def _record(entry: FAQEntry) -> dict[str, object]:
    return {
        "id": entry.id,
        "category": entry.category,
        "question": entry.question,
        "alt_questions": list(entry.alt_questions),
        "answer": entry.answer,
        "tags": list(entry.tags),
        "enabled": entry.enabled,
    }


def _row(entry: FAQEntry) -> list[str]:
    return [
        entry.id,
        entry.category,
        entry.question,
        " | ".join(entry.alt_questions),
        entry.answer,
        ", ".join(entry.tags),
        "true" if entry.enabled else "false",
    ]


def _render_table_text(entries: Sequence[FAQEntry], delimiter: str) -> bytes:
    out = io.StringIO(newline="")
    writer = csv.writer(out, delimiter=delimiter)
    writer.writerow(COLUMNS)
    writer.writerows([spreadsheet_safe(cell) for cell in _row(e)] for e in entries)
    return out.getvalue().encode("utf-8-sig")


def _render_xlsx(entries: Sequence[FAQEntry]) -> bytes:
    import openpyxl
    from openpyxl.styles import Alignment, Font

    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "FAQ"
    sheet.append(list(COLUMNS))
    for cell in sheet[1]:
        cell.font = Font(bold=True)
    wrap = Alignment(wrap_text=True, vertical="top")
    for row_number, entry in enumerate(entries, start=2):
        for column, value in enumerate([*_row(entry)[:-1], entry.enabled], start=1):
            cell = sheet.cell(row=row_number, column=column, value=value)
            # A text starting with "=" would otherwise be stored as a formula, and come back empty.
            if isinstance(value, str) and value.startswith("="):
                cell.data_type = "s"
            cell.alignment = wrap
    for letter, width in zip("ABCDEFG", (16, 16, 40, 40, 60, 20, 9), strict=True):
        sheet.column_dimensions[letter].width = width
    sheet.freeze_panes = "A2"
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


_HEADING_LIKE = re.compile(r"^( {0,3})(#{1,2}(?:[ \t]|$))")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")


def _markdown_answer(answer: str) -> str:
    """Escape answer lines the loader would take for a question or category heading."""
    lines, fence = [], ""
    for line in answer.split("\n"):
        match = _FENCE.match(line)
        if fence:
            if match and match.group(1).startswith(fence[0]) and len(match.group(1)) >= len(fence):
                fence = ""
        elif match:
            fence = match.group(1)
        else:
            line = _HEADING_LIKE.sub(r"\1\\\2", line, count=1)
        lines.append(line)
    return "\n".join(lines)


def _markdown_heading(level: str, text: str) -> str:
    text = " ".join(text.split())
    # A title that ends in " #" would lose it as an optional closing sequence; a closing one keeps it.
    return f"{level} {text} {level}" if re.search(r"(^|\s)#+$", text) else f"{level} {text}"


def _render_markdown(entries: Sequence[FAQEntry]) -> str:
    categories: dict[str, list[FAQEntry]] = {"": []}
    for entry in entries:
        categories.setdefault(entry.category, []).append(entry)
    blocks = []
    for category, members in categories.items():
        if category:
            blocks.append(_markdown_heading("#", category))
        for entry in members:
            head = [_markdown_heading("##", entry.question)]
            head += [f"Also: {alt}" for alt in entry.alt_questions]
            if entry.tags:
                head.append(f"Tags: {', '.join(entry.tags)}")
            if entry.id != content_id(entry.question):
                head.append(f"ID: {entry.id}")
            if not entry.enabled:
                head.append("Enabled: no")
            blocks.append("\n".join(head) + "\n\n" + _markdown_answer(entry.answer))
    return "\n\n".join(blocks) + "\n"
