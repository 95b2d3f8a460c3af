"""Independent trainings in parallel (tasks/parallel.py): a sweep's variants and an ensemble's members run as task
runs of their flow run on a 2-worker local Dask cluster, with their artifacts; the grid's checks; the sweep verb
against the temporary API server of a command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from classify_data import make_texts, write_splits
from conftest import REPO_ROOT, command_env, tiny_config
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)

from gptflow.settings import get_settings
from model.configs import ClassifierConfig
from model.sweep import SweepError, grid_variants
from tasks.parallel import THREAD_VARIABLES, dask_options

TINY = {"trainable": "all", "lr": 2e-3, "epochs": 2, "batch_size": 8, "keep": "last"}
SPLITS = {"train", "validation", "test"}


@pytest.fixture
def two_workers(settings, monkeypatch):
    monkeypatch.setenv("GPTFLOW_DASK_WORKERS", "2")
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def run_records(flow_run_id) -> tuple[dict[str, list], list]:
    """The flow run's task runs by task name, and its artifacts, read back through the Prefect API."""
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_name: dict[str, list] = {}
    for run in task_runs:
        by_name.setdefault(run.task_key.rsplit("-", 1)[0], []).append(run)
    return by_name, artifacts


def assert_ran_in_parallel(runs) -> None:
    """Two task runs that both completed, each starting before the other ended (a worker each)."""
    assert len(runs) == 2 and all(r.state.is_completed() for r in runs)
    first, second = sorted(runs, key=lambda r: r.start_time)
    assert second.start_time < first.end_time, "the two trainings did not overlap: they ran one after the other"


