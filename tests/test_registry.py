"""The model registry: versions, the champion link, rollback, and promotions that a SIGKILL cannot half-do."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from gptflow.registry import Registry, RegistryError, bundle_sha256, tasks
from gptflow.settings import load_settings


def make_bundle(folder: Path, payload: str) -> Path:
    """A bundle as `gptflow export` lays it out: files and a manifest of their sha256."""
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_text(payload)
    (folder / "labels.json").write_text('{"ham": 0, "spam": 1}')
    (folder / "stray.tmp").write_text("not part of the bundle")
    files = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in ("model.onnx", "labels.json")}
    (folder / "manifest.json").write_text(json.dumps({"format": "gptflow-edge-bundle/1", "files": files}))
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
        "labels.json",
        "manifest.json",
        "model.onnx",
        "record.json",
    ]  # the manifest's files only, and the record
    assert (Path(first["path"]) / "model.onnx").stat().st_ino == (a / "model.onnx").stat().st_ino  # hard link
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
    with pytest.raises(RegistryError, match="is not a bundle: no manifest.json"):
        registry.promote(tmp_path, {}, reason="r", run="cli")
    broken = make_bundle(tmp_path / "broken", "w")
    (broken / "model.onnx").unlink()
    with pytest.raises(RegistryError, match="model.onnx is listed in manifest.json but missing"):
        registry.promote(broken, {}, reason="r", run="cli")
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
