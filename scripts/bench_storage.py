"""Storage per augmentation sample, per preset, on real ImageNet images with a real teacher.

Reinforces the first --rows rows of ../shared/datasets/imagenet-sample with EfficientNet-Lite0 (N samples, top-10)
for each preset and writes results/storage.md: bytes per sample of the reinforcement columns (from the parquet
footers), split into parameters and top-K, next to ml-dr's published 65-110 bytes.

    python scripts/bench_storage.py --rows 64 --num-samples 32
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

from dr_hf.stats import summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--teacher", default="efficientnet-lite0")
    ap.add_argument("--presets", nargs="+", default=["rrc+flip", "imagenet+rare", "imagenet+rare+mix"])
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "storage.md"))
    args = ap.parse_args()
    lines = [
        "# Storage per augmentation sample",
        "",
        f"`python scripts/bench_storage.py --rows {args.rows} --num-samples {args.num_samples}`: first {args.rows} rows of "
        f"imagenet-sample, teacher `{args.teacher}`, N={args.num_samples}, K={args.topk}; bytes of the `dr_*` columns in "
        "the parquet files (zstd, from the footers) per augmentation sample. Goals: <= 32 (rrc+flip), <= 48 (all); "
        "ml-dr: 65 (rrc+flip) to 73-110 (all).",
        "",
        "| preset | bytes/sample | params | top-K | teacher top-1 agreement (unmixed) | samples/s (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for preset in args.presets:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            subprocess.run([sys.executable, "-m", "dr_hf", "reinforce", args.dataset, "--output", tmp, "--limit", str(args.rows),
                            "--teacher", args.teacher, "--augment", preset, "--num-samples", str(args.num_samples),
                            "--topk", str(args.topk), "--quiet"], check=True)
            s = summarize(tmp)
            rate = s["samples"] / (time.time() - t0)
            agree = f"{s['teacher_top1_agreement']:.1%}" if "teacher_top1_agreement" in s else "n/a (all mixed)"
            lines.append(f"| `{preset}` | {s['bytes_per_sample']} | {s['bytes_per_sample_params']} | {s['bytes_per_sample_topk']} | {agree} | {rate:.1f} |")
            print(lines[-1], flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
