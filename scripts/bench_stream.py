"""A streamed job's reading, from a Hub-like source: where each process starts, and the next shard read while the
current one is computed, each measured side by side in one run.

The source is `imagenet-sample`'s 1,000 real ImageNet rows (JPEG bytes, about 110 MB) in 8 parquet files, served by
the local Hub stand-in (`tests/hub_standin.py`) and streamed with `load_dataset("org/name", streaming=True)` in a
fresh process per measurement (datasets reads its endpoint at import).

* Where a process starts: bytes downloaded and seconds until its first row, seeking the stream from its parquet
  footers (`dr_hf.streams.seek`, what the job does) against `IterableDataset.skip` (what it did). A job of W
  processes starts process k at row k * 1000 / W (here shifted into a file); the bytes are what the stand-in served
  (ranged reads), so they hold for the real Hub too, where they cost network time; the seconds are over localhost.
* Reading ahead: `dr-hf reinforce org/src --streaming` (the tiny ViT teacher of bench_render.py, which runs on a CPU
  core about as fast as EfficientNet-Lite0 on a GPU) with the stand-in answering at `--bandwidth` MB/s per read, its
  next shard read by a thread while the current one is computed (`dr_hf.job.READ_AHEAD_SHARDS = 1`, the default)
  against each shard read when it is needed (0), in alternating rounds; beside them, the reading alone (the stream
  iterated at that bandwidth) and the compute alone (the same job on a local copy, map-style).

    python scripts/bench_stream.py            # -> results/bench_stream.md
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

from results_md import host, write_markdown  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

FIRST_ROW = textwrap.dedent("""
    import json, sys, time
    import datasets
    from dr_hf.streams import seek
    t0 = time.perf_counter()
    stream = datasets.load_dataset(sys.argv[1], split="train", streaming=True)
    stream = stream.cast_column("image", datasets.Image(decode=False))
    start = int(sys.argv[3])
    rows = seek(stream, start) if sys.argv[2] == "seek" else stream.skip(start)
    row = next(iter(rows))
    print(json.dumps({"seconds": time.perf_counter() - t0, "label": row["label"]}))
""")

JOB = textwrap.dedent("""
    # READ_AHEAD ARGS...: the job (dr-hf reinforce), or with READ_AHEAD "read" the stream alone; its seconds
    import json, sys, time
    import dr_hf.job
    from dr_hf.cli import main
    t0 = time.perf_counter()
    if sys.argv[1] == "read":
        import datasets
        stream = datasets.load_dataset(sys.argv[2], split="train", streaming=True)
        rows = sum(1 for _ in stream.cast_column("image", datasets.Image(decode=False)))
        code = 0 if rows else 1
    else:
        dr_hf.job.READ_AHEAD_SHARDS = int(sys.argv[1])
        code = main(sys.argv[2:])
    print(json.dumps({"code": code, "seconds": time.perf_counter() - t0}))
