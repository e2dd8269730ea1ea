"""Read an FAQ file into :class:`FAQEntry` objects, or say exactly what is wrong with it, all at once.

Formats, chosen by the file's suffix:

``.csv`` / ``.tsv`` / ``.txt``
    A header row, then one entry per row. Required columns ``question`` and ``answer``; optional
    ``id``, ``category``, ``tags``, ``alt_questions``, ``enabled``. Header names are trimmed and
    case-insensitive, and some synonyms are accepted (``q``/``title``, ``a``/``content``/``response``,
    ``alternative_questions``/``paraphrases``); other columns are kept in ``FAQEntry.extra``. The
    delimiter (comma, semicolon, tab or pipe) is sniffed from the header (``.tsv`` is always tab; an
    Excel ``sep=;`` first line is honoured). In a cell, alternative questions are separated by ``|``
    or newlines, tags by ``;`` or ``,``.
``.xlsx``
    The first sheet, laid out like the CSV; numbers and dates are read as text.
``.json``
    A list of records, or ``{"entries": [...]}``, with the same keys as the CSV columns;
    ``alt_questions`` and ``tags`` may be lists or strings.
``.jsonl``
    One such record per line.
``.md`` / ``.markdown``
    Each ``## question`` heading starts an entry; its answer is the text beneath, up to the next
    heading of level 1 or 2 (``###`` and deeper belong to the answer, as do lines in code fences).
    A ``# Category`` heading sets the category of the entries below it (a bare ``#`` clears it);
    text between a category heading and its first question is an introduction and is ignored.
    Lines *directly* under a question heading, with no blank line before them, may give metadata::

        ## How do I reset my password?
        Also: I forgot my password
        Also: Can't log in
        Tags: account, login
        ID: account-001
        Enabled: no

        Open Settings, then ...

    ``Also:`` (one alternative phrasing per line), ``Tags:``, ``ID:`` and ``Enabled:``; the first
    other line starts the answer. A line of the answer that would read as a level-1 or level-2
    heading is written ``\\# ...`` / ``\\## ...``.

Text is decoded from UTF-8 (with or without BOM) or UTF-16/UTF-32 with a BOM, falling back to
Windows-1252. Every text goes through :func:`normalize_text`; single-line fields (questions, ids,
tags, category) also have their line breaks folded into spaces. An entry without an id gets
:func:`content_id` of its question, so re-uploading it updates it in place.

Problems are reported as :class:`Problem` rows whose ``where`` is ``"<file>:<line>"`` with the line
as an editor or spreadsheet shows it (the CSV/XLSX header is line 1, a JSONL record's line, a
Markdown entry's heading), or ``"<file>: record N"`` (counted from 1) for a JSON list. All problems
of a file are raised together as one :class:`IngestError`. With ``skip_bad_rows=True`` problems with
single rows are returned in :attr:`LoadResult.skipped` instead, with the good rows; problems with
the file as a whole (size, format, encoding, header, malformed JSON) always raise.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path

import numpy as np

from knowledge_base.entry import FAQEntry, content_id, normalize_text
from knowledge_base.errors import IngestError, Problem
from knowledge_base.settings import KBSettings

__all__ = ["SUPPORTED_SUFFIXES", "LoadResult", "load_faq_bytes", "load_faq_file"]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".csv", ".tsv", ".txt", ".xlsx", ".json", ".jsonl", ".md", ".markdown")

_FORMAT_BY_SUFFIX = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "csv",
    ".xlsx": "xlsx",
    ".json": "json",
    ".jsonl": "jsonl",
    ".md": "markdown",
    ".markdown": "markdown",
}

_ALIASES: dict[str, tuple[str, ...]] = {
    "id": ("id", "faq_id"),
    "question": ("question", "q", "title"),
    "answer": ("answer", "a", "content", "response"),
    "alt_questions": ("alt_questions", "alternative_questions", "paraphrases"),
    "category": ("category",),
    "tags": ("tags", "tag"),
    "enabled": ("enabled",),
}
_COLUMN_BY_ALIAS = {alias: column for column, aliases in _ALIASES.items() for alias in aliases}
_REQUIRED = ("question", "answer")
_DELIMITERS = (",", ";", "\t", "|")
_TRUE = frozenset({"true", "yes", "y", "1", "on"})
_FALSE = frozenset({"false", "no", "n", "0", "off"})
_ADD_ONE = "add at least one question with its answer"
_FORMATS_TEXT = "CSV (.csv, .tsv, .txt), Excel (.xlsx), JSON (.json), JSON Lines (.jsonl), Markdown (.md)"
#: An error lists this many problems, then says how many more there are: a file with a million bad
#: rows would otherwise produce a message nobody reads, and take memory to build it.
MAX_PROBLEMS_SHOWN = 50
#: A number in a JSON record longer than this is refused while parsing: Python refuses to turn an
#: integer of more than 4,300 digits into text, and no FAQ field needs a number this long.
MAX_NUMBER_DIGITS = 100
_FORMULA_CHARS = frozenset("=+-@\t\r")


@dataclass
class LoadResult:
    entries: list[FAQEntry]
    skipped: list[Problem] = field(default_factory=list)
    """Bad rows left out because ``skip_bad_rows=True`` (empty otherwise)."""
    format: str = ""
    """"csv", "tsv", "xlsx", "json", "jsonl" or "markdown"."""


@dataclass
class _Record:
    """One would-be entry as read from the file, before validation."""

    where: str
    values: dict[str, object]
    extra: dict[str, str] = field(default_factory=dict)


def load_faq_file(path: Path, settings: KBSettings, *, skip_bad_rows: bool = False) -> LoadResult:
    """Load an FAQ file from disk; the size limit is checked before the file is read."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise IngestError([Problem(str(path), what, "check the path")])
    problems = _check_name_and_size(path.name, path.stat().st_size, settings)
    if problems:
        raise IngestError(problems)
    return load_faq_bytes(path.read_bytes(), path.name, settings, skip_bad_rows=skip_bad_rows)


