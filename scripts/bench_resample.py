"""Batched crops (`dr_hf.resample.resized_crops`, the reinforce job's renderer on a GPU): where the time of a
teacher batch's crops goes, side by side in one run.

For the 64 RandomResizedCrop+flip samples of each of 16 real images (224 px, bicubic), four images' 256 samples a
call (a teacher batch of the job at N=64: one call, matrices padded to the largest of the four images), best of 5:

* the resampling matrices as `resample_weights` computes them (each output pixel's taps, scattered into the zero
  matrix) against the whole matrix evaluated at every input pixel (the previous code, kept here as the reference),
  with their largest difference;
* the whole `resized_crops` (boxes in groups of similar size, each box's window cut out, matrices, both matrix
  products in float32 over the windows, rounding) at its default group size and two others, against the previous
  code (products over whole images, one image's boxes at a time; kept here as the reference), with the products'
  multiply-adds per sample (what a GPU's time for the crops follows) and how the pixels differ;
* the same with TF32 matrix products (the crops follow torch's TF32 flag, which the reinforce job sets from its
  teachers' precision: TF32 with tf32 teachers, float32 with fp32 and bf16 ones);
* the aten ops (kernel launches or views) of a call, per group size: what a GPU job's render thread dispatches;
* a training batch under ``replay_on_device``: one view of each of the images, every image its own: the aten ops
  (each a kernel launch or a view on a GPU: the host's part) and the time of one call, windows against the previous
  code;
* a teacher batch's crops alone and beside a thread drawing rows' parameters (Python and numpy that hold the GIL, as
  a GPU job's preparing threads do beside its render thread), the tensor work run op by op from Python or as one
  TorchScript call (the default), for the real crops and for 8-px crops, where the host's work is all there is.

    python scripts/bench_resample.py [--device cuda]    # -> results/bench_resample.md
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

from results_md import host, write_markdown  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def dense_weights(starts, lengths, in_size, out_size, interpolation):
    """The previous resample_weights: the filter evaluated at every input pixel of every output pixel's row."""
    from dr_hf.resample import _filter, _support

    starts = starts.to(torch.float32)[:, None, None]
    lengths = lengths.to(torch.float32)[:, None, None]
    scale = lengths / out_size
    downscale = scale >= 1.0
    support = torch.where(downscale, _support(interpolation) * scale, torch.full_like(scale, _support(interpolation)))
    invscale = torch.where(downscale, 1.0 / scale, torch.ones_like(scale))
    center = scale * (torch.arange(out_size, device=starts.device, dtype=torch.float32)[None, :, None] + 0.5)
    x = torch.arange(in_size, device=starts.device, dtype=torch.float32)[None, None, :] - starts
    lo = torch.clamp(torch.trunc(center - support + 0.5), min=0.0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), lengths)
    w = _filter((x - center + 0.5) * invscale, interpolation) * ((x >= lo) & (x < hi))
    total = w.sum(-1, keepdim=True)
    return w.div_(torch.where(total == 0, torch.ones_like(total), total))


def previous_crops(images, boxes, flips, size, interpolation, owners):
    """The previous resized_crops: per image, both passes' products over the whole image (matrices as wide as it)."""
    from dr_hf.resample import resample_weights, runs
    from dr_hf.teacher import float32_precision

    device, channels = images[0].device, images[0].shape[0]
    height, width = max(im.shape[-2] for im in images), max(im.shape[-1] for im in images)
    box = torch.from_numpy(np.concatenate([boxes, flips[:, None]], axis=1).astype(np.int64)).to(device)
    wy = resample_weights(box[:, 0], box[:, 2], height, size[0], interpolation, max_length=int(boxes[:, 2].max()))
    wx = resample_weights(box[:, 1], box[:, 3], width, size[1], interpolation, flips=box[:, 4],
                          max_length=int(boxes[:, 3].max()))
    out = torch.empty((len(boxes), channels, *size), dtype=torch.uint8, device=device)
    with float32_precision(tf32=False):
        for owner, a, b in runs(owners):
            h, w = images[owner].shape[-2:]
            pixels = images[owner].to(torch.float32).reshape(channels * h, w)
            rows = pixels @ wx[a:b, :, :w].permute(2, 0, 1).reshape(w, (b - a) * size[1])
            rows = rows.view(channels, h, b - a, size[1]).permute(2, 1, 0, 3).reshape(b - a, h, channels * size[1])
            crops = torch.bmm(wy[a:b, :, :h], rows).view(b - a, size[0], channels, size[1]).permute(0, 2, 1, 3)
            out[a:b] = crops.round_().clamp_(0, 255)
    return out


