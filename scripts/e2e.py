"""End-to-end check against a real Prefect server, a process worker and the real UI (`make e2e`).

A throwaway server and outputs folder; the work pools and every deployment of prefect.yaml; the nightly pipeline
run three times by a process worker on a user's CSV (first run promotes, second reuses everything, third sees new
data and a retrained instruction model, which the judge compares with the champion's answers), with alerts caught
by a loopback webhook and the judge served by the tests' loopback Ollama-API server; then the API and headless
Chromium check runs, artifacts and plots. Every process it starts is stopped on the way out, failure included.
Step by step: docs/scheduled-runs.md, "The end-to-end check".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from alert_receiver import AlertReceiver
from e2e_api import Expectation, deployment_checks, run_checks, wait_for_run
from e2e_harness import (
    REPO,
    Browser,
    E2EError,
    Service,
    ensure_chromium,
    free_port,
    log,
    run_cli,
    wait_for_health,
)
from e2e_ui import challenger_table_check, save_failed_run_page, ui_checks

sys.path.insert(0, str(REPO / "tests"))  # the loopback Ollama-API server the tests run serves the judge here too
from fake_ollama import FakeOllama  # noqa: E402


def expectations(user_csv: Path, judge_host: str) -> dict[str, Expectation]:
    """Per deployment of prefect.yaml that the e2e can run: tiny parameters and what the run must show.
    `user_csv`: the nightly pipeline's classifier data; `judge_host`: the Ollama server of its judge."""
    from flows.params import load_params

    # Two epochs: one epoch on a few hundred messages leaves the tiny classifier near-constant, and int8 flips
    # such near-ties (the export's int8 agreement gate refuses it, rightly).
    tiny = load_params(REPO / "configs" / "tiny.yaml").merged(
        {"classifier_data": str(user_csv), "classifier": {"epochs": 2}, "judge": {"host": judge_host}}
    )
    pretrain_artifacts = {"data-corpus-the-verdict", "pretrain-the-verdict-tiny*", "pretrain-the-verdict-tiny*-loss"}
    return {
        "nightly": Expectation(
            parameters={"params": tiny.model_dump(mode="json")},
            subflows={
                "prepare-csv",
                "prepare-instructions",
                "prepare-corpus",
                "pretrain",
                "finetune-classifier",
                "export",
                "export-lm",
                "export-gguf",
                "finetune-instructions",
                "evaluate",
                "inspect",
            },
            tasks={
                "check_data_source",
                "train_model",
                "pretrain_on_domain",
                "challenge-champion",
                "write_run_report",
                "inspect_checkpoint",
                "publish_inspection",
            },
            artifacts={
                *pretrain_artifacts,
                "pipeline-data-sources",
                "pipeline-promotions",
                "classifier-*-challenger-vs-champion",
                "lm-*-challenger-vs-champion",
                "dapt-*-loss",
                "pipeline-report",
                "pipeline-stages",
                "pipeline-report-file",
                "evaluation-report",
                "evaluation-summary",
                "classify-*-confusion",
                "classify-*-curves",
                "export-*-accuracy",
                "export-lm-*-models",
                "export-lm-*-card",
                "export-gguf-*-card",
                "instruct-*-loss",
                "inspect-*-attention-layer-0",
                "inspect-*-attention-focus",
                "inspect-*-logit-lens",
                "inspect-*-tokens-table",
                "inspect-*-logit-lens-table",
            },
            min_plots=10,
        ),
        "weekly-pretrain": Expectation(
            parameters={"corpus": "the-verdict", "config": tiny.pretrain.model_dump(mode="json")},
            subflows={"prepare-corpus"},
            tasks={"build_corpus", "train_model"},
            artifacts=pretrain_artifacts,
        ),
    }


# ---------------------------------------------------------------------------------------------- scheduled runs

