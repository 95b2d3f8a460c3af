"""Verified edge bundles, and classification with onnxruntime.

A bundle folder holds model.onnx (and model.int8.onnx), its tokenizer's files and manifest.json (the sha256 of
every other file and the bundle's kind). Either kind carries GPT-2's encoder.json and vocab.bpe (manifest
`tokenizer: "gpt2"`, the default of bundles written before other vocabularies) or the model's own Hugging Face
tokenizer files (`tokenizer: "hf"`, their names in `tokenizer_files`); a classifier bundle adds labels.json, a
language-model bundle (edge.lm) the onnxruntime-genai files and a card. Every hash is checked before anything is
loaded: a changed, missing or unlisted-but-required file refuses the whole bundle.

tiktoken is imported only for a bundle that reads GPT-2's vocabulary; a bundle with its own tokenizer reads text
through `tokenizers` (edge.hf_tokenizer), and its rows are padded here with the bundle's pad id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from edge import BundleError, finite_logits, sha256_file
from edge.text import PAD_ID as GPT2_PAD_ID
from edge.text import encode_texts, load_gpt2_encoding, pad_batch, softmax

BUNDLE_FORMAT = "gptflow-edge-bundle/1"
BUNDLE_MANIFEST = "manifest.json"
ORT_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
GGUF_FILE = "model.gguf"
CLASSIFIER, LM, GGUF = "classifier", "lm", "gguf"
# Files each kind must list (int8 is optional); bundles written before kinds existed are classifiers.
GPT2_FILES = ("encoder.json", "vocab.bpe")
HF_TOKENIZER = "tokenizer.json"
REQUIRED = {  # and, for an ONNX kind, its tokenizer's files (`tokenizer_files`); a GGUF holds its tokenizer
    CLASSIFIER: (ORT_FILES["fp32"], "labels.json"),
    LM: (ORT_FILES["fp32"],),
    GGUF: (GGUF_FILE, "Modelfile"),  # run by llama.cpp or Ollama, not by edge/
}
RUN_WITH = {
    CLASSIFIER: "python -m edge classify BUNDLE TEXT...",
    LM: 'python -m edge generate BUNDLE "instruction"',
    GGUF: "gptflow publish NAME BUNDLE, or llama-cli -m BUNDLE/model.gguf",
}


def bundle_kind(manifest: dict) -> str:
    return manifest.get("kind", CLASSIFIER)


def check_classifier_fields(manifest: dict, manifest_path: Path) -> None:
    """What the classifier runtime reads from a manifest: labels {name: id 0..n-1} and max_length > 0."""
    labels = manifest.get("labels")
    ids = [v for v in labels.values() if type(v) is int] if isinstance(labels, dict) else []
    if not labels or sorted(ids) != list(range(len(labels))):
        raise BundleError(f"{manifest_path}: 'labels' must map each class name to an id 0..n-1, got {labels!r}")
    length = manifest.get("max_length")
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise BundleError(f"{manifest_path}: 'max_length' must be a positive integer, got {length!r}")


def tokenizer_files(manifest: dict, manifest_path: Path | str = BUNDLE_MANIFEST) -> tuple[str, ...]:
    """The files a bundle's tokenizer is read from: GPT-2's two (`tokenizer` "gpt2", the default of bundles written
    before other vocabularies), or the Hugging Face files its manifest lists (`tokenizer` "hf")."""
    kind = manifest.get("tokenizer", "gpt2")
    if kind == "gpt2":
        return GPT2_FILES
    names = manifest.get("tokenizer_files")
    if kind != "hf" or not isinstance(names, list) or HF_TOKENIZER not in names:
        raise BundleError(
            f"{manifest_path}: 'tokenizer' must be \"gpt2\", or \"hf\" with 'tokenizer_files' listing "
            f"{HF_TOKENIZER}; got tokenizer {kind!r}, tokenizer_files {names!r}"
        )
    return tuple(names)


def read_manifest(bundle: str | Path, kind: str | None = None) -> dict:
    """The bundle's manifest, checked without reading the files: its format, its kind (`kind` when given), and every
    file its kind needs listed, beside it and present."""
    bundle = Path(bundle)
    manifest_path = bundle / BUNDLE_MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{bundle} is not an edge bundle: no {BUNDLE_MANIFEST} (make one with `gptflow export`)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{manifest_path}: expected format {BUNDLE_FORMAT!r}")
    found = bundle_kind(manifest)
    if found not in REQUIRED:
        raise BundleError(f"{manifest_path}: unknown bundle kind {found!r}; kinds: {', '.join(REQUIRED)}")
    if kind is not None and found != kind:
        what = {CLASSIFIER: "a classifier", LM: "a language-model", GGUF: "a GGUF"}[found]
        raise BundleError(f"{bundle} is {what} bundle, not {kind}; run it with `{RUN_WITH[found]}`")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise BundleError(f"{manifest_path}: 'files' must map each file name to its sha256; refusing the bundle")
    if found == CLASSIFIER:
        check_classifier_fields(manifest, manifest_path)
    tokenizer = tokenizer_files(manifest, manifest_path) if found != GGUF else ()
    required = REQUIRED[found][:1] + tokenizer + REQUIRED[found][1:]
    unlisted = [name for name in required if name not in files]
    if unlisted:
        raise BundleError(f"{manifest_path} does not list {', '.join(unlisted)}; refusing the bundle")
    for name in files:
        if Path(name).name != name:
            where = "outside the bundle" if Path(name).is_absolute() or ".." in Path(name).parts else "into a folder"
            raise BundleError(
                f"{manifest_path}: file {name!r} points {where}; a bundle's files sit beside its manifest: "
                "refusing the bundle"
            )
        if not (bundle / name).is_file():
            raise BundleError(f"{bundle}: {name} is missing; refusing the bundle")
    return manifest


def verify_bundle(bundle: str | Path, kind: str | None = None) -> dict:
    """The bundle's manifest (`read_manifest`), after checking the sha256 of every file it lists."""
    manifest = read_manifest(bundle, kind)
    for name, digest in manifest["files"].items():
        path = Path(bundle) / name
        if sha256_file(path) != digest:
            raise BundleError(
                f"{path} does not match its sha256 in {BUNDLE_MANIFEST} (altered after export); "
                "refusing the bundle: export it again"
            )
    return manifest