def count_ops(fn) -> int:
    """The aten ops one call of ``fn`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.ops


def beside_drawing(fn, drain, threads: int, seconds: float):
    """(ms a call of ``fn``, rows/s the others drew): ``fn`` called over and over for ``seconds`` while ``threads``
    other threads draw rows' parameters in a loop (``imagenet+rare+mix``, N=64: numpy and Python that hold the GIL),
    as a GPU job's preparing threads do beside its render thread."""
    import threading

    from dr_hf import make_pipeline
    from dr_hf.augment import Context

    pipe, stop, drawn = make_pipeline("imagenet+rare+mix"), threading.Event(), [0] * threads

    def draw(k):
        while not stop.is_set():
            pipe.sample(0, drawn[k], 64, Context(375, 500, 0, 8, 64))
            drawn[k] += 1

    others = [threading.Thread(target=draw, args=(k,)) for k in range(threads)]
    for t in others:
        t.start()
    try:
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or not calls:
            fn()
            drain()
            calls += 1
        elapsed = time.perf_counter() - t0
    finally:
        stop.set()
        for t in others:
            t.join()
    return 1000 * elapsed / calls, sum(drawn) / elapsed


def multiply_adds(calls, size, group_size=None):
    """The two passes' multiply-adds per sample: over whole images (the previous code) or over each group's windows."""
    from dr_hf.resample import crop_groups

    total = samples = 0
    for ims, boxes, _, owners in calls:
        samples += len(boxes)
        if group_size is None:
            for o in owners:
                h, w = ims[o].shape[-2:]
                total += 3 * h * w * size[1] + size[0] * h * 3 * size[1]
            continue
        _, groups = crop_groups(boxes, group_size, (256 << 20) // 12, size[1])
        total += sum((b - a) * (3 * tall * wide * size[1] + size[0] * tall * 3 * size[1]) for a, b, tall, wide in groups)
    return total / samples


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--contention-seconds", type=float, default=1.0,
                    help="how long each contended measurement calls the crops (best of 3, alternating)")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_resample.md"))
    args = ap.parse_args()

    import datasets

    from dr_hf import make_pipeline
    from dr_hf.augment import Context, boxes_to_pixels
    from dr_hf.images import decode
    from dr_hf import script
    from dr_hf.resample import resample_weights, resized_crops
    from dr_hf.teacher import float32_precision

    device = torch.device(args.device)
    rows = datasets.load_dataset(args.dataset, split="train").select(range(args.images))
    images = [decode(v).to(device) for v in rows.cast_column("image", datasets.Image(decode=False))["image"]]
    pipe = make_pipeline("imagenet+rrc")
    params = [pipe.sample(0, i, 64, Context(im.shape[-2], im.shape[-1], 0, 1, 64)) for i, im in enumerate(images)]

    def drain():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def best(fn, repeats=5):
        fn()
        times = []
        for _ in range(repeats):
            drain()
            t0 = time.perf_counter()
            fn()
            drain()
            times.append(time.perf_counter() - t0)
        return min(times)

    samples = 64 * len(images)
    boxes = [boxes_to_pixels(p["crop"], *im.shape[-2:]) for p, im in zip(params, images)]  # (64, 4) top, left, h, w
    flips = [np.asarray(p["flip"]) for p in params]
    on_device = [torch.from_numpy(b.astype(np.int64)).to(device) for b in boxes]

    per_call = 4  # images a call: a teacher batch of 256 samples
    calls = []
    for a in range(0, len(images), per_call):
        group = range(a, min(len(images), a + per_call))
        calls.append(([images[i] for i in group], np.concatenate([boxes[i] for i in group]),
                      np.concatenate([flips[i] for i in group]), np.repeat(np.arange(len(group)), 64)))
    calls_on_device = [(max(im.shape[-2] for im in ims), max(im.shape[-1] for im in ims),
                        torch.from_numpy(b.astype(np.int64)).to(device), torch.from_numpy(f.astype(np.int64)).to(device))
                       for ims, b, f, _ in calls]

    def weights(fn):
        def go():
            for h, w, b, f in calls_on_device:
                fn(b[:, 0], b[:, 2], h, 224, f, int(b[:, 2].max()))
                fn(b[:, 1], b[:, 3], w, 224, f, int(b[:, 3].max()))
        return go

    taps = best(weights(lambda s, n, size, out, f, m: resample_weights(s, n, size, out, "bicubic", flips=f, max_length=m)))
    dense = best(weights(lambda s, n, size, out, f, m: dense_weights(s, n, size, out, "bicubic")))
    diff = 0.0
    for im, b in zip(images, on_device):
        for axis, size in ((0, im.shape[-2]), (1, im.shape[-1])):
            a = resample_weights(b[:, axis], b[:, axis + 2], size, 224, "bicubic")
            diff = max(diff, float((a - dense_weights(b[:, axis], b[:, axis + 2], size, 224, "bicubic")).abs().max()))

    def crops(group_size=32, fn=None):
        def go():
            for ims, b, f, owners in calls:
                if fn is not None:
                    fn(ims, b, f, (224, 224), "bicubic", owners)
                else:
                    resized_crops(ims, b, f, (224, 224), "bicubic", owners=owners, group_size=group_size)
        return go

    group_sizes = (32, 16, 64)  # the default first
    variants = {**{g: crops(g) for g in group_sizes}, "previous": crops(fn=previous_crops)}
    timings = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm
    for _ in range(5):  # alternating, best of 5: the machine's pace drifts between variants run one after another
        for name, fn in variants.items():
            drain()
            t0 = time.perf_counter()
            fn()
            drain()
            timings[name].append(time.perf_counter() - t0)
    grouped = {g: min(timings[g]) for g in group_sizes}
    previous = min(timings["previous"])
    ims, b, f, owners = calls[0]  # a teacher batch's aten ops (kernel launches or views), what a GPU job's host pays
    batch_ops = {g: count_ops(lambda: resized_crops(ims, b, f, (224, 224), "bicubic", owners=owners, group_size=g))
                 for g in group_sizes}
    batch_ops["previous"] = count_ops(lambda: previous_crops(ims, b, f, (224, 224), "bicubic", owners))
    levels = torch.cat([(resized_crops(ims, b, f, (224, 224), "bicubic", owners=o).int()
                         - previous_crops(ims, b, f, (224, 224), "bicubic", o).int()).abs().flatten()
                        for ims, b, f, o in calls])
    # a replay_on_device training batch: one view of each image, each image its own
    views = (images, np.stack([b[0] for b in boxes]), np.array([f[0] for f in flips]), np.arange(len(images)))
    replay = {"windows": lambda: resized_crops(*views[:3], (224, 224), "bicubic", owners=views[3]),
              "previous": lambda: previous_crops(*views[:3], (224, 224), "bicubic", views[3])}
    replay_ops = {name: count_ops(fn) for name, fn in replay.items()}
    replay_time = {name: best(fn) for name, fn in replay.items()}
    with float32_precision(tf32=True):  # the TF32 row: the products follow the flag, as with tf32 teachers
        tf32 = best(crops())
        tf32_out = resized_crops(images[0], boxes[0], flips[0], (224, 224), "bicubic")
    fp32_out = resized_crops(images[0], boxes[0], flips[0], (224, 224), "bicubic")
    tf32_levels = (tf32_out.int() - fp32_out.int()).abs()
    # a teacher batch's crops, from Python op by op or as one TorchScript call, alone and beside a thread drawing
    # parameters; also with small crops (8 px from 16x20 images), where the host's work is all there is, as on a GPU
    rng = np.random.default_rng(0)
    small = ([torch.from_numpy(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).permute(2, 0, 1).to(device)
              for _ in range(per_call)],
             np.array([(0, 0, 16, 20), (2, 3, 9, 11), (5, 0, 11, 17), (1, 8, 6, 12)] * 64), rng.integers(0, 2, 256),
             np.repeat(np.arange(per_call), 64), (8, 8))
    real = (*calls[0], (224, 224))
    contention, threads_before = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # (on a CPU: one intra-op thread, as a GPU's render thread computes nothing itself)
    for _ in range(3):  # alternating, best of 3
        for scripted in (False, True):
            script.ENABLED = scripted
            for label, (ims, b, f, o, size) in (("224 px crops of real images", real), ("8 px crops", small)):
                for threads in (0, 1):
                    ms, rows = beside_drawing(lambda: resized_crops(ims, b, f, size, "bicubic", owners=o), drain,
                                              threads, args.contention_seconds)
                    key = (label, threads, scripted)
                    contention[key] = min(contention.get(key, (ms, rows)), (ms, rows))
    script.ENABLED = True
    torch.set_num_threads(threads_before)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({host()})"
    lines = ["# Batched crops: resampling matrices and matrix products", "",
             f"{len(images)} real ImageNet images (imagenet-sample), 64 `imagenet+rrc` samples each, {per_call} images' "
             f"{64 * per_call} samples a call (the job's teacher batch at N=64), 224 px, bicubic, "
             f"on {name} (torch {torch.__version__}), best of 5 (crops: alternating).", "",
             "| what | ms per 64 samples | samples/s | products' multiply-adds a sample | aten ops a call |",
             "|---|---|---|---|---|"]
    rows = [("matrices, the filter at each output pixel's taps (`resample_weights`)", taps, None, None),
            ("matrices, the filter at every input pixel (the previous code)", dense, None, None)]
    rows += [(f"`resized_crops` whole, windows in groups of {g}" + (" (the default)" if g == 32 else ""), grouped[g],
              multiply_adds(calls, (224, 224), g), batch_ops[g]) for g in group_sizes]
    rows += [("`resized_crops` previous code: products over whole images, image by image", previous,
              multiply_adds(calls, (224, 224)), batch_ops["previous"]),
             ("`resized_crops` whole, groups of 32, TF32 products (the job's, with tf32 teachers)", tf32, None, None)]
    for label, seconds, macs, ops in rows:
        lines.append(f"| {label} | {1000 * seconds / len(images):.3f} | {samples / seconds:,.0f} | "
                     + (f"{macs / 1e6:.0f} M" if macs else "") + " | " + (f"{ops}" if ops else "") + " |")
    lines += ["", f"Matrices: taps only / every pixel = **{dense / taps:.1f}x** faster; largest difference of a weight "
              f"{diff:.1e} (float rounding of the sums).", "",
              f"Crops: windows in groups of 32 / products over whole images = **{previous / grouped[32]:.2f}x** faster, "
              f"{multiply_adds(calls, (224, 224)) / multiply_adds(calls, (224, 224), 32):.2f}x fewer multiply-adds; "
              f"their pixels differ by {float(levels.float().mean()):.4f} grey levels on average, {int(levels.max())} "
              f"at most ({float((levels > 0).float().mean()):.3%} of pixels: half-level ties, float sums of another "
              "length).", "",
              f"A `replay_on_device` training batch, one view of each of the {len(images)} images: "
              f"{replay_ops['windows']} aten ops (launches or views) against {replay_ops['previous']} for the previous "
              f"code (**{replay_ops['previous'] / replay_ops['windows']:.1f}x** fewer: it ran each image's products on "
              f"their own), {1000 * replay_time['windows']:.1f} ms a call against {1000 * replay_time['previous']:.1f}.",
              "",
              f"TF32 products against float32: {float(tf32_levels.float().mean()):.3f} grey levels on average, "
              f"{int(tf32_levels.max())} at most, {float((tf32_levels > 0).float().mean()):.2%} of pixels differ (one "
              "image's 64 crops).", "",
              "A teacher batch's 256 crops (one call), alone and beside one thread drawing rows' parameters in a loop "
              "(numpy and Python that hold the GIL, as a GPU job's preparing threads do beside its render thread), their "
              "tensor work run op by op from Python or as one TorchScript call (`dr_hf.script.ENABLED`, the "
              f"default); one intra-op thread; best of 3 alternating runs of {args.contention_seconds:g} s each:", "",
              "| crops | tensor work | ms a call, alone | ms a call, beside a drawing thread | slowed | "
              "rows/s the thread drew |", "|---|---|---|---|---|---|"]
    for label in ("224 px crops of real images", "8 px crops"):
        for scripted in (False, True):
            alone, beside = contention[(label, 0, scripted)][0], contention[(label, 1, scripted)]
            lines.append(f"| {label} | {'TorchScript' if scripted else 'Python, op by op'} | {alone:.2f} | "
                         f"{beside[0]:.2f} | {beside[0] / alone:.2f}x | {beside[1]:,.0f} |")
    slow = {s: contention[("8 px crops", 1, s)][0] for s in (False, True)}
    lines += ["", f"Beside a drawing thread, 8 px crops (the host's work alone, as on a GPU) take "
              f"**{slow[False] / slow[True]:.1f}x** as long from Python as scripted.", "",
              "Command: `python scripts/bench_resample.py" + (f" --device {args.device}" if args.device != "cpu" else "") + "`."]
    write_markdown(args.out, lines)


if __name__ == "__main__":
    main()
