"""SMS spam and user CSV data stages: exact counts, stratification, determinism, reuse and bad input."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from data.common import DataError, apportion, split_sizes, stratified_sizes
from data.config import CsvDataConfig, SpamDataConfig
from data.labelled import clean
from data.spam import prepare_spam, read_sms_spam
from data.tabular import TabularError, prepare_csv
from gptflow.download import fetch_source
from gptflow.storage import read_json

DATA_FILES = ["train.csv", "validation.csv", "test.csv", "labels.json", "unused.csv"]


def read_split(out_dir, name) -> pd.DataFrame:
    return pd.read_csv(out_dir / f"{name}.csv", dtype={"text": str}, keep_default_na=False)


@pytest.fixture
def spam_source(settings):
    return fetch_source("sms-spam", settings)


def test_spam_raw_counts(spam_source):
    raw = read_sms_spam(spam_source)
    assert len(raw) == 5574
    assert raw["label"].value_counts().to_dict() == {"ham": 4827, "spam": 747}


def test_spam_stage_counts_and_files(spam_source, settings):
    result = prepare_spam(spam_source, settings=settings)
    out, report = result.out_dir, result.report
    assert out == settings.home / "data" / "spam" and not result.reused
    assert report["cleaning"] == {
        "rows_read": 5574,
        "texts_whitespace_normalized": 424,
        "labels_case_normalized": 0,
        "empty_texts_dropped": 0,
        "empty_labels_dropped": 0,
        "duplicates_dropped": 414,
        "conflicting_texts": 0,
        "conflicting_rows_dropped": 0,
        "rows_clean": 5160,
    }
    assert report["balance"] == {
        "method": "undersample",
        "before": {"ham": 4518, "spam": 642},
        "after": {"ham": 642, "spam": 642},
        "unused_rows": 3876,
    }
    assert report["splits"] == {
        "train": {"ham": 449, "spam": 449, "total": 898},
        "validation": {"ham": 64, "spam": 64, "total": 128},
        "test": {"ham": 129, "spam": 129, "total": 258},
    }
    assert report["token_lengths"]["train"] == {"p50": 32.0, "p95": 56.0, "max": 139}
    assert read_json(out / "labels.json") == {"ham": 0, "spam": 1}
    assert read_json(out / "manifest.json")["stage"] == "data-spam"

    parts = {name: read_split(out, name) for name in ["train", "validation", "test", "unused"]}
    assert list(parts["train"].columns) == ["text", "label"]
    assert {n: len(p) for n, p in parts.items()} == {"train": 898, "validation": 128, "test": 258, "unused": 3876}
    assert parts["unused"]["label"].value_counts().to_dict() == {0: 4518 - 642}
    texts = pd.concat(parts.values())["text"]
    assert len(texts) == texts.nunique() == 5160  # no text in two splits, nor in a split and unused
    assert (texts == texts.str.strip()).all() and not texts.str.contains(r"\s\s|\n").any()


def test_spam_natural_ratio_is_stratified(spam_source, settings):
    report = prepare_spam(spam_source, SpamDataConfig(balance="none"), settings).report
    assert report["balance"]["unused_rows"] == 0
    assert report["splits"] == {
        "train": {"ham": 3162, "spam": 450, "total": 3612},
        "validation": {"ham": 452, "spam": 64, "total": 516},
        "test": {"ham": 904, "spam": 128, "total": 1032},
    }
    for counts in report["splits"].values():  # each split keeps the 4518:642 ratio to within one row
        assert abs(counts["spam"] - counts["total"] * 642 / 5160) < 1


def test_split_arithmetic():
    assert split_sizes(1494, (0.7, 0.1, 0.2)) == (1045, 149, 300)  # the book's sizes
    assert split_sizes(1100, (0.85, 0.05, 0.10)) == (935, 55, 110)
    assert split_sizes(10, (0.7, 0.1, 0.2)) == (7, 1, 2)
    assert apportion(149, {"ham": 74.7, "spam": 74.7}) == {"ham": 75, "spam": 74}
    assert apportion(10, {"ham": 3.0, "spam": 6.0}) == {"ham": 3, "spam": 7}
    assert apportion(5, {"a": 1.2, "b": 1.6, "c": 1.2}) == {"a": 2, "b": 2, "c": 1}
    sizes = stratified_sizes({"ham": 747, "spam": 747}, (0.7, 0.1, 0.2))
    assert sizes == {"ham": (522, 75, 150), "spam": (523, 74, 150)}


def test_spam_deterministic_and_reused(spam_source, settings, tmp_path):
    first = prepare_spam(spam_source, settings=settings).out_dir
    other = settings.model_copy(update={"home": tmp_path / "other"})
    second = prepare_spam(spam_source, settings=other).out_dir
    for name in DATA_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    again = prepare_spam(spam_source, settings=settings)
    assert again.reused and again.report["splits"]["train"]["total"] == 898
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == mtimes

    seed_123_train = (first / "train.csv").read_bytes()
    reseeded = prepare_spam(spam_source, SpamDataConfig(seed=7), settings)
    assert not reseeded.reused and reseeded.report["splits"]["train"]["total"] == 898
    assert (first / "train.csv").read_bytes() != seed_123_train


def test_clean_counts_every_step():
    df = pd.DataFrame(
        {
            "text": ["  hi   there ", "hi there", "hi there", "   ", "both", "both", "ok", "x"],
            "label": ["Ham", "ham", "ham", "spam", "ham", "SPAM ", "spam", ""],
        }
    )
    cleaned, counts = clean(df)
    assert counts == {
        "rows_read": 8,
        "texts_whitespace_normalized": 2,
        "labels_case_normalized": 2,
        "empty_texts_dropped": 1,
        "empty_labels_dropped": 1,
        "duplicates_dropped": 2,
        "conflicting_texts": 1,
        "conflicting_rows_dropped": 2,
        "rows_clean": 2,
    }
    assert cleaned.to_dict("list") == {"text": ["hi there", "ok"], "label": ["ham", "spam"]}


# --- a user's CSV/TSV ------------------------------------------------------------------------------------


def rows(classes: dict[str, int]) -> list[tuple[str, str]]:
    return [(f"message {i} about {name}", name) for name, n in classes.items() for i in range(n)]


def write_table(path, rows, sep=",", header=("text", "label"), encoding="utf-8", trailer=""):
    lines = [sep.join(header) + trailer] + [f"{t}{sep}{lab}{trailer}" for t, lab in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def csv_config(**kw) -> CsvDataConfig:
    return CsvDataConfig(text_column="text", label_column="label", **kw)


def test_csv_three_classes_tsv(tmp_path, settings):
    path = write_table(tmp_path / "reviews.tsv", rows({"pos": 30, "neg": 20, "mixed": 12}), sep="\t")
    result = prepare_csv(path, csv_config(), settings)
    assert result.out_dir.parent == settings.home / "data"
    assert result.out_dir.name.startswith("csv-reviews-") and len(result.out_dir.name) == len("csv-reviews-") + 8
    assert result.report["read"] == {
        "encoding": "utf-8",
        "delimiter": "tab",
        "columns": ["text", "label"],
        "spilled_texts_rejoined": 0,
    }
    assert read_json(result.out_dir / "labels.json") == {"mixed": 0, "neg": 1, "pos": 2}
    assert result.report["splits"] == {  # 36 rows after undersampling to 12 per class -> 25/3/8
        "train": {"mixed": 8, "neg": 8, "pos": 9, "total": 25},
        "validation": {"mixed": 1, "neg": 1, "pos": 1, "total": 3},
        "test": {"mixed": 3, "neg": 3, "pos": 2, "total": 8},
    }
    assert read_split(result.out_dir, "unused")["label"].value_counts().to_dict() == {2: 18, 1: 8}


def test_csv_semicolons_trailing_empty_columns_and_numeric_labels(tmp_path, settings):
    path = write_table(tmp_path / "s.csv", rows({"1": 10, "0": 10}), sep=";", trailer=";;")
    result = prepare_csv(path, csv_config(balance="none"), settings)
    assert result.report["read"]["delimiter"] == "semicolon"
    assert result.report["read"]["columns"] == ["text", "label"]
    assert read_json(result.out_dir / "labels.json") == {"0": 0, "1": 1}
    assert {s: c["total"] for s, c in result.report["splits"].items()} == {"train": 14, "validation": 2, "test": 4}


def test_csv_quoted_commas_and_newlines_with_bom(tmp_path, settings):
    body = "\n".join(f'"hello, friend {i}\nsee you, at {i}",{"spam" if i % 2 else "ham"}' for i in range(20))
    path = tmp_path / "quoted.csv"
    path.write_bytes(("\ufefftext,label,notes\n" + body + "\n").encode("utf-8"))
    result = prepare_csv(path, csv_config(), settings)
    assert result.report["read"] == {
        "encoding": "utf-8-sig",
        "delimiter": "comma",
        "columns": ["text", "label", "notes"],
        "spilled_texts_rejoined": 0,
    }
    assert result.report["cleaning"]["rows_read"] == 20
    texts = set(pd.concat(read_split(result.out_dir, s) for s in ["train", "validation", "test"])["text"])
    assert "hello, friend 3 see you, at 3" in texts and len(texts) == 20


def test_csv_cp1252_fallback_warns(tmp_path, settings, caplog):
    data = rows({"ham": 10, "spam": 10}) + [("café crème €5", "ham")]
    path = write_table(tmp_path / "win.csv", data, encoding="cp1252")
    with caplog.at_level(logging.WARNING, logger="data.tabular"):
        result = prepare_csv(path, csv_config(balance="none"), settings)
    assert result.report["read"]["encoding"] == "cp1252"
    assert "not UTF-8" in caplog.text and "cp1252" in caplog.text
    texts = pd.concat(read_split(result.out_dir, s) for s in ["train", "validation", "test"])["text"]
    assert "café crème €5" in set(texts)


@pytest.mark.parametrize(
    "content, kwargs, message",
    [
        (b"", {}, r"empty\.csv: the file is empty"),
        (b"text,label\nhello,ham\n\x00\x01\x02binary", {}, r"looks binary \(NUL byte at offset 21\)"),
        (b"text,label\n\x81\x8d\x90 x,ham\n", {}, r"unreadable encoding: not UTF-8 .*nor cp1252"),
        (b"message,category\nhello,ham\n", {}, r"no column 'text' or 'label' .*found.*\['message', 'category'\]"),
        (
            "\n".join(f"t{i},ham" for i in range(30)).encode(),
            {"header": True},
            r"at least 2 classes; after cleaning the labels hold only 'ham' \(30 rows\)",
        ),
        (
            None,
            {"classes": {"a": 20, "b": 20, "c": 3}},
            r"class 'c' has only 3 row\(s\) after cleaning: too few"
            r".*0\.7/0\.1/0\.2 \(each class needs at least 10 rows\)",
        ),
        (b"text,label\nhello,ham,oops\n", {}, r"line 2 has 3 fields but the header names 2 columns"),
        (b"text,label\n,ham\nhello,\n", {}, r"no labelled rows \(2 read, none with both a text and a label\)"),
    ],
    ids=["empty", "binary", "encoding", "missing-column", "one-class", "small-class", "extra-fields", "no-rows"],
)
def test_csv_bad_input(tmp_path, settings, content, kwargs, message):
    path = tmp_path / "empty.csv" if content == b"" else tmp_path / "bad.csv"
    if content is None:
        write_table(path, rows(kwargs["classes"]))
    else:
        path.write_bytes((b"text,label\n" if kwargs.get("header") else b"") + content)
    with pytest.raises(DataError, match=message) as info:
        prepare_csv(path, csv_config(balance="none"), settings)
    assert str(path) in str(info.value)


def test_csv_missing_file(tmp_path, settings):
    with pytest.raises(TabularError, match="nope.csv: no such file"):
        prepare_csv(tmp_path / "nope.csv", csv_config(), settings)


# --- files from the wild ---------------------------------------------------------------------------------

# The widely shared copy of the SMS spam set: header `label,text,,,`, cp1252, CRLF. Unquoted commas spill a
# message's tail into the unnamed columns (1, 2 and 3 of them below); the rest end in `,,,`.
SPILLED = [
    (
        b'ham,"Go until jurong point, crazy.. Available only in bugis",,,',
        "Go until jurong point, crazy.. Available only in bugis",
    ),
    (b"ham,I'll be there at 5, ok?,,", "I'll be there at 5, ok?"),
    (b'spam,"part one", part two, part three,', "part one, part two, part three"),
    (b'spam,"Win \xa3100 now", call 0800, txt STOP,', "Win £100 now, call 0800, txt STOP"),
    (b"spam,one, two, three, four", "one, two, three, four"),
    (b"ham,Sorry \xa35 is all,,,", "Sorry £5 is all"),
]


def write_wild_spam(path):
    lines = [b"label,text,,,"] + [line for line, _ in SPILLED]
    lines += [b"ham,message %d for you,,," % i for i in range(12)] + [
        b"spam,offer %d \xa3%d,,," % (i, i) for i in range(12)
    ]
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    return path


def test_csv_spill_over_into_unnamed_columns_is_rejoined(tmp_path, settings):
    path = write_wild_spam(tmp_path / "spam.csv")
    result = prepare_csv(path, csv_config(balance="none"), settings)
    assert result.report["read"] == {
        "encoding": "cp1252",
        "delimiter": "comma",
        "columns": ["label", "text"],  # the three unnamed columns are dropped
        "spilled_texts_rejoined": 4,
    }
    assert read_json(result.out_dir / "report.json")["read"]["spilled_texts_rejoined"] == 4
    assert result.report["cleaning"]["rows_read"] == 30
    assert result.report["raw_class_counts"] == {"ham": 15, "spam": 15}
    parts = pd.concat(read_split(result.out_dir, s) for s in ["train", "validation", "test"])
    texts = dict(zip(parts["text"], parts["label"]))
    assert {text: texts[text] for _, text in SPILLED} == {
        "Go until jurong point, crazy.. Available only in bugis": 0,
        "I'll be there at 5, ok?": 0,
        "part one, part two, part three": 1,
        "Win £100 now, call 0800, txt STOP": 1,
        "one, two, three, four": 1,
        "Sorry £5 is all": 0,
    }
    assert "offer 7 £7" in texts and len(texts) == 30


@pytest.mark.parametrize(
    "content, message",
    [
        (
            b"label,text,,\nspam,a, b, c, d\n",
            "line 2 has 5 fields but the header names 2 columns and 2 unnamed ones "
            "(extra values [' b', ' c', ' d']); quote fields that contain the delimiter 'comma'",
        ),
        (
            b"label,text,notes\nham,fine,\nspam,a, b, c\n",
            "line 3 has 4 fields but the header names 3 columns "
            "(extra values [' c']); quote fields that contain the delimiter 'comma'",
        ),
        (
            b"text,label,,\nhello, world,ham,\n",
            "line 2 has values in unnamed columns after 'label', which only the "
            "spill-over of a last text column may fill ('text' is not last) (extra values ['ham']); quote fields "
            "that contain the delimiter 'comma'",
        ),
        (
            b"text,label\nhello,ham,oops\n",
            "line 2 has 3 fields but the header names 2 columns (extra values "
            "['oops']); quote fields that contain the delimiter 'comma'",
        ),
    ],
    ids=["more-fields-than-header", "named-extra-column", "text-not-last", "no-unnamed-columns"],
)
def test_csv_column_count_errors(tmp_path, settings, content, message):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(TabularError) as info:
        prepare_csv(path, csv_config(), settings)
    assert str(info.value) == f"{path}: {message}"


def test_csv_smallest_class_named_when_balancing(tmp_path, settings):
    path = write_table(tmp_path / "three.csv", rows({"ham": 30, "spam": 20, "promo": 4}))
    with pytest.raises(DataError) as info:
        prepare_csv(path, csv_config(), settings)
    assert str(info.value) == (
        f"{path}: class 'promo' has only 4 row(s) after cleaning (balancing cuts every class to that size): too "
        "few to appear in train, validation and test at fractions 0.7/0.1/0.2 (each class needs at least 10 rows)"
    )


TEN_EACH = "".join(f"note {i},{'spam' if i % 2 else 'ham'}\n" for i in range(20))


@pytest.mark.parametrize(
    "content, message",
    [
        (
            b"\xef\xbb\xbf\r\n",
            "the file holds no text, only 2 whitespace characters (expected a header row and labelled rows)",
        ),
        (
            b"text,label\r\n",
            "no labelled rows (0 read, none with both a text and a label); expected a header row "
            "and at least 2 classes of labelled rows",
        ),
        (
            b"text,label\n,ham\n,spam\n  ,ham\n",
            "no labelled rows (3 read, none with both a text and a label); "
            "expected a header row and at least 2 classes of labelled rows",
        ),
        (
            ("text,label\n" + TEN_EACH).encode("utf-16-le"),
            "looks binary (NUL byte at offset 1); expected a UTF-8 or "
            "cp1252 text CSV/TSV (UTF-16 only with its byte order mark: else save it as 'CSV UTF-8')",
        ),
        (
            b"\xff\xfet\x00e\x00x",
            "not UTF-16 text (byte 0x78 at offset 6); expected a UTF-8 or cp1252 text CSV/TSV "
            "(UTF-16 only with its byte order mark: else save it as 'CSV UTF-8'): it starts with a UTF-16 byte "
            "order mark but is cut short or mixed",
        ),
        (
            b"text,label,text\nhi,ham,ho\n",
            "the header names column 'text' 2 times (columns [1, 3]); rename all but "
            "one so that it is clear which one to read",
        ),
        (
            ("text,label\n" + TEN_EACH + '"never closed,ham\n' + TEN_EACH).encode(),
            "line 22 opens a quoted field "
            "that is never closed, so the rest of the file (lines 22-42) would be read as one text; close the quote "
            '(a quote inside a quoted field is written "")',
        ),
        (
            b'text,label\nhi,ham\n"' + b"x" * 200_000 + b",spam\n",
            "not a readable CSV at line 3: field larger than "
            "field limit (131072); a quote never closed makes one field of the rest of the file",
        ),
    ],
    ids=[
        "bom-only",
        "header-only",
        "texts-all-empty",
        "utf16-no-bom",
        "utf16-odd-bytes",
        "duplicate-column",
        "unclosed-quote",
        "field-limit",
    ],
)
def test_csv_odd_files(tmp_path, settings, content, message):
    path = tmp_path / "odd.csv"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        prepare_csv(path, csv_config(), settings)
    assert str(info.value) == f"{path}: {message}"


def test_csv_folder_and_same_columns(tmp_path, settings):
    with pytest.raises(TabularError) as info:
        prepare_csv(tmp_path, csv_config(), settings)
    assert str(info.value) == f"{tmp_path}: is a folder, not a file (expected a CSV/TSV with a header row)"
    with pytest.raises(ValueError, match="the text and the label column are both 'text': name two columns"):
        CsvDataConfig(text_column="text", label_column="text")


@pytest.mark.parametrize(
    "encoding, sep, newline, delimiter",
    [("utf-16", "\t", "\r\n", "tab"), ("utf-8", "\t", "\n", "tab"), ("utf-8", ",", "\r", "comma")],
    ids=["utf16-excel-unicode-text", "tsv-named-csv", "old-mac-line-ends"],
)
def test_csv_read_as_a_user_expects(tmp_path, settings, encoding, sep, newline, delimiter):
    lines = [f"text{sep}label"] + [f"caf\u00e9 {i}{sep}{'spam' if i % 2 else 'ham'}" for i in range(20)]
    lines += [f"no label{sep} ", f"{sep}ham"]  # a blank label and a blank text: dropped and counted
    path = tmp_path / "export.csv"
    path.write_bytes(newline.join(lines).encode(encoding))
    result = prepare_csv(path, csv_config(), settings)
    assert result.report["read"] == {
        "encoding": encoding,
        "delimiter": delimiter,
        "columns": ["text", "label"],
        "spilled_texts_rejoined": 0,
    }
    cleaning = result.report["cleaning"]
    assert (cleaning["rows_read"], cleaning["empty_texts_dropped"], cleaning["empty_labels_dropped"]) == (22, 1, 1)
    texts = set(pd.concat(read_split(result.out_dir, s) for s in ["train", "validation", "test"])["text"])
    assert texts == {f"café {i}" for i in range(20)}
