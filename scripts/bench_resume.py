"""Resuming a streamed training run: the stream restarts at the start of the checkpoint's pass, whose batches already
trained are dropped (`accelerate.skip_first_batches`, as `Trainer` calls it). The time until the first batch after them, with
the replaying collator counting the dropped batches out unrendered (`ReinforcedCollator.skip_batches`, what
`ReinforcedTrainer` sets on a resume) against rendering each (`skip_batches=0`, as before), side by side, with
`dataloader_num_workers` 0 and 2. The reinforced copy of real ImageNet images stores the paper's N=400 samples per
image (its teacher, a 1-layer ViT, only fills the columns), so each streamed row is as large as an ImageNet+ row.

    python scripts/bench_resume.py   # -> results/bench_resume.md
"""

import argparse
import os
import sys
import tempfile
import time

from bench_render import reinforced_sample  # noqa: E402  (scripts/)
from results_md import host, write_markdown  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--num-samples", type=int, default=400, help="N stored per image (the paper's 400)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (best counts)")
    ap.add_argument("--shuffle-buffer", type=int, default=16, help="the stream's shuffle buffer (rows; smaller than "
                    "the stream, as on ImageNet+: a buffer that holds the whole stream reads it to its end first)")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_resume.md"))
    args = ap.parse_args()

    import datasets
    import timm
    from accelerate import skip_first_batches

    from dr_hf import ReinforcedTrainer, ReinforcedTrainingArguments

    # what a resumed run drops: all but the last batches of the pass that the shuffle buffer and the loader's fetching
    # ahead leave unread (at the end of a stream datasets waits 5 s for Arrow's threads, which is not what is timed)
    skip = (args.rows - args.shuffle_buffer) // args.batch - 3
    rest = args.rows // args.batch - skip - 1
    times = {}
    with tempfile.TemporaryDirectory() as tmp:  # 4 files: each DataLoader worker streams its own
        _, folder = reinforced_sample(args.dataset, args.rows, args.num_samples, tmp, rows_per_shard=args.rows // 4)
        stream = datasets.load_dataset(folder, split="train", streaming=True)
        model = timm.create_model("resnet10t", num_classes=1000)
        for workers in (0, 2):
            trainer = ReinforcedTrainer(model=model, train_dataset=stream, args=ReinforcedTrainingArguments(
                os.path.join(tmp, "r"), per_device_train_batch_size=args.batch, dataloader_num_workers=workers,
                max_steps=args.rows // args.batch, image_size=224, use_cpu=True, report_to=[], uint8_pixels=False,
                shuffle_buffer_size=args.shuffle_buffer))
            loader = trainer.get_train_dataloader()
            for name in ("rendered", "counted out"):
                times[(name, workers)] = float("inf")
            for _ in range(args.rounds):
                for name in ("rendered", "counted out"):
                    trainer.train_collator.skip_batches = skip if name == "counted out" else 0
                    trainer.train_collator.epoch = 0  # (as the Trainer's callback sets both, before the iterator)
                    start = time.perf_counter()
                    batches = iter(skip_first_batches(loader, skip))
                    batch = next(batches)
                    times[(name, workers)] = min(times[(name, workers)], time.perf_counter() - start)
                    assert batch["pixel_values"].shape[0] == args.batch
                    assert len(list(batches)) == rest  # the pass ends (outside the timing)
    lines = ["# Resuming a streamed training run", "",
             f"{args.rows} real ImageNet images (imagenet-sample) reinforced with N={args.num_samples} samples each "
             f"(K=10, `imagenet+rrc`), streamed from 4 local parquet files, batch {args.batch}, 224 px, float batches: the "
             f"time until the first batch after the {skip} batches a resumed run drops (`skip_first_batches`, as "
             f"`Trainer` calls it), workers' start-up included; {host()}, best of {args.rounds} alternating rounds.",
             "", "| workers | dropped batches rendered (s) | counted out unrendered (s) | ratio |", "|---|---|---|---|"]
    for w in (0, 2):
        rendered, counted = times[("rendered", w)], times[("counted out", w)]
        lines.append(f"| {w} | {rendered:.2f} | {counted:.2f} | **{rendered / counted:.2f}x** |")
    lines += ["", "Command: `python scripts/bench_resume.py`."]
    write_markdown(args.out, lines)


if __name__ == "__main__":
    main()
