"""Honest exits: an evaluation that judged nothing is not a pass, a user error is one line on the terminal (its
traceback in a log file), bad settings stop at start-up, and a killed command leaves no Prefect server behind."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, command_env
from fake_ollama import closed_port_host

from cli import main
from gptflow.errors import GptflowError
from gptflow.settings import get_settings

ENTRY = {"instruction": "Name a colour.", "input": "", "output": "Red.", "model_response": "Blue."}


@pytest.fixture
def responses(tmp_path):
    path = tmp_path / "responses.json"
    path.write_text(json.dumps([ENTRY]))
    return path


def test_evaluate_exits_3_when_the_judge_is_unreachable(prefect_harness, responses, settings, capsys, tmp_path):
    host = closed_port_host()
    rc = main(["evaluate", str(responses), "--host", host, "--timeout-s", "2", "--out-dir", str(tmp_path / "r")])
    captured = capsys.readouterr()
    assert rc == 3
    reason = f"Ollama is not reachable at {host}; start it with `ollama serve` (ConnectionError)"
    assert captured.err == f"evaluation skipped: {reason}\n"
    assert captured.out == f"report: {tmp_path / 'r'}/report.md\n"
    assert f"**Skipped**: {reason}" in (tmp_path / "r" / "report.md").read_text()


def test_evaluate_exits_3_without_the_judge_model(prefect_harness, responses, fake_ollama, settings, capsys):
    rc = main(["evaluate", str(responses), "--host", fake_ollama.host, "--model", "mistral"])
    assert rc == 3
    assert capsys.readouterr().err == (
        f"evaluation skipped: model mistral is not available on {fake_ollama.host}; run `ollama pull mistral` "
        "(or pass --pull)\n"
    )


def test_evaluate_exits_3_when_no_reply_holds_a_score(prefect_harness, responses, fake_ollama, settings, capsys):
    fake_ollama.reply = lambda prompt, fmt: "I cannot say."
    rc = main(["evaluate", str(responses), "--host", fake_ollama.host, "--backoff-s", "0"])
    captured = capsys.readouterr()
    assert rc == 3
    assert captured.out.splitlines()[1].split()[:4] == ["llama3", "model_response", "0", "1"]
    assert captured.err == "nothing judged: no reply held a usable score (the report lists each reason)\n"

    fake_ollama.reply = lambda prompt, fmt: "I cannot say."  # no verdict either: nothing compared
    rc = main(
        ["evaluate", "--pairwise", str(responses), str(responses), "--host", fake_ollama.host, "--backoff-s", "0"]
    )
    captured = capsys.readouterr()
    assert rc == 3
    assert captured.out.splitlines()[1].split()[:5] == ["llama3", "0", "0", "0", "1"]
    assert captured.err == "nothing judged: no pair got a verdict in both orders (the report lists each reason)\n"


def test_evaluate_help_documents_the_exit_status(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Exit status: 0 when responses were judged; 3 when nothing could be judged" in help_text


@pytest.mark.slow
def test_a_failed_flow_is_one_line_and_its_traceback_goes_to_a_log_file(prefect_harness, tmp_path, mirror):
    from prefect.settings import PREFECT_API_URL

    data = tmp_path / "messages.csv"  # its header is right (checked before the flow), a row is not (in the flow)
    data.write_text("text,label\n" + "".join(f"message {i},{'ab'[i % 2]}\n" for i in range(40)) + "message,a,stray\n")
    env = command_env(tmp_path, mirror, api=PREFECT_API_URL.value())
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "data", "csv", str(data), "--text-column", "text", "--label-column", "label"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    message = (
        f"{data}: line 42 has 3 fields but the header names 2 columns (extra values ['stray']); quote fields that "
        "contain the delimiter 'comma'"
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gptflow data: error:")]
    assert len(errors) == 1, proc.stderr
    match = re.fullmatch(rf"gptflow data: error: {re.escape(message)} \(traceback: (.+)\)", errors[0])
    assert match, errors[0]
    log = Path(match.group(1))
    assert log.parent == tmp_path / "home" / "logs" and log.name.startswith("data-")
    text = log.read_text()
    assert text.count("Traceback (most recent call last):") == 2  # the task run's and the flow run's
    assert f"data.tabular.TabularError: {message}" in text
    assert "Beginning flow run" in proc.stderr  # progress lines stay on the terminal


def test_the_flow_runs_logs_keep_the_traceback(prefect_harness, settings, tmp_path, capsys):
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    data = tmp_path / "messages.csv"
    data.write_text("text,label\nhello,a\nworld,b,stray\n")  # a bad row: found by the flow, not before it
    assert main(["data", "csv", str(data), "--text-column", "text", "--label-column", "label"]) == 2
    log = Path(capsys.readouterr().err.rsplit("(traceback: ", 1)[1].rstrip(")\n"))
    assert "Traceback (most recent call last):" in log.read_text()
    APILogHandler().flush()  # send what is queued
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=200)
        (run,) = [r for r in runs if r.state.is_failed() and r.parameters.get("path") == str(data)]
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    assert any("Traceback (most recent call last):" in entry.message for entry in logs)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(p) for p in task.read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited (its parent, init, reaps it)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_a_killed_command_takes_its_temporary_prefect_server_down(tmp_path, mirror):
    env = command_env(tmp_path, mirror)
    command = subprocess.Popen(
        [sys.executable, "-m", "cli", "data", "corpus", "the-verdict"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        server = None
        while server is None:
            assert command.poll() is None and time.monotonic() < deadline, "no Prefect server was started"
            server = next(
                (p for p in _children(command.pid) if b"uvicorn" in Path(f"/proc/{p}/cmdline").read_bytes()), None
            )
            time.sleep(0.1)
        command.send_signal(signal.SIGKILL)
        command.wait(timeout=30)
        deadline = time.monotonic() + 15
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server), f"the Prefect server {server} outlived the killed command"
    finally:
        if command.poll() is None:
            command.kill()


@pytest.mark.parametrize(
    "host, message",
    [
        ("http://[::1", "'http://[::1' is not a URL (Invalid IPv6 URL)"),
        (":::::", "':::::' is not a URL (Port could not be cast to integer value as '::::')"),
        ("http://", "'http://' names no host"),
        ("http://host:notaport", "'http://host:notaport' is not a URL (Port could not be cast to integer value"),
        ("http://host:70000", "'http://host:70000' is not a URL (Port out of range 0-65535)"),
        ("ftp://host", "'ftp://host': scheme 'ftp' is not http or https"),
        ("abc def", "'abc def': 'abc def' is not a host name or address"),  # before: "not reachable", later
    ],
)
def test_a_bad_ollama_host_stops_every_verb_in_one_line(host, message, settings, monkeypatch, capsys):
    monkeypatch.setenv("OLLAMA_HOST", host)
    get_settings.cache_clear()
    assert main(["evaluate", "responses.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gptflow evaluate: error: invalid settings: OLLAMA_HOST: Value error, {message}")
    assert err.count("\n") == 1 and "expected http(s)://HOST[:PORT] or HOST[:PORT]" in err


def test_ollama_host_forms_the_client_accepts(settings, monkeypatch):
    for value, url in [
        ("judge.local", "http://judge.local:11434"),
        (":5678", "http://127.0.0.1:5678"),
        ("[::1]:9", "http://[::1]:9"),
        ("https://judge.example/", "https://judge.example"),
        ("", "http://localhost:11434"),
    ]:
        monkeypatch.setenv("OLLAMA_HOST", value)
        get_settings.cache_clear()
        assert get_settings().ollama_host == url


@pytest.mark.parametrize(
    "variable, value, message",
    [
        (
            "GPTFLOW_HOME",
            "{file}/outputs",
            "GPTFLOW_HOME: Value error, {file}/outputs is not a folder ({file} is a file)",
        ),
        ("GPTFLOW_HOME", "{file}", "GPTFLOW_HOME: Value error, {file} is not a folder; expected a writable folder"),
        ("GPTFLOW_JUDGE_MODEL", "llama 3", "GPTFLOW_JUDGE_MODEL: Value error, 'llama 3' is not an Ollama model name"),
        ("PREFECT_HOME", "{file}/prefect", "PREFECT_HOME: cannot create {file}/prefect (Not a directory)"),
        (
            "GPTFLOW_MIRROR",
            "{file}",
            "GPTFLOW_MIRROR: Value error, {file} is a file, not a folder",
        ),  # before: "does not exist"
    ],
)
def test_an_unusable_folder_or_name_in_the_environment_is_one_line(
    variable, value, message, settings, monkeypatch, capsys, tmp_path
):
    file = tmp_path / "a-file"
    file.write_text("")
    monkeypatch.setenv(variable, value.format(file=file))
    get_settings.cache_clear()
    assert main(["data", "spam"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"gptflow data: error: invalid settings: {message.format(file=file)}") and err.count("\n") == 1
    )


def test_a_home_that_cannot_be_created_stops_at_start_up(settings, monkeypatch, capsys):
    """Before: 250 lines and 15 tracebacks. access() says root may write in /proc; only mkdir tells."""
    monkeypatch.setenv("GPTFLOW_HOME", "/proc/x")
    get_settings.cache_clear()
    assert main(["data", "spam"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gptflow data: error: invalid settings: GPTFLOW_HOME: Value error, ")
    assert "cannot create /proc/x (" in err or "/proc is not writable" in err  # root / other users
    assert err.rstrip().endswith("expected a writable folder for the outputs")


def test_an_unwritable_folder_under_home_is_one_line(prefect_harness, settings, capsys):
    settings.home.mkdir(parents=True)
    (settings.home / "data").write_text("")  # where the data stage's folders go
    assert main(["data", "spam"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(  # the stage lock's folder is the first thing the stage makes
        f"gptflow data: error: cannot write {settings.home.absolute()}/data (a file, not a folder): "
        f"GPTFLOW_HOME={settings.home} must be a folder you can write in; set GPTFLOW_HOME to another folder"
    )
    assert err.count("\n") == 1


@pytest.fixture
def odd_files(tmp_path):
    """Files a user might pass by mistake, by name."""
    files = {
        "cp1252.txt": b"caf\xe9 ok\n\nsecond\n",
        "cp1252.csv": b"text,label\ncaf\xe9,1\n",
        "undecodable.txt": b"a\x81\x8d b\n",
        "undecodable.csv": b"text\na\x81\x8d b\n",
        "binary.txt": b"ab\x00cd",
        "empty.csv": b"",
        "ragged.csv": b"text,label\na,1\nb,2,3,4\n",
        "binary.yaml": b"\xff\xfe\x00bad",
        "list.yaml": b"- 1\n- 2\n",
        "a-file": b"",
        "responses.json": json.dumps([ENTRY]).encode(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder").mkdir()
    return tmp_path


def test_classify_file_reads_what_the_data_stage_reads(odd_files):
    from cli.classify import read_texts

    assert read_texts(str(odd_files / "cp1252.txt"), "text") == ["café ok", "second"]
    assert read_texts(str(odd_files / "cp1252.csv"), "text") == ["café"]
    unquoted = odd_files / "unquoted.csv"  # before: "great goal" and "" were classified, the rest dropped
    unquoted.write_text("text\nfootball match today, great goal\ngarlic soup, hot\n")
    with pytest.raises(GptflowError) as caught:
        read_texts(str(unquoted), "text")
    assert str(caught.value) == (
        f"--file: {unquoted}: its rows hold more fields than its header names (text); quote fields that contain "
        "the delimiter (comma)"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["classify", "--model", "m.pt", "--file", "{d}/undecodable.txt"],
            "--file: {d}/undecodable.txt: unreadable encoding: not UTF-8 (invalid byte 0x81 at offset 1) nor "
            "cp1252/latin-1 text (byte 0x81 at offset 1); save the file as UTF-8",
        ),
        (
            ["classify", "--model", "m.pt", "--file", "{d}/undecodable.csv"],
            "--file: {d}/undecodable.csv: unreadable encoding: not UTF-8 (invalid byte 0x81 at offset 6)",
        ),
        (["classify", "--model", "m.pt", "--file", "{d}/binary.txt"], "--file: {d}/binary.txt: looks binary (NUL"),
        (
            ["classify", "--model", "m.pt", "--file", "{d}/folder"],
            "--file: {d}/folder: is a folder, not a file (expected a text file, one message a line)",
        ),
        (
            ["classify", "--model", "m.pt", "--file", "{d}/empty.csv"],
            "--file: {d}/empty.csv is not a readable CSV (No columns to parse from file)",
        ),
        (
            ["classify", "--model", "m.pt", "--file", "{d}/ragged.csv"],
            "--file: {d}/ragged.csv is not a readable CSV (Error tokenizing data. C error: Expected 2 fields in line "
            "3, saw 4)",
        ),
        (["classify", "hi", "--model", "{d}/folder"], "checkpoint {d}/folder/best.pt does not exist"),
        (["export", "{d}/folder"], "checkpoint {d}/folder/best.pt does not exist"),
        (["generate", "hi", "--model", "{d}/folder"], "{d}/folder is neither a GPT-2 preset"),
        (["generate", "hi", "--model", "{d}/a-file"], "{d}/a-file is not a PyTorch checkpoint"),
        (["evaluate", "{d}/folder"], "{d}/folder: is a folder, not a file (expected a JSON list of entries)"),
        (
            ["evaluate", "{d}/responses.json", "--response-key", "a", "--response-key", "a"],
            "response key 'a' given twice: name each field to score once",
        ),
        (
            ["evaluate", "{d}/responses.json", "--model", "llama 3"],
            "--model: Value error, 'llama 3' is not an Ollama model name",
        ),
        (
            ["evaluate", "{d}/responses.json", "--host", "http://host:port"],
            "--host: Value error, 'http://host:port' is not a URL (Port could not be cast to integer value as 'port')",
        ),
        (
            ["evaluate", "{d}/responses.json", "--out-dir", "{d}/a-file"],
            "--out-dir: {d}/a-file is not a folder; expected a writable folder for the outputs",
        ),
        (
            ["inspect", "model.pt", "hi", "--out", "{d}/a-file/inspect"],
            "--out: {d}/a-file/inspect is not a folder ({d}/a-file is a file); expected a writable folder",
        ),
        (
            ["pretrain", "--config", "{d}/binary.yaml"],
            "--config: {d}/binary.yaml is not UTF-8 text (byte 0xff at offset 0); expected a YAML or JSON file",
        ),
        (["pretrain", "--config", "{d}/folder"], "--config: cannot read {d}/folder: Is a directory"),
        (["pipeline", "--config", "{d}/binary.yaml"], "pipeline config: {d}/binary.yaml is not UTF-8 text"),
        (["pipeline", "--config", "{d}/list.yaml"], "pipeline config: {d}/list.yaml holds a list, not a mapping"),
    ],
)
def test_odd_input_is_one_line_naming_it(argv, message, odd_files, settings, capsys):
    verb = argv[0]
    assert main([a.format(d=odd_files) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gptflow {verb}: error: {message.format(d=odd_files)}"), err
    assert err.count("\n") == 1


def test_a_bad_flag_value_is_argparse_one_line(settings, capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "hi", "--model", "m.pt", "--threads", "0"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "gptflow generate: error: argument --threads: expected a positive integer, got '0' "
        "(see gptflow generate --help)\n"
    )


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--max-new-tokens", "-1", "an integer >= 1"),
        ("--top-k", "0", "an integer >= 1"),
        ("--top-p", "1.5", "a number > 0.0 and <= 1.0"),
        ("--top-p", "0", "a number > 0.0 and <= 1.0"),
        ("--temperature", "-0.5", "a number >= 0.0"),
        ("--top-k", "many", "an integer >= 1"),
        ("--temperature", "nan", "a finite number"),  # before: a traceback, or "Probabilities contain NaN"
        ("--temperature", "inf", "a finite number"),  # before: accepted
        ("--top-p", "nan", "a finite number"),
    ],
)
def test_generation_options_out_of_range_are_one_line(flag, value, expected, settings, capsys):
    """The same options of `gptflow generate` and `python -m edge generate` (edge/options.py)."""
    with pytest.raises(SystemExit) as info:
        main(["generate", "hi", "--model", "m.pt", flag, value])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        f"gptflow generate: error: argument {flag}: expected {expected}, got '{value}' (see gptflow generate --help)\n"
    )
    from edge.__main__ import main as edge_main

    with pytest.raises(SystemExit):
        edge_main(["generate", "bundle", "hi", flag, value])
    assert f"argument {flag}: expected {expected}, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "sig, code, how", [(signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted")]
)
def test_sigterm_exits_143_and_ctrl_c_130(sig, code, how, settings, monkeypatch, capsys):
    """Before: SIGTERM exited 130, SIGINT's code. The signal arrives while the command checks its inputs."""
    from cli import prechecks

    monkeypatch.setattr(prechecks, "classifier", lambda spec: signal.raise_signal(sig))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever ran before
    try:
        assert main(["classify", "--model", "m.pt", "some text"]) == code
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err == f"gptflow classify: {how}; finished stages and checkpoints are kept\n"


