"""Edge benchmark: file size, latency (batch 1) and throughput (batch 32), test accuracy for torch fp32,
torch int8, ONNX fp32 and ONNX int8, with ratios against torch fp32 measured in the same run.

    .venv/bin/python -m bench.edge [--checkpoint CLASSIFIER] [--shape gpt2-small] [--threads 2]

--checkpoint: a fine-tuned classifier or ensemble (`gptflow finetune-classifier`'s best.pt). For an ensemble it
also measures the alternative to its one ONNX graph: each member as its own ONNX session, with their class
probabilities averaged in numpy (the largest probability difference between the two ways is printed).
--shape PRESET: a classifier of that preset with random weights instead (speed and size only;
accuracy is then agreement with torch fp32). Batch 1 uses a test message of median token length (a typical
SMS), batch 32 the first 32 test messages padded to their longest. The 2 cores are shared with other work:
timings are noisy.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data.spam import spam_dir
from edge.runtime import run_session, session
from edge.text import pad_batch, softmax
from gptflow.settings import get_settings
from gptflow.splits import read_labelled, read_labels
from gptflow.tokenizer import get_tokenizer
from model.classifier import ClassifierEnsemble, SequenceClassifier, encode_split, predict_logits
from model.config import GPTConfig
from model.files import CLASSIFIERS
from model.gpt import GPTModel
from model.onnx_export import export_onnx
from model.opener import open_model
from model.quantize import quantize_onnx, quantize_torch_dynamic


def timed(fn, repeats: int, warmup: int = 3) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return np.asarray(out)


def state_size(module: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", help="a classifier or ensemble best.pt (or its folder)")
    parser.add_argument("--shape", default=None, help="preset with random weights (e.g. gpt2-small)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = get_settings()
    data_dir = spam_dir(settings)
    labels = read_labels(data_dir)
    if args.shape:
        torch.manual_seed(0)
        model = SequenceClassifier(GPTModel(GPTConfig.from_preset(args.shape)), len(labels)).eval()
        max_length, name = 128, f"{args.shape} (random weights)"
    else:
        if not args.checkpoint:
            parser.error("give --checkpoint (a classifier) or --shape (random weights)")
        loaded = open_model(args.checkpoint, CLASSIFIERS).classifier()
        model, max_length = loaded.model, loaded.max_length
        name = f"{model.cfg.n_layers}x{model.cfg.emb_dim} classifier {loaded.path}"
    test = encode_split(read_labelled(data_dir / "test.csv", labels), get_tokenizer(), max_length)
    y = np.asarray(test.labels)
    lengths = [len(r) for r in test.ids]
    typical = test.ids[int(np.argsort(lengths)[len(lengths) // 2])]
    one = pad_batch([typical])
    many = pad_batch(test.ids[:32])

    tmp = Path(tempfile.mkdtemp(prefix="gptflow-bench-edge-"))
    fp32_path, int8_path = tmp / "model.onnx", tmp / "model.int8.onnx"
    export_onnx(model, fp32_path, {"bench": "edge"})
    quantize_onnx(fp32_path, int8_path)
    qmodel = quantize_torch_dynamic(model)

    def torch_runner(m):
        def run(batch):
            with torch.no_grad():
                return m(torch.from_numpy(batch[0]), torch.from_numpy(batch[1]))

        return run

    def ort_runner(path):
        sess = session(path, args.threads)
        return lambda batch: sess.run(["logits"], {"input_ids": batch[0], "attention_mask": batch[1]}), sess

    variants = {}
    variants["torch fp32"] = (torch_runner(model), lambda: predict_logits(model, test.ids), state_size(model))
    variants["torch int8"] = (torch_runner(qmodel), lambda: predict_logits(qmodel, test.ids), state_size(qmodel))
    for label, path in (("onnx fp32", fp32_path), ("onnx int8", int8_path)):
        run, sess = ort_runner(path)
        variants[label] = (run, lambda s=sess: run_session(s, test.ids), path.stat().st_size)

    if isinstance(model, ClassifierEnsemble):
        for label, quantized in (("fp32", False), ("int8", True)):
            sessions = []
            for i, member in enumerate(model.members):
                path = tmp / f"member{i}.onnx"
                export_onnx(member, path, {"bench": "edge"})
                if quantized:
                    quantize_onnx(path, path.with_suffix(".int8.onnx"))
                    path = path.with_suffix(".int8.onnx")
                sessions.append(session(path, args.threads))
            size = sum(p.stat().st_size for p in tmp.glob("member*.onnx") if (".int8" in p.name) == quantized)
            variants[f"onnx {label}, members averaged in numpy"] = (
                lambda batch, ss=sessions: averaged([s.run(["logits"], dict(zip(INPUTS, batch)))[0] for s in ss]),
                lambda ss=sessions: averaged([run_session(s, test.ids) for s in ss]),
                size,
            )

    rows, ref_pred, outputs = [], None, {}
    for label, (run, all_logits, size) in variants.items():
        lat = timed(lambda: run(one), args.repeats)
        thr = timed(lambda: run(many), max(5, args.repeats // 5), warmup=1)
        outputs[label] = all_logits()
        pred = outputs[label].argmax(1)
        ref_pred = pred if ref_pred is None else ref_pred
        acc = float((pred == y).mean()) if not args.shape else float((pred == ref_pred).mean())
        rows.append(
            {
                "variant": label,
                "size_mb": size / 1e6,
                "p50_ms": 1e3 * np.median(lat),
                "p95_ms": 1e3 * np.percentile(lat, 95),
                "msgs_per_s": 32 / np.median(thr),
                "acc": acc,
            }
        )
    base = rows[0]
    print(
        f"\n{name}; batch 1 = {len(typical)} tokens, batch 32 = {many[0].shape[1]} tokens wide; "
        f"{args.threads} threads; test n={len(y)}"
    )
    acc_name = "agreement vs torch fp32" if args.shape else "test accuracy"
    print(
        "| variant | file MB | smaller x | p50 ms (b=1) | p95 ms | faster x (b=1) | msgs/s (b=32) | faster x (b=32) "
        f"| {acc_name} |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['size_mb']:.1f} | {base['size_mb'] / r['size_mb']:.2f} | {r['p50_ms']:.2f} | "
            f"{r['p95_ms']:.2f} | {base['p50_ms'] / r['p50_ms']:.2f} | {r['msgs_per_s']:.0f} | "
            f"{r['msgs_per_s'] / base['msgs_per_s']:.2f} | {100 * r['acc']:.2f}% |"
        )
    for kind in ("fp32", "int8"):
        if (other := outputs.get(f"onnx {kind}, members averaged in numpy")) is not None:
            diff = np.abs(softmax(outputs[f"onnx {kind}"]) - softmax(other)).max()
            print(f"onnx {kind}: one ensemble graph vs members averaged in numpy, max |probability diff| {diff:.2e}")


INPUTS = ("input_ids", "attention_mask")


def averaged(logits: list[np.ndarray]) -> np.ndarray:
    """The log of the members' mean class probability: what the ensemble graph returns."""
    return np.log(np.mean([softmax(x) for x in logits], axis=0))


if __name__ == "__main__":
    main()
