"""The model registry: versions, the champion link, rollback, promotions that a SIGKILL cannot half-do, verified
bundles, read-only versions, and damaged registry files repaired."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from cli import main
from edge.runtime import verify_bundle
from gptflow.registry import Registry, RegistryError, bundle_sha256, tasks
from gptflow.settings import load_settings


def make_bundle(folder: Path, payload: str, kind: str = "classifier") -> Path:
    """A bundle as `gptflow export` lays it out: files and a manifest of their sha256 and the bundle's kind."""
    folder.mkdir(parents=True)
    texts = {"model.onnx": payload, "encoder.json": "{}", "vocab.bpe": "#version: 0.2", "card.md": f"# {kind}"}
    extra = {}
    if kind == "classifier":
        texts["labels.json"] = '{"ham": 0, "spam": 1}'
        extra = {"labels": {"ham": 0, "spam": 1}, "max_length": 8}
    for name, text in {**texts, "stray.tmp": "not part of the bundle"}.items():
        (folder / name).write_text(text)
    files = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in texts}
    manifest = {"format": "gptflow-edge-bundle/1", "kind": kind, "files": files, **extra}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def intact(path: Path) -> bool:
    """Every file the bundle's manifest lists is there with its sha256."""
    files = json.loads((path / "manifest.json").read_text())["files"]
    return all(hashlib.sha256((path / n).read_bytes()).hexdigest() == d for n, d in files.items())


@pytest.fixture
def registry_settings(tmp_path):
    return load_settings(home=tmp_path / "home", mirror="")


def test_promote_list_rollback_and_the_champion_link(tmp_path, registry_settings):
    registry = Registry("classifier-spam", registry_settings)
    assert registry.champion() is None and registry.version_ids() == []
    a, b = make_bundle(tmp_path / "a", "weights A"), make_bundle(tmp_path / "b", "weights B")

    first = registry.promote(a, {"scores": {"d1": {"accuracy": 0.9}}}, reason="no champion yet", run="run-1")
    assert first["version"] == "v0001" and first["bundle_sha256"] == bundle_sha256(a) and first["run"] == "run-1"
    assert sorted(p.name for p in Path(first["path"]).iterdir()) == [
        "card.md",
        "encoder.json",
        "labels.json",
        "manifest.json",
        "model.onnx",
        "record.json",
        "vocab.bpe",
    ]  # the manifest's files only, and the record
    assert first["kind"] == "classifier" and registry.state()["kind"] == "classifier"
    second = registry.promote(b, {}, reason="better", run="run-2")
    assert second["version"] == "v0002"
    link = registry_settings.home / "registry" / "classifier-spam" / "champion"
    assert os.readlink(link) == "versions/v0002" and (link / "model.onnx").read_text() == "weights B"

    again = registry.promote(a, {}, reason="a again", run="run-3")  # a bundle seen before: no new version
    assert again["version"] == "v0001" and registry.version_ids() == ["v0001", "v0002"]
    assert registry.state()["lineage"] == ["v0001", "v0002", "v0001"]

    back = registry.rollback(reason="bad release", run="cli")
    assert back["version"] == "v0002" and os.readlink(link) == "versions/v0002"
    state = registry.state()
    assert state["lineage"] == ["v0001", "v0002"]
    assert [(e["action"], e["version"], e["before"]) for e in state["events"]] == [
        ("promote", "v0001", None),
        ("promote", "v0002", "v0001"),
        ("promote", "v0001", "v0002"),
        ("rollback", "v0002", "v0001"),
    ]
    assert registry.rollback(to="v0001", reason="pin", run="cli")["version"] == "v0001"
    assert tasks(registry_settings) == ["classifier-spam"]

    registry.add_score("v0001", "d2", {"accuracy": 0.8})
    assert registry.record("v0001")["scores"] == {"d1": {"accuracy": 0.9}, "d2": {"accuracy": 0.8}}


def test_registry_errors_name_what_was_expected(tmp_path, registry_settings):
    with pytest.raises(RegistryError, match="registry task 'Spam Model'"):
        Registry("Spam Model", registry_settings)
    registry = Registry("lm-x", registry_settings)
    with pytest.raises(RegistryError, match=r"no version 'v0009' \(versions: none\)"):
        registry.record("v0009")
    with pytest.raises(RegistryError, match="no earlier champion to roll back to"):
        registry.rollback(reason="r", run="cli")
    with pytest.raises(RegistryError, match="is not an edge bundle: no manifest.json"):
        registry.promote(tmp_path, {}, reason="r", run="cli")
    broken = make_bundle(tmp_path / "broken", "w", kind="lm")
    (broken / "model.onnx").unlink()
    with pytest.raises(RegistryError, match="model.onnx is missing; refusing the bundle"):
        registry.promote(broken, {}, reason="r", run="cli")
    assert not registry.folder.exists()  # refused before anything is written
    registry.folder.mkdir(parents=True)
    (registry.folder / "registry.json").write_text('{"format": "other"}')
    with pytest.raises(RegistryError, match="not a gptflow-registry/1 registry of task 'lm-x'"):
        registry.champion()