def load_faq_bytes(data: bytes, filename: str, settings: KBSettings, *, skip_bad_rows: bool = False) -> LoadResult:
    """Load an uploaded FAQ file; ``filename`` picks the format and becomes each entry's ``source``."""
    # Browsers and clients may send a full path ("C:\fakepath\faq.csv"); keep the name only.
    name = filename.replace("\\", "/").rsplit("/", 1)[-1] or "upload"
    problems = _check_name_and_size(name, len(data), settings)
    if problems:
        raise IngestError(problems)
    if not data.strip():
        raise _reject(name, "the file is empty", _ADD_ONE)
    fmt = _FORMAT_BY_SUFFIX[_suffix(name)]
    items: Iterable[_Record | Problem]
    if fmt == "xlsx":
        items = _read_xlsx(data, name, settings)
    else:
        text = _decode(data, name)
        if fmt == "json":
            items = _read_json(text, name, settings)
        elif fmt == "jsonl":
            items = _read_jsonl(text, name, settings)
        elif fmt == "markdown":
            items = _read_markdown(text, name, settings)
        else:
            delimiter, items = _read_delimited(text, name, settings, tab=fmt == "tsv")
            fmt = "tsv" if delimiter == "\t" else "csv"
    return _build(items, name, fmt, settings, skip_bad_rows)


# --- file-level checks -------------------------------------------------------------------------------


def _reject(where: str, message: str, fix: str) -> IngestError:
    """An error for a problem with the file as a whole: nothing after it can be read sensibly."""
    return IngestError([Problem(where, message, fix)])


def _suffix(name: str) -> str:
    return Path(name).suffix.lower()


def _check_name_and_size(name: str, size: int, settings: KBSettings) -> list[Problem]:
    problems = []
    suffix = _suffix(name)
    if suffix not in _FORMAT_BY_SUFFIX:
        what = f"'{suffix}' files are not supported" if suffix else "the file name has no extension"
        fix = f"save it as one of: {_FORMATS_TEXT}"
        if suffix == ".xls":
            fix = "open it in Excel and save it as an Excel Workbook (.xlsx)"
        problems.append(Problem(name, what, fix))
    limit = settings.max_upload_mb * 1024 * 1024
    if size > limit:
        problems.append(
            Problem(
                name,
                f"the file is {size / 1024 / 1024:.3g} MB, over the {settings.max_upload_mb:g} MB limit",
                "split it into smaller files, or raise kb.max_upload_mb",
            )
        )
    return problems


# Longest first: the UTF-32 LE mark begins with the UTF-16 LE one.
_BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


# Unicode category Cc, less the whitespace a text file may hold.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")


