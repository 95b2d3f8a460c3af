"""Wall time of a sweep of independent classifier trainings: one after the other in this process, then in parallel
as the sweep flow runs them, on a local Dask cluster of --workers processes (tasks/parallel.py).

    GPTFLOW_MIRROR=../shared/mirror .venv/bin/python -m bench.parallel_sweep [--preset mini] [--epochs 1] \
        [--seeds 1 2] [--workers 2]

The spam data stage is prepared first (and Prefect's temporary API server started) outside the timings. Each mode
trains into its own empty outputs folder under a new temporary folder (printed; Prefect's state is kept there too),
so nothing is reused; the parallel time includes starting and
stopping the cluster. Sequential runs use torch's default threads, each Dask worker its share of the CPUs. The cores
may be shared with other work: wall times are noisy (the 1-minute load average before and after each mode is
printed beside its time), and so are accuracies in the last digits: the same seed on another number of torch threads
sums in another order.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from gptflow.settings import get_settings


def use_home(path: Path) -> None:
    os.environ["GPTFLOW_HOME"] = str(path)
    get_settings.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="parallel-sweep-"))
    os.environ.update(
        GPTFLOW_DASK_WORKERS=str(args.workers),
        PREFECT_HOME=str(tmp / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",  # a cold start on a busy machine, as the CLI allows
    )
    os.environ.pop("PREFECT_API_URL", None)

    from cli.common import table
    from data.config import SpamDataConfig
    from flows.classify import finetune_classifier_flow
    from flows.prepare import prepare_spam
    from flows.sweep import sweep_classifier_flow
    from model.configs import ClassifierConfig

    config = ClassifierConfig(preset=args.preset, trainable="all", lr=3e-4, epochs=args.epochs, keep="last")
    use_home(tmp / "data")
    data_dir = prepare_spam(SpamDataConfig())["out_dir"]

    use_home(tmp / "sequential")
    load0, sequential, each_s = os.getloadavg()[0], [], []
    for seed in args.seeds:
        t0 = time.perf_counter()
        sequential.append(finetune_classifier_flow(data_dir, config.model_copy(update={"seed": seed})))
        each_s.append(time.perf_counter() - t0)
    sequential_s, sequential_load = sum(each_s), (load0, os.getloadavg()[0])

    use_home(tmp / "parallel")
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    parallel = sweep_classifier_flow(data_dir, config, {"seed": args.seeds})
    parallel_s, parallel_load = time.perf_counter() - t0, (load0, os.getloadavg()[0])

    by_seed = {v["fields"]["seed"]: v for v in parallel}
    rows = [
        {
            "seed": seed,
            "sequential val/test": "/".join(
                f"{100 * s['metrics'][k]['accuracy']:.2f}%" for k in ("validation", "test")
            ),
            "parallel val/test": "/".join(
                f"{100 * by_seed[seed]['metrics'][k]['accuracy']:.2f}%" for k in ("validation", "test")
            ),
        }
        for seed, s in zip(args.seeds, sequential)
    ]
    print(table(rows))
    print(
        f"{len(args.seeds)} x {args.preset}, {args.epochs} epoch(s), {os.cpu_count()} CPUs: sequential "
        f"{sequential_s:.1f} s ({' + '.join(f'{t:.1f}' for t in each_s)}; "
        f"load {sequential_load[0]:.1f} -> {sequential_load[1]:.1f}), parallel on "
        f"{args.workers} Dask workers {parallel_s:.1f} s (load {parallel_load[0]:.1f} -> {parallel_load[1]:.1f}): "
        f"{sequential_s / parallel_s:.2f}x; outputs in {tmp}"
    )


if __name__ == "__main__":
    main()
