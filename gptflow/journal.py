"""A stage's journal: the checkpoint of a stage whose items are independent (an instruction model's test
responses), so that an interrupted run resumes at the first unfinished item."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from gptflow.stage import Decision, Stage


class Journal:
    """A stage's journal: an append-only JSON-lines file whose first line is the stage key, then one line per
    finished item, for a stage whose items are independent (an instruction model's test responses). It is the
    stage's checkpoint: `plan(checkpoint=journal.stored_key)` resumes from it, and a resumed build skips the items
    it holds. Each line is flushed to disk before the next item starts; a line torn by a crash is dropped."""

    def __init__(self, stage: Stage, name: str = "progress.jsonl") -> None:
        self.stage, self.path = stage, stage.dir / name

    def stored_key(self) -> dict | None:
        """The key on the first line (None without a journal; {} when that line is unreadable)."""
        if not self.path.is_file():
            return None
        with open(self.path, "rb") as handle:
            try:
                return json.loads(handle.readline()).get("stage") or {}
            except (json.JSONDecodeError, AttributeError):
                return {}

    def begin(self, decision: Decision) -> dict[int, dict[str, Any]]:
        """The items a resumed run finished (by index); a fresh run starts a new journal and gets none."""
        done = self._read() if decision.action == "resume" else {}
        if not done:
            self.stage.dir.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"stage": self.stage.key}) + "\n", encoding="utf-8")
        return done

    def append(self, index: int, record: Mapping[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"index": index, **record}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def remove(self) -> None:
        """Once the manifest is written (before it, an interruption resumes from the journal)."""
        self.path.unlink(missing_ok=True)

    def _read(self) -> dict[int, dict[str, Any]]:
        done: dict[int, dict[str, Any]] = {}
        with open(self.path, "rb") as handle:
            good_bytes = len(handle.readline())
            for raw in handle:
                try:
                    record = json.loads(raw)
                    if not raw.endswith(b"\n"):
                        break
                    done[int(record.pop("index"))] = record
                except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                    break
                good_bytes += len(raw)
        with open(self.path, "r+b") as handle:
            handle.truncate(good_bytes)  # a torn last line is cut off before new lines follow it
        return done