def test_the_runner_is_a_local_cluster_sized_from_the_settings_or_an_address(two_workers, monkeypatch):
    options = dask_options(two_workers)
    kwargs = options["cluster_kwargs"]
    assert (kwargs["n_workers"], kwargs["threads_per_worker"], kwargs["processes"]) == (2, 1, True)
    assert set(kwargs["env"]) == set(THREAD_VARIABLES)
    assert kwargs["env"]["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    monkeypatch.setenv("GPTFLOW_DASK_ADDRESS", "tcp://10.0.0.5:8786")
    get_settings.cache_clear()
    assert dask_options(get_settings()) == {"address": "tcp://10.0.0.5:8786"}


@pytest.mark.parametrize(
    "config, grid, message",
    [
        ({}, {"sed": [1, 2]}, "grid: 'sed' is not a ClassifierConfig field; fields: preset, dropout, lr,"),
        ({}, {"lr": [1e-4, -1]}, "grid: lr=-1: Input should be greater than 0"),
        ({}, {"pooling": ["mean", "max"]}, "grid: pooling='max': Input should be 'last_real', 'last_position' or"),
        ({}, {"seed": "12"}, "grid: seed: expected a list of one or more values, got '12'"),
        ({}, {"seed": []}, "grid: seed: expected a list of one or more values, got []"),
        ({}, {"seed": [1, "1"]}, "grid: variants seed=1 and seed=1 train the same classifier"),
        ({}, {"threads": [1, 2]}, "grid: threads is a run setting: it does not change the classifier"),
        ({}, {"seed": [3]}, "grid: 1 variant; a sweep trains 2 or more"),
        ({}, {"ensemble": [[1, 2], [3, 4]]}, "grid: ensemble: a sweep trains single classifiers"),
        (
            {"ensemble": (1, 2)},
            {"seed": [1, 2]},
            "a sweep trains single classifiers: the config's ensemble must be empty",
        ),
        ({"keep": "last"}, {"patience": [None, 2]}, "grid: variant patience=2: Value error, keep='last' trains"),
    ],
)
def test_a_bad_grid_is_one_error_naming_the_field(config, grid, message):
    with pytest.raises(SweepError) as caught:
        grid_variants(ClassifierConfig(**config), grid)
    assert str(caught.value).startswith(message)


def test_grid_variants_are_every_combination_the_last_field_fastest():
    variants = grid_variants(ClassifierConfig(epochs=3), {"seed": [1, 2], "lr": ["1e-4", 3e-4]})
    assert [fields for fields, _ in variants] == [
        {"seed": 1, "lr": 1e-4},
        {"seed": 1, "lr": 3e-4},
        {"seed": 2, "lr": 1e-4},
        {"seed": 2, "lr": 3e-4},
    ]
    assert all(config.epochs == 3 and config.seed == fields["seed"] for fields, config in variants)


def test_a_sweep_trains_its_variants_in_parallel_on_two_workers_and_reports_a_failed_one(
    prefect_harness, two_workers, tmp_path
):
    from flows.sweep import sweep_classifier_flow

    data = write_splits(tmp_path / "data", (20, 5, 10))
    environ = dict(os.environ)
    # 2 blocks: last_k 5 fails, at once. 6 epochs keep the first good variant training while the second worker gets
    # past a failed one to the other good variant (with 2 epochs a loaded machine could run them one after the other).
    config = tiny_config("classifier", **{**TINY, "trainable": "last_k", "epochs": 6})
    state = sweep_classifier_flow(str(data), config, {"seed": [11, 12], "last_k": [2, 5]}, return_state=True)
    *variants, failed_11, failed_12 = state.result()
    assert dict(os.environ) == environ  # the cluster's nannies left the flow's environment as it was

    assert sorted(v["fields"]["seed"] for v in variants) == [11, 12] and all(
        v["fields"]["last_k"] == 2 for v in variants
    )
    val = [v["metrics"]["validation"]["accuracy"] for v in variants]
    assert val == sorted(val, reverse=True)  # best validation accuracy first
    for v in variants:
        assert "error" not in v and set(v["metrics"]) == SPLITS
        assert all(0.0 <= m["accuracy"] <= 1.0 for m in v["metrics"].values())
        assert Path(v["best"]).is_file() and Path(v["out_dir"]).parent == two_workers.home / "classify"
        manifest = json.loads((Path(v["out_dir"]) / "manifest.json").read_text())
        assert manifest["config"]["seed"] == v["fields"]["seed"]
    assert len({v["out_dir"] for v in variants}) == 2  # each its own stage folder
    error = "ClassifierError: last_k 5 exceeds the model's 2 blocks"
    assert [failed_11, failed_12] == [  # failed variants last, in grid order; the others kept
        {"variant": 2, "fields": {"seed": 11, "last_k": 5}, "error": error},
        {"variant": 4, "fields": {"seed": 12, "last_k": 5}, "error": error},
    ]

    tasks, artifacts = run_records(state.state_details.flow_run_id)
    assert_ran_in_parallel([r for r in tasks["train_classifier"] if not r.state.is_failed()])
    assert len(tasks["finetune_classifier"]) == 4 and len(tasks["evaluate_splits"]) == 2
    keys = {a.key for a in artifacts}
    for v in variants:
        name = Path(v["out_dir"]).name
        for suffix in ("history", "curves", "accuracy", "test-metrics", "confusion"):
            assert f"classify-{name}-{suffix}" in keys
    (table,) = [a for a in artifacts if a.key == "sweep-data"]
    rows = table.data if isinstance(table.data, list) else json.loads(table.data)
    assert [(r["variant"], r["seed"], r["last_k"], r["checkpoint"], r["error"]) for r in rows] == [
        (v["variant"], v["fields"]["seed"], 2, v["best"], None) for v in variants
    ] + [(2, 11, 5, None, error), (4, 12, 5, None, error)]
    assert [r["validation_accuracy"] for r in rows] == [round(a, 4) for a in val] + [None, None]


def test_an_ensemble_trains_its_members_on_the_scheduler_the_settings_name(
    prefect_harness, settings, tmp_path, monkeypatch
):
    """GPTFLOW_DASK_ADDRESS: the members run on that cluster's workers (started here, as a user would start theirs:
    the same GPTFLOW_HOME), which the flow run leaves running."""
    from distributed import LocalCluster

    from flows.classify import finetune_classifier_flow

    data = write_splits(tmp_path / "data", (20, 5, 10))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        monkeypatch.setenv("GPTFLOW_DASK_ADDRESS", cluster.scheduler_address)
        get_settings.cache_clear()
        state = finetune_classifier_flow(
            str(data), tiny_config("classifier", ensemble=(1, 2), **TINY), return_state=True
        )
        assert cluster.scheduler.task_prefixes.keys() == {"train_classifier"}
        assert len(cluster.scheduler.workers) == 2
    out = state.result()
    assert len(out["members"]) == 2 and Path(out["best"]).is_file() and set(out["metrics"]) == SPLITS
    members = json.loads((Path(out["out_dir"]) / "manifest.json").read_text())["metrics"]["members"]
    assert [m["checkpoint"] for m in members] == [m["best"] for m in out["members"]]

    tasks, artifacts = run_records(state.state_details.flow_run_id)
    assert_ran_in_parallel(tasks["train_classifier"])
    assert len(tasks["ensemble_classifiers"]) == 1 and len(tasks["evaluate_splits"]) == 3
    ensemble_inputs = tasks["ensemble_classifiers"][0].task_inputs["members"]
    assert {i.id for i in ensemble_inputs} == {r.id for r in tasks["train_classifier"]}  # drawn as its upstreams
    assert f"classify-{Path(out['out_dir']).name}-members" in {a.key for a in artifacts}


@pytest.mark.slow
def test_the_sweep_verb_runs_against_the_commands_own_api_server(tmp_path, mirror):
    """No PREFECT_API_URL: the command's flow runs on a temporary server, which its Dask workers report to."""
    csv = tmp_path / "topics.csv"
    make_texts(20, seed=3).rename(columns={"text": "message", "label": "topic"}).to_csv(csv, index=False)
    env = {**command_env(tmp_path, mirror), "GPTFLOW_DASK_WORKERS": "2"}
    argv = ["--data", str(csv), "--text-column", "message", "--label-column", "topic", "--preset", "tiny"]
    argv += ["--trainable", "all", "--lr", "2e-3", "--epochs", "1", "--keep", "last", "--grid", "seed=5,6"]
    done = subprocess.run(
        [sys.executable, "-m", "cli", "sweep-classifier", *argv],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "2 variants, best validation accuracy first:" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    assert header and lines[header].split() == ["variant", "seed", "train", "validation", "test", "model"]
    assert sorted(line.split()[1] for line in lines[header + 1 : header + 3]) == ["5", "6"]
    best = next(line for line in lines if line.startswith("best: ")).split()[1]
    assert Path(best).is_file()


def test_the_sweep_verb_refuses_a_bad_grid_in_one_line(settings, capsys):
    from cli import main

    assert main(["sweep-classifier", "--grid", "seed=1,2", "--grid", "sed=3,4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptflow sweep-classifier: error: grid: 'sed' is not a ClassifierConfig field") and (
        err.count("\n") == 1
    )
    assert main(["sweep-classifier", "--grid", "lr=1e-4", "--grid", "lr=3e-4"]) == 2
    assert "--grid: lr is given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep-classifier", "--grid", "seed"])
    assert "--grid: expected FIELD=VALUE[,VALUE...], got 'seed'" in capsys.readouterr().err
