"""The model registry: every promoted bundle of a task, and which one is the champion now.

`<home>/registry/<task>/`
    registry.json     the commit point: the champion, the champions' lineage and every event (written atomically)
    versions/vNNNN/   a promoted bundle's files (hard links when the outputs share the file system) + record.json
    champion          a symlink to the champion's version folder: the stable path that edge consumers read

A promotion stages the version folder under a temporary name and renames it into place, commits registry.json,
then swaps the symlink (a new link renamed over the old one). A crash before the commit leaves the old champion
in both places; a crash after it leaves the symlink one step behind, and the next registry call (any of them)
points it at the champion registry.json names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

from gptflow.errors import GptflowError
from gptflow.settings import Settings, get_settings
from gptflow.storage import read_json, sha256_file, write_json_atomic

FORMAT = "gptflow-registry/1"
BUNDLE_MANIFEST = "manifest.json"
RECORD = "record.json"
_TASK = re.compile(r"[a-z0-9][a-z0-9._-]*")
_VERSION = re.compile(r"v\d{4,}")


class RegistryError(GptflowError, ValueError):
    """A registry task, version or bundle that does not exist or is not what was expected."""


def registry_root(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).home / "registry"


def bundle_sha256(bundle: Path) -> str:
    """A bundle's identity: the sha256 of its manifest, which holds the sha256 of every other file."""
    manifest = bundle / BUNDLE_MANIFEST
    if not manifest.is_file():
        raise RegistryError(f"{bundle} is not a bundle: no {BUNDLE_MANIFEST} (make one with `gptflow export`)")
    return sha256_file(manifest)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Registry:
    """One task's registry (`classifier-spam`, `lm-instructions`, ...)."""

    def __init__(self, task: str, settings: Settings | None = None) -> None:
        if not _TASK.fullmatch(task):
            raise RegistryError(f"registry task {task!r}: expected lower-case letters, digits and . _ - ")
        self.task = task
        self.folder = registry_root(settings) / task
        self.versions = self.folder / "versions"
        self.link = self.folder / "champion"

    # ------------------------------------------------------------------------------------------- reading

    @property
    def exists(self) -> bool:
        return (self.folder / "registry.json").is_file()

    def state(self) -> dict[str, Any]:
        path = self.folder / "registry.json"
        if not path.is_file():
            return {"format": FORMAT, "task": self.task, "champion": None, "lineage": [], "events": []}
        state = read_json(path)
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("task") != self.task:
            raise RegistryError(f"{path}: not a {FORMAT} registry of task {self.task!r}")
        return state

    def champion(self) -> dict[str, Any] | None:
        """The champion's record (with its `version` and `path`), or None before the first promotion."""
        with self._lock():
            state = self.state()
            self._sync_link(state)
        return self.record(state["champion"]) if state["champion"] else None

    def record(self, version: str) -> dict[str, Any]:
        folder = self.versions / version
        if not _VERSION.fullmatch(version) or not (folder / RECORD).is_file():
            known = ", ".join(self.version_ids()) or "none"
            raise RegistryError(f"registry {self.task}: no version {version!r} (versions: {known})")
        return {**read_json(folder / RECORD), "version": version, "path": str(folder)}

    def version_ids(self) -> list[str]:
        if not self.versions.is_dir():
            return []
        return sorted(p.name for p in self.versions.iterdir() if _VERSION.fullmatch(p.name) and (p / RECORD).is_file())

    def records(self) -> list[dict[str, Any]]:
        return [self.record(v) for v in self.version_ids()]

    def find(self, sha256: str) -> str | None:
        """The version holding the bundle with this sha256, if any."""
        for version in self.version_ids():
            if read_json(self.versions / version / RECORD).get("bundle_sha256") == sha256:
                return version
        return None

    # ------------------------------------------------------------------------------------------- writing

    def promote(
        self,
        bundle: str | Path,
        record: dict[str, Any],
        *,
        reason: str,
        run: str,
        action: str = "promote",
        on_step: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Make `bundle` the champion; `record` (metrics, data version, ...) is kept with it. A bundle promoted
        before becomes champion again without a copy. `on_step` hears each step (copied, staged, committed,
        linked). Returns the champion's record."""
        bundle = Path(bundle)
        digest = bundle_sha256(bundle)
        step = on_step or (lambda name: None)
        with self._lock():
            state = self.state()
            version = self.find(digest) or self._stage(bundle, digest, record, run, step)
            step("staged")
            self._commit(state, version, action, run, reason)
            step("committed")
            self._sync_link(state)
            step("linked")
        return self.record(version)

    def activate(self, version: str, *, reason: str, run: str, action: str) -> dict[str, Any]:
        """Make an already registered version the champion (a manual promotion or a rollback)."""
        self.record(version)
        with self._lock():
            state = self.state()
            self._commit(state, version, action, run, reason)
            self._sync_link(state)
        return self.record(version)

    def rollback(self, *, to: str | None = None, reason: str, run: str) -> dict[str, Any]:
        """Back to the champion before the current one (or to version `to`)."""
        state = self.state()
        if to is None:
            lineage = state["lineage"]
            if len(lineage) < 2:
                raise RegistryError(f"registry {self.task}: no earlier champion to roll back to")
            to = lineage[-2]
        return self.activate(to, reason=reason, run=run, action="rollback")

    def add_score(self, version: str, key: str, scores: dict[str, Any]) -> None:
        """Keep a version's scores on one data version (`key`), so it is scored on each data version once."""
        path = self.versions / version / RECORD
        with self._lock():
            record = read_json(path)
            record.setdefault("scores", {})[key] = scores
            write_json_atomic(path, record)

    # ------------------------------------------------------------------------------------------- internals

    def _lock(self) -> FileLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.folder / "registry.lock"))

    def _stage(self, bundle: Path, digest: str, record: dict[str, Any], run: str, step: Callable[[str], None]) -> str:
        """Copy the bundle into the next version folder: a temporary name first, renamed when complete."""
        self.versions.mkdir(parents=True, exist_ok=True)
        for leftover in self.versions.glob(".v*.tmp"):  # a promotion killed while staging
            shutil.rmtree(leftover, ignore_errors=True)
        taken = [int(p.name[1:]) for p in self.versions.iterdir() if _VERSION.fullmatch(p.name)]
        version = f"v{max(taken, default=0) + 1:04d}"
        tmp = self.versions / f".{version}.tmp"
        tmp.mkdir()
        for source in _bundle_files(bundle):
            _link_or_copy(source, tmp / source.name)
        if bundle_sha256(tmp) != digest:
            raise RegistryError(f"{bundle} changed while it was being registered; promote it again")
        full = {**record, "bundle_sha256": digest, "source": str(bundle), "run": run, "registered": now()}
        (tmp / RECORD).write_text(json.dumps(full, indent=2, default=str), encoding="utf-8")
        step("copied")
        os.replace(tmp, self.versions / version)
        return version

    def _commit(self, state: dict[str, Any], version: str, action: str, run: str, reason: str) -> None:
        before = state["champion"]
        lineage = state["lineage"]
        if action == "rollback" and version in lineage:
            del lineage[lineage.index(version) + 1 :]
        elif not lineage or lineage[-1] != version:
            lineage.append(version)
        state["events"].append(
            {"action": action, "version": version, "before": before, "run": run, "time": now(), "reason": reason}
        )
        state["champion"] = version
        write_json_atomic(self.folder / "registry.json", state)

    def _sync_link(self, state: dict[str, Any]) -> None:
        """Point `champion` at the version registry.json names (a no-op when it already does)."""
        if state["champion"] is None:
            return
        target = Path("versions") / state["champion"]
        if self.link.is_symlink() and Path(os.readlink(self.link)) == target:
            return
        tmp = self.folder / ".champion.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, self.link)


def _bundle_files(bundle: Path) -> Iterator[Path]:
    """The manifest and every file it lists (anything else in the folder is not part of the bundle)."""
    manifest = json.loads((bundle / BUNDLE_MANIFEST).read_text(encoding="utf-8"))
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise RegistryError(f"{bundle / BUNDLE_MANIFEST}: 'files' must map each file name to its sha256")
    yield bundle / BUNDLE_MANIFEST
    for name in files:
        path = bundle / name
        if Path(name).name != name or not path.is_file():
            raise RegistryError(f"{bundle}: {name} is listed in {BUNDLE_MANIFEST} but missing")
        yield path


def _link_or_copy(source: Path, dest: Path) -> None:
    """A hard link (no copy of a bundle's hundreds of MB) when source and registry share a file system."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def tasks(settings: Settings | None = None) -> list[str]:
    root = registry_root(settings)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "registry.json").is_file())