LATER_RUNS = Expectation(
    parameters={},
    subflows={"prepare-csv", "finetune-classifier", "export", "export-lm"},
    tasks={"check_data_source", "challenge-champion", "write_run_report"},
    artifacts={"pipeline-data-sources", "pipeline-promotions", "classifier-*-challenger-vs-champion"},
    min_plots=0,
)
# The third run also retrains the instruction model: a new LM bundle, judged against the champion pairwise.
THIRD_RUN = Expectation(
    parameters={},
    subflows=LATER_RUNS.subflows | {"finetune-instructions", "evaluate"},
    tasks=LATER_RUNS.tasks,
    artifacts=LATER_RUNS.artifacts | {"lm-*-challenger-vs-champion", "lm-*-pairwise"},
    min_plots=0,
)


def retrained_instructions(parameters: dict[str, Any]) -> dict[str, Any]:
    """The nightly parameters with two more instruction fine-tuning steps: the same data, a new LM bundle. The tiny
    model's 8-token answers may still be the champion's: then every pair is a tie and the champion stays."""
    from flows.params import PipelineParams

    params = PipelineParams.model_validate(parameters["params"])
    steps = params.instruct.max_steps + 2
    return {"params": params.merged({"instruct": {"max_steps": steps}}).model_dump(mode="json")}


def write_user_csv(path: Path, rows: int) -> Path:
    """The first `rows` messages of the SMS spam set as a user's labelled CSV (label,text)."""
    import csv

    from gptflow.download import fetch_source
    from gptflow.settings import load_settings

    lines = fetch_source("sms-spam", load_settings()).read_text(encoding="utf-8").splitlines()[:rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "text"])
        writer.writerows(line.split("\t", 1) for line in lines)
    return path


def run_summary(home: Path, run) -> dict[str, Any]:
    """The run's report summary on disk (what the pipeline decided)."""
    path = home / "runs" / run.name / "summary.json"
    if not path.is_file():
        raise E2EError(f"flow run {run.name} wrote no {path}")
    return json.loads(path.read_text())