def _decode(data: bytes, name: str) -> str:
    """Decode by BOM, else strict UTF-8, else Windows-1252; refuse what is not text."""
    not_text = "save it as UTF-8 text (in Excel: Save As → CSV UTF-8), or upload an .xlsx file"
    codec = next((codec for bom, codec in _BOMS if data.startswith(bom)), "")
    # NUL never occurs in UTF-8 or Windows-1252 text: this is binary, or UTF-16 without a BOM.
    if not codec and b"\x00" in data:
        raise _reject(name, "the file is binary, not text (it contains NUL bytes)", not_text)
    try:
        if codec:
            text = data.decode(codec)
        else:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("cp1252")
    except UnicodeDecodeError as exc:
        what = (
            f"the file starts with a {exc.encoding} byte-order mark but is not {exc.encoding} text"
            if codec
            else "the file is neither UTF-8 nor Windows-1252 text"
        )
        raise _reject(name, f"{what} ({exc.reason} at byte {exc.start})", not_text) from None
    if "\x00" in text:
        raise _reject(name, "the file is binary, not text (it contains NUL characters)", not_text)
    controls = len(_CONTROL_CHARS.findall(text))
    if controls > max(8, len(text) // 50):
        raise _reject(name, f"the file looks binary ({controls} control characters)", not_text)
    if not text.strip():
        raise _reject(name, "the file is empty", _ADD_ONE)
    return text


# --- tables: CSV, TSV, XLSX ----------------------------------------------------------------------------


def _column_key(header: str) -> str:
    return re.sub(r"[\s\-]+", "_", normalize_text(header).casefold())


def _sniff_delimiter(header_line: str) -> str:
    """The delimiter that splits the header into the most known column names (then the most columns)."""

    def score(delimiter: str) -> tuple[int, int]:
        try:
            cells = next(csv.reader([header_line], delimiter=delimiter), [])
        except csv.Error:  # e.g. the whole line one field over the csv module's size limit
            return 0, 0
        cells = cells[:1000]  # a header of a million cells is refused later; judging it costs seconds
        return sum(_column_key(c) in _COLUMN_BY_ALIAS for c in cells), len(cells)

    best = max(_DELIMITERS, key=score)
    return best if score(best)[1] > 1 else ","


def _too_many_rows(where: str, settings: KBSettings) -> IngestError:
    return _reject(
        where,
        f"the file has more than {settings.max_rows:,} rows, the limit (kb.max_rows)",
        "split it into several files, or raise kb.max_rows",
    )


def _too_many_cells(where: str, count: int, settings: KBSettings) -> IngestError:
    return _reject(
        where,
        f"this row has {count:,} cells, over the limit of {settings.max_columns} (kb.max_columns)",
        "delete the unused columns to the right, or raise kb.max_columns",
    )


def _read_delimited(
    text: str, name: str, settings: KBSettings, *, tab: bool
) -> tuple[str, Iterator[_Record | Problem]]:
    # Only the first lines are needed (the "sep=" hint and the header). Old Mac files end lines with
    # a lone CR, which the csv reader below also takes as a line break.
    lines = re.split(r"\r\n|\r|\n", text, maxsplit=100)[:100]
    skip = 0
    delimiter = "\t" if tab else ""
    first = lines[0].strip()
    if re.fullmatch(r"sep=.", first):  # Excel's "sep=;" hint line
        delimiter, skip = delimiter or first[-1], 1
    if not delimiter:
        header_line = next((line for line in lines[skip:] if line.strip()), "")
        delimiter = _sniff_delimiter(header_line)
    # strict: an unclosed quote is reported where it opens instead of swallowing the rest of the file.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=True, strict=True)
    # Count the rows first (the csv module alone, a fraction of a second for 100,000 rows), so a file
    # over the limit is refused before its rows are validated one by one.
    if text.count("\n") + text.count("\r") > settings.max_rows:
        counter = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        try:
            for _ in zip(range(settings.max_rows + skip + 1), counter, strict=False):
                pass
        except csv.Error:
            pass  # reported with its line by the real pass below
        if counter.line_num > settings.max_rows:
            raise _too_many_rows(f"{name}:{counter.line_num}", settings)

    def rows() -> Iterator[tuple[int, list[str]]]:
        for _ in range(skip):
            next(reader, None)
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                fix = (
                    "a cell that contains quotes, line breaks or the delimiter must be quoted whole, "
                    'with inner quotes doubled: "She said ""hi"""'
                )
                what = f"cannot read this row: {exc}"
                if "field larger than field limit" in str(exc):
                    what = f"a cell is longer than {csv.field_size_limit():,} characters"
                    fix = "shorten it (an FAQ answer is a few paragraphs), or check for an unclosed quote above"
                raise _reject(f"{name}:{start}", what, fix) from None
            if start > settings.max_rows:
                raise _too_many_rows(f"{name}:{start}", settings)
            if len(row) > settings.max_columns:
                raise _too_many_cells(f"{name}:{start}", len(row), settings)
            yield start, row

    return delimiter, _records_from_table(rows(), name, settings)


def _cell_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, datetime):
        return value.date().isoformat() if value.time() == time(0) else value.isoformat(sep=" ")
    if isinstance(value, (date, time)):
        return value.isoformat()
    return str(value)


