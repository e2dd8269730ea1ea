"""Hostile FAQ files: every one is an `IngestError` naming the file, row and fix, or a clean load.

A seeded mutator damages the demo FAQ written in each format (byte flips, cut and pasted ranges,
inserted syntax, lone CRs, NULs, surrogates, huge numbers, deep nesting); every result must be a
successful load or an `IngestError`, never another exception, and a rejected upload leaves the
stored knowledge base exactly as it was.
"""

from __future__ import annotations

import io
import random
import time
import zipfile
from pathlib import Path

import pytest
from conftest import DEMO_DIR, HashingEmbedder

from knowledge_base.errors import IngestError
from knowledge_base.export import render_entries
from knowledge_base.kb import KnowledgeBase
from knowledge_base.loaders import MAX_PROBLEMS_SHOWN, load_faq_bytes, load_faq_file
from knowledge_base.settings import KBSettings

KB = KBSettings()
FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".md", ".xlsx")

# Fragments that parsers of these formats treat specially.
TOKENS = [
    b"\r",
    b"\r\r",
    b"\n",
    b"\x00",
    b'"',
    b'""',
    b",",
    b";",
    b"\t",
    b"|",
    b"[",
    b"{",
    b"]",
    b"}",
    b"[" * 3000,
    b'{"a":' * 3000,
    b"9" * 5000,
    b"1e999",
    b"-1e999",
    b"NaN",
    b"Infinity",
    b"null",
    b"true",
    b'"\\ud800"',
    b"\\ud800",
    b"\\udfff\\ud800",
    b"\xff\xfe",
    b"\xef\xbb\xbf",
    b"\xed\xa0\x80",  # a surrogate encoded as UTF-8 (invalid)
    b"\xe2\x80\x8b",  # zero-width space
    b"\xe2\x80\xae",  # right-to-left override
    b"sep=;\n",
    b"\n## ",
    b"\n# ",
    b"\n```\n",
    b"Also: ",
    b"ID: ",
    b"Enabled: maybe",
    b'=HYPERLINK("http://x")',
    b"\x1b[31m",
    "é漢字🙂".encode(),
    b"x" * 200_000,
]


def _demo_files(count: int = 8) -> dict[str, bytes]:
    """The first ``count`` demo entries written in every format."""
    entries = load_faq_file(DEMO_DIR / "faq.csv", KB).entries[:count]
    return {suffix: render_entries(entries, suffix) for suffix in FORMATS}


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        pos = rng.randrange(len(out) + 1)
        if kind == 0 and out:  # flip a byte
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif kind == 1:  # insert a token
            out[pos:pos] = rng.choice(TOKENS)
        elif kind == 2:  # delete a range
            del out[pos : pos + rng.randint(1, 64)]
        elif kind == 3:  # duplicate a range elsewhere
            start = rng.randrange(len(out) + 1)
            out[pos:pos] = out[start : start + rng.randint(1, 200)]
        elif kind == 4:  # truncate
            del out[pos:]
        else:  # swap line endings for lone CRs
            out = bytearray(bytes(out).replace(b"\n", b"\r"))
    return bytes(out)


def _mutate_xlsx(data: bytes, rng: random.Random) -> bytes:
    """Damage the sheet or shared-strings XML inside the archive (most byte flips only break the zip)."""
    if rng.random() < 0.2:
        return _mutate(data, rng)
    source = zipfile.ZipFile(io.BytesIO(data))
    names = source.namelist()
    target = rng.choice([n for n in names if n.endswith(".xml")])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as out:
        for name in names:
            content = source.read(name)
            out.writestr(name, _mutate(content, rng) if name == target else content)
    return buffer.getvalue()


def _load_or_reject(data: bytes, name: str) -> str:
    """ "ok" or "rejected"; anything else raised is a bug and fails the test with the input named."""
    try:
        load_faq_bytes(data, name, KB)
        return "ok"
    except IngestError as exc:
        assert exc.problems and all(p.where and p.message for p in exc.problems)
        assert all(p.where.startswith(name) for p in exc.problems), exc
        assert len(exc.problems) <= MAX_PROBLEMS_SHOWN + 1
        return "rejected"


