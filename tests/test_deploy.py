"""`make deploy` against a real local Prefect server: the work pools of prefect.yaml with their types, every
deployment on its pool, the container deployments' job variables as written, and the workers' view of them (the
Docker and Kubernetes job configurations rendered from the pools' templates). No Docker daemon or cluster needed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SPEC = yaml.safe_load((REPO / "prefect.yaml").read_text())
POOLS = SPEC["definitions"]["work_pools"]
DEPLOYMENTS = {d["name"]: d for d in SPEC["deployments"]}
CONTAINER = {name: d for name, d in DEPLOYMENTS.items() if POOLS[d["work_pool"]["name"]]["type"] != "process"}
IMAGE = "registry.example/gptflow:test"  # GPTFLOW_IMAGE for `make deploy`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """End the server and everything in its process group."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture(scope="module")
def deployed(prefect_harness):
    """`make deploy` run against the session's real Prefect server (the test harness's); yields its API URL."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    env = {**os.environ, "PREFECT_API_URL": api, "GPTFLOW_IMAGE": IMAGE}
    # -o: the test runs in the installed venv; an older install stamp must not trigger a reinstall.
    done = subprocess.run(
        ["make", "-C", str(REPO), "-o", ".venv/.installed", "deploy"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"make deploy failed:\n{(done.stdout + done.stderr)[-5000:]}"
    return api


def read_back(api: str) -> tuple[dict, dict]:
    """Work pools and deployments by name, through the Prefect client."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        pools = {p.name: p for p in client.read_work_pools()}
        deployments = {d.name: d for d in client.read_deployments()}
    return pools, deployments


def render(api: str, configuration_class, base_job_template: dict, values: dict):
    """The job configuration a worker of the pool's type builds for a flow run with these job variables."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def build():
        async with get_client() as client:
            return await configuration_class.from_template_and_values(base_job_template, values, client=client)

    with temporary_settings({PREFECT_API_URL: api}):
        return asyncio.run(build())


@pytest.mark.slow
def test_make_deploy_registers_pools_and_deployments_as_written(deployed):
    pools, deployments = read_back(deployed)
    assert {name: pools[name].type for name in POOLS} == {name: pool["type"] for name, pool in POOLS.items()}
    assert {p["type"] for p in POOLS.values()} == {"process", "docker", "kubernetes"}
    for name, pool in POOLS.items():
        if pool.get("base_job_template"):
            assert pools[name].base_job_template == json.loads((REPO / pool["base_job_template"]).read_text())
    assert CONTAINER, "prefect.yaml has no docker or kubernetes deployment"
    for name, want in DEPLOYMENTS.items():
        got = deployments[name]
        assert got.work_pool_name == want["work_pool"]["name"], name
        assert got.entrypoint == want["entrypoint"], name
        schedules = sorted((s.schedule.cron, s.schedule.timezone, s.active) for s in got.schedules)
        assert schedules == sorted(
            (s["cron"], s.get("timezone", "UTC"), s.get("active", True)) for s in want.get("schedules") or []
        ), name
    for name, want in CONTAINER.items():
        variables = want["work_pool"]["job_variables"]
        assert variables["image"] == "{{ $GPTFLOW_IMAGE }}", name  # filled in from the environment at deploy time
        assert deployments[name].job_variables == {**variables, "image": IMAGE}, name
        assert deployments[name].pull_steps == want["pull"], name


@pytest.mark.slow
def test_docker_and_kubernetes_workers_build_the_requested_containers(deployed):
    from docker.types import HostConfig
    from prefect_docker.worker import DockerWorkerJobConfiguration
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    pools, deployments = read_back(deployed)
    (docker,) = [d for d in deployments.values() if pools[d.work_pool_name].type == "docker"]
    config = render(
        deployed, DockerWorkerJobConfiguration, pools[docker.work_pool_name].base_job_template, docker.job_variables
    )
    assert config.image == IMAGE and config.mem_limit == docker.job_variables["mem_limit"]
    assert config.volumes == docker.job_variables["volumes"] and config.env["GPTFLOW_HOME"] == "/data/outputs"
    # docker-py accepts the container settings, and with the README's GPU override (no daemon needed).
    kwargs = config.container_create_kwargs
    host = HostConfig(version="1.44", mem_limit=config.mem_limit, binds=config.volumes, **kwargs)
    assert host["Memory"] > 0 and host["NanoCpus"] == kwargs["nano_cpus"] and "DeviceRequests" not in host
    gpus = [{"count": -1, "capabilities": [["gpu"]]}]
    host = HostConfig(version="1.44", mem_limit=config.mem_limit, **{**kwargs, "device_requests": gpus})
    assert host["DeviceRequests"][0]["Capabilities"] == [["gpu"]]

    (k8s,) = [d for d in deployments.values() if pools[d.work_pool_name].type == "kubernetes"]
    template = pools[k8s.work_pool_name].base_job_template
    variables = k8s.job_variables
    for gpus in (None, 2):  # the deployment asks for no GPU; a run can (--job-variable gpu_limit=2)
        values = variables if gpus is None else {**variables, "gpu_limit": gpus}
        job = render(deployed, KubernetesWorkerJobConfiguration, template, values).job_manifest
        assert job["metadata"]["namespace"] == variables["namespace"]
        pod = job["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        limits = {"memory": variables["memory_limit"]} | ({"nvidia.com/gpu": gpus} if gpus else {})
        requests = {"cpu": variables["cpu_request"], "memory": variables["memory_request"]}
        assert container["resources"] == {"limits": limits, "requests": requests}
        assert container["image"] == IMAGE
        assert (
            container["volumeMounts"] == variables["volume_mounts"] and pod["spec"]["volumes"] == variables["volumes"]
        )


def test_the_image_is_what_the_container_deployments_expect():
    """The Dockerfile installs the lock, builds CPU torch by default, and puts the clone and the outputs where the
    container deployments' pull step and env look."""
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert "pip install -r requirements.lock" in text and "COPY requirements.lock" in text
    (workdir,) = re.findall(r"^WORKDIR (\S+)$", text, re.M)
    for name, want in CONTAINER.items():
        (step,) = want["pull"]
        assert step["prefect.deployments.steps.set_working_directory"]["directory"] == workdir, name
        assert f"GPTFLOW_HOME={want['work_pool']['job_variables']['env']['GPTFLOW_HOME']}" in text, name
