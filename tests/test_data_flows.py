"""The data flows under Prefect's test harness, and the `gptflow data` CLI end to end."""

from __future__ import annotations

import json

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from test_data_labelled import write_wild_spam

from cli import main
from data.config import CorpusConfig, CsvDataConfig, InstructionDataConfig, SpamDataConfig
from flows.prepare import prepare_corpus, prepare_csv, prepare_instructions, prepare_spam


def test_prepare_spam_flow_and_rerun(prefect_harness, settings):
    outcome = prepare_spam(SpamDataConfig())
    assert outcome["out_dir"] == str(settings.home / "data" / "spam") and not outcome["reused"]
    assert {s: c["total"] for s, c in outcome["report"]["splits"].items()} == {
        "train": 898,
        "validation": 128,
        "test": 258,
    }
    assert outcome["report"]["cleaning"]["duplicates_dropped"] == 414
    assert prepare_spam(SpamDataConfig())["reused"]

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["data-spam-splits"]))
        )
    assert artifacts and artifacts[0].type == "table"
    table = artifacts[0].data if isinstance(artifacts[0].data, list) else json.loads(artifacts[0].data)
    assert table[0] == {
        "split": "train",
        "ham": 449,
        "spam": 449,
        "total": 898,
        "tokens_p50": 32.0,
        "tokens_p95": 56.0,
        "tokens_max": 139,
    }


def test_prepare_csv_flow(prefect_harness, settings, tmp_path):
    path = tmp_path / "mail.csv"
    path.write_text("body,kind\n" + "".join(f"note {i},{'spam' if i % 3 else 'ham'}\n" for i in range(45)))
    outcome = prepare_csv(str(path), CsvDataConfig(text_column="body", label_column="kind", balance="none"))
    assert outcome["report"]["balance"]["before"] == {"ham": 15, "spam": 30}
    assert outcome["report"]["splits"] == {  # 45 rows -> 31/4/10; the tied extra test row goes to spam
        "train": {"ham": 11, "spam": 20, "total": 31},
        "validation": {"ham": 1, "spam": 3, "total": 4},
        "test": {"ham": 3, "spam": 7, "total": 10},
    }
    assert outcome["report"]["labels"] == {"ham": 0, "spam": 1}


def test_prepare_instructions_flow(prefect_harness, settings):
    outcome = prepare_instructions(None, InstructionDataConfig())
    assert outcome["out_dir"] == str(settings.home / "data" / "instructions")
    assert outcome["report"]["splits"] == {"train": 935, "validation": 55, "test": 110}


def test_prepare_corpus_flow(prefect_harness, settings):
    outcome = prepare_corpus("the-verdict", CorpusConfig())
    assert (outcome["report"]["tokens"], outcome["report"]["train_tokens"]) == (5145, 4630)


def test_cli_data_spam(prefect_harness, settings, capsys):
    assert main(["data", "spam"]) == 0
    out = capsys.readouterr().out
    assert "duplicates_dropped" in out and "414" in out
    assert "train       449   449    898" in out
    assert f"outputs written: {settings.home / 'data' / 'spam'}" in out


def test_cli_bad_csv(prefect_harness, settings, tmp_path, capsys):
    path = tmp_path / "mail.csv"
    path.write_text("body,kind\nhello,ham\n")
    code = main(["data", "csv", str(path), "--text-column", "text", "--label-column", "kind"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the line may end with where the traceback went
    assert code == 2
    assert err.startswith(
        f"gptflow data: error: {path}: no column 'text' in the header; the columns found "
        "(comma-separated) are ['body', 'kind']"
    ), err


def test_cli_csv_from_the_wild(prefect_harness, settings, tmp_path, capsys):
    path = write_wild_spam(tmp_path / "spam.csv")
    code = main(["data", "csv", str(path), "--text-column", "text", "--label-column", "label", "--balance", "none"])
    out = capsys.readouterr().out
    assert code == 0
    assert "4 row(s) held unquoted commas that split the text into unnamed columns: joined back into the text" in out
    assert "rows_read                      30" in out


def test_cli_bad_data_files(prefect_harness, settings, tmp_path, capsys):
    zeros = tmp_path / "zeros.txt"
    zeros.write_bytes(b"\0" * 4000)
    two_columns = write_wild_spam(tmp_path / "spam.csv")
    cases = [
        (["corpus", str(zeros)], f"{zeros}: looks binary (NUL byte at offset 0); expected UTF-8 text to pretrain on"),
        (
            ["csv", str(two_columns), "--text-column", "text", "--label-column", "text"],
            "options: Value error, the text and the label column are both 'text': name two columns",
        ),
        (
            ["instructions", str(tmp_path)],
            f"{tmp_path}: is a folder, not a file (expected a non-empty JSON list (or JSON Lines) of "
            "{instruction, input, output} objects)",
        ),
    ]
    for args, message in cases:
        code = main(["data", *args])
        err = capsys.readouterr().err.strip().splitlines()[-1]  # the line may end with where the traceback went
        assert code == 2 and err.startswith(f"gptflow data: error: {message}"), err