def _check_zip_size(data: bytes, name: str, settings: KBSettings) -> None:
    """Refuse an archive whose members expand past the limit, from the sizes in its directory.

    Python's zip reader never inflates a member past its declared size, so a bomb that lies in its
    directory is cut short (and then fails its CRC check) instead of filling memory.
    """
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            expanded = sum(max(info.file_size, 0) for info in archive.infolist())
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise _reject(name, f"cannot read this Excel workbook: {exc}", "open it in Excel and save it again") from None
    limit = settings.max_xlsx_expanded_mb * 1024 * 1024
    if expanded > limit:
        raise _reject(
            name,
            f"the workbook expands to {expanded / 1024 / 1024:,.0f} MB when unzipped, over the "
            f"{settings.max_xlsx_expanded_mb:g} MB limit (kb.max_xlsx_expanded_mb)",
            "split it into smaller workbooks or save it as CSV, or raise kb.max_xlsx_expanded_mb",
        )


def _first_sheet_rows(data: bytes) -> Iterator[tuple[int, tuple[object, ...]]]:
    """The first worksheet's rows as values, numbered from 1, read one at a time.

    ``openpyxl.load_workbook(read_only=True)`` looks for every sheet's declared size when it opens
    the workbook; a sheet without one (written by a script, or hostile) is parsed to its end first,
    30 s for two million rows before the first one is seen. This follows ``ExcelReader.read`` up to
    the stylesheet (shared strings, date formats), then opens the first sheet without that scan,
    and ignores the declared size, which would pad each row to as many cells as it claims.
    """
    from openpyxl.reader.excel import ExcelReader
    from openpyxl.styles.stylesheet import apply_stylesheet
    from openpyxl.worksheet._read_only import ReadOnlyWorksheet

    class FirstSheet(ReadOnlyWorksheet):
        def _get_size(self) -> None:
            pass  # no declared size: rows hold the cells written

    reader = ExcelReader(io.BytesIO(data), read_only=True, data_only=True)
    try:
        reader.read_manifest()
        reader.read_strings()
        reader.read_workbook()
        apply_stylesheet(reader.archive, reader.wb)
        for sheet, rel in reader.parser.find_sheets():
            if rel.target in reader.valid_files and "chartsheet" not in rel.Type:
                ws = FirstSheet(reader.wb, sheet.name, rel.target, reader.shared_strings)
                yield from enumerate(ws.iter_rows(values_only=True), start=1)
                return
        raise ValueError("the workbook has no worksheet")
    finally:
        reader.archive.close()


def _read_xlsx(data: bytes, name: str, settings: KBSettings) -> Iterator[_Record | Problem]:
    import zipfile

    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise _reject(
            name,
            "this is not an Excel .xlsx workbook (an .xlsx file is a zip archive)",
            "save it from Excel as 'Excel Workbook (.xlsx)' without a password, "
            "or if it is a CSV file, rename it to .csv",
        )
    _check_zip_size(data, name, settings)
    rows: list[tuple[int, list[str]]] = []
    try:
        # openpyxl warns about workbook features it ignores (styles, data validation): not our concern;
        # and it print()s about a damaged stylesheet, which must not land in a --json command's stdout.
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            for line, row in _first_sheet_rows(data):
                if line > settings.max_rows:
                    raise _too_many_rows(f"{name}:{line}", settings)
                if len(row) > settings.max_columns:
                    # Trailing empty cells are formatting, not data.
                    row = row[: max((i + 1 for i, v in enumerate(row) if v is not None), default=0)]
                    if len(row) > settings.max_columns:
                        raise _too_many_cells(f"{name}:{line}", len(row), settings)
                rows.append((line, [_cell_text(v) for v in row]))
    except IngestError:
        raise
    except Exception as exc:  # a damaged workbook can fail anywhere inside openpyxl or its XML parser
        fix = "open it in Excel and save it again as .xlsx"
        raise _reject(name, f"cannot read this Excel workbook: {exc}", fix) from None
    return _records_from_table(iter(rows), name, settings)


def _long_cell(where: str, which: str, length: int, settings: KBSettings) -> Problem:
    return Problem(
        where,
        f"{which} is {length:,} characters long, over the limit of {settings.max_cell_chars:,} (kb.max_cell_chars)",
        "shorten it or split the entry, or raise kb.max_cell_chars",
    )


def _unquote_formula(cell: str) -> str:
    """Undo :func:`knowledge_base.export.spreadsheet_safe`: exported cells that would start like a
    formula carry a leading ``'``, which a spreadsheet hides and this drops, so an export loads back
    unchanged (a cell that really starts with ``'=`` is vanishingly rare in an FAQ)."""
    return cell[1:] if cell[:1] == "'" and cell[1:2] in _FORMULA_CHARS else cell


