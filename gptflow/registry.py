"""The model registry: every promoted bundle of a task, and which one is the champion now.

`<home>/registry/<task>/`
    registry.json     the commit point: the task's bundle kind, the champion, the champions' lineage and every event
                      (written atomically)
    versions/vNNNN/   a read-only copy of a promoted bundle (nothing shared with the export folder, so a later
                      edit there cannot change a registered version) + record.json
    champion          a symlink to the champion's version folder: the stable path that edge consumers read

A bundle is verified (every file against its manifest, its kind against the task's) before anything is written,
and a version is verified again before it becomes the champion, so the edge runtime never refuses a champion.

A promotion stages the version folder under a temporary name and renames it into place, commits registry.json,
then swaps the symlink (a new link renamed over the old one). A crash before the commit leaves the old champion
in both places; a crash after it leaves the symlink one step behind, and the next registry call (any of them)
points it at the champion registry.json names. A damaged registry.json or record.json (truncated, not UTF-8) is
rebuilt by `repair` from what is intact: the versions' bundles and records, and the champion link.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from edge import BundleError
from edge.runtime import REQUIRED, bundle_kind, verify_bundle
from gptflow.errors import GptflowError
from gptflow.settings import Settings, get_settings
from gptflow.storage import atomic_dir, sha256_file, write_json_atomic

FORMAT = "gptflow-registry/1"
BUNDLE_MANIFEST = "manifest.json"
RECORD = "record.json"
_TASK = re.compile(r"[a-z0-9][a-z0-9._-]*")
_VERSION = re.compile(r"v\d{4,}")


class RegistryError(GptflowError, ValueError):
    """A registry task, version or bundle that does not exist or is not what was expected."""


class DamagedFileError(RegistryError):
    """A registry.json or record.json that cannot be read (truncated, not UTF-8, not what it should hold)."""

    def __init__(self, path: Path, task: str, what: str) -> None:
        self.what = what
        super().__init__(
            f"{path} is damaged: {what}; `gptflow registry repair {task}` rebuilds it from the versions' bundles "
            f"and records (and keeps the damaged file as {path.name}.damaged)"
        )


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
            return {"format": FORMAT, "task": self.task, "kind": None, "champion": None, "lineage": [], "events": []}
        state = self._read(path)
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("task") != self.task:
            raise DamagedFileError(path, self.task, f"not a {FORMAT} registry of task {self.task!r}")
        champion = state.get("champion", 0)  # a missing champion is damage; None is a task with no champion yet
        if not (champion is None or isinstance(champion, str)) or not all(
            isinstance(state.get(key), list) for key in ("lineage", "events")
        ):
            raise DamagedFileError(path, self.task, "its champion, lineage or events are missing or malformed")
        return state

    def kind(self, state: dict[str, Any] | None = None) -> str | None:
        """The kind of bundle the task holds (`classifier`, `lm`): registry.json keeps it from the first promotion
        on; before (or in a registry written before kinds were kept), a name that starts with a kind says it
        (`classifier-spam`, as the pipeline names its tasks); else None, and the first bundle decides."""
        state = self.state() if state is None else state
        prefix = self.task.split("-")[0]
        return state.get("kind") or (prefix if prefix in REQUIRED else None)

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
        return {**self._record(folder / RECORD), "version": version, "path": str(folder)}

    def version_ids(self) -> list[str]:
        if not self.versions.is_dir():
            return []
        return sorted(p.name for p in self.versions.iterdir() if _VERSION.fullmatch(p.name) and (p / RECORD).is_file())

    def records(self) -> list[dict[str, Any]]:
        return [self.record(v) for v in self.version_ids()]

    def find(self, sha256: str) -> str | None:
        """The version holding the bundle with this sha256, if any."""
        for version in self.version_ids():
            if self._record(self.versions / version / RECORD)["bundle_sha256"] == sha256:
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
        """Make `bundle` the champion; `record` (metrics, data version, ...) is kept with it. The bundle is verified
        before anything is written (a new task takes its kind). A bundle promoted before becomes champion again
        without a copy, once its registered copy is verified. `on_step` hears each step (copied, staged,
        committed, linked). Returns the champion's record."""
        bundle = Path(bundle)
        manifest, digest = self._verified(bundle)
        kind = bundle_kind(manifest)
        step = on_step or (lambda name: None)
        with self._lock():
            state = self.state()
            version = self.find(digest)
            if version is None:
                version = self._stage(bundle, manifest, digest, {**record, "kind": kind}, run, step)
            else:
                self._verify_version(version, kind)
            step("staged")
            state["kind"] = kind
            self._commit(state, version, action, run, reason)
            step("committed")
            self._sync_link(state)
            step("linked")
        return self.record(version)

    def activate(self, version: str, *, reason: str, run: str, action: str) -> dict[str, Any]:
        """Make an already registered version the champion (a manual promotion or a rollback), once verified."""
        self.record(version)
        with self._lock():
            state = self.state()
            state["kind"] = self.kind(state)
            self._verify_version(version, state["kind"])
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
            record = self._record(path)
            record.setdefault("scores", {})[key] = scores
            write_json_atomic(path, record)

    def repair(self, run: str) -> list[str]:
        """Rebuild a damaged or missing record.json from its version's verified bundle (its scores are measured
        again when next needed), then a damaged or missing registry.json from the versions and the champion link
        (the events before are lost). A damaged file is kept as NAME.damaged. Returns what was done, a line each."""
        done = []
        with self._lock():
            folders = self.versions.glob("v*") if self.versions.is_dir() else []
            for folder in sorted(f for f in folders if _VERSION.fullmatch(f.name)):
                why = self._damage(folder / RECORD, self._record)
                if why is None:
                    continue
                try:
                    kind = bundle_kind(verify_bundle(folder))
                except BundleError as exc:
                    done.append(f"{folder.name}: record.json {why}, not rebuilt: its bundle is damaged too ({exc})")
                    continue
                record = {"kind": kind, "bundle_sha256": sha256_file(folder / BUNDLE_MANIFEST), "run": run}
                self._replace(folder / RECORD, {**record, "registered": now(), "repaired": f"record.json {why}"})
                done.append(
                    f"{folder.name}: record.json {why}; rebuilt from its bundle (its scores are measured again)"
                )
            why = self._damage(self.folder / "registry.json", lambda path: self.state())
            if why is not None:
                state = self._rebuilt_state(run, f"registry.json {why}")
                done.append(f"registry.json {why}; rebuilt: champion {state['champion']}, lineage {state['lineage']}")
                self._sync_link(state)
        return done

    # ------------------------------------------------------------------------------------------- internals

    def _lock(self) -> FileLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.folder / "registry.lock"))

    def _read(self, path: Path) -> Any:
        """A registry file's JSON; a truncated or non-UTF-8 one is one error naming it and the way back."""
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            what = f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        except json.JSONDecodeError as exc:
            what = f"not valid JSON, truncated or edited ({exc.msg} at line {exc.lineno} column {exc.colno})"
        raise DamagedFileError(path, self.task, what)

    def _record(self, path: Path) -> dict[str, Any]:
        record = self._read(path)
        if not isinstance(record, dict) or not isinstance(record.get("bundle_sha256"), str):
            raise DamagedFileError(path, self.task, "not a version record (no bundle_sha256)")
        return record

    def _damage(self, path: Path, read: Callable[[Path], Any]) -> str | None:
        """What is wrong with a registry file (`is missing`, `was ...`), or None when `read` reads it."""
        if not path.is_file():
            return "is missing"
        try:
            read(path)
        except DamagedFileError as exc:
            return f"was {exc.what}"
        return None

    def _replace(self, path: Path, content: dict[str, Any]) -> None:
        """Write a rebuilt registry file, keeping a damaged one beside it."""
        if path.is_file():
            os.replace(path, path.with_name(f"{path.name}.damaged"))
        write_json_atomic(path, content)

    def _rebuilt_state(self, run: str, why: str) -> dict[str, Any]:
        """registry.json from what is intact: every version was a champion when it was registered, and the
        champion link names the champion (else the latest version is)."""
        ids = self.version_ids()
        if not ids:
            raise RegistryError(f"registry {self.task}: no version to rebuild registry.json from; promote a bundle")
        linked = Path(os.readlink(self.link)).name if self.link.is_symlink() else None
        champion = linked if linked in ids else ids[-1]
        kind = self._record(self.versions / champion / RECORD).get("kind")  # the bundle's kind since kinds are kept
        state = {
            "format": FORMAT,
            "task": self.task,
            "kind": kind if kind in REQUIRED else self.kind({}),
            "champion": champion,
            "lineage": [v for v in ids if int(v[1:]) <= int(champion[1:])],
            "events": [
                {"action": "repair", "version": champion, "before": None, "run": run, "time": now(), "reason": why}
            ],
        }
        self._replace(self.folder / "registry.json", state)
        return state

    def _verified(self, bundle: Path) -> tuple[dict[str, Any], str]:
        """The bundle's manifest and sha256, once its kind is the task's and every file matches its manifest."""
        kind = self.kind()
        try:
            manifest = verify_bundle(bundle, kind)
        except BundleError as exc:
            holds = f" (it holds {kind} bundles)" if kind else ""
            known = self.find(sha256_file(bundle / BUNDLE_MANIFEST)) if (bundle / BUNDLE_MANIFEST).is_file() else None
            also = (
                f"; its manifest is that of {known}, which is not re-activated: `gptflow registry promote "
                f"{self.task} {known}` makes the registered copy the champion"
                if known
                else ""
            )
            raise RegistryError(f"cannot promote {bundle} into registry {self.task}{holds}: {exc}{also}") from None
        return manifest, sha256_file(bundle / BUNDLE_MANIFEST)

    def _verify_version(self, version: str, kind: str | None) -> None:
        """A version becomes the champion only whole: the edge runtime would refuse it otherwise."""
        try:
            verify_bundle(self.versions / version, kind)
        except BundleError as exc:
            raise RegistryError(
                f"registry {self.task}: version {version} cannot be the champion: {exc}; roll back to another "
                "version, or promote a new export"
            ) from None

    def _stage(
        self,
        bundle: Path,
        manifest: dict[str, Any],
        digest: str,
        record: dict[str, Any],
        run: str,
        step: Callable[[str], None],
    ) -> str:
        """Copy the manifest and every file it lists into the next version folder, read-only and verified again
        (the copy is what the registry keeps): a temporary folder first, renamed when complete."""
        self.versions.mkdir(parents=True, exist_ok=True)
        for leftover in self.versions.glob(".v*.tmp"):  # a promotion killed while staging
            shutil.rmtree(leftover, ignore_errors=True)
        taken = [int(p.name[1:]) for p in self.versions.iterdir() if _VERSION.fullmatch(p.name)]
        version = f"v{max(taken, default=0) + 1:04d}"
        with atomic_dir(self.versions / version) as tmp:
            try:
                for name in [BUNDLE_MANIFEST, *manifest["files"]]:
                    _copy_read_only(bundle / name, tmp / name)
                verify_bundle(tmp, record["kind"])
                same = sha256_file(tmp / BUNDLE_MANIFEST) == digest
            except (BundleError, FileNotFoundError):
                same = False
            if not same:
                raise RegistryError(f"{bundle} changed while it was being registered; promote it again")
            full = {**record, "bundle_sha256": digest, "source": str(bundle), "run": run, "registered": now()}
            (tmp / RECORD).write_text(json.dumps(full, indent=2, default=str), encoding="utf-8")
            step("copied")
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


def _copy_read_only(source: Path, dest: Path) -> None:
    """A copy, not a hard link: a registered version shares nothing with the export folder, and cannot be
    written to by mistake (its folder stays writable, so it can still be removed)."""
    shutil.copy2(source, dest)
    os.chmod(dest, 0o444)


def tasks(settings: Settings | None = None) -> list[str]:
    root = registry_root(settings)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "registry.json").is_file())
