"""The end-to-end pipeline: data check -> data -> base model (pretrained, GPT-2 weights or a Hugging Face model) ->
classifier -> edge bundle; instruction model -> judge, LM edge bundle and GGUF bundle (llama.cpp, Ollama); each
edge bundle then challenges its registry's champion (the LM judged against it pairwise when a judge answers), and a
new LM champion goes to Ollama when a name is set; last,
a look inside the base and the instruction model on a probe text.

Entry point for `gptflow pipeline`, `make run` and the `prefect.yaml` deployments: `flows/pipeline.py:pipeline`.
Every stage is a subflow whose outputs live in content-addressed stage folders under GPTFLOW_HOME (reused
when their manifest matches); this run's own folder `<home>/runs/<run name>/` holds its report.
"""

from __future__ import annotations

from prefect import flow

from eval.champion import PairwiseChallenge
from flows.classify import finetune_classifier_flow
from flows.evaluate import evaluate_responses_flow
from flows.export import export_flow, export_gguf_flow, export_lm_flow
from flows.inspect import inspect_flow
from flows.instruct import finetune_instructions
from flows.limits import time_limit
from flows.params import PipelineParams
from flows.prepare import prepare_csv, prepare_instructions, prepare_spam
from flows.pretrain import load_gpt2_flow, load_hf_flow, pretrain_flow
from tasks.alerts import ALERT_HOOKS
from tasks.pipeline import write_run_report
from tasks.prepare import check_data_source
from tasks.registry import challenge_champion, publish_champion, registry_task


@flow(name="pipeline", log_prints=True, **ALERT_HOOKS)
def pipeline(params: PipelineParams = PipelineParams()) -> dict:
    with time_limit(params.timeout_minutes, "the pipeline run"):
        return run_stages(params)


def run_stages(params: PipelineParams) -> dict:
    sources = {role: check_data_source(role, ref) for role, ref in params.data_sources().items()}
    if params.classifier_data == "spam":
        labelled = prepare_spam(params.spam)
    else:
        labelled = prepare_csv(sources["classifier"]["path"], params.csv_config())
    instructions_file = None if sources["instructions"]["status"] == "pinned" else sources["instructions"]["path"]
    instructions = prepare_instructions(instructions_file, params.instructions)

    if params.weights == "pretrain":
        base = pretrain_flow(sources["corpus"]["path"], params.pretrain)
    elif params.weights_kind == "hf":  # its tokenizer (and chat template) travels in the checkpoint
        base = load_hf_flow(params.gpt2_source)
    else:
        base = load_gpt2_flow(params.gpt2_source)
    init = f"checkpoint:{base['model']}"

    classifier = finetune_classifier_flow(labelled["out_dir"], params.classifier.model_copy(update={"init": init}))
    bundle = export_flow(classifier["best"], labelled["out_dir"], params.export)

    instruct = finetune_instructions(instructions["out_dir"], params.instruct.model_copy(update={"init": init}))
    judged = evaluate_responses_flow(instruct["responses"], judge=params.judge, require_judge=params.require_judge)
    lm_bundle = export_lm_flow(instruct["model"], instructions["out_dir"], params.export)
    gguf_bundle = export_gguf_flow(instruct["model"], params.export)

    promotions = {}
    if params.promotion.enabled:
        rules = params.promotion
        name = registry_task("classifier", params.data_sources()["classifier"])
        promotions["classifier"] = challenge_champion(
            "classifier", name, bundle["bundle"], labelled["out_dir"], rules.classifier
        )
        name = registry_task("lm", params.instructions_data)
        pairwise = None
        if rules.pairwise.enabled:
            generation = params.instruct.generation_key()
            pairwise = PairwiseChallenge(
                responses=instruct["responses"], generation=generation, judge=params.judge, rule=rules.pairwise
            )
        promotions["lm"] = challenge_champion(
            "lm", name, lm_bundle["bundle"], instructions["out_dir"], rules.lm, judged.summary, pairwise
        )
        promotions["lm"]["ollama"] = publish_champion(promotions["lm"], gguf_bundle["bundle"], rules.ollama_model)

    inspect_base = inspect_flow(base["model"], params.probe_text, params.inspect)
    inspect_instruct = inspect_flow(instruct["model"], params.probe_text, params.inspect)

    stages = {
        "data-classifier": labelled,
        "data-instructions": instructions,
        "base-model": base,
        "classifier": classifier,
        "export": bundle,
        "instruct": instruct,
        "evaluate": judged.model_dump(),
        "export-lm": lm_bundle,
        "export-gguf": gguf_bundle,
        "inspect-base": inspect_base,
        "inspect-instruct": inspect_instruct,
    }
    return write_run_report(params, stages, sources, promotions)