PROMOTE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from gptflow.registry import Registry
    from gptflow.settings import load_settings

    home, bundle, stop_at, marker = sys.argv[1:5]

    def step(name):
        if name == stop_at:
            Path(marker).write_text(name)
            time.sleep(600)

    Registry("classifier-spam", load_settings(home=home, mirror="")).promote(
        bundle, {}, reason="challenger", run="killed", on_step=step
    )
    """
)


@pytest.mark.parametrize("stop_at", ["copied", "staged", "committed"])
def test_a_promotion_killed_at_any_step_leaves_a_whole_champion(tmp_path, registry_settings, stop_at):
    registry = Registry("classifier-spam", registry_settings)
    old = registry.promote(make_bundle(tmp_path / "old", "old weights"), {}, reason="first", run="run-1")
    new = make_bundle(tmp_path / "new", "new weights")
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", PROMOTE, str(registry_settings.home), str(new), stop_at, str(marker)],
        cwd=REPO_ROOT,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the promotion ended before the step it was to be killed at"
            assert time.monotonic() < deadline, "the promotion never reached its step"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    link = registry.link
    # Whatever the step, the champion link points at a whole bundle, and it is the old one until the next call.
    assert os.readlink(link) == "versions/v0001" and intact(link)
    assert (link / "model.onnx").read_text() == "old weights" and intact(Path(old["path"]))
    champion = registry.champion()  # any registry call repairs the link once registry.json has committed
    expected = "v0002" if stop_at == "committed" else "v0001"
    assert champion["version"] == expected and os.readlink(link) == f"versions/{expected}" and intact(link)

    again = registry.promote(new, {}, reason="retry", run="run-3")  # the next promotion completes cleanly
    assert again["version"] == "v0002" and registry.version_ids() == ["v0001", "v0002"]
    assert (link / "model.onnx").read_text() == "new weights" and intact(link)
    assert not list(registry.versions.glob(".*"))  # no staging leftovers


def registry_cli(capsys, *args: str) -> tuple[int, str, list[str]]:
    """`gptflow registry ARGS`: exit code, stdout, and stderr's lines."""
    code = main(["registry", *args])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def test_promote_verifies_the_bundle_and_its_kind_before_anything_is_written(tmp_path, settings, capsys):
    registry = Registry("classifier-spam", settings)
    registry.promote(make_bundle(tmp_path / "a", "weights A"), {}, reason="first", run="run-1")
    index = (registry.folder / "registry.json").read_bytes()
    altered = make_bundle(tmp_path / "altered", "weights B")
    with open(altered / "model.onnx", "a") as handle:  # altered after export
        handle.write("x")
    lm = make_bundle(tmp_path / "lm", "lm weights", kind="lm")
    for bundle, why in [
        (altered, f"{altered / 'model.onnx'} does not match its sha256 in manifest.json (altered after export)"),
        (lm, f"{lm} is a language-model bundle, not classifier"),
    ]:
        code, _, err = registry_cli(capsys, "promote", "classifier-spam", str(bundle))
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(
            f"gptflow registry: error: cannot promote {bundle} into registry classifier-spam (it holds classifier "
            f"bundles): {why}"
        )
    assert registry.version_ids() == ["v0001"] and (registry.folder / "registry.json").read_bytes() == index
    # a new task whose name says its kind takes no other kind, and nothing of it is written
    code, _, err = registry_cli(capsys, "promote", "classifier-new", str(lm))
    assert code == 2 and "is a language-model bundle, not classifier" in err[-1]
    assert not Registry("classifier-new", settings).folder.exists()


def test_a_registered_version_is_a_read_only_copy(tmp_path, registry_settings):
    registry = Registry("classifier-spam", registry_settings)
    a = make_bundle(tmp_path / "a", "weights A")
    version = Path(registry.promote(a, {}, reason="first", run="run-1")["path"])
    with open(a / "card.md", "a") as handle:  # `echo x >> card.md` in the export folder
        handle.write("x\n")
    assert intact(version) and verify_bundle(registry.link, "classifier")
    for name in json.loads((version / "manifest.json").read_text())["files"]:
        assert (version / name).stat().st_mode & 0o777 == 0o444, name
        assert (version / name).stat().st_ino != (a / name).stat().st_ino, name
    assert registry.rollback(to="v0001", reason="still whole", run="cli")["version"] == "v0001"