@pytest.mark.parametrize("suffix", FORMATS)
def test_mutated_files_load_or_are_rejected_with_a_message(suffix: str) -> None:
    base = _demo_files()[suffix]
    rng = random.Random(f"fuzz{suffix}")
    cases = 400 if suffix == ".xlsx" else 1500
    outcomes = {"ok": 0, "rejected": 0}
    for case in range(cases):
        data = _mutate_xlsx(base, rng) if suffix == ".xlsx" else _mutate(base, rng)
        try:
            outcomes[_load_or_reject(data, f"faq{suffix}")] += 1
        except Exception as exc:  # a crash: name the case so it can be reproduced
            raise AssertionError(f"case {case} of {suffix} raised {type(exc).__name__}: {exc}") from exc
    # Both outcomes occur: the mutator neither only breaks files nor never does.
    assert outcomes["ok"] > 0 and outcomes["rejected"] > 0, outcomes


def test_a_rejected_upload_leaves_the_store_unchanged(tmp_path: Path) -> None:
    base = _demo_files(12)[".csv"]
    files = _demo_files(20)

    def fresh(case: int) -> KnowledgeBase:
        kb = KnowledgeBase(tmp_path / f"kb{case}", KB, HashingEmbedder())
        kb.add_bytes(base, "faq.csv")
        return kb

    kb = fresh(0)
    before, stats = [e.to_dict() for e in kb.entries()], kb.stats()
    rng = random.Random("store")
    rejected = 0
    for case in range(60):
        suffix = FORMATS[case % len(FORMATS)]
        data = _mutate_xlsx(files[suffix], rng) if suffix == ".xlsx" else _mutate(files[suffix], rng)
        try:
            kb.add_bytes(data, f"faq{suffix}")
        except IngestError:
            rejected += 1
            assert [e.to_dict() for e in kb.entries()] == before, f"case {case} ({suffix}) changed the store"
            assert kb.stats() == stats
        else:  # a mutated file that still loads: the next case starts from a fresh copy
            kb.close()
            kb = fresh(case + 1)
            before, stats = [e.to_dict() for e in kb.entries()], kb.stats()
    assert rejected >= 10
    kb.close()


# --- the five crashes of issue 16, and the hostile files it lists ------------------------------------


def _reject(data: bytes, name: str, settings: KBSettings = KB) -> str:
    with pytest.raises(IngestError) as caught:
        load_faq_bytes(data, name, settings)
    return str(caught.value)


def test_csv_with_lone_cr_line_endings_reads_them_as_line_breaks() -> None:
    data = b"question,answer\rHow do I pay?,By card.\rCan I return it?,Within 30 days.\r"
    entries = load_faq_bytes(data, "faq.csv", KB).entries
    assert [(e.question, e.answer) for e in entries] == [
        ("How do I pay?", "By card."),
        ("Can I return it?", "Within 30 days."),
    ]


@pytest.mark.parametrize("name", ["faq.json", "faq.jsonl"])
def test_deep_nesting_is_refused_before_the_parser_recurses(name: str) -> None:
    deep = "[" * 5000 + "]" * 5000
    text = (
        f'[{{"question": "q", "answer": {deep}}}]' if name == "faq.json" else f'{{"question": "q", "answer": {deep}}}'
    )
    message = _reject(text.encode(), name)
    assert "nested more than 20 levels deep (kb.max_nesting)" in message


def test_brackets_inside_json_strings_are_not_nesting() -> None:
    text = '[{"question": "What is [[[[[[[[[[[[[[[[[[[[[[[[[x?", "answer": "{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{ \\" [[["}]'
    assert load_faq_bytes(text.encode(), "faq.json", KB).entries[0].question.startswith("What is [[[")


@pytest.mark.parametrize("name", ["faq.json", "faq.jsonl"])
def test_huge_integers_are_refused_with_the_record(name: str) -> None:
    record = '{"question": "q", "answer": ' + "9" * 5000 + "}"
    text = f"[{record}]" if name == "faq.json" else record
    message = _reject(text.encode(), name)
    assert "a number 5,000 digits long (the limit is 100)" in message
    assert (f"{name}: record 1" if name == "faq.json" else f"{name}:1") in message


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_and_infinity_are_refused(value: str) -> None:
    message = _reject(f'[{{"question": "q", "answer": "a", "rank": {value}}}]'.encode(), "faq.json")
    assert "faq.json: record 1: the record holds" in message