def _records_from_table(
    rows: Iterator[tuple[int, list[str]]], name: str, settings: KBSettings
) -> Iterator[_Record | Problem]:
    """Map the header row to columns (file-level problems raise at once), then yield one record per row."""
    for line, header in rows:
        if any(cell.strip() for cell in header):
            where_header = f"{name}:{line}"
            break
    else:
        fix = "upload a file with a header row and questions (of an .xlsx file, only the first sheet is read)"
        raise _reject(name, "the file is empty", fix)
    columns: dict[str, int] = {}
    extra_columns: dict[int, str] = {}
    problems = []
    for index, cell in enumerate(header):
        label = normalize_text(cell)
        column = _COLUMN_BY_ALIAS.get(_column_key(cell))
        if column is None:
            if label:
                extra_columns[index] = label
        elif column in columns:
            first = normalize_text(header[columns[column]])
            problems.append(
                Problem(
                    where_header,
                    f"columns '{first}' and '{label}' both give the {column}",
                    "keep one of them, or rename the other",
                )
            )
        else:
            columns[column] = index
    missing = [c for c in _REQUIRED if c not in columns]
    if missing:
        found = ", ".join(f"'{normalize_text(c)}'" for c in header if normalize_text(c)) or "none"
        names = " and ".join(f"'{c}'" for c in missing)
        accepted = "; ".join(f"{c}: {'/'.join(_ALIASES[c][1:])}" for c in missing)
        problems.append(
            Problem(
                where_header,
                f"missing required column{'s' if len(missing) > 1 else ''} {names} (columns found: {found})",
                f"add a header row with columns named 'question' and 'answer' (also accepted, {accepted})",
            )
        )
    if problems:
        raise IngestError(problems)
    for line, row in rows:
        if not any(cell.strip() for cell in row):
            continue
        longest = max(range(len(row)), key=lambda i: len(row[i]))
        if len(row[longest]) > settings.max_cell_chars:
            yield _long_cell(f"{name}:{line}", f"cell {longest + 1}", len(row[longest]), settings)
            continue
        cells = [_unquote_formula(c) for c in row] + [""] * (len(header) - len(row))
        extra = {label: normalize_text(cells[i]) for i, label in extra_columns.items() if cells[i].strip()}
        yield _Record(f"{name}:{line}", {c: cells[i] for c, i in columns.items()}, extra)


# --- JSON, JSONL -----------------------------------------------------------------------------------------


class _Invalid:
    """A JSON value refused while parsing (NaN, Infinity, a huge number), reported with its record."""

    def __init__(self, what: str) -> None:
        self.what = what


