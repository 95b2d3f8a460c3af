#!/usr/bin/env bash
# One-command GPU check for a machine with an NVIDIA GPU and a fresh clone:
#
#     bash scripts/gpu_check.sh
#
# 1. nvidia-smi -L, then .venv as `make setup` makes it (requirements.lock: torch==2.13.0, whose PyPI wheel for
#    Linux x86_64 is a CUDA build), and a check that this torch sees the GPU;
# 2. bench.train_throughput on cuda at gpt2-small and gpt2-medium shapes (context 1024, batch 8): book-style
#    baseline and ours, fp32 (TF32 matmuls) vs bf16: tokens/s, MFU against matmul peaks measured on the GPU,
#    peak memory; then the fp32-vs-bf16 loss curve of config A (skipped if tiny Shakespeare can't be fetched);
# 3. bench.loss_head --device cuda: fused vs plain LM-head loss, and which one pretraining uses on CUDA;
# 4. a pretraining smoke run (the-verdict, preset tiny, 20 steps, --device cuda): 2 ranks under torchrun when
#    2+ GPUs are visible, else 1 process; its metrics.json must say it trained on cuda with that many ranks;
# 5. `gptflow inspect` of that model on cuda and on the CPU: same next tokens, attention and lens within 1e-3;
# 6. a LoRA instruction fine-tune of that model on cuda (10 steps, every linear layer), then `gptflow merge` of it.
#
# Everything printed also goes to outputs/gpu_check/gpu_check-<UTC time>.log. A failed step does not stop the
# later ones; the exit status is non-zero when any step failed (or at once when there is no usable GPU).
# Environment: PYTHON (the interpreter that makes .venv, default python3), GPTFLOW_MIRROR (offline downloads),
# GPU_CHECK_VARIANTS (bench.train_throughput --variants; add ours-bf16-compile to time torch.compile too).

set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
PYTHON=${PYTHON:-python3}
VENV=.venv
BIN=$VENV/bin
STAMP=$VENV/.installed
VARIANTS=${GPU_CHECK_VARIANTS:-baseline,baseline-bf16,ours-fp32,ours-bf16}

# The Makefile's environment (Prefect inside the project, analytics off, our loggers in Prefect's).
export PREFECT_HOME=${PREFECT_HOME:-$ROOT/.prefect}
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-300}
export TOKENIZERS_PARALLELISM=false
export PREFECT_LOGGING_EXTRA_LOGGERS=${PREFECT_LOGGING_EXTRA_LOGGERS:-gptflow,data,model,eval}
export PYTHONUNBUFFERED=1 # the log shows each line as it comes

WHEN=$(date -u +%Y%m%d-%H%M%S)
LOG_DIR=$ROOT/outputs/gpu_check
LOG=$LOG_DIR/gpu_check-$WHEN.log
SMOKE_HOME=$LOG_DIR/home-$WHEN # a fresh GPTFLOW_HOME: the smoke run trains instead of reusing a product

failed=()
summary=()

# step NAME COMMAND...: run it, note ok/FAILED and its time; later steps run either way.
step() {
	local name=$1 start=$SECONDS rc=0
	shift
	echo
	echo "=== $name"
	echo "+ $*"
	"$@" || rc=$?
	local took=$((SECONDS - start))
	if ((rc == 0)); then
		summary+=("ok      $name (${took} s)")
	else
		summary+=("FAILED  $name (exit $rc, ${took} s)")
		failed+=("$name")
	fi
	echo "=== $name: $([[ $rc == 0 ]] && echo ok || echo "FAILED (exit $rc)") in ${took} s"
}

die() {
	echo "gpu_check: $*" >&2
	exit 1
}

# The Makefile's `setup` target; the same steps by hand where make is missing.
setup_venv() {
	if command -v make >/dev/null; then
		make --no-print-directory setup PYTHON="$PYTHON"
		return
	fi
	if [[ -f $STAMP && $STAMP -nt pyproject.toml && $STAMP -nt requirements.lock ]]; then
		return 0
	fi
	{ test -x "$BIN/python" || "$PYTHON" -m venv "$VENV"; } &&
		"$BIN/python" -m pip install -q --upgrade pip &&
		"$BIN/python" -m pip install -q -r requirements.lock &&
		"$BIN/python" -m pip install -q --no-deps -e . &&
		touch "$STAMP"
}

check_torch_cuda() {
	"$BIN/python" - <<'PY'
import sys

import torch

print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s) visible")
if torch.version.cuda is None:
    sys.exit(
        "gpu_check: .venv holds a CPU-only torch (a venv made on a CPU machine, or pip finding a local CPU wheel); "
        "remove .venv and rerun with pip reaching PyPI, whose torch==2.13.0 for Linux x86_64 is a CUDA build"
    )
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch (CUDA {torch.version.cuda}) cannot use the GPU: driver too old, or none visible?")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
print(f"bf16 supported: {torch.cuda.is_bf16_supported()}")
PY
}

