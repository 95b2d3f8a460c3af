"""The one stage contract: every stage (data, pretrain, load-gpt2, classifier, instruct, responses, export,
evaluate) declares what it is made of, and this module alone names its folder, decides whether it is reused,
resumed or rerun, checks a checkpoint against it, and writes its manifest.

A stage's key is its inputs (files by sha256, plus literal values such as `random`), the part of its config that
defines the product, and the sha256 of the source of every project module its stage module imports, directly or
not (read from the source, so no list kept by hand can drift from the code).

Decisions, first match wins (each logged in one line that names what changed):
- reuse:  the manifest holds the same key and every output still has the hash it lists;
- resume: no usable manifest, and the checkpoint in the folder was written under the same key;
- run:    anything else, from scratch. In a folder the user chose, a checkpoint of other inputs or config is
          refused rather than replaced. An output that no longer matches its manifest, or that a stage's reader
          cannot load, is rebuilt, not resumed (a checkpoint cannot recreate a damaged file that was written before
          it), and so is the rest of an interrupted rebuild. A stage never certifies an output its reader cannot
          load.

A folder the user chose (`out_dir`) is written only when it is new, empty (hidden files aside) or a folder of this
same stage (its manifest, its in-progress marker or its checkpoint names the stage): a folder holding files gptflow
did not write is refused, naming them, unless `force`; a folder of another stage is refused always, even with
`resume=False` or `force`, so that no folder ever holds the products of two stages. While a stage writes a chosen
folder, `building.json` (its key) marks it as ours until the manifest replaces it.

Code-change policy: code is part of the key, not of the folder name. After an edit of a module a stage depends
on, a finished stage is rebuilt in its folder and an unfinished checkpoint is not resumed: a checkpoint or model
is never certified as the product of code that did not make it. Edits to modules outside a stage's import closure
leave it reusable.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

from pydantic import BaseModel

from gptflow.closure import import_closure, module_digest
from gptflow.errors import GptflowError
from gptflow.ranks import process_ranks
from gptflow.settings import get_settings
from gptflow.stage_keys import describe_change, is_key, stored_key, without_code
from gptflow.storage import (
    MANIFEST_NAME,
    code_version,
    read_json,
    sha256_file,
    sha256_json,
    stage_lock,
    write_json_atomic,
)

log = logging.getLogger(__name__)

Action = Literal["reuse", "resume", "run"]
REBUILD_NAME = "rebuild.json"  # marks a folder whose damaged outputs are being rebuilt
BUILDING_NAME = "building.json"  # marks a folder the user chose as one a stage is writing (its key), until complete
Reader = Callable[[Path], Any]  # loads an output; a GptflowError means the file is damaged


class StageError(GptflowError, ValueError):
    """A stage input is missing, or a checkpoint belongs to another stage."""


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered for as long as its inode, size and mtime stay the same (a stage is often
    declared twice in one run: by a task naming its artifacts, then by the stage itself)."""
    st = path.stat()
    return _digest_of(str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _digest_of(path: str, inode: int, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def verify_output(path: str | Path) -> None:
    """A file a stage wrote is read only while it still has the sha256 its stage's manifest records (the nearest
    manifest.json with `outputs`, in its folder or the two above); a file no stage certified passes as it is."""
    path = Path(path).resolve()
    for folder in list(path.parents)[:3]:
        manifest_path = folder / MANIFEST_NAME
        try:
            recorded = read_json(manifest_path).get("outputs") if manifest_path.is_file() else None
        except (OSError, ValueError, AttributeError):
            continue  # not a stage manifest we can read: nothing certified here
        digest = recorded.get(path.relative_to(folder).as_posix()) if isinstance(recorded, dict) else None
        if digest is None:
            continue
        if file_digest(path) != digest:
            raise StageError(
                f"{path} no longer matches the sha256 that {manifest_path} records for it (it changed after its stage "
                "wrote it): run the stage again, or restore the file"
            )
        return


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    damaged: tuple[str, ...] = ()  # outputs being rebuilt because they were damaged

    @property
    def reused(self) -> bool:
        return self.action == "reuse"


@dataclass(frozen=True)
class Built:
    """What a stage's build wrote into its folder: `outputs` (names relative to it, hashed into the manifest),
    `metrics` (recorded in it), and `value`, anything else the caller wants back. `certified=False`: the outputs
    are partial (e.g. some judge requests failed), so no manifest is written and the next run builds again."""

    outputs: Sequence[str]
    metrics: Mapping[str, Any]
    value: Any = None
    certified: bool = True


@dataclass(frozen=True)
class StageRun:
    """A stage run: its folder, whether it was reused, its metrics (the manifest's when reused) and what the build
    returned beside them (None when reused)."""

    folder: Path
    reused: bool
    metrics: dict[str, Any]
    value: Any = None


@dataclass
class Stage:
    """A declared stage. Build it with `Stage.declare`; `key` is what reuse and resume compare."""

    name: str
    dir: Path
    inputs: dict[str, str]
    config: dict[str, Any]
    code: dict[str, str]
    chosen: bool = False  # the folder was named by the user
    force: bool = False  # a chosen folder may hold files gptflow did not write (never another stage's folder)
    decision: Decision | None = field(default=None, compare=False)
    readers: dict[str, Reader] = field(default_factory=dict, compare=False)

    @classmethod
    def declare(
        cls,
        name: str,
        *,
        inputs: Mapping[str, Path | str],
        config: BaseModel | Mapping[str, Any],
        code: str | Sequence[str],
        label: str = "",
        out_dir: str | Path | None = None,
        folder: str | Path | None = None,
        force: bool = False,
    ) -> "Stage":
        """`inputs`: label -> file (a Path, hashed) or a literal value (a str). `config`: the fields that define
        the product (a config's `identity()` if it has one). `code`: the stage's module (`__name__`); it and every
        project module it imports are hashed into the key. The folder is `out_dir` (the
        user's choice: a checkpoint of other inputs or config there is refused, not replaced; so is a folder holding
        files gptflow did not write, unless `force`, and a folder of another stage, always), else `folder` (fixed
        by the stage: rebuilt in place when its key changes), else `<home>/<name>/<label>-<8 hex of the inputs and
        config>`."""
        digests = {}
        for key, value in inputs.items():
            if isinstance(value, Path):
                if not value.is_file():
                    raise StageError(f"{name}: input {key} {value} does not exist")
                digests[key] = file_digest(value)
            else:
                digests[key] = str(value)
        if isinstance(config, BaseModel):
            config = config.identity() if hasattr(config, "identity") else config.model_dump(mode="json")
        config = json.loads(json.dumps(dict(config), default=str))
        if out_dir is None and folder is None:
            slug = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or name
            folder = get_settings().stage_dir(name) / f"{slug}-{sha256_json({'inputs': digests, 'config': config})[:8]}"
        return cls(
            name,
            Path(out_dir or folder),
            digests,
            config,
            {m: module_digest(m) for m in import_closure(code)},
            chosen=out_dir is not None,
            force=force,
        )

    @property
    def key(self) -> dict[str, Any]:
        return {"stage": self.name, "inputs": self.inputs, "config": self.config, "code": self.code}

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST_NAME

    def manifest(self) -> dict[str, Any] | None:
        try:
            manifest = read_json(self.manifest_path) if self.manifest_path.is_file() else None
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) else None

    def plan(
        self,
        resume: bool = True,
        checkpoint: Callable[[], dict | None] | None = None,
        readers: Mapping[str, Reader] | None = None,
    ) -> Decision:
        """Decide reuse / resume / run and log why. `checkpoint()` returns the key stored in the stage's
        checkpoint (None when there is none); it is called only when reuse is ruled out. `readers`: outputs that
        must load for the folder to be reused or resumed (output name -> a function that reads the file and raises
        a GptflowError when it cannot), such as weights written before the checkpoint, which it cannot recreate;
        `complete` reads them too. Anything but reuse removes the manifest first, so a folder being rewritten is
        never taken for the finished product; a rebuild of damaged outputs is marked until it completes, so that
        an interrupted one starts over instead of resuming the checkpoint of the run whose output was damaged.
        A folder the user chose is checked first (see the module's docstring): a refusal changes nothing in it.
        The other ranks of a torchrun job decide the same from the same files and change nothing."""
        self.readers = dict(readers or {})
        manifest = self.manifest()
        if self.chosen:
            self._check_chosen_folder(manifest, checkpoint)
        decision = self._decide(resume, manifest, checkpoint)
        if decision.action != "reuse" and process_ranks().is_main:
            if self.chosen:  # before the manifest goes, so that the folder is always marked as this stage's
                write_json_atomic(self.dir / BUILDING_NAME, {"stage": self.key})
            self.manifest_path.unlink(missing_ok=True)
            if decision.damaged:
                write_json_atomic(self.dir / REBUILD_NAME, {"damaged": list(decision.damaged)})
            else:
                (self.dir / REBUILD_NAME).unlink(missing_ok=True)
        log.info(
            "%s %s: %s",
            self.name,
            {"reuse": "reused", "resume": "resumed", "run": "runs"}[decision.action],
            decision.reason,
        )
        self.decision = decision
        return decision

    def _check_chosen_folder(self, manifest: dict | None, checkpoint: Callable[[], dict | None] | None) -> None:
        """Refuse a folder of another stage (always), or one holding files gptflow did not write (unless `force`)."""
        if not self.dir.is_dir():
            return
        owner = self._owner(manifest, checkpoint)
        if owner is not None:
            stage, evidence = owner
            if stage != self.name:
                raise StageError(
                    f"{self.dir} is the folder of a {stage} stage ({evidence}); a {self.name} stage never writes into "
                    "another stage's folder, not even with --no-resume or --force: choose another output folder"
                )
            return
        ours = {BUILDING_NAME, REBUILD_NAME}
        foreign = sorted(
            p.name + ("/" if p.is_dir() else "")
            for p in self.dir.iterdir()
            if not p.name.startswith(".") and p.name not in ours
        )
        if foreign and not self.force:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise StageError(
                f"{self.dir} is not empty and holds no gptflow stage ({shown}): {self.name} would overwrite files it "
                "did not write; choose a new or empty output folder, or pass --force to write into this one"
            )

    def _owner(self, manifest: dict | None, checkpoint: Callable[[], dict | None] | None) -> tuple[str, str] | None:
        """(stage name, the file that says so) of the stage whose folder this is: its manifest, else the marker of a
        stage writing it, else its checkpoint (read only when neither says); None when no file of ours says."""
        if manifest is not None and is_key(manifest):
            return manifest["stage"], MANIFEST_NAME
        try:
            marker = read_json(self.dir / BUILDING_NAME).get("stage")
        except (OSError, ValueError, AttributeError):
            marker = None
        if is_key(marker):
            return marker["stage"], BUILDING_NAME
        if checkpoint is not None:
            try:
                stored = checkpoint()
            except GptflowError:
                stored = None  # unreadable: not ours to vouch for (the decision says so if the folder is taken)
            if is_key(stored):
                return stored["stage"], "its checkpoint"
        return None

    def _decide(self, resume: bool, manifest: dict | None, checkpoint: Callable[[], dict | None] | None) -> Decision:
        where = str(self.dir)
        if not resume:
            return Decision("run", f"{where}: resume turned off, starting over")
        if manifest is not None and stored_key(manifest) == self.key:
            changed = [
                n
                for n, digest in manifest.get("outputs", {}).items()
                if not (self.dir / n).is_file() or sha256_file(self.dir / n) != digest
            ]
            if changed:
                return Decision(
                    "run",
                    f"{where}: output {', '.join(changed)} changed since the manifest was written; rebuilding",
                    tuple(changed),
                )
            if unreadable := self._unreadable():
                name, why = unreadable
                return Decision("run", f"{where}: output {name} cannot be read ({why}); rebuilding", (name,))
            return Decision("reuse", f"{where}: same inputs, config and code as its manifest")
        stored = None
        if checkpoint is not None:
            try:
                stored = checkpoint()
            except GptflowError as exc:
                return Decision("run", f"{where}: checkpoint unreadable ({exc}); starting over")
        if stored is not None:
            if stored == self.key:
                if (rebuild := self._rebuilding()) is not None:
                    return Decision(
                        "run",
                        f"{where}: an interrupted rebuild of damaged output {', '.join(rebuild)}; starting over (the "
                        "checkpoint may be the damaged run's)",
                        rebuild,
                    )
                if unreadable := self._unreadable():
                    name, why = unreadable
                    return Decision(
                        "run",
                        f"{where}: output {name} cannot be read ({why}) and its checkpoint cannot recreate it; "
                        "starting over",
                        (name,),
                    )
                return Decision("resume", f"{where}: its checkpoint has the same inputs, config and code")
            change = describe_change(stored, self.key)
            if self.chosen and without_code(stored) != without_code(self.key):
                raise StageError(
                    f"{where} holds a checkpoint of a run with different inputs or a different config "
                    f"({change}); pass another output folder, or --no-resume to start over"
                )
            return Decision("run", f"{where}: the checkpoint was written for another key ({change}); starting over")
        if manifest is not None:
            return Decision("run", f"{where}: {describe_change(stored_key(manifest), self.key)} since the manifest")
        return Decision("run", f"{where}: nothing built yet")

    def _unreadable(self) -> tuple[str, str] | None:
        """(name, why) of the first output, of those written so far, that its reader cannot load; None when every
        one loads."""
        for name, read in self.readers.items():
            path = self.dir / name
            if path.is_file():
                try:
                    read(path)
                except GptflowError as exc:
                    return name, str(exc)
        return None

    def _rebuilding(self) -> tuple[str, ...] | None:
        """The damaged outputs an unfinished rebuild of this folder is remaking (None when there is none)."""
        try:
            return tuple(read_json(self.dir / REBUILD_NAME)["damaged"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return ("(unknown)",)  # a damaged marker still means a rebuild was under way

    def run(
        self,
        build: Callable[[Decision], Built],
        *,
        resume: bool = True,
        checkpoint: Callable[[], dict | None] | None = None,
        readers: Mapping[str, Reader] | None = None,
    ) -> StageRun:
        """The one way a stage runs: under its lock, plan (see `plan` for the arguments); reuse the finished
        product, or `build(decision)` (a resume reads `decision.action`) and write the manifest of what it made."""
        with self.lock():
            decision = self.plan(resume, checkpoint, readers)
            if decision.reused:
                return StageRun(self.dir, True, dict((self.manifest() or {}).get("metrics") or {}))
            built = build(decision)
            if built.certified:
                self.complete(built.outputs, built.metrics)
        return StageRun(self.dir, False, dict(built.metrics), built.value)

    def check_checkpoint(self, stored: dict | None, path: str | Path) -> None:
        """Refuse to load a checkpoint written under another key (e.g. a file passed by hand)."""
        if stored != self.key:
            raise StageError(
                f"{path} was not written by this {self.name} stage: {describe_change(stored or {}, self.key)}"
            )

    def complete(self, outputs: Sequence[str], metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write the manifest: the key, the hash of every output, metrics, the commit and the time. An output that
        its reader (given to `plan`) cannot load is refused, never certified."""
        if unreadable := self._unreadable():
            name, why = unreadable
            raise StageError(
                f"{self.dir}: output {name} cannot be read ({why}); not certifying it: run the stage again to rebuild"
            )
        manifest = {
            **self.key,
            "code_version": code_version(),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "outputs": {name: sha256_file(self.dir / name) for name in outputs},
            "metrics": dict(metrics or {}),
        }
        write_json_atomic(self.manifest_path, manifest)
        (self.dir / REBUILD_NAME).unlink(missing_ok=True)
        (self.dir / BUILDING_NAME).unlink(missing_ok=True)
        return manifest

    @contextlib.contextmanager
    def lock(self) -> Iterator["Stage"]:
        """Hold the stage's lock while it is planned and written (a second run of the same stage waits). Only rank 0
        of a torchrun job takes it: the others join its training, they do not queue behind it."""
        if not process_ranks().is_main:
            yield self
            return
        with stage_lock(self.dir):
            yield self
