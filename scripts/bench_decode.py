"""JPEG decoding for the training loader: PIL (what `datasets` uses), PIL with DCT-domain reduction (`Image.draft`,
1/2, 1/4, 1/8) and TorchCodec (what dr-hf uses), on real ImageNet JPEGs, one thread, side by side in one run; TorchCodec
in two threads of one process (the reinforce job's preparing threads: decoding releases the GIL); and what
reduced decoding would cost in fidelity: the replayed sample's deviation from the full-size replay when each image
is decoded at the largest reduction whose crop still covers the output size. With ``--device cuda``: nvJPEG on the
GPU, in batches as `replay_on_device` decodes them, and how far its pixels are from the host decoder's (the pixels
the reinforce job's teacher saw).

    python scripts/bench_decode.py            # -> results/bench_decode.md
    python scripts/bench_decode.py --device cuda --out results/gpu/bench_decode.md   # on a GPU machine
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
    ap.add_argument("--device", default=None, help="also decode in batches on this device (cuda: nvJPEG)")
    ap.add_argument("--batch", type=int, default=32, help="JPEGs per device decode call (a training batch)")
    args = ap.parse_args()

    import datasets
    from PIL import Image

    from dr_hf.augment import Context, box_to_pixels
    from dr_hf.pipeline import make_pipeline, params_at
    from dr_hf.images import _jpeg_decoder, decode
    from dr_hf.inputs import InputSpec

    torch.set_num_threads(1)
    ds = datasets.load_dataset(args.dataset, split="train").cast_column("image", datasets.Image(decode=False))
    cells = [ds[i]["image"] for i in range(min(args.rows, len(ds)))]
    codec = _jpeg_decoder() is not None  # TorchCodec loads here (dr-hf's decoder; PIL otherwise)

    def pil(cell, reduce=1):
        image = Image.open(io.BytesIO(cell["bytes"]))
        if reduce > 1:
            image.draft(image.mode, (image.width // reduce, image.height // reduce))
        return np.asarray(image.convert("RGB"))

    ways = {"PIL, full size": lambda c: pil(c), "PIL draft 1/2": lambda c: pil(c, 2), "PIL draft 1/4": lambda c: pil(c, 4),
            "PIL draft 1/8": lambda c: pil(c, 8), ("TorchCodec" if codec else "PIL (no TorchCodec here)")
            + ", full size, RGB tensor (dr-hf)": decode}
    threaded = ("TorchCodec" if codec else "PIL") + ", full size, 2 threads of one process (wall time)"
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
    if args.device:
        lines += on_device(cells, torch.device(args.device), args.batch, decode)

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
    command = "python scripts/bench_decode.py" + (f" --device {args.device}" if args.device else "")
    lines += rows + ["", f"Command: `{command}`."]
    write_markdown(args.out, lines)


def device_decoder(device: torch.device):
    """(name, decode) for JPEGs (1-D uint8 CPU tensors) in one call on ``device``: TorchCodec's, dr-hf's own
    (``dr_hf.images.decode_jpegs``), where it decodes there; else torchvision.io's ``decode_jpeg``, the same nvJPEG
    library on CUDA, used here only to measure what decoding on the GPU gives (it ignores EXIF orientation on CUDA)."""
    from dr_hf.images import _jpeg_decoder, decode_jpegs

    decoder = _jpeg_decoder()
    probe = torch.frombuffer(bytearray(_tiny_jpeg()), dtype=torch.uint8)
    if decoder is not None:
        try:
            decoder([probe], mode="RGB", device=device)
            return "TorchCodec (dr-hf's `decode_jpegs`)", lambda jpegs: decode_jpegs(jpegs, device, [None] * len(jpegs))
        except (RuntimeError, ValueError):
            pass
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    def tv(jpegs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
            return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)

    why = "TorchCodec cannot decode on this device" if decoder is not None else "TorchCodec does not load here"
    return f"torchvision.io `decode_jpeg` ({why})", tv


def _tiny_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def on_device(cells, device: torch.device, batch: int, decode) -> list:
    """Rows of the report: decoding in batches of ``batch`` on ``device`` (wall and host time per image, best of 3),
    and its pixels against the host decoder's."""
    name, decoder = device_decoder(device)
    jpegs = [torch.frombuffer(bytearray(c["bytes"]), dtype=torch.uint8) for c in cells]
    chunks = [jpegs[i:i + batch] for i in range(0, len(jpegs), batch)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for chunk in chunks[:2]:
        decoder(chunk)  # warm-up: the library's handles and buffers
    sync()
    wall = host = math.inf
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.thread_time()
        for chunk in chunks:
            decoder(chunk)
        sync()
        wall, host = min(wall, time.perf_counter() - t0), min(host, time.thread_time() - c0)
    decoded = [image for chunk in chunks for image in decoder(chunk)]
    diffs, sizes = [], 0
    for cell, image in zip(cells, decoded):
        reference = decode(cell)
        if tuple(image.shape) != tuple(reference.shape):  # an EXIF-rotated photo that this decoder left unturned
            continue
        sizes += 1
        diffs.append((image.cpu().int() - reference.int()).abs().flatten())
    d = torch.cat(diffs).float()
    where = f"{device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    return ["", f"On {where}: {name}, batches of {batch} JPEGs a call: **{1e3 * wall / len(jpegs):.3f} ms per image** "
            f"(wall time, to the decoded batch on the device; {len(jpegs) / wall:.0f} images/s), of which "
            f"the calling thread's own CPU time is {1e3 * host / len(jpegs):.3f} ms; best of 3.", "",
            f"Its pixels against the host decoder's (the pixels the reinforce job renders from), {sizes} images: "
            f"{d.mean():.3f} grey levels on average, {np.percentile(d.numpy(), 99.9):.1f} at the 99.9th percentile, "
            f"{d.max():.0f} at most; {(d > 0).float().mean() * 100:.2f}% of pixels differ."]


if __name__ == "__main__":
    main()
