"""Data-parallel training from the product's two entry points: `torchrun ... gptflow pretrain` (rank 0 runs the
verb and its Prefect flow, rank 1 joins the training) and a Prefect flow whose stage config says
`launcher: {kind: torchrun}` (the task starts the ranks and streams rank 0's records into the flow run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from classify_data import write_splits
from conftest import command_env, tiny_config, write_random_tokens
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler

from flows.pretrain import pretrain_flow
from model.checkpoint import save_model
from model.configs import PretrainConfig
from model.finetune_classifier import finetune
from model.gpt import GPTModel
from model.launch import launch

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = {
    "preset": "tiny",
    "context_length": 32,
    "batch_size": 2,
    "steps": 4,
    "eval_every": 2,
    "eval_batches": 2,
    "checkpoint_every": 2,
    "precision": "fp32",
    "sample_tokens": 0,
}


@pytest.mark.slow
def test_torchrun_gptflow_pretrain(prefect_harness, tmp_path, mirror):
    """Rank 0 runs the CLI verb (Prefect flow, data stage, report); rank 1 follows into the training stage."""
    from prefect.settings import PREFECT_API_URL

    env = command_env(tmp_path, mirror, api=PREFECT_API_URL.value())
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "--no-python", str(BIN / "gptflow")]
    run = subprocess.run(
        [*command, "pretrain", "--corpus", "the-verdict", *flags, "--out", str(tmp_path / "run")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "trained tiny: 4 steps" in run.stdout
    assert run.stdout.count("trained tiny") == 1  # rank 1 printed nothing of its own
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["world_size"] == 2
    assert {k: manifest["metrics"][k] for k in ("world_size", "global_batch", "device", "precision")} == {
        "world_size": 2,
        "global_batch": 4,
        "device": "cpu",
        "precision": "fp32",
    }
    assert (tmp_path / "home" / "data" / "corpus" / "the-verdict" / "train.bin").is_file()  # rank 0's data stage


@pytest.mark.slow
def test_flow_launches_training_under_torchrun(prefect_harness, settings, tmp_path):
    data = write_random_tokens(tmp_path / "tokens", 4000, 1000, seed=0)
    config = PretrainConfig(**TINY, threads=1, launcher={"kind": "torchrun", "nproc_per_node": 2})
    state = pretrain_flow(str(data), config, out_dir=str(tmp_path / "run"), return_state=True)
    result = state.result()
    assert not result["reused"] and result["metrics"]["world_size"] == 2 and result["metrics"]["steps"] == 4
    assert not (settings.home / "launch").exists() or not any((settings.home / "launch").iterdir())

    # The flow run's logs reach the API from a background worker that sends a batch every 2 s: under CPU load
    # the last batch may still be queued when the flow returns. Send what is queued before reading them back.
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    messages = [log.message for log in logs]
    assert any("training under torchrun, 1 node(s) x 2 process(es)" in m for m in messages), messages
    # rank 0's records reached the flow run's log: the training loss at the last step, evaluations at 2 and 4
    assert sum(m.startswith("step 4 train: loss ") for m in messages) == 1, messages
    assert sum(m.startswith(("step 2 eval: ", "step 4 eval: ")) for m in messages) == 2, messages

    # same weights as one process with the same global batch (grad_accum 2 on one rank)
    single = PretrainConfig(**TINY, threads=1, grad_accum=2)
    local = pretrain_flow(str(data), single, out_dir=str(tmp_path / "single"))
    a = torch.load(result["model"], weights_only=True)["model"]
    b = torch.load(local["model"], weights_only=True)["model"]
    assert max(((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)).item() for k in b) <= 1e-5


@pytest.mark.slow
def test_failed_rank_fails_the_task_with_its_log(prefect_harness, settings, tmp_path):
    data = write_random_tokens(tmp_path / "tokens", 4000, 1000, seed=0)
    (data / "val.bin").write_bytes(b"\x00\x00" * 10)  # fewer tokens than one validation window: rank 0 fails
    config = PretrainConfig(**TINY, threads=1, launcher={"kind": "torchrun", "nproc_per_node": 2})
    state = pretrain_flow(str(data), config, out_dir=str(tmp_path / "run"), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception) as failure:
        state.result()
    message = str(failure.value)
    assert "model.pretrain:pretrain under torchrun failed" in message
    assert "fewer than one window" in message and "stderr.log" in message


@pytest.mark.slow
@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_classifier_data_parallel_matches_one_process(settings, tmp_path, tokenizer, trainable):
    """Two ranks with grad_accum 1 take the same steps over the same epochs as one process with grad_accum 2, training
    every weight or LoRA adapters (without adapter dropout, whose masks differ between ranks)."""
    data = write_splits(tmp_path / "data", (10, 3, 3))  # 30 texts, batch 4: 8 batches (the last short) per epoch
    base = dict(trainable=trainable, lr=1e-3, epochs=2, batch_size=4, eval_every=2, precision="fp32")
    base |= dict(threads=1, patience=None, keep="last")
    if trainable == "lora":
        start = save_model(tmp_path / "base" / "model.pt", GPTModel(tiny_config("gpt")))
        base |= dict(init=f"checkpoint:{start}", lora_targets=("all",), lora_dropout=0.0)
    records: list[dict] = []
    config = tiny_config("classifier", **base, launcher={"kind": "torchrun", "nproc_per_node": 2})
    launch(
        "model.finetune_classifier:finetune",
        (data, tmp_path / "ddp"),
        {"resume": True},
        config=config,
        workdir=tmp_path / "launch",
        on_record=records.append,
    )
    single = finetune(data, tmp_path / "single", tiny_config("classifier", **base, grad_accum=2), tokenizer=tokenizer)
    assert (
        [r["step"] for r in records if r["kind"] == "eval"]
        == [2, 4, 6, 8]
        == [h["step"] for h in single.history if h["kind"] == "eval"]
    )
    summary = json.loads((tmp_path / "ddp" / "manifest.json").read_text())["metrics"]
    assert summary["steps"] == single.summary["steps"] == 8 and summary["world_size"] == 2
    a = torch.load(tmp_path / "ddp" / "best.pt", weights_only=True)["model"]
    b = torch.load(single.best, weights_only=True)["model"]
    assert max(((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)).item() for k in b) <= 1e-5