def decision_checks(step: str, summary: dict[str, Any], first_run: str | None, alerts: list[str]) -> list[str]:
    """What each of the three scheduled runs must have decided; returns problems."""
    problems = []
    status = {row["stage"]: row["status"] for row in summary["stages"]}
    promotions = summary["promotions"]
    decided = {k: (p["status"], p["verdict"]["reason"]) for k, p in promotions.items()}
    if step == "first":
        if {k: p["status"] for k, p in promotions.items()} != {"classifier": "promoted", "lm": "promoted"}:
            problems.append(f"first run: expected both bundles promoted, got {decided}")
        if alerts.count("promoted") != 2:
            problems.append(f"first run: expected 2 'promoted' alerts, received {alerts}")
    elif step == "second":
        if not summary["data"].startswith(f"data unchanged since run {first_run} ("):
            problems.append(f"second run: data {summary['data']!r}, expected unchanged since run {first_run}")
        if busy := {k: v for k, v in status.items() if v not in ("reused", "skipped")}:
            problems.append(f"second run: stages not reused: {busy}")
        if any("(same bundle)" not in reason for _, reason in decided.values()):
            problems.append(f"second run: expected both champions kept as the same bundle, got {decided}")
        if alerts:
            problems.append(f"second run: expected no alert, received {alerts}")
    else:
        if not summary["data"].startswith("classifier: new data version"):
            problems.append(f"third run: data {summary['data']!r}, expected a new classifier data version")
        if not status.get("data-classifier") == status.get("classifier") == status.get("export") == "done":
            problems.append(f"third run: the classifier stages did not run again: {status}")
        # Its answers may equal the last run's (8 tokens of a tiny model): then their evaluation is reused.
        if not status.get("instruct") == status.get("export-lm") == "done" or status.get("evaluate") == "skipped":
            problems.append(f"third run: the instruction model was not retrained and judged: {status}")
        classifier, lm = promotions["classifier"], promotions["lm"]
        if classifier["verdict"]["champion"] is None:
            problems.append(f"third run: the champion was not scored on the new data: {classifier['verdict']}")
        if lm["verdict"]["metric"] != "pairwise_win_rate" or not lm.get("pairwise"):
            problems.append(f"third run: the language model was not decided pairwise: {lm['verdict']}")
        expected = [
            "promoted" if p["status"] == "promoted" else "challenger-worse"
            for p in (classifier, lm)
            if p["status"] == "promoted" or p["verdict"]["alert"]
        ]
        if alerts != expected:
            problems.append(f"third run: alerts {alerts}, expected {expected} for {decided}")
    return problems


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--deployment",
        default="nightly",
        choices=["nightly", "weekly-pretrain"],
        help="deployment of prefect.yaml to run, with the tiny parameters of configs/tiny.yaml",
    )
    parser.add_argument("--prefect-file", type=Path, default=REPO / "prefect.yaml", help="deployments to create")
    parser.add_argument("--run-timeout", type=float, default=900, help="seconds the flow run may take")
    parser.add_argument("--keep", action="store_true", help="keep the throwaway PREFECT_HOME and GPTFLOW_HOME")
    args = parser.parse_args(argv)
    t0 = time.monotonic()

    from gptflow.settings import load_settings

    report = load_settings().home.resolve() / "e2e" / time.strftime("%Y%m%d-%H%M%S")
    report.mkdir(parents=True, exist_ok=True)
    prefect_file = args.prefect_file.resolve()
    spec = yaml.safe_load(prefect_file.read_text())
    pool = spec["definitions"]["work_pool"]["name"]
    chromium = ensure_chromium()

    scratch = Path(tempfile.mkdtemp(prefix="gptflow-e2e-"))
    user_csv = scratch / "user-data" / "sms.csv"
    receiver = AlertReceiver()
    judge = FakeOllama()  # the judge of the evaluate stage and of the LM's pairwise promotion
    judge.__enter__()
    expect = expectations(user_csv, judge.host)[args.deployment]
    port = free_port()
    base, api_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(scratch / "prefect"),
        "PREFECT_API_URL": api_url,
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "GPTFLOW_HOME": str(scratch / "outputs"),
        "GPTFLOW_ALERT_URL": receiver.url,
        "OLLAMA_HOST": judge.host,
        "GPTFLOW_REPO": str(REPO),
        "PYTHONUNBUFFERED": "1",
    }
    if env.get("GPTFLOW_MIRROR"):
        env["GPTFLOW_MIRROR"] = str(Path(env["GPTFLOW_MIRROR"]).resolve())
    os.environ.update(env)  # this process talks to the same API (prefect is imported below, after this)
    prefect = str(Path(sys.executable).with_name("prefect"))
    services: list[Service] = []
    summary: dict[str, Any] = {"deployment": args.deployment, "report": str(report), "ok": False}
    try:
        server = Service(
            "server",
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env,
            report / "server.log",
        )
        services.append(server)
        log(f"prefect server starting on {base} (PREFECT_HOME {scratch / 'prefect'})")
        summary["server_start_s"] = round(wait_for_health(server, api_url, 180), 1)
        log(f"server healthy after {summary['server_start_s']}s")

        create_pools = [sys.executable, str(REPO / "scripts" / "create_pools.py"), "--prefect-file", str(prefect_file)]
        run_cli(create_pools, env, report / "work-pool.log", 180)
        t = time.monotonic()
        run_cli(
            [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)],
            env,
            report / "deploy.log",
            300,
        )
        log(f"deployed {len(spec['deployments'])} deployments in {time.monotonic() - t:.0f}s")

        from prefect.client.orchestration import get_client

        write_user_csv(user_csv, 4500)
        steps = ["first", "second", "third"] if args.deployment == "nightly" else ["only"]
        with get_client(sync_client=True) as client:
            deployments = deployment_checks(client, spec)
            worker = Service(
                "worker",
                [
                    prefect,
                    "worker",
                    "start",
                    "--pool",
                    pool,
                    "--type",
                    "process",
                    "--install-policy",
                    "never",
                    "--limit",
                    "1",
                    "--name",
                    "gptflow-e2e",
                ],
                env,
                report / "worker.log",
            )
            services.append(worker)
            runs: dict[str, Any] = {}
            for step in steps:
                parameters = expect.parameters
                if step == "third":
                    write_user_csv(user_csv, 5574)  # the user's file grew: a new data version
                    log(f"{user_csv} changed: 5574 messages instead of 4500")
                    parameters = retrained_instructions(parameters)
                    log("instruction fine-tuning: two more steps (a new LM bundle to judge against the champion)")
                flow_run = client.create_flow_run_from_deployment(
                    deployments[args.deployment].id, parameters=parameters
                )
                log(f"{step} run of {args.deployment}: flow run {flow_run.name}")
                t = time.monotonic()
                run = wait_for_run(client, flow_run.id, worker, args.run_timeout)
                summary[f"{step}_run_s"] = round(time.monotonic() - t, 1)
                try:
                    later = THIRD_RUN if step == "third" else LATER_RUNS
                    api = run_checks(client, run, expect if step in ("first", "only") else later)
                except E2EError:
                    save_failed_run_page(chromium, scratch, report, env, services, base, run)
                    raise
                runs[step] = (run, api)
                log(
                    f"API: {run.name} {run.state_name} in {summary[f'{step}_run_s']:.0f}s; {api['flow_runs']} flow "
                    f"runs, {api['task_runs']} task runs, {len(api['artifacts'])} artifacts "
                    f"({len(api['plots'])} plots), all Completed"
                )
                if step == "only":
                    continue
                decisions = run_summary(scratch / "outputs", run)
                time.sleep(2)  # an alert is posted before the run ends; give the receiver a moment all the same
                alerts = receiver.about(run.name)
                first_run = runs["first"][0].name
                if problems := decision_checks(step, decisions, first_run, alerts):
                    raise E2EError("decisions:\n  " + "\n  ".join(problems))
                summary[f"{step}_run"] = {
                    "run": run.name,
                    "data": decisions["data"],
                    "stages": {row["stage"]: row["status"] for row in decisions["stages"]},
                    "promotions": {
                        k: f"{p['status']}: {p['verdict']['reason']} (champion {p['champion']})"
                        for k, p in decisions["promotions"].items()
                    },
                    "alerts": alerts,
                }
                log(f"{step} run decided: {decisions['data']}; {summary[f'{step}_run']['promotions']}")
                log(f"{step} run alerts received: {alerts}")
            worker.stop()
            summary["registry"] = {
                task.name: json.loads((task / "registry.json").read_text())
                for task in sorted((scratch / "outputs" / "registry").glob("*"))
                if (task / "registry.json").is_file()
            }
        run, api = runs[steps[0]]
        summary.update(
            run=run.name, state=run.state_name, **{k: v for k, v in api.items() if k not in ("plots", "run_artifacts")}
        )
        summary["plot_artifacts"] = [p.key for p in api["plots"]]

        browser = Browser(chromium, scratch / "chromium", report / "chromium.log", env)
        services.append(browser.service)
        try:
            summary.update(ui_checks(browser, base, run, api, report))
            if "third" in runs:
                third, third_api = runs["third"]
                problems = challenger_table_check(browser, base, third_api["run_artifacts"], report)
                if problems:
                    raise E2EError("UI checks failed:\n  " + "\n  ".join(problems))
                log(f"UI: {third.name}'s challenger-vs-champion table rendered")
        finally:
            browser.close()
        for line in summary["plots_rendered"]:
            log(f"UI: plot rendered {line}")
        summary["ok"] = True
    except E2EError as exc:
        summary["error"] = str(exc)
        log(f"FAILED: {exc}")
    finally:
        for service in reversed(services):
            service.stop()
        receiver.close()
        judge.__exit__(None, None, None)
        summary["judge_requests"] = len(judge.requests_to("/api/chat"))
        summary["total_s"] = round(time.monotonic() - t0, 1)
        (report / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    log(
        f"{'PASSED' if summary['ok'] else 'FAILED'} in {summary['total_s']:.0f}s; screenshots, DOM dumps, logs "
        f"and summary.json in {report}"
    )
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
