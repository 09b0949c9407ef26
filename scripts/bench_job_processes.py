"""The reinforce job on one GPU fed by 1, 2 or 4 job processes (`torchrun --nproc_per_node P dr-hf reinforce ...
--device cuda:0`), against the bare bf16 teacher forward on the job's batches, in one run. Where one host thread cannot
keep a GPU busy (the teacher's kernel launches, parameter sampling, decoding all run on it), several processes can.

Teacher: timm's `tf_efficientnet_lite0` with random weights (the architecture's speed), bf16, N=64, `imagenet+rrc`,
rendering batched on the GPU. Wall time of the whole command (process start, teacher load and card included).

    python scripts/bench_job_processes.py --dataset PATH     # -> results/bench_job_processes.md
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from results_md import write_markdown  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--rows", type=int, default=1024, help="rows of the job (the dataset repeated if smaller)")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_job_processes.md"))
    args = ap.parse_args()

    import datasets
    import timm
    from safetensors.torch import save_file

    from dr_hf import TeacherEnsemble

    datasets.disable_progress_bars()
    tmp = tempfile.mkdtemp()
    src = datasets.load_dataset(args.dataset, split="train").select_columns(["image", "label"])
    src = src.cast_column("label", datasets.Value("int64"))
    rows = datasets.concatenate_datasets([src] * -(-args.rows // len(src))).select(range(args.rows))
    folder = os.path.join(tmp, "source")
    rows.to_parquet(os.path.join(folder, "data", "train-00000-of-00001.parquet"))
    torch.manual_seed(0)
    weights = os.path.join(tmp, "lite0.safetensors")
    save_file(timm.create_model("tf_efficientnet_lite0").state_dict(), weights)
    spec = f"timm:tf_efficientnet_lite0@{weights}"
    n = args.num_samples

    teacher = TeacherEnsemble.from_specs([spec], device=args.device, precision="bf16")
    x = torch.randn(n, 3, 224, 224, device=args.device)
    for _ in range(3):
        teacher.log_probs({0: x})
    steps = 64
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        teacher.log_probs({0: x})
    bare = steps * n / (time.perf_counter() - t0)
    del teacher

    rates = {}
    for procs in args.processes:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)] if procs > 1 else [sys.executable]
        command = launch + ["-m", "dr_hf", "reinforce", folder, "--output", os.path.join(tmp, f"out{procs}"),
                            "--teacher", spec, "--augment", "imagenet+rrc", "--num-samples", str(n), "--topk", "10",
                            "--precision", "bf16", "--device", args.device, "--render-device", args.device,
                            "--rows-per-shard", str(max(16, args.rows // 8)), "--batch-size", "64", "--quiet"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // (2 * procs)))}
        t0 = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode:
            print(done.stdout[-2000:], done.stderr[-4000:])
            raise SystemExit(f"{procs} process(es): exit {done.returncode}")
        rates[procs] = args.rows * n / seconds
        print(f"{procs} process(es): {rates[procs]:,.0f} samples/s ({seconds:.1f} s)", flush=True)

    lines = ["# One GPU, several job processes", "",
             f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, {os.cpu_count()} host CPUs. "
             f"{args.rows} rows of real ImageNet images (imagenet-sample, repeated), N={n}, `imagenet+rrc`, rendered "
             "batched on the GPU, teacher `tf_efficientnet_lite0` (random weights) in bf16; each process takes its "
             "own shards (`--device cuda:0` puts them all on the one GPU). Whole command, start-up included.", "",
             "| job processes | samples/s | / bare teacher |", "|---|---|---|"]
    lines += [f"| {p} | {r:,.0f} | {r / bare:.2f} |" for p, r in rates.items()]
    lines += ["", f"Bare teacher forward on the job's batches ({n} samples): {bare:,.0f} samples/s.", "",
              "Command: `python scripts/bench_job_processes.py`."]
    write_markdown(args.out, lines)


if __name__ == "__main__":
    main()
