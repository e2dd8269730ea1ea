"""FAQ files in every supported format load into entries, or are rejected with every problem named."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import openpyxl
import pytest

from knowledge_base.entry import FAQEntry, content_id
from knowledge_base.errors import IngestError, Problem, SupportBotError
from knowledge_base.export import export_entries, render_entries
from knowledge_base.loaders import SUPPORTED_SUFFIXES, LoadResult, load_faq_bytes, load_faq_file
from knowledge_base.settings import KBSettings

DEMO_FAQ = Path(__file__).resolve().parents[1] / "knowledge_base" / "demo" / "faq.csv"


@pytest.fixture
def kb() -> KBSettings:
    return KBSettings()


def write(folder: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = folder / name
    path.write_bytes(text.encode(encoding))
    return path


def write_xlsx(folder: Path, name: str, rows: Sequence[Sequence[object]]) -> Path:
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    for row in rows:
        sheet.append(list(row))
    path = folder / name
    book.save(path)
    return path


def rejected(path: Path, kb: KBSettings) -> list[Problem]:
    with pytest.raises(IngestError) as caught:
        load_faq_file(path, kb)
    return caught.value.problems


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, problems
    return problems[0]


# --- each format loads --------------------------------------------------------------------------------


def test_csv_with_every_column(tmp_path: Path, kb: KBSettings) -> None:
    path = write(
        tmp_path,
        "faq.csv",
        "id,category,question,alt_questions,answer,tags,enabled,notes\n"
        'ship-1,Shipping,How long does shipping take?,When will it arrive? | Delivery time?,"3-5 days.\n\n'
        'Express: 1 day.",delivery; time,no,check with ops\n'
        "ship-2,Shipping,Do you ship abroad?,,Yes.,,,\n",
    )
    result = load_faq_file(path, kb)
    assert result.format == "csv"
    assert result.skipped == []
    first, second = result.entries
    assert first == FAQEntry(
        id="ship-1",
        question="How long does shipping take?",
        answer="3-5 days.\n\nExpress: 1 day.",
        alt_questions=("When will it arrive?", "Delivery time?"),
        category="Shipping",
        tags=("delivery", "time"),
        enabled=False,
        source="faq.csv",
    )
    assert first.extra == {"notes": "check with ops"}
    assert second.enabled is True
    assert second.alt_questions == ()
    assert second.tags == ()


def test_header_names_are_trimmed_case_insensitive_and_accept_synonyms(tmp_path: Path, kb: KBSettings) -> None:
    path = write(tmp_path, "faq.csv", " Q , Response ,Paraphrases, TAGS \nHi?,Hello.,Hey?|Yo?,a\n")
    (entry,) = load_faq_file(path, kb).entries
    assert (entry.question, entry.answer, entry.alt_questions, entry.tags) == (
        "Hi?",
        "Hello.",
        ("Hey?", "Yo?"),
        ("a",),
    )
    path = write(tmp_path, "faq2.csv", "Title,Content,Alternative Questions\nHi?,Hello.,Hey?\n")
    assert load_faq_file(path, kb).entries[0].alt_questions == ("Hey?",)


def test_tsv_is_tab_separated(tmp_path: Path, kb: KBSettings) -> None:
    path = write(tmp_path, "faq.tsv", "question\tanswer\tcategory\nCan I pay, later?\tYes, with Klarna.\tPayments\n")
    result = load_faq_file(path, kb)
    assert result.format == "tsv"
    assert result.entries[0].answer == "Yes, with Klarna."
    assert result.entries[0].category == "Payments"


@pytest.mark.parametrize(
    ("name", "text", "fmt"),
    [
        ("faq.csv", "question;answer;tags\nCan I pay, later?;Yes, with Klarna.;pay,later\n", "csv"),
        ("faq.csv", "question|answer\nCan I pay, later?|Yes, with Klarna.\n", "csv"),
        ("faq.txt", "question\tanswer\nCan I pay, later?\tYes, with Klarna.\n", "tsv"),
        ("faq.csv", "sep=;\nquestion;answer\nCan I pay, later?;Yes, with Klarna.\n", "csv"),
    ],
    ids=["semicolon", "pipe", "txt-tab", "excel-sep-line"],
)
def test_delimiter_is_sniffed_from_the_header(tmp_path: Path, kb: KBSettings, name: str, text: str, fmt: str) -> None:
    result = load_faq_file(write(tmp_path, name, text), kb)
    assert result.format == fmt
    assert [(e.question, e.answer) for e in result.entries] == [("Can I pay, later?", "Yes, with Klarna.")]


def test_alt_questions_split_on_newlines_and_tags_on_commas(tmp_path: Path, kb: KBSettings) -> None:
    path = write(tmp_path, "faq.csv", 'question,answer,alt_questions,tags\nHi?,Hello.,"Hey?\nYo? | Sup?","a, b;c"\n')
    (entry,) = load_faq_file(path, kb).entries
    assert entry.alt_questions == ("Hey?", "Yo?", "Sup?")
    assert entry.tags == ("a", "b", "c")


def test_xlsx_first_sheet_with_numbers_dates_and_booleans_as_text(tmp_path: Path, kb: KBSettings) -> None:
    path = write_xlsx(
        tmp_path,
        "faq.xlsx",
        [
            ["ID", "Question", "Answer", "Alt_Questions", "Enabled"],
            [42, "When is the sale?", datetime(2024, 11, 29), "Black Friday? | Sale date?", True],
            [7.0, "What is the discount?", 0.25, None, False],
            [None, None, None, None, None],
        ],
    )
    result = load_faq_file(path, kb)
    assert result.format == "xlsx"
    sale, discount = result.entries
    assert (sale.id, sale.answer, sale.alt_questions, sale.enabled) == (
        "42",
        "2024-11-29",
        ("Black Friday?", "Sale date?"),
        True,
    )
    assert (discount.id, discount.answer, discount.enabled) == ("7", "0.25", False)
    assert sale.source == "faq.xlsx"


def test_json_list_of_records(tmp_path: Path, kb: KBSettings) -> None:
    records = [
        {
            "question": "Hi?",
            "answer": "Hello.",
            "alt_questions": ["Hey?", "Yo?"],
            "tags": ["a", "b"],
            "enabled": False,
        },
        {
            "Question": "Bye?",
            "Answer": "Goodbye.",
            "alt_questions": "See you? | Later?",
            "tags": "x; y",
            "id": 5,
        },
    ]
    result = load_faq_file(write(tmp_path, "faq.json", json.dumps(records)), kb)
    assert result.format == "json"
    hi, bye = result.entries
    assert (hi.alt_questions, hi.tags, hi.enabled) == (("Hey?", "Yo?"), ("a", "b"), False)
    assert (bye.id, bye.alt_questions, bye.tags) == ("5", ("See you?", "Later?"), ("x", "y"))


def test_json_object_with_entries(tmp_path: Path, kb: KBSettings) -> None:
    path = write(tmp_path, "faq.json", json.dumps({"entries": [{"question": "Hi?", "answer": "Hello."}]}))
    assert [e.question for e in load_faq_file(path, kb).entries] == ["Hi?"]


def test_jsonl_one_record_per_line(tmp_path: Path, kb: KBSettings) -> None:
    lines = [json.dumps({"q": "Hi?", "a": "Hello."}), "", json.dumps({"question": "Bye?", "answer": "Bye."})]
    result = load_faq_file(write(tmp_path, "faq.jsonl", "\n".join(lines) + "\n"), kb)
    assert result.format == "jsonl"
    assert [e.question for e in result.entries] == ["Hi?", "Bye?"]


MARKDOWN = """\
Welcome to our FAQ. This introduction is not an entry.