""")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--processes", type=int, default=8, help="W: the job's processes")
    ap.add_argument("--bandwidth", type=float, default=25.0, help="MB/s of each of the stand-in's answers (reading ahead)")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--rows-per-shard", type=int, default=125)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_stream.md"))
    args = ap.parse_args()

    import datasets
    from huggingface_hub import HfApi, constants

    from hub_standin import HubStandIn

    rows = datasets.load_dataset(args.dataset, split="train")
    rows = rows.cast_column("image", datasets.Image(decode=False))
    n = len(rows)
    hub = HubStandIn()
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "src", "data"))
        for k in range(args.files):
            rows.shard(args.files, k, contiguous=True).to_parquet(
                os.path.join(tmp, "src", "data", f"train-{k:05d}-of-{args.files:05d}.parquet"))
        env = {**os.environ, **hub.env(os.path.join(tmp, "home")), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
        sizes = {f"data/{f}": os.path.getsize(os.path.join(tmp, "src", "data", f))
                 for f in os.listdir(os.path.join(tmp, "src", "data"))}
        total_bytes = sum(sizes.values())
        constants.ENDPOINT, constants.HF_HUB_DISABLE_XET = hub.url, True  # (as tests/hub_standin.py's point_here)
        api = HfApi(endpoint=hub.url)
        api.create_repo("org/src", repo_type="dataset")
        api.upload_folder(repo_id="org/src", repo_type="dataset", folder_path=os.path.join(tmp, "src"))

        def run(how, start):
            hub.state.reads.clear()
            proc = subprocess.run([sys.executable, "-c", FIRST_ROW, "org/src", how, str(start)], env=env,
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            served = earlier = 0  # all bytes; those of the files before the one holding row `start`
            for path, rng in hub.state.reads:
                a, b = rng.split("=")[1].split("-")
                a, b = (int(a), int(b) if b else sizes[path] - 1) if a else (sizes[path] - int(b), sizes[path] - 1)
                size = min(b, sizes[path] - 1) - a + 1
                served += size
                earlier += size if names.index(path) < file_of(start) else 0
            return out, served, earlier

        names = sorted(sizes)
        ends = [len(rows.shard(args.files, k, contiguous=True)) for k in range(args.files)]
        ends = [sum(ends[:k + 1]) for k in range(args.files)]

        def file_of(row):
            return next(k for k, end in enumerate(ends) if row < end)

        table = []
        for rank in (1, args.processes // 2, args.processes - 1):
            start = rank * n // args.processes + args.files // 2  # (inside a file)
            sought, skipped = run("seek", start), run("skip", start)
            assert sought[0]["label"] == skipped[0]["label"] == rows[start]["label"]
            table.append((rank, start, sought, skipped))

        from bench_render import tiny_vit

        teacher = tiny_vit(os.path.join(tmp, "teacher"))

        def job(read_ahead, source, out):
            args_ = ["reinforce", source, "--output", out, "--teacher", teacher, "--num-samples",
                     str(args.num_samples), "--topk", "10", "--rows-per-shard", str(args.rows_per_shard), "--device",
                     "cpu", "--quiet"] + (["--streaming"] if source == "org/src" else [])
            proc = subprocess.run([sys.executable, "-c", JOB, str(read_ahead), *args_], env=env, capture_output=True,
                                  text=True, timeout=900)
            out_ = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
            if out_.get("code") != 0:
                raise SystemExit(proc.stderr[-3000:])
            return out_["seconds"]

        hub.state.read_bandwidth = args.bandwidth * 1e6
        timings = {"ahead": [], "when needed": [], "reading alone": [], "compute alone": []}
        for r in range(args.rounds):
            for arm in (("ahead", "when needed") if r % 2 == 0 else ("when needed", "ahead")):
                timings[arm].append(job(1 if arm == "ahead" else 0, "org/src", os.path.join(tmp, f"{arm}-{r}")))
            proc = subprocess.run([sys.executable, "-c", JOB, "read", "org/src"], env=env, capture_output=True,
                                  text=True, timeout=900)
            timings["reading alone"].append(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])
            timings["compute alone"].append(job(0, os.path.join(tmp, "src"), os.path.join(tmp, f"local-{r}")))
            print({k: [round(v, 2) for v in vs] for k, vs in timings.items()}, flush=True)
    hub.stop()

    mb = 1e6
    lines = ["# Where a streamed job's process starts: seeking from parquet footers against skipping", "",
             f"{n} real ImageNet rows (imagenet-sample, JPEG bytes) in {args.files} parquet files, {total_bytes / mb:.1f} "
             f"MB, served by the local Hub stand-in; process k of W={args.processes} starts at row k * {n} / "
             f"{args.processes} + {args.files // 2} (inside a file). MB: what the stand-in served (ranged reads) until the process's first row; seconds: "
             f"from `load_dataset` to that row, a fresh process each, over localhost ({host()}).", "",
             "| process | first row | MB read, sought | of them, earlier files' | MB read, skipped | of them, earlier files' | s, sought | s, skipped |",
             "|---|---|---|---|---|---|---|---|"]
    for rank, start, (so, sb, se), (ko, kb, ke) in table:
        lines.append(f"| {rank} of {args.processes} | {start} | {sb / mb:.2f} | {se / mb:.3f} | {kb / mb:.2f} | {ke / mb:.2f} | "
                     f"{so['seconds']:.2f} | {ko['seconds']:.2f} |")
    rank, start, (_, sb, se), (_, kb, ke) = table[-1]
    lines += ["", f"Before its first row, the last process of {args.processes} downloads {sb / mb:.1f} MB when the stream "
              f"is sought, of which {se / 1e3:.0f} kB are the footers of the files before its own (the rest: its own "
              f"file up to its row, which it reads anyway), and {kb / mb:.1f} MB when it is skipped ({ke / mb:.1f} MB "
              f"of them the earlier files'; {kb / total_bytes:.2f}x the source's size). At ImageNet-1k's scale (about 150 GB "
              "streamed) with 8 processes, the last would otherwise download about 130 GB before its first row.", "",
              "", "## Reading the next shard while the current one is computed", "",
              f"`dr-hf reinforce org/src --streaming` on the {n} rows, N={args.num_samples}, {args.rows_per_shard} rows a "
              f"shard ({-(-n // args.rows_per_shard)} shards), the tiny ViT teacher on this CPU, the stand-in answering "
              f"each read at {args.bandwidth:g} MB/s; seconds from the command's start to its end (teacher loading, the "
              f"stream's length, every shard, the card), a fresh process each, the best of {args.rounds} alternating "
              "rounds.", "",
              "| | seconds |", "|---|---|"]
    best = {k: min(v) for k, v in timings.items()}
    for label, key in (("the job, the next shard read ahead (the default)", "ahead"),
                       ("the job, each shard read when it is needed", "when needed"),
                       ("reading the stream alone", "reading alone"),
                       ("the same job on a local copy, map-style (the compute alone)", "compute alone")):
        lines.append(f"| {label} | {best[key]:.2f} |")
    lines += ["", f"Reading ahead: **{best['when needed'] / best['ahead']:.2f}x** the job that reads each shard when it is "
              f"needed; the job takes {best['ahead'] / max(best['reading alone'], best['compute alone']):.2f}x the longer "
              f"of reading alone and computing alone (1.00x: one hides the other entirely).", "",
              "Command: `python scripts/bench_stream.py`."]
    write_markdown(args.out, lines)


if __name__ == "__main__":
    main()
