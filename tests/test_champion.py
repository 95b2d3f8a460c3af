"""Champion vs challenger: the decision rule, scoring bundles as they ship, and the promotion task end to end
(registry, the UI table, alerts)."""

from __future__ import annotations

import json
import shutil

import pytest
from classify_data import write_splits
from conftest import tiny_config

from eval.champion import ChampionError, PromotionConfig, PromotionRule, decide, score_classifier_bundle
from gptflow.settings import get_settings, load_settings
from gptflow.tokenizer import tokenizer_files
from model.configs import ExportConfig
from model.finetune_classifier import finetune
from model.onnx_export import export_classifier
from scripts.alert_receiver import AlertReceiver
from tasks.registry import registry_task

ACCURACY = PromotionRule(metric="accuracy", margin=0.01, alert_worse_by=0.05)


def test_decide_promotes_only_past_the_margin_and_alerts_only_past_the_threshold():
    assert decide({"accuracy": 0.9}, None, ACCURACY).reason == "no champion yet"
    better = decide({"accuracy": 0.93}, {"accuracy": 0.9}, ACCURACY)
    assert better.decision == "promote" and better.improvement == pytest.approx(0.03)
    assert better.reason == "better: accuracy 0.9300 vs champion 0.9000"
    within = decide({"accuracy": 0.905}, {"accuracy": 0.9}, ACCURACY)
    assert within.decision == "keep" and "less than the margin 0.01" in within.reason and not within.alert
    tied = decide({"accuracy": 0.9}, {"accuracy": 0.9}, ACCURACY)
    assert (tied.decision, tied.alert, tied.reason) == ("keep", False, "no better: accuracy 0.9000 vs champion 0.9000")
    slightly = decide({"accuracy": 0.88}, {"accuracy": 0.9}, ACCURACY)
    assert slightly.decision == "keep" and not slightly.alert
    worse = decide({"accuracy": 0.8}, {"accuracy": 0.9}, ACCURACY)
    assert worse.decision == "keep" and worse.alert and worse.reason.startswith("worse by 0.1000")


def test_perplexity_is_better_when_lower():
    rule = PromotionRule(metric="val_perplexity", margin=0.5, alert_worse_by=2.0)
    assert decide({"val_perplexity": 11.0}, {"val_perplexity": 12.0}, rule).decision == "promote"
    assert decide({"val_perplexity": 11.8}, {"val_perplexity": 12.0}, rule).decision == "keep"
    assert decide({"val_perplexity": 15.0}, {"val_perplexity": 12.0}, rule).alert
    unjudged = decide({"val_perplexity": 1.0, "n": 5}, None, PromotionRule(metric="judge_score"))
    assert (unjudged.decision, unjudged.reason) == ("keep", "no judge_score score this run (scored: val_perplexity)")


def test_promotion_config_checks_each_registry_metric():
    with pytest.raises(ValueError, match="a classifier is compared on accuracy or macro_f1, not 'val_perplexity'"):
        PromotionConfig(classifier={"metric": "val_perplexity"})
    with pytest.raises(ValueError, match="a language model is compared on val_perplexity or judge_score"):
        PromotionConfig(lm={"metric": "accuracy"})


@pytest.mark.parametrize(
    ("kind", "source", "name"),
    [
        ("classifier", "sms-spam", "classifier-spam"),
        ("classifier", "/data/My SMS export.csv", "classifier-my-sms-export"),
        ("classifier", "https://example.com/exports/tickets.tsv?token=1", "classifier-tickets"),
        ("lm", "instruction-data", "lm-instructions"),
        ("lm", "/data/support_answers.jsonl", "lm-support_answers"),
    ],
)
def test_registry_task_names_are_stable_per_source(kind, source, name):
    assert registry_task(kind, source) == name


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tokenizer, mirror, topic_classifier):
    """A learned classifier of 3 classes exported with int8 (the session's topic classifier), and a barely trained
    one on the same data (near-uniform logits, which int8 rounding would flip) exported fp32 only."""
    root = tmp_path_factory.mktemp("champion")
    data = topic_classifier["data"]
    config = tiny_config("classifier", trainable="all", lr=1e-6, epochs=1, batch_size=8, patience=None)
    weak = finetune(data, root / "weak", config, tokenizer=tokenizer)
    export = export_classifier(
        weak.best,
        data,
        root / "weak-export",
        ExportConfig(int8=False),
        tokenizer=tokenizer,
        tokenizer_files=tokenizer_files(load_settings(mirror=mirror)),
    )
    return {"data": data, "root": root, "strong": topic_classifier["bundle"], "weak": export["bundle"]}