@pytest.mark.parametrize(
    ("damaged", "commands"),
    [
        ("registry.json", [["list"], ["list", "TASK"], ["promote", "TASK", "v0001"], ["rollback", "TASK"]]),
        ("versions/v0002/record.json", [["list"], ["list", "TASK"], ["show", "TASK"], ["promote", "TASK", "NEW"]]),
    ],
)
def test_a_damaged_registry_file_is_one_line_and_repair_rebuilds_it(tmp_path, settings, capsys, damaged, commands):
    registry = Registry("classifier-spam", settings)
    registry.promote(make_bundle(tmp_path / "a", "weights A"), {}, reason="first", run="run-1")
    b = make_bundle(tmp_path / "b", "weights B")
    registry.promote(b, {"scores": {"d1": {"accuracy": 0.9}}}, reason="better", run="run-2")
    path = registry.folder / damaged
    text = path.read_bytes()
    broken = text[: len(text) // 2] if damaged == "registry.json" else b"\xff" + text  # truncated; not UTF-8
    path.write_bytes(broken)
    what = "not UTF-8 text (byte 0xff at offset 0)" if broken[0] == 0xFF else "not valid JSON, truncated or edited"
    new = make_bundle(tmp_path / "new", "weights C")
    for command in commands:
        args = [{"TASK": "classifier-spam", "NEW": str(new)}.get(a, a) for a in command]
        code, _, err = registry_cli(capsys, *args)
        assert code == 2 and len(err) == 1, (command, err)
        assert err[0].startswith(f"gptflow registry: error: {path} is damaged: {what}"), (command, err)
        assert "`gptflow registry repair classifier-spam` rebuilds it" in err[0]

    code, out, _ = registry_cli(capsys, "repair", "classifier-spam")
    assert code == 0 and "rebuilt" in out
    assert path.with_name(f"{path.name}.damaged").read_bytes() == broken  # nothing is lost
    assert registry.champion()["version"] == "v0002" and registry.state()["lineage"] == ["v0001", "v0002"]
    assert registry.record("v0002")["bundle_sha256"] == bundle_sha256(b)
    assert registry_cli(capsys, "repair", "classifier-spam")[1] == "classifier-spam: nothing to repair\n"
    assert registry_cli(capsys, "list", "classifier-spam")[0] == 0
    assert registry_cli(capsys, "rollback", "classifier-spam")[0] == 0 and registry.champion()["version"] == "v0001"


def test_a_first_promote_by_hand_creates_the_task_with_the_bundles_kind(tmp_path, settings, capsys):
    code, out, err = registry_cli(capsys, "promote", "my-lm", str(make_bundle(tmp_path / "lm", "w", kind="lm")))
    assert code == 0, err
    assert "my-lm: new registry task of lm bundles" in out and "my-lm: promoted v0001" in out
    registry = Registry("my-lm", settings)
    assert registry.state()["kind"] == "lm" and registry.champion()["version"] == "v0001"
    code, _, err = registry_cli(capsys, "promote", "my-lm", str(make_bundle(tmp_path / "c", "w")))
    assert code == 2 and "(it holds lm bundles)" in err[-1] and "is a classifier bundle, not lm" in err[-1]
    code, _, err = registry_cli(capsys, "rollback", "classifier-spam")  # a version, not a bundle: no new task
    assert code == 2 and err[-1].startswith(
        "gptflow registry: error: no registry task 'classifier-spam' (tasks: my-lm); "
        "`gptflow registry promote classifier-spam BUNDLE` creates it"
    )


def test_a_tampered_copy_of_a_registered_bundle_is_refused_and_named(tmp_path, registry_settings):
    registry = Registry("classifier-spam", registry_settings)
    a = make_bundle(tmp_path / "a", "weights A")
    registry.promote(a, {}, reason="first", run="run-1")
    registry.promote(make_bundle(tmp_path / "b", "weights B"), {}, reason="better", run="run-2")
    tampered = Path(shutil.copytree(a, tmp_path / "tampered"))
    (tampered / "model.onnx").write_text("weights A, edited")  # the manifest still matches v0001's
    events = len(registry.state()["events"])
    with pytest.raises(
        RegistryError, match=r"model.onnx does not match .*; its manifest is that of v0001, which is not"
    ):
        registry.promote(tampered, {}, reason="r", run="cli")
    assert registry.champion()["version"] == "v0002" and len(registry.state()["events"]) == events
    edited = registry.versions / "v0001" / "model.onnx"  # a version damaged by hand never becomes the champion
    edited.chmod(0o644)
    edited.write_text("edited in place")
    with pytest.raises(RegistryError, match="version v0001 cannot be the champion: .*model.onnx does not match"):
        registry.rollback(reason="r", run="cli")
    assert registry.champion()["version"] == "v0002"
