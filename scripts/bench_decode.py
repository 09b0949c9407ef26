"""JPEG decoding for the training loader: PIL (what `datasets` uses), PIL with DCT-domain reduction (`Image.draft`,
1/2, 1/4, 1/8) and TorchCodec (what dr-hf uses), on real ImageNet JPEGs, one thread, side by side in one run; TorchCodec
in two threads of one process (the reinforce job's preparing threads: decoding releases the GIL); and what
reduced decoding would cost in fidelity: the replayed sample's deviation from the full-size replay when each image
is decoded at the largest reduction whose crop still covers the output size.

    python scripts/bench_decode.py            # -> results/bench_decode.md
"""

import argparse
import io
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from results_md import write_markdown  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_decode.md"))
    args = ap.parse_args()

    import datasets
    from PIL import Image

    from dr_hf.augment import Context, box_to_pixels, make_pipeline, params_at
    from dr_hf.images import _jpeg_decoder, decode
    from dr_hf.inputs import InputSpec

    torch.set_num_threads(1)
    ds = datasets.load_dataset(args.dataset, split="train").cast_column("image", datasets.Image(decode=False))
    cells = [ds[i]["image"] for i in range(min(args.rows, len(ds)))]
    assert _jpeg_decoder() is not None, "TorchCodec does not load here"

    def pil(cell, reduce=1):
        image = Image.open(io.BytesIO(cell["bytes"]))
        if reduce > 1:
            image.draft(image.mode, (image.width // reduce, image.height // reduce))
        return np.asarray(image.convert("RGB"))

    ways = {"PIL, full size": lambda c: pil(c), "PIL draft 1/2": lambda c: pil(c, 2), "PIL draft 1/4": lambda c: pil(c, 4),
            "PIL draft 1/8": lambda c: pil(c, 8), "TorchCodec, full size (dr-hf)": decode}
    threaded = "TorchCodec, full size, 2 threads of one process (wall time)"
    pool = ThreadPoolExecutor(2)
    best = {name: math.inf for name in (*ways, threaded)}
    for _ in range(3):  # alternating, best of 3
        for name in best:
            t0 = time.perf_counter()
            if name == threaded:
                list(pool.map(decode, cells))
            else:
                for cell in cells:
                    ways[name](cell)
            best[name] = min(best[name], (time.perf_counter() - t0) / len(cells))
    lines = ["# JPEG decoding for the loader", "",
             f"{len(cells)} real ImageNet JPEGs (imagenet-sample, median 500x375), 1 thread, best of 3 alternating runs.", "",
             "| decoder | ms per image | vs PIL full size |", "|---|---|---|"]
    lines += [f"| {n} | {1e3 * t:.2f} | {best['PIL, full size'] / t:.2f}x |" for n, t in best.items()]

    pipe = make_pipeline("imagenet+rrc")
    rows = ["", "What reduced decoding would change: each image's sample replayed from the largest reduction whose crop "
            "still covers the output, against the full-size replay (pixel values 0-255, `imagenet+rrc`, bilinear):", "",
            "| output px | images reduced | mean abs deviation | 99th percentile | max |", "|---|---|---|---|---|"]
    for size in (64, 128, 224):
        out = InputSpec((size, size), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")
        diffs, reduced = [], 0
        for i, cell in enumerate(cells):
            full = decode(cell)
            p = params_at(pipe.sample(0, i, 1, Context(full.shape[-2], full.shape[-1])), 0)
            _, _, h, w = box_to_pixels(p["crop"], full.shape[-2], full.shape[-1])
            factor = next((f for f in (8, 4, 2) if h // f >= size and w // f >= size), 1)
            if factor == 1:
                continue
            reduced += 1
            small = torch.from_numpy(pil(cell, factor).copy()).permute(2, 0, 1)
            diffs.append((pipe.render(full, p, out) - pipe.render(small, p, out)).abs().flatten() * 255)
        d = torch.cat(diffs) if diffs else torch.zeros(1)
        rows.append(f"| {size} | {reduced} of {len(cells)} | {d.mean():.2f} | {np.percentile(d.numpy(), 99):.1f} | "
                    f"{d.max():.0f} |")
    lines += rows + ["", "Command: `python scripts/bench_decode.py`."]
    write_markdown(args.out, lines)


if __name__ == "__main__":
    main()
