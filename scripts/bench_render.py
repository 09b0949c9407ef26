"""Rendering in the reinforce job: samples/s of the job's render + teacher path against a naive per-sample torchvision
render of the same rows with the same teacher, side by side in one run, on one intra-op thread.

The teacher is a 1-layer transformers ViT with 32-px patches (hidden 16) at 224 px: about as fast per sample on one
CPU core as EfficientNet-Lite0 is on a GPU, so the job is bound by everything but the teacher, as on a GPU.

* naive: decode each image once, then per sample `v2.RandomResizedCrop(224, antialias=True)` + flip + normalise,
  stacked into teacher batches of 256 (the issue's baseline: uint8 tensors, torch's antialiased kernel);
* naive on PIL images, for context: the same transforms on each image decoded once as a PIL image (what `datasets`'
  `Image` feature gives and the classic torchvision pipeline takes: Pillow's resize, then `v2.ToImage`);
* dr-hf: `Reinforcer.compute` (parameter sampling, the pipeline's batched rendering, the teacher) on the same rows;
* teacher only: the bare forward on the same number of samples, in the job's batch layout;
* ceiling: decoding, torch's antialiased crop kernel alone per sample (no flip, no normalisation, no float batch to
  write) and the bare forward: the fastest a job that crops with this kernel could be, so the largest ratio to the
  naive render it allows on this machine;
* parameter sampling alone (part of the job), per sample, for `imagenet+rrc` and `imagenet+rare+mix`;
* the whole job (`reinforce()`: the map, top-K, parquet shards, the card and its preview) on `--job-rows` rows in 4
  shards, and `Dataset.map` with the map function, against `Reinforcer.compute` alone on the same rows: what the job
  and the map add to the compute;
* the whole job with a GPU job's pipeline (a render and a preparing thread) on `--piped-rows` rows, in map batches
  of 32 and of 256 rows (the default): what the pipeline's draining between map batches costs;
* rows prepared ahead of the teacher: `Reinforcer.compute` with rows decoded and sampled on the main thread
  (`--prepare-threads 0`) against one preparing thread, at N=64 and N=16, with the second core free for it, as a GPU
  job's host has its cores;
* rendering's host cost per preset, per sample (the CPU path) against batched (the GPU path), in kernel launches
  (aten ops) and ms per 64 samples, with 8x8 crops of small images so that the host's work is all there is.

    python scripts/bench_render.py            # -> results/bench_render.md
"""

import argparse
import dataclasses
import io
import os
import sys
import tempfile
import time

import PIL.Image
import torch

from results_md import host, write_markdown  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def tiny_vit(folder, size=224, patch=32, classes=1000, resample=2):
    """A 1-layer transformers ViT (hidden 16) saved under ``folder``, as an ``hf:`` teacher spec: at 224 px with 32-px
    patches about as fast on one CPU core as EfficientNet-Lite0 on a GPU. ``resample``: its processor's PIL filter
    (2 bilinear, 3 bicubic)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=size, patch_size=patch, hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                       intermediate_size=32, num_labels=classes)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": size, "width": size}, resample=resample).save_pretrained(folder)
    return f"hf:{folder}"


def reinforced_sample(dataset: str, rows: int, num_samples: int, folder: str, rows_per_shard=None):
    """The first ``rows`` images of ``dataset`` (imagenet-sample: image and a 1000-class label) and their reinforced
    copy, written to ``folder`` with N=``num_samples`` samples each (K=10, `imagenet+rrc`) by the tiny ViT, which only
    fills the columns: at the paper's N=400 each row is as large as an ImageNet+ row."""
    import datasets

    from dr_hf import ReinforceConfig, TeacherEnsemble, reinforce

    datasets.disable_progress_bars()
    source = datasets.load_dataset(dataset, split="train").select(range(rows))
    source = source.cast_column("label", datasets.ClassLabel(num_classes=1000)).select_columns(["image", "label"])
    teachers = TeacherEnsemble.from_specs([tiny_vit(os.path.join(folder, "vit"))])
    config = ReinforceConfig.for_teachers(teachers, "imagenet+rrc", num_samples=num_samples, topk=10, seed=0,
                                          **({"rows_per_shard": rows_per_shard} if rows_per_shard else {}))
    reinforce(source, config, teachers, os.path.join(folder, "plus"), show_progress=False)
    return source, os.path.join(folder, "plus")


