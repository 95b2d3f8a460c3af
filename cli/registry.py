"""`gptflow registry list|show|promote|rollback|repair`: the champions under GPTFLOW_HOME/registry, read and
changed by hand. The pipeline promotes by itself (champion vs challenger); these are for people."""

from __future__ import annotations

import argparse
import getpass
import json
from pathlib import Path

from cli.common import table


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "registry",
        help="the model registry: champions per task, their versions, promote and roll back by hand",
        description="Every pipeline run's classifier and LM bundles challenge their task's champion; a better one "
        "is promoted. The registry lives in GPTFLOW_HOME/registry/<task>/: versions/vNNNN (the bundle and its "
        "record), registry.json (kind, champion, lineage, events) and `champion`, a link to the champion's version "
        "that edge devices can read. A bundle is verified before it is registered, and a registered version is a "
        "read-only copy.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every task and its champion; with TASK, every version of it")
    listing.add_argument("task", nargs="?", metavar="TASK", help="a registry task, e.g. classifier-spam")
    show = actions.add_parser("show", help="one version's record as JSON (default: the champion)")
    show.add_argument("task", metavar="TASK")
    show.add_argument("version", nargs="?", metavar="VERSION", help="vNNNN (default: the champion)")
    promote = actions.add_parser(
        "promote",
        help="make a version, or a verified bundle folder, the champion (no comparison); a bundle creates a new TASK",
    )
    promote.add_argument("task", metavar="TASK")
    promote.add_argument("target", metavar="VERSION|BUNDLE", help="vNNNN, or an exported bundle folder")
    promote.add_argument("--reason", default="promoted by hand", help="kept in the registry's event log")
    rollback = actions.add_parser("rollback", help="back to the champion before the current one (or --to VERSION)")
    rollback.add_argument("task", metavar="TASK")
    rollback.add_argument("--to", metavar="VERSION", help="the version to make champion again")
    rollback.add_argument("--reason", default="rolled back by hand", help="kept in the registry's event log")
    repair = actions.add_parser(
        "repair", help="rebuild a damaged registry.json or record.json from the versions (damaged files are kept)"
    )
    repair.add_argument("task", metavar="TASK")
    p.set_defaults(handler=run_registry)


def run_registry(args: argparse.Namespace) -> int:
    from gptflow.registry import Registry, RegistryError, tasks

    if args.action == "list" and args.task is None:
        rows = []
        for name in tasks():
            registry = Registry(name)
            champion = registry.champion()
            rows.append(
                {
                    "task": name,
                    "champion": champion["version"] if champion else "-",
                    "versions": len(registry.version_ids()),
                    "registered by run": champion["run"] if champion else "-",
                    "path": str(registry.link),
                }
            )
        print(table(rows) if rows else "the registry is empty: a pipeline run promotes its first champions")
        return 0
    registry = Registry(args.task)
    new_task = args.action == "promote" and Path(args.target).is_dir()  # a verified bundle creates its task
    if not (registry.exists or new_task or (args.action == "repair" and registry.versions.is_dir())):
        known = ", ".join(tasks()) or "none yet"
        raise RegistryError(
            f"no registry task {args.task!r} (tasks: {known}); `gptflow registry promote {args.task} BUNDLE` "
            "creates it from an exported bundle"
        )
    who = f"cli ({getpass.getuser()})"
    if args.action == "repair":
        done = registry.repair(run=who)
        print("\n".join(f"{registry.task}: {line}" for line in done) or f"{registry.task}: nothing to repair")
        return 0
    if args.action == "list":
        champion = registry.state()["champion"]
        print(table([_version_row(r, champion) for r in registry.records()]))
    elif args.action == "show":
        record = registry.record(args.version) if args.version else registry.champion()
        print(json.dumps(record, indent=2, default=str))
    elif args.action == "promote":
        if new_task:
            created = not registry.exists
            record = registry.promote(args.target, {}, reason=args.reason, run=who)
            if created:
                print(f"{registry.task}: new registry task of {record['kind']} bundles")
        else:
            record = registry.activate(args.target, reason=args.reason, run=who, action="promote")
        _announce(registry, record, "promoted", args.reason)
    else:
        record = registry.rollback(to=args.to, reason=args.reason, run=who)
        _announce(registry, record, "rolled back to", args.reason)
    return 0


def _version_row(record: dict, champion: str | None) -> dict:
    scores = [s for s in record.get("scores", {}).values()]
    latest = scores[-1] if scores else {}
    return {
        "version": record["version"] + (" *" if record["version"] == champion else ""),
        "registered": record.get("registered", "-"),
        "run": record.get("run", "-"),
        "bundle sha256": record["bundle_sha256"][:12],
        **{k: round(v, 4) for k, v in latest.items() if isinstance(v, float)},
    }


def _announce(registry, record: dict, what: str, reason: str) -> None:
    from tasks.alerts import RunRef, notify

    print(f"{registry.task}: {what} {record['version']} ({reason}); champion: {registry.link}")
    run = RunRef(f"gptflow registry ({getpass.getuser()})")
    notify("promoted", run=run, stage=f"registry {registry.task}", reason=f"{what} {record['version']}: {reason}")
