"""The reinforce job's memory and throughput, on real ImageNet images with a real teacher.

1. Peak RSS of `dr-hf reinforce` on the first 300 and the first 1000 rows of ../shared/datasets/imagenet-sample (each run
   in its own process, same shard size): memory must not grow with the dataset (goal: within 10%); and at a teacher
   batch of 256 instead of the CPU default 64.
2. The CPU default teacher batch: the README's example job (EfficientNet-Lite0 + Lite1, N=8) at 64 and at 256.
3. Throughput of the job (decode, sample, render, teacher, top-K, parquet) against the bare teacher forward on the very
   same teacher batches, measured in this one process, alternating (goal: >= 0.9). Rendering inline (the CPU default)
   and with one render thread (the GPU default).

    python scripts/bench_reinforce.py
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

from results_md import host, write_markdown  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample")


def _status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def run_job(job_args, rows, teacher_batch_size):
    """Run ``dr-hf reinforce DATASET --limit rows --teacher-batch-size B JOB_ARGS`` in a child process: its peak RSS
    (kernel, ``wait4``), its peak anonymous RSS (sampled every 20 ms from /proc: heap and tensors, without the
    memory-mapped source files), seconds, and the samples/s the job reports (its compute, without start-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "dr_hf", "reinforce", job_args.dataset, "--output", tmp, "--limit", str(rows),
               "--teacher-batch-size", str(teacher_batch_size), "--topk", "10", "--quiet", *job_args.extra]
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        anon = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            anon = max(anon, _status_kb(proc.pid, "RssAnon"))
            time.sleep(0.02)
        out = proc.stdout.read()
        if status != 0:
            raise SystemExit(f"{cmd} failed ({status})")
        rate = float(out.split("throughput: ")[1].split(", ")[1].split(" samples/s")[0])
        return usage.ru_maxrss / 1024, anon / 1024, time.time() - t0, rate