## Do you have a store?
Also: Where is your shop?
Also: Can I visit you?

No, we sell online only.

# Shipping

Everything about delivery (ignored: no question yet).

## How long does shipping take?
Also: When will my order arrive?
Tags: delivery, time
Standard shipping takes 3-5 days.

### Express
Express takes 1 day:

```bash
# not a category
## not a question
track --order 123
```

# Returns ##

## How do I return an item? ##
ID: ret-1
Enabled: no

Send it back within 30 days.
"""


def test_markdown_headings_categories_and_also_lines(tmp_path: Path, kb: KBSettings) -> None:
    result = load_faq_file(write(tmp_path, "faq.md", MARKDOWN), kb)
    assert result.format == "markdown"
    store, shipping, returns = result.entries
    assert store == FAQEntry(
        id=content_id("Do you have a store?"),
        question="Do you have a store?",
        answer="No, we sell online only.",
        alt_questions=("Where is your shop?", "Can I visit you?"),
        source="faq.md",
    )
    assert shipping.category == "Shipping"
    assert shipping.alt_questions == ("When will my order arrive?",)
    assert shipping.tags == ("delivery", "time")
    assert shipping.answer.startswith("Standard shipping takes 3-5 days.\n\n### Express\n")
    assert "# not a category\n## not a question\ntrack --order 123\n```" in shipping.answer
    assert (returns.id, returns.question, returns.category, returns.enabled) == (
        "ret-1",
        "How do I return an item?",
        "Returns",
        False,
    )
    assert returns.answer == "Send it back within 30 days."


def test_markdown_metadata_lines_only_directly_under_the_heading(tmp_path: Path, kb: KBSettings) -> None:
    path = write(tmp_path, "faq.md", "## Does it work on iPhone?\n\nAlso: on Android.\n")
    (entry,) = load_faq_file(path, kb).entries
    assert entry.alt_questions == ()
    assert entry.answer == "Also: on Android."


def test_markdown_without_question_headings_says_how_to_write_them(tmp_path: Path, kb: KBSettings) -> None:
    problem = only(rejected(write(tmp_path, "faq.md", "# FAQ\n\n### Hi?\nHello.\n"), kb))
    assert problem.where == "faq.md"
    assert "'## question'" in problem.message
    assert "'###'" in problem.fix


# --- encodings ----------------------------------------------------------------------------------------

ACCENTED = "question,answer\nIs the café open?,Yes — naïve visitors welcome.\n"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le-bom", "utf-16-be-bom", "cp1252"])
def test_text_encodings_are_detected(tmp_path: Path, kb: KBSettings, encoding: str) -> None:
    if encoding.endswith("-bom"):
        codec = encoding.removesuffix("-bom")
        data = "\ufeff".encode(codec) + ACCENTED.encode(codec)
    else:
        data = ACCENTED.encode(encoding)
    result = load_faq_bytes(data, "faq.csv", kb)
    (entry,) = result.entries
    assert entry.question == "Is the café open?"
    assert entry.answer == "Yes — naïve visitors welcome."


def test_utf8_bom_does_not_hide_the_first_column(tmp_path: Path, kb: KBSettings) -> None:
    path = write(tmp_path, "faq.csv", "id,question,answer\nx-1,Hi?,Hello.\n", encoding="utf-8-sig")
    assert load_faq_file(path, kb).entries[0].id == "x-1"


# --- ids -----------------------------------------------------------------------------------------------


def test_content_ids_are_the_same_in_every_format(tmp_path: Path, kb: KBSettings) -> None:
    question, answer = "How do I reset my password?", "Use the link on the login page."
    files = [
        write(tmp_path, "a.csv", f"question,answer\n{question},{answer}\n"),
        write(tmp_path, "a.json", json.dumps([{"question": question, "answer": answer}])),
        write(tmp_path, "a.jsonl", json.dumps({"question": question, "answer": answer})),
        write(tmp_path, "a.md", f"## {question}\n{answer}\n"),
        write_xlsx(tmp_path, "a.xlsx", [["question", "answer"], [question, answer]]),
    ]
    ids = {load_faq_file(path, kb).entries[0].id for path in files}
    assert ids == {content_id(question)}


def test_upload_name_is_the_source_without_client_folders(kb: KBSettings) -> None:
    result = load_faq_bytes(b"question,answer\nHi?,Hello.\n", "C:\\fakepath\\faq.csv", kb)
    assert result.entries[0].source == "faq.csv"


def test_demo_faq_loads(kb: KBSettings) -> None:
    result = load_faq_file(DEMO_FAQ, kb)
    assert len(result.entries) > 50
    assert result.entries[0].id == "orders-001"
    assert result.entries[0].alt_questions == (
        "How do I buy something on your website?",
        "What are the steps to order?",
    )


# --- problems -----------------------------------------------------------------------------------------


def test_missing_column_names_the_columns_found(tmp_path: Path, kb: KBSettings) -> None:
    problem = only(rejected(write(tmp_path, "faq.csv", "question,reply\nHi?,Hello.\n"), kb))
    assert problem.where == "faq.csv:1"
    assert "'answer'" in problem.message
    assert "'question', 'reply'" in problem.message
    assert "answer" in problem.fix


def test_xlsx_missing_column(tmp_path: Path, kb: KBSettings) -> None:
    problem = only(rejected(write_xlsx(tmp_path, "faq.xlsx", [["Frage", "Antwort"], ["Hi?", "Hello."]]), kb))
    assert problem.where == "faq.xlsx:1"
    assert "'question' and 'answer'" in problem.message
    assert "'Frage', 'Antwort'" in problem.message


def test_empty_answer_names_file_and_line(tmp_path: Path, kb: KBSettings) -> None:
    problem = only(rejected(write(tmp_path, "faq.csv", "question,answer\nHi?,Hello.\nBye?,  \n"), kb))
    assert problem.where == "faq.csv:3"
    assert "answer is empty" in problem.message
    assert "Bye?" in problem.message


def test_line_numbers_follow_the_editor_with_blank_lines_and_multiline_cells(tmp_path: Path, kb: KBSettings) -> None:
    text = 'question,answer\n\nHi?,"Hello,\nthere."\nBye?,\n'
    assert only(rejected(write(tmp_path, "faq.csv", text), kb)).where == "faq.csv:5"


def test_xlsx_row_numbers_are_spreadsheet_rows(tmp_path: Path, kb: KBSettings) -> None:
    path = write_xlsx(tmp_path, "faq.xlsx", [["question", "answer"], ["Hi?", "Hello."], ["Bye?", None]])
    assert only(rejected(path, kb)).where == "faq.xlsx:3"


def test_too_long_question_and_answer_say_length_and_limit(tmp_path: Path) -> None:
    kb = KBSettings(max_question_chars=20, max_answer_chars=30)
    path = write(tmp_path, "faq.csv", f"question,answer\n{'q' * 25},ok\nHi?,{'a' * 31}\n")
    long_question, long_answer = rejected(path, kb)
    assert long_question.where == "faq.csv:2"
    assert "25 characters" in long_question.message
    assert "limit is 20" in long_question.message
    assert long_answer.where == "faq.csv:3"
    assert "31 characters" in long_answer.message
    assert "limit is 30" in long_answer.message


def test_duplicate_id_names_both_lines(tmp_path: Path, kb: KBSettings) -> None:
    path = write(tmp_path, "faq.csv", "id,question,answer\nx,Hi?,Hello.\ny,Bye?,Bye.\nx,Thanks?,Welcome.\n")
    problem = only(rejected(path, kb))
    assert problem.where == "faq.csv:4"
    assert "duplicate id 'x'" in problem.message
    assert "faq.csv:2" in problem.message


def test_same_question_twice_names_both_lines(tmp_path: Path, kb: KBSettings) -> None:
    path = write(tmp_path, "faq.csv", "question,answer\nHow do I pay?,Card.\nhow do I pay,By card.\n")
    problem = only(rejected(path, kb))
    assert problem.where == "faq.csv:3"
    assert "faq.csv:2" in problem.message
    assert content_id("How do I pay?") in problem.message


def test_malformed_jsonl_line_gives_line_and_parser_message(tmp_path: Path, kb: KBSettings) -> None:
    text = '{"question": "Hi?", "answer": "Hello."}\n{"question": "Bye?", "answer": }\n'
    problem = only(rejected(write(tmp_path, "faq.jsonl", text), kb))
    assert problem.where == "faq.jsonl:2"
    assert "Expecting value" in problem.message


def test_malformed_json_file_gives_line_and_parser_message(tmp_path: Path, kb: KBSettings) -> None:
    text = '[\n  {"question": "Hi?", "answer": "Hello."},\n  {"question": "Bye?" "answer": "Bye."}\n]\n'
    problem = only(rejected(write(tmp_path, "faq.json", text), kb))
    assert problem.where == "faq.json:3"
    assert "Expecting ',' delimiter" in problem.message


def test_json_record_problems_name_the_record(tmp_path: Path, kb: KBSettings) -> None:
    records = [{"question": "Hi?", "answer": "Hello."}, "Bye?", {"text": "Thanks?", "answer": "Welcome."}]
    not_an_object, no_question = rejected(write(tmp_path, "faq.json", json.dumps(records)), kb)
    assert not_an_object.where == "faq.json: record 2"
    assert "got a string" in not_an_object.message
    assert no_question.where == "faq.json: record 3"
    assert "no 'question'" in no_question.message
    assert "'text'" in no_question.message


def test_unclosed_quote_is_reported_where_it_opens(tmp_path: Path, kb: KBSettings) -> None:
    text = 'question,answer\nHi?,Hello.\nBye?,"Goodbye.\nThanks?,Welcome.\n'
    problem = only(rejected(write(tmp_path, "faq.csv", text), kb))
    assert problem.where == "faq.csv:3"
    assert "quoted" in problem.fix


def test_bad_enabled_value(tmp_path: Path, kb: KBSettings) -> None:
    problem = only(rejected(write(tmp_path, "faq.csv", "question,answer,enabled\nHi?,Hello.,maybe\n"), kb))
    assert problem.where == "faq.csv:2"
    assert "'maybe'" in problem.message


@pytest.mark.parametrize("name", ["faq.csv", "faq.md", "faq.json", "faq.jsonl"])
def test_binary_garbage_in_a_text_format(tmp_path: Path, kb: KBSettings, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * 4)
    problem = only(rejected(path, kb))
    assert problem.where == name
    assert "binary" in problem.message


def test_xlsx_that_is_not_a_workbook(tmp_path: Path, kb: KBSettings) -> None:
    path = write(tmp_path, "faq.xlsx", "question,answer\nHi?,Hello.\n")
    problem = only(rejected(path, kb))
    assert problem.where == "faq.xlsx"
    assert "not an Excel .xlsx workbook" in problem.message
    assert ".csv" in problem.fix


def test_damaged_xlsx(tmp_path: Path, kb: KBSettings) -> None:
    good = write_xlsx(tmp_path, "good.xlsx", [["question", "answer"], ["Hi?", "Hello."]])
    damaged = tmp_path / "faq.xlsx"
    damaged.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    problem = only(rejected(damaged, kb))
    assert problem.where == "faq.xlsx"


def test_too_large_file_is_refused_before_parsing(tmp_path: Path) -> None:
    kb = KBSettings(max_upload_mb=0.001)
    path = tmp_path / "faq.csv"
    path.write_bytes(b"\x00" * 2000)  # would be "binary" if it were read at all
    problem = only(rejected(path, kb))
    assert problem.where == "faq.csv"
    assert "0.001 MB limit" in problem.message
    assert "kb.max_upload_mb" in problem.fix
    with pytest.raises(IngestError, match="MB limit"):
        load_faq_bytes(b"\x00" * 2000, "faq.csv", kb)


def test_unknown_extension_names_the_supported_formats(tmp_path: Path, kb: KBSettings) -> None:
    problem = only(rejected(write(tmp_path, "faq.docx", "whatever"), kb))
    assert problem.where == "faq.docx"
    assert "'.docx'" in problem.message
    for fmt in (".csv", ".xlsx", ".json", ".jsonl", ".md"):
        assert fmt in problem.fix
    assert {".csv", ".tsv", ".xlsx", ".json", ".jsonl", ".md", ".markdown"} <= set(SUPPORTED_SUFFIXES)


def test_old_excel_files_are_told_to_save_as_xlsx(tmp_path: Path, kb: KBSettings) -> None:
    assert ".xlsx" in only(rejected(write(tmp_path, "faq.xls", "x"), kb)).fix


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("faq.csv", b""),
        ("faq.csv", "\ufeff \n\n".encode()),
        ("faq.json", b"  "),
        ("faq.xlsx", b""),
    ],
)
def test_empty_file(kb: KBSettings, name: str, data: bytes) -> None:
    with pytest.raises(IngestError) as caught:
        load_faq_bytes(data, name, kb)
    problem = only(caught.value.problems)
    assert problem.where == name
    assert "empty" in problem.message


@pytest.mark.parametrize(
    ("name", "text"),
    [("faq.csv", "question,answer\n"), ("faq.json", "[]"), ("faq.jsonl", "\n\n")],
)
def test_file_without_entries(tmp_path: Path, kb: KBSettings, name: str, text: str) -> None:
    problem = only(rejected(write(tmp_path, name, text), kb))
    assert "no entries" in problem.message or "empty" in problem.message


def test_missing_file(tmp_path: Path, kb: KBSettings) -> None:
    assert "does not exist" in only(rejected(tmp_path / "nope.csv", kb)).message


BAD_ROWS = (
    "id,question,answer\n"
    "a,Hi?,Hello.\n"  # 2 good
    "b,Bye?,\n"  # 3 empty answer
    "c,,Orphan answer.\n"  # 4 empty question
    "a,Thanks?,Welcome.\n"  # 5 duplicate id
    "d,Hi?,Hello again.\n"  # 6 same question as line 2
    "e,Where?,Here.\n"  # 7 good
)


def test_all_problems_are_reported_at_once(tmp_path: Path, kb: KBSettings) -> None:
    problems = rejected(write(tmp_path, "faq.csv", BAD_ROWS), kb)
    assert [p.where for p in problems] == ["faq.csv:3", "faq.csv:4", "faq.csv:5", "faq.csv:6"]
    assert all(p.fix for p in problems)
    with pytest.raises(IngestError) as caught:
        load_faq_file(tmp_path / "faq.csv", kb)
    assert "(4)" in str(caught.value)
    assert "nothing was stored" in str(caught.value)


def test_skip_bad_rows_keeps_the_good_ones(tmp_path: Path, kb: KBSettings) -> None:
    result = load_faq_file(write(tmp_path, "faq.csv", BAD_ROWS), kb, skip_bad_rows=True)
    assert isinstance(result, LoadResult)
    assert [e.id for e in result.entries] == ["a", "e"]
    assert [p.where for p in result.skipped] == ["faq.csv:3", "faq.csv:4", "faq.csv:5", "faq.csv:6"]


def test_skip_bad_rows_skips_malformed_jsonl_lines(tmp_path: Path, kb: KBSettings) -> None:
    text = '{"question": "Hi?", "answer": "Hello."}\nnot json\n'
    result = load_faq_file(write(tmp_path, "faq.jsonl", text), kb, skip_bad_rows=True)
    assert [e.question for e in result.entries] == ["Hi?"]
    assert only(result.skipped).where == "faq.jsonl:2"


def test_skip_bad_rows_still_raises_for_the_file_as_a_whole(tmp_path: Path, kb: KBSettings) -> None:
    with pytest.raises(IngestError, match="missing required column"):
        load_faq_file(write(tmp_path, "faq.csv", "question,reply\nHi?,Hello.\n"), kb, skip_bad_rows=True)
    with pytest.raises(IngestError, match="not valid JSON"):
        load_faq_file(write(tmp_path, "faq.json", "[{"), kb, skip_bad_rows=True)


def test_skip_bad_rows_with_no_good_row_raises(tmp_path: Path, kb: KBSettings) -> None:
    path = write(tmp_path, "faq.csv", "question,answer\nHi?,\n")
    with pytest.raises(IngestError) as caught:
        load_faq_file(path, kb, skip_bad_rows=True)
    assert [p.where for p in caught.value.problems] == ["faq.csv:2", "faq.csv"]


# --- export -------------------------------------------------------------------------------------------

ENTRIES = [
    FAQEntry(
        id="ship-1",
        question="How long does shipping take?",
        answer="Standard: 3-5 days.\n\nExpress: 1 day, see below.",
        alt_questions=("When will my order arrive?", "Delivery time?"),
        category="Shipping",
        tags=("delivery", "express shipping"),
    ),
    FAQEntry(
        id=content_id("Est-ce que le café est ouvert ?"),
        question="Est-ce que le café est ouvert ?",
        answer="Oui, naïvement ouvert — tous les jours.",
    ),
    FAQEntry(
        id="tricky",
        question="Do you support C#",
        answer=(
            "Tags: this line is part of the answer.\n## Not a question\n# Not a category\n"
            "```\n# comment in code\n```\n=SUM(A1:A2) is text"
        ),
        category="Dev",
        enabled=False,
    ),
    FAQEntry(id="007", question="=1+1?", answer="2", alt_questions=("one plus one",), category="Shipping"),
    FAQEntry(
        id="-neg",
        question="@here what is +1?",
        answer="- a list item\n- another",
        alt_questions=("=cmd /C calc!A0",),
        tags=("+tag",),
    ),
]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".md", ".xlsx"])
def test_export_then_load_gives_the_same_entries(tmp_path: Path, kb: KBSettings, suffix: str) -> None:
    path = tmp_path / f"export{suffix}"
    export_entries(ENTRIES, path)
    loaded = load_faq_file(path, kb).entries
    expected = [e.with_changes(source=path.name) for e in ENTRIES]
    # Markdown groups entries by category; every other format keeps the order.
    key = (lambda e: e.id) if suffix == ".md" else (lambda e: 0)
    assert sorted(loaded, key=key) == sorted(expected, key=key)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_exported_tables_have_the_documented_columns() -> None:
    header = render_entries(ENTRIES, "csv").decode("utf-8-sig").splitlines()[0]
    assert header == "id,category,question,alt_questions,answer,tags,enabled"
    assert render_entries(ENTRIES, ".md") == render_entries(ENTRIES, "markdown")


def test_markdown_export_reads_like_the_documented_format() -> None:
    text = render_entries(ENTRIES[:2], "markdown").decode()
    assert text.startswith(
        f"## {ENTRIES[1].question}\n\nOui, naïvement ouvert — tous les jours.\n\n# Shipping\n\n"
        "## How long does shipping take?\nAlso: When will my order arrive?\nAlso: Delivery time?\n"
        "Tags: delivery, express shipping\nID: ship-1\n\nStandard: 3-5 days."
    )


def test_export_to_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SupportBotError, match="cannot export"):
        export_entries(ENTRIES, tmp_path / "faq.pdf")
