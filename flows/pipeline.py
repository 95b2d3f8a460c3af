"""The end-to-end pipeline: data -> base model -> classifier -> edge bundle; instruction model -> judge and LM
edge bundle; last, a look inside the base and the instruction model on a probe text.

Entry point for `gptflow pipeline`, `make run` and the `prefect.yaml` deployments: `flows/pipeline.py:pipeline`.
Every stage is a subflow whose outputs live in content-addressed stage folders under GPTFLOW_HOME (reused
when their manifest matches); this run's own folder `<home>/runs/<run name>/` holds its report.
"""

from __future__ import annotations

from prefect import flow

from flows.classify import finetune_classifier_flow
from flows.evaluate import evaluate_responses_flow
from flows.export import export_flow, export_lm_flow
from flows.inspect import inspect_flow
from flows.instruct import finetune_instructions
from flows.params import PipelineParams
from flows.prepare import prepare_instructions, prepare_spam
from flows.pretrain import load_gpt2_flow, pretrain_flow
from tasks.pipeline import write_run_report


@flow(name="pipeline", log_prints=True)
def pipeline(params: PipelineParams = PipelineParams()) -> dict:
    spam = prepare_spam(params.spam)
    instructions = prepare_instructions(config=params.instructions)

    if params.weights == "pretrain":
        base = pretrain_flow(params.corpus, params.pretrain)
    else:
        base = load_gpt2_flow(params.gpt2_source)
    init = f"checkpoint:{base['model']}"

    classifier = finetune_classifier_flow(spam["out_dir"], params.classifier.model_copy(update={"init": init}))
    bundle = export_flow(classifier["best"], spam["out_dir"], params.export)

    instruct = finetune_instructions(instructions["out_dir"], params.instruct.model_copy(update={"init": init}))
    judged = evaluate_responses_flow(instruct["responses"], judge=params.judge, require_judge=params.require_judge)
    lm_bundle = export_lm_flow(instruct["model"], instructions["out_dir"], params.export)

    inspect_base = inspect_flow(base["model"], params.probe_text, params.inspect)
    inspect_instruct = inspect_flow(instruct["model"], params.probe_text, params.inspect)

    stages = {
        "data-spam": spam,
        "data-instructions": instructions,
        "base-model": base,
        "classifier": classifier,
        "export": bundle,
        "instruct": instruct,
        "evaluate": judged.model_dump(),
        "export-lm": lm_bundle,
        "inspect-base": inspect_base,
        "inspect-instruct": inspect_instruct,
    }
    return write_run_report(params, stages)
