"""Where the reinforce job's time goes: cProfile of `dr_hf.reinforce` with EfficientNet-Lite0 (random weights, bf16) at
N=64, rendering batched on the GPU, rows prepared as by default (threads, on a GPU); cProfile sees the main thread
only; prints the 28 most expensive functions by own time.

    python scripts/profile_job.py --dataset PATH [--device cuda]
"""

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

import torch

from bench_gpu import lite0_spec, repeated_rows  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    import datasets

    from dr_hf import ReinforceConfig, TeacherEnsemble, make_pipeline
    from dr_hf.reinforce import reinforce

    datasets.disable_progress_bars()
    rows = repeated_rows(args.dataset, args.rows)
    tmp = tempfile.mkdtemp()
    teachers = TeacherEnsemble.from_specs([lite0_spec(tmp)], device=args.device, precision="bf16")
    config = ReinforceConfig(augment="imagenet+rrc", augmentations=make_pipeline("imagenet+rrc").config(),
                             teachers=teachers.specs, num_samples=64, topk=10, seed=0, num_classes=1000,
                             precision="bf16", render="batched")
    reinforce(rows.select(range(min(16, args.rows))), config, teachers, os.path.join(tmp, "warm"), batch_size=16,
              show_progress=False, render_device=args.device)
    profile = cProfile.Profile()
    profile.enable()
    t0 = time.perf_counter()
    reinforce(rows, config, teachers, os.path.join(tmp, "job"), show_progress=False,
              render_device=args.device)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    profile.disable()
    print(f"{args.rows} rows x 64 samples in {seconds:.2f} s: {args.rows * 64 / seconds:,.0f} samples/s")
    pstats.Stats(profile).sort_stats("tottime").print_stats(28)


if __name__ == "__main__":
    main()
