"""Soak run: reinforce real CIFAR-10 rows with a share of them corrupted, kill the job at random moments, resume it each
time, and check that nothing was lost, duplicated or changed.

1. The first ``--rows`` rows of ../shared/datasets/cifar10, with ``--corrupt`` of them (chosen with a fixed seed)
   replaced by undecodable images (truncated JPEGs, random bytes, empty cells).
2. An uninterrupted ``dr-hf reinforce --on-bad-row skip`` run: the reference.
3. The same command, killed with SIGKILL at ``--kills`` random moments (fixed seed) and rerun each time to the end.
4. Checks: output rows + error-report rows = source rows, each exactly once; every shard and error report identical
   to the reference; ``dr-hf verify`` passes.

    python scripts/soak.py                 # 2,000 rows, 5% corrupted, 3 kills -> results/soak.md
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from results_md import write_markdown  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_source(args, folder):
    import datasets

    src = datasets.load_dataset(args.dataset, split="train").select(range(args.rows))
    src = src.cast_column("image", datasets.Image(decode=False))
    rng = np.random.default_rng(args.seed)
    bad = set(rng.choice(args.rows, size=int(round(args.corrupt * args.rows)), replace=False).tolist())

    def corrupt(row, i):
        if i not in bad:
            return row
        data = row["image"]["bytes"]
        kind = i % 3
        damaged = data[: len(data) // 3] if kind == 0 else bytes(rng.integers(0, 256, 64, dtype=np.uint8)) if kind == 1 else b""
        return {"image": {"bytes": damaged, "path": None}}

    src = src.map(corrupt, with_indices=True).cast_column("image", datasets.Image())
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    for k in range(4):
        src.shard(4, k, contiguous=True).to_parquet(os.path.join(folder, "data", f"train-{k:05d}-of-00004.parquet"))
    return sorted(bad)


def make_teacher(folder):
    import timm
    import torch
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10, pretrained_cfg_overlay=dict(
        input_size=(3, 32, 32), interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3))
    save_for_hf(model, folder, safe_serialization=True)
    return f"timm:local-dir:{folder}"


def command(args, source, out, teacher):
    return [sys.executable, "-m", "dr_hf", "reinforce", source, "--output", out, "--teacher", teacher,
            "--num-samples", str(args.num_samples), "--topk", "3", "--rows-per-shard", str(args.rows_per_shard),
            "--on-bad-row", "skip", "--augment", "imagenet+rare", "--seed", "0", "--quiet"]


def folder_state(out):
    """Shard tables (as pyarrow tables) and error reports, by file name."""
    import pyarrow.parquet as pq

    tables = {n: pq.read_table(os.path.join(out, "data", n)) for n in sorted(os.listdir(os.path.join(out, "data")))}
    errors = {}
    if os.path.isdir(os.path.join(out, "errors")):
        for n in sorted(os.listdir(os.path.join(out, "errors"))):
            with open(os.path.join(out, "errors", n)) as f:
                errors[n] = [json.loads(line) for line in f if line.strip()]
    return tables, errors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "cifar10"))
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--corrupt", type=float, default=0.05, help="share of rows whose image is made undecodable")
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--num-samples", type=int, default=4)
    ap.add_argument("--rows-per-shard", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "soak.md"))
    args = ap.parse_args()

    from dr_hf.verify import verify

    work = args.work or tempfile.mkdtemp(prefix="dr-hf-soak-")
    source, teacher = os.path.join(work, "source"), make_teacher(os.path.join(work, "teacher"))
    bad = make_source(args, source)
    ref, soaked = os.path.join(work, "reference"), os.path.join(work, "soaked")
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    t0 = time.time()
    subprocess.run(command(args, source, ref, teacher), check=True, env=env)
    reference_seconds = time.time() - t0

    # Kill moments: after a random number of further shards is complete, plus a random fraction of one shard's time,
    # so every kill lands inside the job (mid-shard), never after it has finished.
    rng = np.random.default_rng(args.seed + 1)
    total = len(os.listdir(os.path.join(ref, "data")))
    per_shard = reference_seconds / total
    targets = sorted(rng.choice(np.arange(1, total), size=min(args.kills, total - 1), replace=False).tolist())
    landed, runs = [], 0

    def complete():
        folder = os.path.join(soaked, "data")
        return len([n for n in os.listdir(folder) if n.endswith(".parquet")]) if os.path.isdir(folder) else 0

    for target in targets:
        proc = subprocess.Popen(command(args, source, soaked, teacher), env=env, stderr=subprocess.DEVNULL)
        runs += 1
        while complete() < target and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0.0, 0.8)) * per_shard)
        running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        landed.append({"after shard": target, "still running when killed": running, "shards complete": complete()})
    subprocess.run(command(args, source, soaked, teacher), check=True, env=env)
    runs += 1

    ref_tables, ref_errors = folder_state(ref)
    tables, errors = folder_state(soaked)
    identical = ref_tables.keys() == tables.keys() and all(ref_tables[n].equals(tables[n]) for n in tables) \
        and ref_errors == errors
    stored = [int(i) for t in tables.values() for i in t.column("dr_index").to_pylist()]
    skipped = [int(e["dr_index"]) for rows in errors.values() for e in rows]
    once = sorted(stored + skipped) == list(range(args.rows))
    skipped_bad = sorted(e["dr_index"] for rows in errors.values() for e in rows if e["column"] == "image")
    report = verify(soaked, rows=8)
    lines = [
        "# Soak: corrupted rows, kill -9 at random moments, resume", "",
        f"`python scripts/soak.py --rows {args.rows} --kills {args.kills}` on the first {args.rows} rows of "
        f"../shared/datasets/cifar10, {len(bad)} of them ({args.corrupt:.0%}) made undecodable (truncated JPEG, random "
        f"bytes, empty), `--on-bad-row skip`, `imagenet+rare`, N={args.num_samples}, {args.rows_per_shard} rows per "
        "shard, a tiny timm teacher. 2 CPU cores.", "",
        "| check | result |", "|---|---|",
        f"| reference (uninterrupted) run | {reference_seconds:.1f} s, {len(ref_tables)} shards |",
        f"| kills (each after a random number of shards, mid-shard) | {landed} |",
        f"| runs of the interrupted job | {runs} |",
        f"| output rows + error-report rows = source rows ({len(stored)} + {len(skipped)} = {args.rows}), each exactly once: "
        f"{'yes' if once else 'NO'} | |",
        f"| corrupted rows reported as bad images | {len(skipped_bad)} of {len(bad)}: {'all' if skipped_bad == bad else 'NOT all'} |",
        f"| shards and error reports identical to the uninterrupted run: {'yes' if identical else 'NO'} | |",
        f"| dr-hf verify (values, card vs shards, 8 rows replayed) | {'OK' if report.ok else report.problems} |",
    ]
    write_markdown(args.out, lines)
    if not (identical and once and skipped_bad == bad and report.ok and all(k["still running when killed"] for k in landed)):
        sys.exit(1)


if __name__ == "__main__":
    main()