@pytest.mark.parametrize("name", ["faq.json", "faq.jsonl"])
def test_lone_surrogates_are_refused_with_the_row(name: str) -> None:
    record = '{"question": "How do I pay\\ud83d?", "answer": "By card."}'
    text = f"[{record}]" if name == "faq.json" else record
    message = _reject(text.encode(), name)
    assert "lone UTF-16 surrogate, U+D83D" in message


def test_zero_width_and_bidi_controls_are_stripped_so_look_alikes_collide() -> None:
    data = "question,answer\nHow do I\u200b pay?,By card.\nHow do I pay?,In cash.\nRefund\u202e?,Yes.\n".encode()
    message = _reject(data, "faq.csv")
    assert "faq.csv:3: the same question is also at faq.csv:2" in message
    entries = load_faq_bytes("question,answer\nRefund\u202e\u2066?,Y\u200des.\n".encode(), "faq.csv", KB).entries
    assert (entries[0].question, entries[0].answer) == ("Refund?", "Yes.")


# --- resource limits ----------------------------------------------------------------------------------


def test_too_many_rows_stops_reading_and_names_the_setting() -> None:
    data = b"question,answer\n" + b"".join(b"q%d,a\n" % i for i in range(200))
    message = _reject(data, "faq.csv", KBSettings(max_rows=100))
    assert "faq.csv:101: the file has more than 100 rows, the limit (kb.max_rows)" in message


def test_too_many_cells_in_a_row() -> None:
    data = b"question,answer\nq," + b"," * 500 + b"\n"
    assert "this row has 502 cells, over the limit of 100 (kb.max_columns)" in _reject(data, "faq.csv")


def test_too_long_cell_names_the_cell_and_setting() -> None:
    data = b"question,answer,notes\nq,a," + b"x" * 2000 + b"\n"
    message = _reject(data, "faq.csv", KBSettings(max_cell_chars=1000))
    assert "faq.csv:2: cell 3 is 2,000 characters long, over the limit of 1,000 (kb.max_cell_chars)" in message


def test_only_the_first_problems_are_listed_then_how_many_more() -> None:
    data = b"question,answer\n" + b"".join(b"q%d,\n" % i for i in range(120))
    with pytest.raises(IngestError) as caught:
        load_faq_bytes(data, "faq.csv", KB)
    problems = caught.value.problems
    assert len(problems) == MAX_PROBLEMS_SHOWN + 1
    assert problems[-1].message == "... and 70 more problems"


def _bomb_xlsx(rows: int) -> bytes:
    """A workbook whose sheet holds ``rows`` identical rows: a few hundred kB on disk, ~50 bytes a row
    unzipped (rows without a row number are numbered in order, so they compress to almost nothing)."""
    import openpyxl

    template = io.BytesIO()
    openpyxl.Workbook().save(template)
    source = zipfile.ZipFile(template)
    buffer = io.BytesIO()
    row = b'<row><c t="inlineStr"><is><t>q</t></is></c><c t="inlineStr"><is><t>a</t></is></c></row>'
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
        for name in source.namelist():
            if name != "xl/worksheets/sheet1.xml":
                out.writestr(name, source.read(name))
                continue
            with out.open(name, "w", force_zip64=True) as sheet:
                sheet.write(
                    b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
                    b'<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>'
                    b'<row><c t="inlineStr"><is><t>question</t></is></c><c t="inlineStr"><is><t>answer</t></is></c></row>'
                )
                for _ in range(rows // 10_000):
                    sheet.write(row * 10_000)
                sheet.write(b"</sheetData></worksheet>")
    return buffer.getvalue()


def test_an_xlsx_with_too_many_rows_is_refused_quickly() -> None:
    data = _bomb_xlsx(2_000_000)  # the file: 2,000,000 rows
    assert len(data) < 1_000_000
    started = time.perf_counter()
    message = _reject(data, "faq.xlsx", KBSettings(max_rows=20_000, max_xlsx_expanded_mb=1000))
    assert "faq.xlsx:20001: the file has more than 20,000 rows, the limit (kb.max_rows)" in message
    assert time.perf_counter() - started < 30  # reads 20,000 rows, not 2,000,000 (generous: shared CI CPUs)


def test_an_xlsx_that_expands_past_the_limit_is_refused_before_reading() -> None:
    data = _bomb_xlsx(2_000_000)
    started = time.perf_counter()
    message = _reject(data, "faq.xlsx")
    assert "MB when unzipped, over the 100 MB limit (kb.max_xlsx_expanded_mb)" in message
    assert time.perf_counter() - started < 5


def test_an_xlsx_row_padded_to_many_columns_keeps_only_the_written_cells(tmp_path: Path) -> None:
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["question", "answer"])
    sheet.append(["How do I pay?", "By card."])
    sheet.cell(row=2, column=300).value = None  # formatting far to the right widens the declared size
    sheet.cell(row=3, column=300).number_format = "0.00"
    path = tmp_path / "faq.xlsx"
    book.save(path)
    assert [e.question for e in load_faq_file(path, KB).entries] == ["How do I pay?"]