@pytest.mark.slow
def test_bundles_are_scored_as_they_ship(bundles):
    strong = score_classifier_bundle(bundles["strong"], bundles["data"])
    weak = score_classifier_bundle(bundles["weak"], bundles["data"])
    assert (strong["model"], weak["model"], strong["n"], weak["n"]) == ("int8", "fp32", 102, 102)
    assert strong["accuracy"] > 0.9 > weak["accuracy"] + 0.2
    assert 0 <= weak["macro_f1"] <= weak["accuracy"] + 0.34
    other = write_splits(bundles["root"] / "two-classes", (4, 2, 4))
    (other / "labels.json").write_text(json.dumps({"ham": 0, "spam": 1}))
    with pytest.raises(ChampionError, match=r"classifies \['billing', 'food', 'sport'\]; .* has classes \['ham'"):
        score_classifier_bundle(bundles["strong"], other)


@pytest.mark.slow
def test_challengers_promote_keep_alert_and_rescore_on_new_data(prefect_harness, settings, bundles, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client

    from gptflow.registry import Registry
    from tasks.registry import challenge_champion

    @flow
    def challenge(bundle: str, data_dir: str) -> dict:
        return challenge_champion("classifier", "classifier-topics", bundle, data_dir, ACCURACY)

    with AlertReceiver() as receiver:
        monkeypatch.setenv("GPTFLOW_ALERT_URL", receiver.url)
        get_settings.cache_clear()
        data = str(bundles["data"])
        first = challenge(str(bundles["weak"]), data)
        assert (first["status"], first["champion"], first["verdict"]["reason"]) == (
            "promoted",
            "v0001",
            "no champion yet",
        )
        second = challenge(str(bundles["strong"]), data)
        assert (second["status"], second["champion_before"], second["champion"]) == ("promoted", "v0001", "v0002")
        assert second["verdict"]["reason"].startswith("better: accuracy")
        third = challenge(str(bundles["weak"]), data)
        assert (third["status"], third["champion"]) == ("kept", "v0002") and third["verdict"]["alert"]
        assert third["metrics"]["champion"] == second["challenger"]  # kept from the promotion: not re-scored
        fourth = challenge(str(bundles["strong"]), data)
        assert fourth["status"] == "kept" and fourth["verdict"]["reason"] == (
            "the challenger is the champion v0002 (same bundle)"
        )
        events = [(r["json"]["title"].split(":")[1].strip(), r["json"]["message"]) for r in receiver.requests]
        assert [e for e, _ in events] == ["promoted", "promoted", "challenger-worse"]
        assert "stage: promote classifier-topics" in events[2][1] and "reason: worse by" in events[2][1]

        new_data = shutil.copytree(bundles["data"], bundles["root"] / "data-v2")  # the session's data stays as it is
        (new_data / "test.csv").write_text("text,label\ninvoice refund bank,0\nfootball goal team,2\n")
        fifth = challenge(str(bundles["weak"]), str(new_data))
        assert fifth["data_key"] != first["data_key"] and fifth["metrics"]["champion"]["n"] == 2  # re-scored
        get_settings.cache_clear()

    champion = Registry("classifier-topics").record("v0002")
    assert set(champion["scores"]) == {first["data_key"], fifth["data_key"]}
    with get_client(sync_client=True) as client:
        tables = [a for a in client.read_artifacts() if a.key == "classifier-topics-challenger-vs-champion"]
    assert len(tables) >= 5
    rows = json.loads(tables[-1].data) if isinstance(tables[-1].data, str) else tables[-1].data
    assert rows[0]["metric"] == "accuracy (decides)" and rows[-1]["metric"] == "decision"
