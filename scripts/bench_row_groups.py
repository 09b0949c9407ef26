"""Row groups of a reinforced shard: memory a stream holds, and how finely a stream can be split.

Reinforces an ImageNet-sized shard (2,048 rows: the 1,000 real photos of ../shared/datasets/imagenet-sample, repeated)
with the tiny `hf:` teacher, N=4, so the shard is dr-hf's own writing (row groups as `datasets` sizes them, at most
100 MB of Arrow data each); the same table is also written by the same writer in one row group, as dr-hf wrote every
shard before. Each file is then streamed whole (`load_dataset(folder, streaming=True)`, Arrow rows) in a fresh
process, alternating, and its peak resident memory above the process's after import is taken (best of --repeats).
Writes results/bench_row_groups.md.

    python scripts/bench_row_groups.py
"""

import argparse
import os
import subprocess
import sys
import tempfile

import datasets
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_render import tiny_vit  # noqa: E402
from results_md import host, write_markdown  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# peak memory from the process's own high-water mark (VmHWM: getrusage's ru_maxrss starts from the parent's at fork)
STREAM = """
import sys, time, datasets
def peak_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
ds = datasets.load_dataset(sys.argv[1], split="train", streaming=True).with_format("arrow")
before, t0, rows = peak_mb(), time.perf_counter(), 0
for table in ds.iter(batch_size=1):
    rows += table.num_rows
print(rows, peak_mb() - before, time.perf_counter() - t0)
"""


def stream(folder):
    out = subprocess.run([sys.executable, "-c", STREAM, folder], capture_output=True, text=True, check=True).stdout
    rows, peak_mb, seconds = out.split()
    return int(rows), float(peak_mb), float(seconds)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_row_groups.md"))
    args = ap.parse_args()
    from dr_hf import ReinforceConfig, TeacherEnsemble, reinforce
    from dr_hf.job import write_parquet

    source = datasets.load_dataset(args.dataset, split="train")
    rows = datasets.concatenate_datasets([source] * (args.rows // len(source) + 1)).select(range(args.rows))
    with tempfile.TemporaryDirectory() as tmp:
        teachers = TeacherEnsemble.from_specs([tiny_vit(os.path.join(tmp, "teacher"))], device="cpu")
        config = ReinforceConfig.for_teachers(teachers, "imagenet+rrc", num_samples=4, rows_per_shard=args.rows)
        folders = {"dr-hf (datasets' row groups)": os.path.join(tmp, "groups"), "one row group": os.path.join(tmp, "one")}
        reinforce(rows, config, teachers, folders["dr-hf (datasets' row groups)"], show_progress=False)
        shard = os.path.join(folders["dr-hf (datasets' row groups)"], "data", "train-00000-of-00001.parquet")
        table = pq.read_table(shard)
        # the same shard through the same writer, with a row-group limit it never reaches: one group, as before
        os.makedirs(os.path.join(folders["one row group"], "data"))
        datasets.config.MAX_ROW_GROUP_SIZE = "1TB"
        write_parquet(datasets.Dataset.from_parquet(shard), os.path.join(folders["one row group"], "data",
                                                                         os.path.basename(shard)), config)
        found = {name: dict(peak=float("inf"), seconds=float("inf")) for name in folders}
        for _ in range(args.repeats):
            for name, folder in folders.items():
                n, peak, seconds = stream(folder)
                assert n == args.rows, (name, n)
                found[name]["peak"] = min(found[name]["peak"], peak)
                found[name]["seconds"] = min(found[name]["seconds"], seconds)
        for name, folder in folders.items():
            meta = pq.read_metadata(os.path.join(folder, "data", os.path.basename(shard)))
            found[name]["groups"] = meta.num_row_groups
            found[name]["shards"] = datasets.load_dataset(folder, split="train", streaming=True).reshard().n_shards
        mb = table.nbytes / 1e6
    new, old = found["dr-hf (datasets' row groups)"], found["one row group"]
    lines = [
        "# Row groups of a reinforced shard",
        "",
        f"One shard of {args.rows} rows ({len(source)} real ImageNet photos of imagenet-sample, repeated; {mb:.0f} MB of "
        f"Arrow data), reinforced with `imagenet+rrc`, N=4, streamed whole in a fresh process "
        f"(`load_dataset(folder, streaming=True)`, Arrow rows), best of {args.repeats} alternating runs, {host()}.",
        "",
        "| written in | row groups | stream shards after `reshard()` | peak memory while streaming (MB above import) "
        "| seconds to stream |",
        "|---|---|---|---|---|",
    ]
    for name, f in found.items():
        lines.append(f"| {name} | {f['groups']} | {f['shards']} | {f['peak']:.0f} | {f['seconds']:.2f} |")
    lines += [
        "",
        f"datasets' row groups / one row group: **{old['peak'] / new['peak']:.2f}x** less peak memory while streaming "
        f"(each DataLoader worker of a streamed training run holds this), {new['shards']} parts for "
        f"processes and workers to share instead of {old['shards']}.",
        "",
        "Command: `python scripts/bench_row_groups.py`.",
    ]
    write_markdown(args.out, lines)


if __name__ == "__main__":
    main()