# --- exports: no cell a spreadsheet would run as a formula --------------------------------------------

FORMULAS = [
    '=HYPERLINK("http://evil.example","Click")',
    "=cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd",
    "+1+cmd",
    "-2+cmd",
    "\t=1",
    "\r=1",
]


def _csv_cells(text: str, delimiter: str = ",") -> list[str]:
    import csv

    return [cell for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) for cell in row]


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_kb_export_neutralises_formula_cells_and_loads_back(fmt: str) -> None:
    from knowledge_base.entry import FAQEntry

    entries = [
        FAQEntry(id=f"e{i}", question=f"{formula} question {i}?", answer=formula, tags=(formula.strip(),))
        for i, formula in enumerate(FORMULAS)
    ]
    text = render_entries(entries, fmt).decode("utf-8-sig")
    cells = _csv_cells(text, "\t" if fmt == "tsv" else ",")
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert f"'{FORMULAS[0]}" in cells
    loaded = load_faq_bytes(text.encode(), f"faq.{fmt}", KB).entries
    assert [(e.answer, e.question) for e in loaded] == [
        (e.answer.strip(), " ".join(e.question.split())) for e in entries
    ]


def test_conversation_export_neutralises_every_text_column(tmp_path: Path) -> None:
    from chatbot.store import ConversationStore

    store = ConversationStore(tmp_path / "c.sqlite3")
    cid = store.create_conversation(channel="web")
    for formula in FORMULAS:
        store.add_message(cid, "user", formula, question=formula)
        mid = store.add_message(cid, "assistant", formula, mode="faq", model=formula, adapter=formula)
        store.add_feedback(mid, "down", formula)
    buffer = io.StringIO()
    store.export_csv(buffer)
    cells = _csv_cells(buffer.getvalue())
    assert not [c for c in cells if c[:1] in ("=", "+", "@", "\t", "\r") or (c[:1] == "-" and not c[1:].isdigit())]
    store.close()


def test_a_header_of_a_million_cells_is_refused_quickly() -> None:
    started = time.perf_counter()
    message = _reject(b"question,answer" + b",x" * 1_000_000 + b"\nq,a\n", "faq.csv")
    assert "faq.csv:1: this row has 1,000,002 cells, over the limit of 100 (kb.max_columns)" in message
    assert time.perf_counter() - started < 10


def test_a_file_over_the_row_limit_is_refused_before_its_rows_are_validated() -> None:
    data = b"question,answer\n" + b"".join(b"q%d,a\n" % i for i in range(120_000))
    started = time.perf_counter()
    assert "faq.csv:100001: the file has more than 100,000 rows" in _reject(data, "faq.csv")
    assert "faq.jsonl:100001: the file has more than 100,000 rows" in _reject(b'{"q": 1}\n' * 120_000, "faq.jsonl")
    assert time.perf_counter() - started < 5  # a counting pass, not 100,000 validated rows


def test_labelled_examples_export_neutralises_every_text_cell(tmp_path: Path) -> None:
    import json as _json

    from chatbot.learning import export_examples_csv
    from knowledge_base.examples import SOURCES

    kb = KnowledgeBase(tmp_path / "kb", KB, HashingEmbedder())
    records = [{"id": f"=e{i}", "question": f"Question number {i}?", "answer": "An answer."} for i in range(3)]
    kb.add_bytes(_json.dumps(records).encode(), "faq.json")
    for i, formula in enumerate(FORMULAS[:3]):
        kb.learn(formula, f"=e{i}", source=SOURCES[0])
    buffer = io.StringIO()
    assert export_examples_csv(kb, buffer) == 3
    cells = _csv_cells(buffer.getvalue())
    assert not [c for c in cells if c[:1] in ("=", "+", "@", "\t", "\r") or (c[:1] == "-" and not c[1:].isdigit())]
    kb.close()
