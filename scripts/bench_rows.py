"""Reading reinforced rows for the trainer, and handing batches across DataLoader workers, side by side in one run:

* a row at the paper's N=400 as `datasets` returns it (every stored value a Python object) against `ReplayRows`
  (Arrow, only the replayed sample converted), map-style and streamed (one-row Arrow tables through `rows_of`);
* what a 2-worker DataLoader alone can hand over: empty 32 x 3 x 224 x 224 batches, float32 and uint8, copied into
  shared memory when pickled, written there directly, and written into blocks the workers recycle.

    python scripts/bench_rows.py            # -> results/bench_rows.md
"""

import argparse
import os
import sys
import tempfile
import time

import torch

from bench_render import tiny_vit  # noqa: E402  (scripts/)
from results_md import host, write_markdown  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def _empty_float(indices):
    return torch.ones(len(indices), 3, 224, 224)


def _empty_uint8(indices):
    return torch.ones(len(indices), 3, 224, 224, dtype=torch.uint8)


def _shared_float(indices):  # fresh shared memory for each batch (channels-last), as default_collate allocates
    from dr_hf.pipeline import empty_batch
    from dr_hf.batch_memory import shared_empty

    return empty_batch(len(indices), (224, 224), allocate=shared_empty).fill_(1.0)


def _recycled_float(indices):  # as dr-hf's collators in a worker: a pooled block the training process has freed
    from dr_hf.pipeline import empty_batch
    from dr_hf.batch_memory import batch_empty, handed_over

    return handed_over(empty_batch(len(indices), (224, 224), allocate=batch_empty).fill_(1.0))


def per_row_ms(fn, n, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e3)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--num-samples", type=int, default=400)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_rows.md"))
    args = ap.parse_args()

    import datasets

    from dr_hf import ReinforceConfig, TeacherEnsemble, make_pipeline
    from dr_hf import reinforce
    from dr_hf.rows import ReplayRows, rows_of

    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    n = args.rows
    with tempfile.TemporaryDirectory() as tmp:
        source = datasets.load_dataset(args.dataset, split="train").select(range(n)).select_columns(["image", "label"])
        source = source.cast_column("label", datasets.ClassLabel(num_classes=1000))
        teachers = TeacherEnsemble.from_specs([tiny_vit(os.path.join(tmp, "vit"))])  # only fills the columns here
        config = ReinforceConfig(augment="imagenet+rare", augmentations=make_pipeline("imagenet+rare").config(),
                                 teachers=teachers.specs, num_samples=args.num_samples, topk=10, seed=0, num_classes=1000)
        reinforce(source, config, teachers, os.path.join(tmp, "plus"), show_progress=False)
        folder = os.path.join(tmp, "plus")
        plain = datasets.load_dataset(folder, split="train").cast_column("image", datasets.Image(decode=False))
        replay = ReplayRows(plain)
        stream = datasets.load_dataset(folder, split="train", streaming=True).cast_column(
            "image", datasets.Image(decode=False))
        arrow_stream = stream.with_format("arrow")
        mix_config = ReinforceConfig(augment="imagenet+rare+mix", augmentations=make_pipeline("imagenet+rare+mix").config(),
                                     teachers=teachers.specs, num_samples=args.num_samples, topk=10, seed=0,
                                     num_classes=1000)
        reinforce(source, mix_config, teachers, os.path.join(tmp, "plus-mix"), show_progress=False)
        mix_stream = datasets.load_dataset(os.path.join(tmp, "plus-mix"), split="train", streaming=True).cast_column(
            "image", datasets.Image(decode=False))
        groups = mix_stream.batch(8)
        arrow_groups = mix_stream.with_format("arrow").batch(8)
        rows = {
            "map-style, datasets' Python rows": per_row_ms(lambda: [plain[i] for i in range(n)], n),
            "map-style, ReplayRows (dr-hf)": per_row_ms(lambda: [replay[i] for i in range(n)], n),
            "streamed, datasets' Python rows": per_row_ms(lambda: list(stream), n),
            "streamed, one-row Arrow tables + rows_of (dr-hf)": per_row_ms(
                lambda: [rows_of(t) for t in arrow_stream], n),
            "streamed MixUp/CutMix groups of 8, datasets' Python rows (`.batch(8)`)": per_row_ms(
                lambda: list(groups), n),
            "streamed MixUp/CutMix groups of 8, one Arrow table per group + rows_of (dr-hf)": per_row_ms(
                lambda: [rows_of(t) for t in arrow_groups], n),
        }
    handoff = {}
    for name, collate in (("float32", _empty_float), ("uint8", _empty_uint8),
                          ("float32, allocated in fresh shared memory", _shared_float),
                          ("float32, recycled shared blocks (dr-hf's collators, `dr_hf.batch_memory`)", _recycled_float)):
        loader = torch.utils.data.DataLoader(_Indices(2048), batch_size=32, num_workers=2, collate_fn=collate)
        best = 0.0
        for _ in range(2):
            t0, count = time.perf_counter(), 0
            for batch in loader:
                count += batch.shape[0]
            best = max(best, count / (time.perf_counter() - t0))
        handoff[name] = best
    lines = ["# Reading rows and handing batches over", "",
             f"{n} real ImageNet images reinforced with N={args.num_samples} samples each (`imagenet+rare`, and "
             "`imagenet+rare+mix` for the groups; K=10), 1 thread, best of 3.", "", "| reading a row | ms per row |", "|---|---|"]
    lines += [f"| {name} | {ms:.3f} |" for name, ms in rows.items()]
    lines += ["", "A 2-worker DataLoader handing over empty 32 x 3 x 224 x 224 batches (2,048 images, best of 2 epochs, "
              f"{host()}):", "", "| batch dtype | images/s |", "|---|---|"]
    lines += [f"| {name} | {rate:.0f} |" for name, rate in handoff.items()]
    lines += ["", "Command: `python scripts/bench_rows.py`."]
    write_markdown(args.out, lines)


if __name__ == "__main__":
    main()