# check_smoke HOME WORLD: the smoke run's metrics.json says 20 steps on cuda by WORLD ranks, finite loss.
# shellcheck disable=SC2329 # called through step
check_smoke() {
	"$BIN/python" - "$1" "$2" <<'PY'
import json
import math
import sys
from pathlib import Path

home, world = Path(sys.argv[1]), int(sys.argv[2])
found = sorted(home.glob("pretrain/*/metrics.json"))
if len(found) != 1:
    sys.exit(f"expected one pretrain/*/metrics.json under {home}, found {len(found)}")
final = json.loads(found[0].read_text())["final"]
print({k: final.get(k) for k in ("steps", "device", "precision", "world_size", "global_batch", "val_loss")})
problems = []
if not str(final.get("device", "")).startswith("cuda"):
    problems.append(f"device {final.get('device')!r} is not cuda")
if final.get("world_size") != world:
    problems.append(f"world_size {final.get('world_size')} != {world}")
if final.get("steps") != 20:
    problems.append(f"steps {final.get('steps')} != 20")
if not math.isfinite(final.get("val_loss") or math.nan):
    problems.append(f"val_loss {final.get('val_loss')} is not finite")
sys.exit("; ".join(problems) or None)
PY
}

# check_inspect CUDA_DIR CPU_DIR: the two inspection reports agree (next tokens, attention, logit lens).
# shellcheck disable=SC2329 # called through step
check_inspect() {
	"$BIN/python" - "$1" "$2" <<'PY'
import json
import sys
from pathlib import Path

import numpy as np

cuda, cpu = (Path(d) for d in sys.argv[1:3])
a, b = (json.loads((d / "report.json").read_text()) for d in (cuda, cpu))
problems = []
if [t["id"] for t in a["next_token"]] != [t["id"] for t in b["next_token"]]:
    problems.append("next-token top-k ids differ")
probs = max(abs(x["probability"] - y["probability"]) for x, y in zip(a["next_token"], b["next_token"]))
attention = float(np.abs(np.load(cuda / "attention.npy") - np.load(cpu / "attention.npy")).max())
lens = max(abs(x - y) for r, s in zip(a["logit_lens"]["top1_prob"], b["logit_lens"]["top1_prob"]) for x, y in zip(r, s))
print(f"max |diff|: next-token probability {probs:.2e}, attention {attention:.2e}, lens top-1 probability {lens:.2e}")
problems += [f"{name} differs by {v:.2e}" for name, v in (("probability", probs), ("attention", attention), ("lens", lens)) if v > 1e-3]
sys.exit("; ".join(problems) or None)
PY
}

main() {
	echo "gptflow GPU check, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), host $(hostname)"
	command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver on this machine"
	echo "+ nvidia-smi -L"
	nvidia-smi -L || die "nvidia-smi -L failed"
	nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv || true
	echo
	echo "+ make setup (.venv from requirements.lock)"
	setup_venv || die "creating .venv failed"
	check_torch_cuda || exit 1
	local ngpu
	ngpu=$("$BIN/python" -c 'import torch; print(torch.cuda.device_count())') || die "counting GPUs failed"

	step "train throughput, gpt2-small and gpt2-medium shapes, fp32 vs bf16" \
		"$BIN/python" -m bench.train_throughput --device cuda --preset gpt2-small --preset gpt2-medium \
		--context 1024 --batch 8 --variants "$VARIANTS" --rounds 2 --curve-steps 200
	step "LM-head loss, fused vs plain" "$BIN/python" -m bench.loss_head --device cuda

	local world=1
	local -a smoke=("$BIN/gptflow" pretrain --corpus the-verdict --preset tiny --steps 20 --device cuda)
	if ((ngpu >= 2)); then
		world=2
		smoke=("$BIN/torchrun" --standalone --nproc-per-node 2 --no-python "${smoke[@]}")
	fi
	step "pretrain smoke, $world process(es) on cuda" env GPTFLOW_HOME="$SMOKE_HOME" "${smoke[@]}"
	step "pretrain smoke trained on cuda with world_size $world" check_smoke "$SMOKE_HOME" "$world"

	local model
	model=$(find "$SMOKE_HOME/pretrain" -name model.pt 2>/dev/null | head -n 1)
	for device in cuda cpu; do
		step "inspect the smoke model on $device" env GPTFLOW_HOME="$SMOKE_HOME" "$BIN/gptflow" inspect "${model:-missing}" \
			"Every effort moves you" --device "$device" --out "$SMOKE_HOME/inspect-$device"
	done
	step "inspect on cuda equals inspect on the CPU" check_inspect "$SMOKE_HOME/inspect-cuda" "$SMOKE_HOME/inspect-cpu"

	step "LoRA instruction fine-tune of the smoke model on cuda" env GPTFLOW_HOME="$SMOKE_HOME" "$BIN/gptflow" \
		finetune-instructions --init "checkpoint:${model:-missing}" --trainable lora --lora-targets all --max-steps 10 \
		--device cuda --max-test-entries 2 --max-new-tokens 8
	local tuned
	tuned=$(find "$SMOKE_HOME/instruct" -name model.pt 2>/dev/null | head -n 1)
	step "merge the LoRA checkpoint" env GPTFLOW_HOME="$SMOKE_HOME" "$BIN/gptflow" merge "${tuned:-missing}"

	echo
	echo "=== summary"
	printf '%s\n' "${summary[@]}"
	echo "log: $LOG"
	if ((${#failed[@]})); then
		echo "GPU check FAILED: ${failed[*]}"
		return 1
	fi
	echo "GPU check passed"
}

mkdir -p "$LOG_DIR" || exit 1
main "$@" 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