def throughput(args):
    """(job samples/s, bare teacher samples/s) per render-thread setting, measured alternately in this process."""
    import datasets
    import torch

    from dr_hf import ReinforceConfig, TeacherEnsemble, make_pipeline
    from dr_hf import reinforce
    from dr_hf.reinforcer import Reinforcer

    teachers = TeacherEnsemble.from_specs([args.teacher])
    ds = datasets.load_dataset(args.dataset, split="train").select(range(args.rows))
    pipe = make_pipeline(args.augment)
    config = ReinforceConfig(augment=args.augment, augmentations=pipe.config(), teachers=[args.teacher],
                             num_samples=args.num_samples, topk=10, seed=0, num_classes=teachers.num_classes,
                             teacher_batch_size=args.teacher_batch_size, rows_per_shard=args.rows)

    # The job's exact teacher batches, rendered once, for the bare forward.
    job = Reinforcer(config, teachers, num_rows=len(ds))
    raw = ds.cast_column("image", datasets.Image(decode=False))
    batches = []

    def capture(inputs, **kwargs):
        batches.append({o: x.clone() for o, x in inputs.items()})
        return real(inputs, **kwargs)

    real = teachers.log_probs
    teachers.log_probs = capture
    step = job.block_rows * max(1, 8 // job.block_rows)  # map batches of whole teacher blocks
    for start in range(0, len(ds), step):
        job.compute(raw[start:start + step], list(range(start, min(len(ds), start + step))))
    teachers.log_probs = real
    samples = len(ds) * args.num_samples
    assert sum(next(iter(b.values())).shape[0] for b in batches) == samples

    def bare():
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                teachers.log_probs(b)
        return samples / (time.perf_counter() - t0)

    def full(threads):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            reinforce(ds, config, teachers, tmp, show_progress=False, render_threads=threads)
            return samples / (time.perf_counter() - t0)

    bare()  # warm-up
    results = {"bare": [], 0: [], 1: []}
    for _ in range(args.repeats):
        results["bare"].append(bare())
        results[1].append(full(1))
        results[0].append(full(0))
    return {k: max(v) for k, v in results.items()}, len(batches), job.block_rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default=DATASET)
    ap.add_argument("--teacher", default="efficientnet-lite0")
    ap.add_argument("--augment", default="rrc+flip")
    ap.add_argument("--rows", type=int, default=16, help="rows for the throughput comparison")
    ap.add_argument("--num-samples", type=int, default=32, help="N for the throughput comparison")
    ap.add_argument("--teacher-batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-rows", type=int, nargs=2, default=[300, 1000],
                    help="two job sizes; from 3 shards on, a shard is written while the next is computed, as at scale")
    ap.add_argument("--rss-num-samples", type=int, default=1)
    ap.add_argument("--rows-per-shard", type=int, default=100)
    ap.add_argument("--batch-rows", type=int, default=96, help="rows for the teacher batch size comparison")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_reinforce.md"))
    args = ap.parse_args()

    rss = []
    memory_job = argparse.Namespace(dataset=args.dataset, extra=[
        "--teacher", args.teacher, "--augment", args.augment, "--num-samples", str(args.rss_num_samples),
        "--rows-per-shard", str(args.rows_per_shard)])
    for rows, batch in ((args.rss_rows[0], 64), (args.rss_rows[1], 64), (args.rss_rows[1], 256)):
        runs = [run_job(memory_job, rows, batch) for _ in range(args.repeats)]
        mb, anon, seconds = max(r[0] for r in runs), max(r[1] for r in runs), min(r[2] for r in runs)
        rss.append((rows, batch, mb, anon, seconds, min(r[1] for r in runs)))
        print(f"{rows} rows, teacher batches of {batch}: peak RSS {mb:.0f} MB, anonymous {anon:.0f} MB, {seconds:.0f} s",
              flush=True)
    # The CPU default teacher batch: the README's example job (two teachers, N=8) at B=64 and B=256, alternating
    ensemble_job = argparse.Namespace(dataset=args.dataset, extra=[
        "--teacher", "efficientnet-lite0", "--teacher", "efficientnet-lite1", "--augment", "imagenet+rrc",
        "--num-samples", "8"])
    by_batch = {64: [], 256: []}
    for _ in range(args.repeats):
        for batch in by_batch:
            by_batch[batch].append(run_job(ensemble_job, args.batch_rows, batch))
            print(f"teacher batches of {batch}: {by_batch[batch][-1]}", flush=True)
    best = {b: (max(r[3] for r in runs), max(r[1] for r in runs)) for b, runs in by_batch.items()}
    rates, num_batches, block_rows = throughput(args)
    print(rates, flush=True)

    import torch

    lines = [
        "# The reinforce job: memory and throughput",
        "",
        f"`python scripts/bench_reinforce.py` on this machine ({host()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads, no GPU); real images from `imagenet-sample`, teacher `{args.teacher}`, "
        f"preset `{args.augment}`.",
        "",
        "## Peak memory does not grow with the dataset",
        "",
        f"`dr-hf reinforce imagenet-sample --limit M --num-samples {args.rss_num_samples} --rows-per-shard {args.rows_per_shard} "
        "--teacher-batch-size B`, each in its own process. Peak RSS from `wait4` counts the pages of the memory-mapped "
        "source parquet that were read (file-backed, reclaimable); peak anonymous RSS (sampled from /proc every 20 ms) "
        "is the job's own memory; the largest of "
        f"{args.repeats} runs each. Both sizes have a shard written while the next one is computed, as every job of more "
        "than one shard has. A teacher batch holds all samples of as many rows as fit, within a shard, and its "
        "activations are most of the peak: B=64 is the CPU default; with "
        f"N={args.rss_num_samples}, B=256 gives forwards of {min(256 // args.rss_num_samples, args.rows_per_shard)} samples.",
        "",
        "| rows | teacher batch size B | peak RSS (MB) | peak anonymous RSS (MB) | smallest run's anonymous peak | wall (s) |",
        "|---|---|---|---|---|---|",
        *[f"| {r} | {b} | {mb:.0f} | {anon:.0f} | {least:.0f} | {s:.0f} |" for r, b, mb, anon, s, least in rss],
        "",
        f"- peak RSS {args.rss_rows[1]} rows / {args.rss_rows[0]} rows: **{rss[1][2] / rss[0][2]:.3f}**; "
        f"anonymous: **{rss[1][3] / rss[0][3]:.3f}** (goal: at most 1.10). The same job's peak varies from run to run "
        "(the smallest run's column), by more than any growth.",
        f"- the same {args.rss_rows[1]} rows with B=256: peak anonymous RSS {rss[2][3]:.0f} MB "
        f"({rss[2][3] / rss[1][3]:.2f}x B=64's): `--teacher-batch-size` sets the job's memory, not the dataset",
        "",
        "## The teacher batch size on a CPU",
        "",
        f"`dr-hf reinforce imagenet-sample --limit {args.batch_rows} --teacher efficientnet-lite0 --teacher "
        "efficientnet-lite1 --augment imagenet+rrc --num-samples 8 --teacher-batch-size B` (the README's example job), "
        f"each in its own process, alternating, best of {args.repeats}: the samples/s the job reports and its peak RSS.",
        "",
        "| teacher batch size B | samples/s | peak RSS (MB) |",
        "|---|---|---|",
        *[f"| {b} | {rate:.1f} | {mb:.0f} |" for b, (rate, mb) in best.items()],
        "",
        f"- B=64 (the CPU default) / B=256 (the GPU default): **{best[64][0] / best[256][0]:.2f}x** the samples/s, "
        f"{best[64][1] / best[256][1]:.2f}x the peak memory",
        "",
        "## Job throughput against the bare teacher forward",
        "",
        f"{args.rows} rows x N={args.num_samples} = {args.rows * args.num_samples} samples in {num_batches} teacher batches "
        f"(teacher batch size {args.teacher_batch_size}: a teacher batch holds all samples of {block_rows} row(s), a teacher "
        "block, and never crosses blocks, which keeps the output independent of the map batch size). The bare forward "
        "runs the job's own rendered batches; the job "
        "includes decoding, parameter sampling, rendering, the teacher, top-K and writing parquet. Best of "
        f"{args.repeats}, alternating, in one process.",
        "",
        "| what | samples/s | / bare teacher |",
        "|---|---|---|",
        f"| bare teacher forward | {rates['bare']:.1f} | 1.000 |",
        f"| job, rendering inline (`--render-threads 0`, the CPU default) | {rates[0]:.1f} | **{rates[0] / rates['bare']:.3f}** |",
        f"| job, one render thread (`--render-threads 1`, the GPU default) | {rates[1]:.1f} | {rates[1] / rates['bare']:.3f} |",
        "",
        "Goal: job / bare >= 0.9. On a CPU-only machine a render thread and the teacher share the same cores, so the "
        "overlap buys little and the thread is off by default; on a GPU the teacher runs on the device while the thread "
        "renders the next batch.",
    ]
    write_markdown(args.out, lines)


if __name__ == "__main__":
    main()
