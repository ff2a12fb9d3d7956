"""Tune efficiency: ASHA against running every sampled configuration to the full budget.

Both searches are real `pipeline tune` searches (Ray Tune trials, each a TorchTrainer run of the
pipeline on the Parquet digits) over the same space with the same seed and number of samples, so
both see the same configurations, one trial at a time. Measured in one run:
  * epochs each search spent in total;
  * the best validation accuracy each found (best over a trial's epochs, as the search ranks);
  * whether ASHA's best is within 0.5 points of the exhaustive search's best;
  * epochs spent until each search had finished a configuration within 0.5 points of that best.

    .venv/bin/python jobs/bench/tune_efficiency.py [--samples 12] [--epochs 12] [--out FILE]

Target: ASHA spends at most 40% of the full-budget epochs and still finds a configuration within
0.5 points of the best. Prints a table and writes JSON (default jobs/bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 0.005  # 0.5 accuracy points


def space_settings(samples: int, scheduler: str, seed: int, grace: int, rf: float) -> dict:
    return {
        "metric": "val_acc",
        "num_samples": samples,
        "max_concurrent_trials": 1,
        "search": "random",
        "scheduler": scheduler,
        "asha": {"grace_period": grace, "reduction_factor": rf},
        "seed": seed,
        "space": {
            "train.lr": {"loguniform": [0.001, 1.0]},
            "train.label_smoothing": {"uniform": [0.0, 0.3]},
            "train.batch_size": {"choice": [32, 64, 128]},
        },
    }


def epochs_to_find(trials, target: float) -> int | None:
    """Epochs spent (trials in the order they ran) until one finished within reach of `target`."""
    spent = 0
    for t in sorted(trials, key=lambda t: t.trial_id):  # one at a time: id order = run order
        spent += t.epochs
        if t.state == "completed" and t.best is not None and t.best >= target - TOLERANCE:
            return spent
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--grace", type=int, default=1)
    parser.add_argument("--reduction-factor", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=REPO / "jobs/bench/results/tune_efficiency.json"
    )
    args = parser.parse_args()

    from rich.console import Console

    from pipeline.config import load_config
    from pipeline.data.sources import WriteOptions, prepare_digits
    from pipeline.tune import parse_search_space, run_tune

    console = Console(stderr=True)
    work = Path(tempfile.mkdtemp(prefix="tune-bench-"))
    data = work / "digits"
    prepare_digits(WriteOptions(out=str(data)))
    cfg = load_config(
        REPO / "jobs/configs/digits.yaml",
        [
            f"data.uri={data}",
            f"run.storage_path={work / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            f"train.epochs={args.epochs}",
            "scaling.num_workers=1",
            "tracking.log_model=false",  # the searches compare epochs; no model to register
            "registry.model_name=",
        ],
    )
    results = {}
    for label, scheduler in (("full", "none"), ("asha", "asha")):
        space = parse_search_space(
            space_settings(args.samples, scheduler, args.seed, args.grace, args.reduction_factor),
            cfg,
            f"bench space ({label})",
        )
        started = time.time()
        summary = run_tune(cfg, space, name=f"bench-{label}", console=console)
        results[label] = {
            "seconds": time.time() - started,
            "trials": summary.trials,
            "epochs": summary.epochs_total,
            "best": max((t.best for t in summary.trials if t.best is not None), default=None),
        }

    full, asha = results["full"], results["asha"]
    best = full["best"]
    same_configs = sorted(str(t.params) for t in full["trials"]) == sorted(
        str(t.params) for t in asha["trials"]
    )
    asha_best = max(
        (t.best for t in asha["trials"] if t.state == "completed" and t.best is not None),
        default=None,
    )
    found = asha_best is not None and asha_best >= best - TOLERANCE
    ratio = asha["epochs"] / full["epochs"]
    to_find = {k: epochs_to_find(results[k]["trials"], best) for k in ("full", "asha")}

    rows = [
        ("trials", args.samples, args.samples),
        ("epochs spent", full["epochs"], asha["epochs"]),
        ("best val_acc", f"{best:.4f}", f"{asha_best:.4f}" if asha_best else "-"),
        ("epochs until within 0.5 pt", to_find["full"], to_find["asha"]),
        ("stopped early", 0, sum(t.state == "stopped" for t in asha["trials"])),
        ("wall time (s)", f"{full['seconds']:.0f}", f"{asha['seconds']:.0f}"),
    ]
    print(f"{'':<28}{'full budget':>14}{'ASHA':>10}")
    for name, a, b in rows:
        print(f"{name:<28}{a!s:>14}{b!s:>10}")
    print(f"same configurations in both searches: {same_configs}")
    print(
        f"ASHA epochs / full-budget epochs = {ratio:.3f} (target <= 0.40); "
        f"ASHA's best within 0.5 points of the best: {found}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "samples": args.samples,
        "epochs": args.epochs,
        "asha": {"grace_period": args.grace, "reduction_factor": args.reduction_factor},
        "seed": args.seed,
        "epochs_full": full["epochs"],
        "epochs_asha": asha["epochs"],
        "ratio": ratio,
        "best_full": best,
        "best_asha": asha_best,
        "asha_within_tolerance": found,
        "epochs_to_find": to_find,
        "same_configurations": same_configs,
        "trials": {
            k: [
                {"id": t.trial_id, "state": t.state, "epochs": t.epochs, "best": t.best, **t.params}
                for t in results[k]["trials"]
            ]
            for k in ("full", "asha")
        },
    }
    args.out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0 if (ratio <= 0.40 and found) else 1


if __name__ == "__main__":
    sys.exit(main())