@pytest.mark.parametrize("verb", ["classify", "generate"])
def test_edge_threads_are_checked_as_gptflow_checks_them(verb, capsys):
    """Before: `python -m edge generate --threads -1` was passed on to onnxruntime."""
    from edge.__main__ import main as edge_main

    with pytest.raises(SystemExit):
        edge_main([verb, "bundle", "hi", "--threads", "-1"])
    assert "argument --threads: expected a positive integer, got '-1'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["a real text", ""], "TEXT 2 is empty"),  # before: classified as one end-of-text token
        (["  "], "TEXT 1 is empty"),
    ],
)
def test_an_empty_text_to_classify_is_refused(argv, message, settings, capsys):
    assert main(["classify", "--model", "m.pt", *argv]) == 2
    err = capsys.readouterr().err
    assert (
        err == f'gptflow classify: error: {message}; give the text to classify, e.g. "Call now to claim your prize"\n'
    )


@pytest.mark.parametrize(
    "config, message",
    [
        ("pretrain:\n  lr: 0.001\n  steps: 5\n  lr: 0.002\n", "{path}: line 4: 'lr' is given twice; keep one"),
        ("seed: true\n", "{path}: seed: Value error, expected a number, got true"),  # before: seed 1
        ("lr: .nan\n", "{path}: lr: Input should be a finite number"),
        ("grad_clip: .inf\n", "{path}: grad_clip: Input should be a finite number"),
    ],
)
def test_a_config_file_says_what_it_means_or_is_refused(config, message, settings, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(config)
    assert main(["pretrain", "--corpus", "tinyshakespeare", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(path=path) in err, err