def host_cost(preset: str, mode: str, repeats: int):
    """(aten ops, ms, blocking copies) per 64 samples of rendering a teacher batch of 256 samples (4 rows x 64, or 8
    rows x 32 in MixUp/CutMix groups of 8) with 8x8 crops of small images, where the host's work is all there is.
    ``mode``: "per sample" (the CPU path), "batched, row by row", "batched" (the GPU path, one call per teacher batch).
    Blocking copies (batched modes): host-to-device copies that wait for the device, counted on the meta device after
    a first batch (each would wait for the teacher's queued forward on a GPU; copies made from Python lists are not
    seen)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dr_hf import make_pipeline
    from dr_hf.augment import Context
    from dr_hf.pipeline import empty_batch
    from dr_hf.inputs import InputSpec

    class Count(TorchDispatchMode):
        ops = blocking = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" \
                    and torch.device(kwargs.get("device") or "cpu").type != "cpu" and not kwargs.get("non_blocking"):
                Count.blocking += 1
            return func(*args, **kwargs)

    pipe, out = make_pipeline(preset), InputSpec(size=(8, 8), interpolation="bicubic")
    g = pipe.group_size
    rows, per_row = (4, 64) if g == 1 else (8, 32)
    rng = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 24 + r, 32), dtype=torch.uint8, generator=rng) for r in range(rows)]
    params = [pipe.sample(0, r, per_row, Context(24 + r, 32, r % g, g, per_row)) for r in range(rows)]
    batch = empty_batch(256, out.size)

    def render(images=images, batch=batch):
        if mode == "batched, row by row":
            for r in range(rows):
                pipe.render_samples(images[r:r + 1], params[r:r + 1], [(0, j) for j in range(per_row)], out,
                                    batch[per_row * r:per_row * (r + 1)], batched=True)
        else:
            pipe.render_samples(images, params, [(r, j) for r in range(rows) for j in range(per_row)], out, batch,
                                batched=mode == "batched")

    render()
    with Count():
        render()
    ops = Count.ops
    blocking = None
    if mode != "per sample":
        Count.blocking = 0
        on_meta = [im.to("meta") for im in images], torch.empty(batch.shape, device="meta")
        render(*on_meta)  # constants cached per device on the first batch
        with Count():
            render(*on_meta)
        blocking = Count.blocking / 4
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(5):
            render()
        best = min(best, (time.perf_counter() - t0) / 5)
    return ops / 4, best / 4 * 1e3, blocking


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--augment", default="imagenet+rrc")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--teacher-batch-size", type=int, default=256)
    ap.add_argument("--job-rows", type=int, default=128)
    ap.add_argument("--piped-rows", type=int, default=256)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_render.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    import datasets
    from torchvision.transforms import v2

    from dr_hf import ReinforceConfig, TeacherEnsemble, make_pipeline
    from dr_hf.augment import Context, box_to_pixels
    from dr_hf.pipeline import empty_batch
    from dr_hf.images import decode
    from dr_hf import reinforce
    from dr_hf.resample import resized_crop
    from dr_hf.reinforcer import Reinforcer, preparation_pool

    rows = datasets.load_dataset(args.dataset, split="train").select(range(args.rows))
    rows = rows.cast_column("image", datasets.Image(decode=False))
    batch = rows[:]
    with tempfile.TemporaryDirectory() as tmp:
        teachers = TeacherEnsemble.from_specs([tiny_vit(tmp)], device="cpu")
    spec = teachers.outputs()[0]
    config = ReinforceConfig(augment=args.augment, augmentations=make_pipeline(args.augment).config(),
                             teachers=teachers.specs, num_samples=args.num_samples, topk=10, seed=0, num_classes=1000,
                             teacher_batch_size=args.teacher_batch_size)
    job = Reinforcer(config, teachers, num_rows=len(rows))
    samples = args.rows * args.num_samples
    to_input = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)]
    naive = v2.Compose([v2.RandomResizedCrop(spec.size, antialias=True, interpolation=v2.InterpolationMode.BILINEAR),
                        v2.RandomHorizontalFlip(), *to_input])
    pil_naive = v2.Compose([v2.RandomResizedCrop(spec.size, interpolation=v2.InterpolationMode.BILINEAR),
                            v2.RandomHorizontalFlip(), v2.ToImage(), *to_input])

    def naive_render(decoder, transform):
        images = [decoder(v) for v in batch["image"]]
        xs = [transform(im) for im in images for _ in range(args.num_samples)]
        for k in range(0, len(xs), 256):
            teachers.log_probs({0: torch.stack(xs[k:k + 256])})

    def run_naive():
        naive_render(decode, naive)

    def run_naive_pil():
        naive_render(lambda v: PIL.Image.open(io.BytesIO(v["bytes"])).convert("RGB"), pil_naive)

    def run_job():
        job.compute(batch, list(range(args.rows)))

    x = empty_batch(256, spec.size).copy_(torch.randn(256, 3, *spec.size))  # the job's batch layout (channels-last)

    def run_teacher():
        for _ in range(0, samples, 256):
            teachers.log_probs({0: x})

    pipe = make_pipeline(args.augment)
    boxes = []  # each sample's crop in pixels, drawn as the job draws them (drawing is timed separately, below)
    for i, value in enumerate(batch["image"]):
        h, w = decode(value).shape[-2:]
        crops = pipe.sample(0, i, args.num_samples, Context(h, w, 0, 1, args.num_samples))["crop"]
        boxes.append([box_to_pixels(c, h, w) for c in crops])

    def run_ceiling():
        for value, row_boxes in zip(batch["image"], boxes):
            image = decode(value)
            for top, left, h, w in row_boxes:
                resized_crop(image, top, left, h, w, spec.size, spec.interpolation)
        run_teacher()

    timings = {"naive per-sample torchvision + teacher": [], "dr-hf job (render + teacher)": [], "teacher forward only": [],
               "ceiling: decode + crop kernel alone + teacher": [],
               "naive per-sample torchvision on PIL images + teacher (context)": []}
    fns = dict(zip(timings, (run_naive, run_job, run_teacher, run_ceiling, run_naive_pil)))
    for _ in range(args.repeats):  # alternating, best of N
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t0)
    rate = {name: samples / min(ts) for name, ts in timings.items()}
    sizes = [tuple(decode(v).shape[-2:]) for v in batch["image"]]
    sampling = {}
    for preset in ("imagenet+rrc", "imagenet+rare+mix"):
        pipe, n = make_pipeline(preset), args.num_samples
        g = pipe.group_size
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for i, (h, w) in enumerate(sizes):
                pipe.sample(0, i, n, Context(h, w, i % g, g, n))
            best = min(best, time.perf_counter() - t0)
        sampling[preset] = best / samples * 1e6
    print({"sampling_us_per_sample": sampling})

    job_rows = datasets.load_dataset(args.dataset, split="train").select(range(args.job_rows))
    job_config = dataclasses.replace(config, rows_per_shard=args.job_rows // 4)
    job_batch = job_rows.cast_column("image", datasets.Image(decode=False))[:]
    compute_only = Reinforcer(config, teachers, num_rows=args.job_rows)

    def run_whole_job():
        with tempfile.TemporaryDirectory() as out:
            reinforce(job_rows, job_config, teachers, out, show_progress=False)

    map_rows = job_rows.cast_column("image", datasets.Image(decode=False))

    outside_compute = []  # per map run: its seconds outside Reinforcer.compute (timed around each call)

    def run_map():  # the map function and datasets writing what it returns, as the job runs them per shard
        inside, compute = [0.0], compute_only.compute

        def timed(*a, **kw):
            t0 = time.perf_counter()
            result = compute(*a, **kw)
            inside[0] += time.perf_counter() - t0
            return result

        compute_only.compute = timed
        try:
            t0 = time.perf_counter()
            map_rows.map(compute_only, batched=True, batch_size=32, with_indices=True, keep_in_memory=True,
                         load_from_cache_file=False, new_fingerprint=f"bench-{time.time_ns()}")
            outside_compute.append(time.perf_counter() - t0 - inside[0])
        finally:
            del compute_only.compute

    whole = {"whole job": [], "compute alone": [], "map": []}
    for _ in range(3):
        for name, fn in zip(whole, (run_whole_job,
                                    lambda: compute_only.compute(job_batch, list(range(args.job_rows)), topk=config.topk),
                                    run_map)):
            t0 = time.perf_counter()
            fn()
            whole[name].append(time.perf_counter() - t0)
    whole_rate = {name: args.job_rows * args.num_samples / min(ts) for name, ts in whole.items()}
    map_overhead_ms = min(outside_compute) / args.job_rows * 1e3
    print(whole_rate)
    # a GPU job's pipeline (render and preparing threads ahead of the teacher) drains between map batches
    piped_rows = datasets.load_dataset(args.dataset, split="train").select(range(args.piped_rows))
    piped = {32: [], 256: []}
    for _ in range(2):
        for map_batch in piped:
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                reinforce(piped_rows, config, teachers, out, show_progress=False, render_threads=1, prepare_threads=1,
                          batch_size=map_batch)
                piped[map_batch].append(time.perf_counter() - t0)
    piped_rate = {map_batch: args.piped_rows * args.num_samples / min(ts) for map_batch, ts in piped.items()}
    print(piped_rate)
    ahead = {}  # (N, preparing threads) -> samples/s of Reinforcer.compute, alternating, best of repeats
    pools = {threads: preparation_pool(0, threads) for threads in (0, 1)}
    for n in (args.num_samples, args.num_samples // 4):
        jobs = {t: Reinforcer(dataclasses.replace(config, num_samples=n), teachers, num_rows=len(rows), pool=pool)
                for t, pool in pools.items()}
        times = {t: [] for t in jobs}
        for _ in range(args.repeats):
            for t, prepared_job in jobs.items():
                t0 = time.perf_counter()
                prepared_job.compute(batch, list(range(args.rows)))
                times[t].append(time.perf_counter() - t0)
        ahead.update({(n, t): args.rows * n / min(ts) for t, ts in times.items()})
    print(ahead)
    costs = {(preset, mode): host_cost(preset, mode, args.repeats)
            for preset in ("imagenet+rrc", "imagenet+mix", "imagenet+rare", "imagenet+rare+mix")
            for mode in ("per sample", "batched") + (("batched, row by row",) if preset == "imagenet+rrc" else ())}
    print(costs)
    print({name: [round(samples / t) for t in ts] for name, ts in timings.items()})
    naive_rate, job_rate, teacher_rate, ceiling_rate, pil_rate = rate.values()
    render_share = 1 - job_rate / teacher_rate
    lines = ["# Rendering in the reinforce job", "",
             f"{args.rows} real ImageNet images (imagenet-sample), N={args.num_samples} samples each, `{args.augment}`, "
             f"224 px, tiny ViT teacher (1 layer, 32-px patches, hidden 16), 1 intra-op thread, best of {args.repeats} "
             f"alternating runs, CPU ({host()}).", "", "| path | samples/s |", "|---|---|"]
    lines += [f"| {name} | {r:.0f} |" for name, r in rate.items()]
    lines += ["", f"dr-hf job / naive = **{job_rate / naive_rate:.2f}x** (goal >= 3x); the job's time is "
              f"{render_share:.0%} rendering and sampling, {1 - render_share:.0%} teacher.", "",
              f"Ceiling: decoding each image once, torch's antialiased crop kernel alone for each sample (uint8, "
              f"channels-last, what the job uses) and the bare teacher, with no flip, normalisation or float batch to "
              f"write, run at {ceiling_rate:.0f} samples/s: **{ceiling_rate / naive_rate:.2f}x** the naive render, the "
              f"most a job that crops with this kernel can reach here; the job reaches {job_rate / ceiling_rate:.0%} "
              "of it.", "",
              f"For context, the same naive transforms on PIL images (each image decoded once by Pillow, as `datasets`' "
              f"`Image` feature and the classic torchvision pipeline have it: Pillow's resize, then `v2.ToImage`) run at "
              f"{pil_rate:.0f} samples/s: the job is **{job_rate / pil_rate:.2f}x** that. The goal above is judged "
              "against the uint8-tensor naive render, the faster of the two.", "",
              "Parameter sampling alone (part of the job; a row's N samples at once): "
              + ", ".join(f"{us:.1f} us a sample with `{p}`" for p, us in sampling.items()) + ".", "",
              f"Whole job (`reinforce()` on {args.job_rows} rows in 4 shards: map, top-K, parquet shards written while the "
              f"next is computed, the card and its preview): {whole_rate['whole job']:.0f} samples/s against "
              f"{whole_rate['compute alone']:.0f} for `Reinforcer.compute` alone on the same rows "
              f"(**{whole_rate['whole job'] / whole_rate['compute alone']:.2f}**; best of 3). `Dataset.map` with the map "
              f"function on the same rows (batches of 32) spends {map_overhead_ms:.2f} ms a row outside `compute` (the "
              f"columns as Arrow, `datasets` writing them; timed around each call, best of 3): work the main thread "
              f"does between map batches "
              f"while a GPU would wait (EfficientNet-Lite0 in bf16 on the H100, 19,321 samples/s in results/bench_gpu.md, spends {1e3 * args.num_samples / 19321:.1f} ms "
              f"on a row's {args.num_samples} samples).", "",
              f"With a GPU job's pipeline (a render thread and a preparing thread ahead of the teacher), which drains "
              f"between map batches, the whole job on {args.piped_rows} rows in one shard runs at "
              f"{piped_rate[32]:.0f} samples/s in map batches of 32 rows and {piped_rate[256]:.0f} in batches of 256 "
              f"(the default; **{piped_rate[256] / piped_rate[32]:.2f}x**; best of 2).", "",
              "Rows prepared ahead of the teacher: `Reinforcer.compute` on the same rows, each row decoded and its "
              "parameters drawn on the main thread (`--prepare-threads 0`, the CPU default) or by one thread ahead of "
              "the teacher (a GPU job's default uses 4), with this machine's second core free for it, as a GPU job's "
              "host has its cores (samples/s, best of alternating runs):", "",
              "| N | main thread | 1 preparing thread | ratio |", "|---|---|---|---|"]
    lines += [f"| {n} | {ahead[(n, 0)]:.0f} | {ahead[(n, 1)]:.0f} | {ahead[(n, 1)] / ahead[(n, 0)]:.2f}x |"
              for n in sorted({n for n, _ in ahead}, reverse=True)]
    lines += ["",
              "Rendering's host cost, what a GPU job's host must keep up with: a teacher batch of 256 samples (4 rows x 64; "
              "8 rows x 32 in MixUp/CutMix groups) on this CPU with 8x8 crops of small images, so that the host's work is "
              "all there is. Per sample: the CPU path; batched: the GPU path (every stage on the whole batch, one call "
              "per teacher batch).", "",
              "| preset | rendered | kernel launches (aten ops) per 64 samples | host ms per 64 samples | blocking "
              "host-to-device copies per 64 samples |",
              "|---|---|---|---|---|"]
    lines += [f"| `{preset}` | {mode} | {ops:.0f} | {ms:.2f} | {'' if blocking is None else f'{blocking:g}'} |"
              for (preset, mode), (ops, ms, blocking) in costs.items()]
    lines += ["",
              "Command: `python scripts/bench_render.py`."]
    write_markdown(args.out, lines)


if __name__ == "__main__":
    main()