def session(onnx_path: str | Path, threads: int | None = None):
    """A CPU onnxruntime session (`threads`: intra-op threads, default onnxruntime's choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def run_session(sess, ids: Sequence[Sequence[int]], batch_size: int = 32, pad_id: int = GPT2_PAD_ID) -> np.ndarray:
    """Logits (N, classes) in input order; rows batched by length so that little padding is computed, padded with
    `pad_id` (the classifier's tokenizer's, as `model.classifier.predict_logits` pads)."""
    order = np.argsort([len(r) for r in ids], kind="stable")
    out: np.ndarray | None = None
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        input_ids, mask = pad_batch([ids[j] for j in idx], pad_id)
        logits = sess.run(["logits"], {"input_ids": input_ids, "attention_mask": mask})[0]
        if out is None:
            out = np.zeros((len(ids), logits.shape[1]), dtype=np.float32)
        out[idx] = logits
    return out


class EdgeClassifier:
    """A verified bundle's tokenizer (GPT-2's through tiktoken, or the model's own through tokenizers), labels, pad
    id and ONNX session (fp32, or int8 with `int8=True`)."""

    def __init__(self, bundle: str | Path, *, int8: bool = False, threads: int | None = None) -> None:
        self.bundle = Path(bundle)
        self.manifest = verify_bundle(self.bundle, CLASSIFIER)
        labels = self.manifest["labels"]
        self.names = [name for name, _ in sorted(labels.items(), key=lambda kv: kv[1])]
        self.max_length = int(self.manifest["max_length"])
        self.pad_id = int(self.manifest.get("pad_id", GPT2_PAD_ID))
        names = tokenizer_files(self.manifest, self.bundle / BUNDLE_MANIFEST)
        self.hf = self.manifest.get("tokenizer", "gpt2") == "hf"
        if self.hf:
            from edge.hf_tokenizer import HFTokenizer

            self.tokenizer = HFTokenizer.from_files(read_tokenizer_texts(self.bundle, names), origin=self.bundle)
            if self.tokenizer.eos_id is None and self.tokenizer.pad_id is None:
                raise BundleError(f"{self.bundle}: the tokenizer names no end or pad token to read an empty text as")
        else:
            self.tokenizer = load_gpt2_encoding(self.bundle / names[0], self.bundle / names[1])
        name = ORT_FILES["int8" if int8 else "fp32"]
        if name not in self.manifest["files"]:
            raise BundleError(f"{self.bundle} holds no int8 model; export it with `gptflow export --int8`")
        self.model_path = self.bundle / name
        self.session = session(self.model_path, threads)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text as the classifier was trained on them (`edge.text.encode_texts`)."""
        return encode_texts(self.tokenizer, texts, self.max_length)

    def logits(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        logits = run_session(self.session, self.encode(texts), batch_size, self.pad_id)
        return finite_logits(logits, self.model_path)

    def predict(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        """(label, probability of that label) per text."""
        probs = softmax(self.logits(texts))
        return [(self.names[k], float(p[k])) for p, k in zip(probs, probs.argmax(axis=1))]


def read_tokenizer_texts(bundle: Path, names: Sequence[str]) -> dict[str, str]:
    """The bundle's tokenizer files as texts (name -> text), as `HFTokenizer.from_files` takes them."""
    files = {}
    for name in names:
        try:
            files[name] = (bundle / name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleError(f"{bundle / name} cannot be read as UTF-8 text: {exc}") from None
    return files