def _parse_int(text: str) -> int | _Invalid:
    digits = len(text.lstrip("-"))
    if digits > MAX_NUMBER_DIGITS:
        return _Invalid(f"a number {digits:,} digits long (the limit is {MAX_NUMBER_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float | _Invalid:
    value = float(text)
    if not math.isfinite(value):
        return _Invalid(f"the number {text[:20]}{'...' if len(text) > 20 else ''}, too large for a number")
    return value


def _parse_constant(text: str) -> _Invalid:
    return _Invalid(f"{text}, which is not a number in standard JSON")


def _json_loads(text: str) -> object:
    return json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _nesting(text: str, limit: int) -> int:
    """How deeply JSON ``text`` nests, checked before parsing: Python's parser recurses once per level
    and a few thousand levels crash it. Counted up to ``limit + 1``, in time linear in the text."""
    if text.count("[") + text.count("{") <= limit:
        return 0
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii")
    if not brackets:
        return 0
    steps = np.where(np.frombuffer(brackets, dtype=np.uint8) % 4 == 3, 1, -1)  # "[" and "{" are 3 mod 4
    return int(np.cumsum(steps).max())


def _too_deep(where: str, settings: KBSettings) -> Problem:
    return Problem(
        where,
        f"lists or objects are nested more than {settings.max_nesting} levels deep (kb.max_nesting)",
        'write each record flat: {"question": "...", "answer": "...", "tags": ["..."]}',
    )


def _bad_value(value: object, settings: KBSettings) -> str:
    """What is wrong with a parsed JSON value, or ""; the nesting was checked before parsing."""
    if isinstance(value, _Invalid):
        return value.what
    if isinstance(value, str):
        if len(value) > settings.max_cell_chars:
            return f"a text of {len(value):,} characters, over the limit of {settings.max_cell_chars:,} (kb.max_cell_chars)"
        bad = _SURROGATE.search(value) if not value.isascii() else None
        if bad:
            return f"an invalid character (a lone UTF-16 surrogate, U+{ord(bad[0]):04X})"
        return ""
    items: Iterable[object] = ()
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        items = value
    for item in items:
        problem = _bad_value(item, settings)
        if problem:
            return problem
    return ""


def _record_from_object(obj: object, where: str, settings: KBSettings) -> _Record | Problem:
    if not isinstance(obj, dict):
        return Problem(
            where,
            f'expected an object like {{"question": ..., "answer": ...}}, got {_json_type(obj)}',
            "make each record a JSON object with 'question' and 'answer' keys",
        )
    if len(obj) > settings.max_columns:
        what = f"the record has {len(obj):,} keys, over the limit of {settings.max_columns} (kb.max_columns)"
        return Problem(where, what, "keep only the fields of the FAQ entry, or raise kb.max_columns")
    bad = _bad_value(obj, settings)
    if bad:
        return Problem(
            where,
            f"the record holds {bad}",
            "re-save the file as UTF-8 from a text editor (a broken emoji is the usual cause)"
            if "surrogate" in bad
            else "shorten that text"
            if "characters" in bad
            else "write the number as text in quotes, or as an ordinary number",
        )
    values: dict[str, object] = {}
    extra: dict[str, str] = {}
    for key, value in obj.items():
        column = _COLUMN_BY_ALIAS.get(_column_key(str(key)))
        if column is not None and column not in values:
            values[column] = value
        elif value is not None:
            extra[str(key)] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return _Record(where, values, extra)


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")


def _read_json(text: str, name: str, settings: KBSettings) -> Iterator[_Record | Problem]:
    if _nesting(text, settings.max_nesting) > settings.max_nesting:
        raise IngestError([_too_deep(name, settings)])
    try:
        data = _json_loads(text)
    except json.JSONDecodeError as exc:
        fix = "fix the JSON syntax at that spot (a JSON validator shows it too)"
        if exc.msg == "Extra data":
            fix = "if the file holds one JSON record per line, name it .jsonl"
        what = f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        raise _reject(f"{name}:{exc.lineno}", what, fix) from None
    records = data.get("entries") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise IngestError(
            [
                Problem(
                    name,
                    f'expected a list of records or {{"entries": [...]}}, got {_json_type(data)}'
                    + (" without an 'entries' list" if isinstance(data, dict) else ""),
                    'write [{"question": "...", "answer": "..."}, ...]',
                )
            ]
        )
    if len(records) > settings.max_rows:
        raise _reject(
            name,
            f"the file has {len(records):,} records, over the limit of {settings.max_rows:,} (kb.max_rows)",
            "split it into several files, or raise kb.max_rows",
        )
    for index, obj in enumerate(records, start=1):
        yield _record_from_object(obj, f"{name}: record {index}", settings)


def _read_jsonl(text: str, name: str, settings: KBSettings) -> Iterator[_Record | Problem]:
    if text.lstrip().startswith("[") and _nesting(text, settings.max_nesting) <= settings.max_nesting:
        try:
            _json_loads(text)
        except json.JSONDecodeError:
            pass
        else:
            raise _reject(name, "this is one JSON list, not JSON Lines (one record per line)", "rename it to .json")
    if text.rstrip("\n").count("\n") >= settings.max_rows:
        raise _too_many_rows(f"{name}:{settings.max_rows + 1}", settings)
    # Split on "\n" only: JSON strings may hold other line separators (U+2028) that splitlines() would cut.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if lineno > settings.max_rows:
            raise _too_many_rows(f"{name}:{lineno}", settings)
        where = f"{name}:{lineno}"
        if _nesting(line, settings.max_nesting) > settings.max_nesting:
            yield _too_deep(where, settings)
            continue
        try:
            obj = _json_loads(line)
        except json.JSONDecodeError as exc:
            yield Problem(
                where,
                f"line {lineno} is not valid JSON: {exc.msg} (column {exc.colno})",
                'write one complete JSON object per line, like {"question": "...", "answer": "..."}',
            )
            continue
        yield _record_from_object(obj, where, settings)


# --- Markdown ------------------------------------------------------------------------------------------

_HEADING = re.compile(r" {0,3}(#{1,2})(?:[ \t]+(.*?))?[ \t]*")
_CLOSING_HASHES = re.compile(r"(?:^|[ \t]+)#+[ \t]*$")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_METADATA = re.compile(r"(also|tags|id|enabled)[ \t]*:[ \t]*(.*)", re.IGNORECASE)
_ESCAPED_HEADING = re.compile(r"^( {0,3})\\(#{1,2}(?:[ \t]|$))")


def _read_markdown(text: str, name: str, settings: KBSettings) -> Iterator[_Record]:
    category = ""
    current: _Record | None = None
    answer: list[str] = []
    in_metadata = False
    fence = ""
    found_entries = False
    entries = 0
    deeper_headings = 0

    def finish() -> _Record | None:
        if current is not None:
            current.values["answer"] = "\n".join(answer)
        return current

    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        fence_match = _FENCE.match(line)
        if fence:
            closing = fence_match.group(1) if fence_match else ""
            if closing.startswith(fence[0]) and len(closing) >= len(fence):
                fence = ""
        elif fence_match:
            fence = fence_match.group(1)
        else:
            heading = _HEADING.fullmatch(line)
            if heading:
                record = finish()
                if record is not None:
                    yield record
                title = _CLOSING_HASHES.sub("", heading.group(2) or "")
                if len(heading.group(1)) == 1:
                    category, current = title, None
                else:
                    found_entries = True
                    entries += 1
                    if entries > settings.max_rows:
                        raise _reject(
                            f"{name}:{lineno}",
                            f"the file has more than {settings.max_rows:,} entries, the limit (kb.max_rows)",
                            "split it into several files, or raise kb.max_rows",
                        )
                    current = _Record(f"{name}:{lineno}", {"question": title, "category": category})
                    answer, in_metadata = [], True
                continue
            if line.lstrip().startswith("###"):
                deeper_headings += 1
            if current is not None and in_metadata:
                meta = _METADATA.fullmatch(line.strip())
                if meta:
                    key, value = meta.group(1).lower(), meta.group(2)
                    if key == "also":
                        alts = current.values.setdefault("alt_questions", [])
                        assert isinstance(alts, list)
                        alts.append(value)
                    else:
                        current.values[key] = value
                    continue
            line = _ESCAPED_HEADING.sub(r"\1\2", line, count=1)
        if current is not None:
            in_metadata = False
            answer.append(line)
    record = finish()
    if record is not None:
        yield record
    if not found_entries:
        fix = "start each question with a level-2 heading: '## How do I ...?', with the answer beneath"
        if deeper_headings:
            fix += f" (found {deeper_headings} '###' headings: use '##' for questions)"
        raise _reject(name, "no entries: the file has no '## question' headings", fix)


# --- validation ------------------------------------------------------------------------------------------


@dataclass
class _Checked:
    entry: FAQEntry | None
    question_key: str
    id: str
    problems: list[Problem]


def _quote(text: str) -> str:
    return f"'{text[:57]}...'" if len(text) > 60 else f"'{text}'"


def _one_line(text: str) -> str:
    return " ".join(normalize_text(text).split())


def _as_text(value: object, what: str, where: str, problems: list[Problem]) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        bad = _SURROGATE.search(value) if not value.isascii() else None
        if bad:
            problems.append(
                Problem(
                    where,
                    f"the {what} holds an invalid character (a lone UTF-16 surrogate, U+{ord(bad[0]):04X})",
                    "re-save the file as UTF-8 from a text editor (a broken emoji is the usual cause)",
                )
            )
            return ""
        return value
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(Problem(where, f"the {what} is {value}, not text", f"write the {what} as text"))
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _cell_text(value)
    problems.append(Problem(where, f"the {what} must be text, not {_json_type(value)}", f"write the {what} as text"))
    return ""


def _as_list(value: object, separators: str, what: str, where: str, problems: list[Problem]) -> list[str]:
    if isinstance(value, list):
        return [_as_text(item, what, where, problems) for item in value]
    return re.split(separators, _as_text(value, what, where, problems))


def _unique(items: Iterable[str], *, exclude: str = "") -> tuple[str, ...]:
    seen = {exclude.casefold()} if exclude else set()
    out = []
    for item in items:
        if item and item.casefold() not in seen:
            seen.add(item.casefold())
            out.append(item)
    return tuple(out)


def _check_record(record: _Record, source: str, settings: KBSettings) -> _Checked:
    where, values = record.where, record.values
    problems: list[Problem] = []
    limit_q, limit_a = settings.max_question_chars, settings.max_answer_chars
    question = _one_line(_as_text(values.get("question"), "question", where, problems))
    answer = normalize_text(_as_text(values.get("answer"), "answer", where, problems))
    about = f" (question {_quote(question)})" if question else ""
    if "question" not in values:
        keys = ", ".join(f"'{k}'" for k in [*values, *record.extra]) or "none"
        problems.append(Problem(where, f"no 'question' key (keys found: {keys})", "add a 'question' key"))
    elif not question:
        problems.append(Problem(where, "the question is empty", "fill in the question, or delete this entry"))
    elif len(question) > settings.max_question_chars:
        problems.append(
            Problem(
                where,
                f"the question is {len(question)} characters long, the limit is {limit_q}",
                "shorten the question (put details in the answer), or raise kb.max_question_chars",
            )
        )
    if "answer" not in values:
        problems.append(Problem(where, f"no 'answer' key{about}", "add an 'answer' key"))
    elif not answer:
        problems.append(Problem(where, f"the answer is empty{about}", "write the answer, or delete the entry"))
    elif len(answer) > settings.max_answer_chars:
        problems.append(
            Problem(
                where,
                f"the answer is {len(answer)} characters long, the limit is {limit_a}{about}",
                "shorten the answer or split it into several entries, or raise kb.max_answer_chars",
            )
        )
    raw_alts = _as_list(values.get("alt_questions"), r"[|\n]", "alternative question", where, problems)
    alts = _unique((_one_line(a) for a in raw_alts), exclude=question)
    for alt in alts:
        if len(alt) > settings.max_question_chars:
            problems.append(
                Problem(
                    where,
                    f"the alternative question {_quote(alt)} is {len(alt)} characters long, the limit is {limit_q}",
                    "shorten it, or raise kb.max_question_chars",
                )
            )
    tags = _unique(_one_line(t) for t in _as_list(values.get("tags"), r"[;,]", "tag", where, problems))
    category = _one_line(_as_text(values.get("category"), "category", where, problems))
    entry_id = _one_line(_as_text(values.get("id"), "id", where, problems))
    enabled = _parse_enabled(values.get("enabled"), where, problems)
    question_key = content_id(question) if question else ""
    entry_id = entry_id or question_key
    entry = None
    if not problems:
        entry = FAQEntry(
            id=entry_id,
            question=question,
            answer=answer,
            alt_questions=alts,
            category=category,
            tags=tags,
            enabled=enabled,
            source=source,
            extra=record.extra,
        )
    return _Checked(entry, question_key, entry_id, problems)


def _parse_enabled(value: object, where: str, problems: list[Problem]) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return True
    text = str(value).strip().casefold()
    if not text or text in _TRUE:
        return True
    if text in _FALSE:
        return False
    what = f"enabled is '{value}', expected true/false, yes/no or 1/0"
    problems.append(Problem(where, what, "write true or false (or leave it empty)"))
    return True


def _build(
    items: Iterable[_Record | Problem], name: str, fmt: str, settings: KBSettings, skip_bad_rows: bool
) -> LoadResult:
    entries: list[FAQEntry] = []
    problems: list[Problem] = []
    where_question: dict[str, str] = {}
    where_id: dict[str, str] = {}
    for item in items:
        if isinstance(item, Problem):
            problems.append(item)
            continue
        checked = _check_record(item, name, settings)
        if checked.question_key in where_question:
            first = where_question[checked.question_key]
            checked.problems.append(
                Problem(
                    item.where,
                    f"the same question is also at {first} (both give id '{checked.question_key}')",
                    "merge the two entries (add the other wording as an alternative question) or delete one",
                )
            )
        elif checked.id and checked.id in where_id:
            checked.problems.append(
                Problem(
                    item.where,
                    f"duplicate id '{checked.id}': also used at {where_id[checked.id]}",
                    "give each entry its own id",
                )
            )
        # When skipping, a row duplicates only rows that are kept; otherwise every duplicate is reported.
        if not (skip_bad_rows and checked.problems):
            if checked.question_key:
                where_question.setdefault(checked.question_key, item.where)
            if checked.id:
                where_id.setdefault(checked.id, item.where)
        problems.extend(checked.problems)
        if checked.entry is not None and not checked.problems:
            entries.append(checked.entry)
    if problems and not skip_bad_rows:
        raise IngestError(_first_problems(problems, name))
    if not entries:
        what = "every entry has a problem" if problems else "the file has no questions in it"
        raise IngestError([*_first_problems(problems, name), Problem(name, f"no entries: {what}", _ADD_ONE)])
    return LoadResult(entries=entries, skipped=problems, format=fmt)


def _first_problems(problems: list[Problem], name: str) -> list[Problem]:
    """The first :data:`MAX_PROBLEMS_SHOWN` problems, then one line counting the rest."""
    if len(problems) <= MAX_PROBLEMS_SHOWN:
        return problems
    more = len(problems) - MAX_PROBLEMS_SHOWN
    return [
        *problems[:MAX_PROBLEMS_SHOWN],
        Problem(name, f"... and {more:,} more problems", "fix the problems above, then upload again to see the rest"),
    ]
