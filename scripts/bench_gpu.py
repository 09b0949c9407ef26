"""On a GPU: the reinforce job with EfficientNet-Lite0 (bf16) at N=64 against the bare bf16 teacher forward on the same
batches, and batched rendering's speed and fidelity on the device, side by side in one run.

* fidelity: batched CUDA renders against the per-sample CPU renders that training replays (grey levels), and the
  teacher's log-probabilities on both;
* rendering: samples/s of teacher batches of 256 samples as the job renders them (all N samples of the rows of a
  teacher block; MixUp/CutMix groups of 8 rows), per sample on the CPU (1 thread), per sample on the GPU, batched on
  the GPU (``--render batched``);
* teacher: the bare bf16 forward at N (one row's samples) and at 256 (the job's teacher batches at N=64), and at 256
  compiled (``--compile reduce-overhead``: each forward one CUDA graph), traced (``--compile trace``: eager's kernels
  launched from C++ without the GIL), and in fp32 (the default ``--precision``: strict float32) and tf32 at 256;
* job: ``dr_hf.reinforce`` end to end (decode, render, teacher, top-k, parquet) as its defaults run it (map batches
  of 65,536 samples' worth of rows: 1024 at N=64), rendering on the GPU (batched) with rows prepared (decoded,
  parameters drawn) inline on the main thread or by threads ahead of the teacher (the default on a GPU), the latter
  also with the teacher compiled and traced; and on the CPU (per sample, one render thread ahead of the teacher). Whole-job
  rates include writing the card, shard rates (from the job's log) do not. Options that might beat these defaults
  (more render threads, TF32 crops, a render stream, ...) run in ``bench_gpu_ab.py``, interleaved against them.

The teacher is timm's ``tf_efficientnet_lite0`` with random weights unless ``--weights`` gives a safetensors file: the
speed is the architecture's, the weights only change the numbers it writes.

    python scripts/bench_gpu.py --dataset PATH            # -> results/bench_gpu.md, results/bench_gpu.json
    python scripts/bench_gpu.py --dataset PATH --job-only # the teacher and the job only (a short device budget)
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from results_md import write_markdown  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def drain():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synced(fn, repeats=1):
    """Best wall time of ``repeats`` calls, the GPU drained before and after each."""
    best = float("inf")
    for _ in range(repeats):
        drain()
        t0 = time.perf_counter()
        fn()
        drain()
        best = min(best, time.perf_counter() - t0)
    return best


def logged_shard_rates() -> list:
    """A list that fills with each shard's samples/s as the reinforce job logs it (its shard rate leaves out the card
    and its preview, which a whole-job time includes)."""
    import logging
    import re

    rates = []

    class ShardRate(logging.Handler):
        def emit(self, record):
            found = re.search(r"shard .* ([0-9.]+) samples/s", record.getMessage())
            if found:
                rates.append(float(found.group(1)))

    job_logger = logging.getLogger("dr_hf.job")
    job_logger.setLevel(logging.INFO)
    job_logger.addHandler(ShardRate())
    return rates


def repeated_rows(dataset: str, rows: int):
    """``rows`` rows (image, label) of a dataset folder, repeated if it has fewer, images left encoded."""
    import datasets

    source = datasets.load_dataset(dataset, split="train").select_columns(["image", "label"])
    source = source.cast_column("label", datasets.Value("int64")).cast_column("image", datasets.Image(decode=False))
    return datasets.concatenate_datasets([source] * -(-rows // len(source))).select(range(rows))


def lite0_spec(folder: str, weights=None) -> str:
    """A teacher spec for timm's ``tf_efficientnet_lite0``: ``weights``, or random ones (the architecture's speed)
    saved under ``folder``."""
    if weights is None:
        import timm
        from safetensors.torch import save_file

        torch.manual_seed(0)
        weights = os.path.join(folder, "lite0.safetensors")
        save_file(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict(), weights)
    return f"timm:tf_efficientnet_lite0@{weights}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--rows", type=int, default=256, help="rows of the timed job (the dataset repeated if smaller)")
    ap.add_argument("--gpu-repeat", type=int, default=4,
                    help="the GPU job variants run on the rows this many times over (a shard long enough to time)")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--weights", default=None, help="tf_efficientnet_lite0 weights (safetensors); default: random")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_gpu.md"))
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of every step (no figures worth reading)")
    ap.add_argument("--job-only", action="store_true",
                    help="only the teacher and the job (skip fidelity and the rendering table: a short device budget)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_gpu needs a CUDA GPU (--device cpu: a dry run)")
    device = args.device
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    import datasets

    from dr_hf import ReinforceConfig, TeacherEnsemble, make_pipeline
    from dr_hf.augment import Context
    from dr_hf.images import decode
    from dr_hf import reinforce

    datasets.disable_progress_bars()
    results = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu (dry run)", "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
               "num_samples": args.num_samples}
    lines = []

    def log(message):
        lines.append(message)

    def save():
        base = os.path.splitext(args.out)[0]
        with open(base + ".json", "w") as f:
            json.dump(results, f, indent=1)

    encoded = repeated_rows(args.dataset, args.rows)
    cells = encoded[: min(16, args.rows)]["image"]
    t0 = time.perf_counter()
    images = [decode(v) for v in cells]
    results["decode_ms_per_image"] = 1000 * (time.perf_counter() - t0) / len(images)

    tmp = tempfile.mkdtemp()
    spec = lite0_spec(tmp, args.weights)
    fp32 = TeacherEnsemble.from_specs([spec], device=device, precision="fp32")
    out = fp32.outputs()[0]
    results["teacher"] = {"spec": "timm:tf_efficientnet_lite0", "random_weights": args.weights is None,
                          "input": list(out.size), "interpolation": out.interpolation}
    n = args.num_samples

    # -- fidelity: batched on the GPU vs per sample on the CPU (what training replays) --------------------------------
    fidelity = {}
    for preset in () if args.job_only else ("imagenet+rrc", "imagenet+rare+mix"):
        pipe = make_pipeline(preset)
        g = pipe.group_size
        few = images[:8]
        params = [pipe.sample(0, i, 16, Context(im.shape[-2], im.shape[-1], i % g, g, 16)) for i, im in enumerate(few)]
        picks = [(r, j) for r in range(len(few)) for j in range(16)]
        cpu = pipe.render_samples(few, params, picks, out, batched=False)
        gpu_images = [im.to(device) for im in few]
        gpu = pipe.render_samples(gpu_images, params, picks, out, batched=True)
        cpu_batched = pipe.render_samples(few, params, picks, out, batched=True)
        levels = torch.tensor(out.std)[:, None, None] * 255
        diff = ((gpu.cpu() - cpu) * levels).abs()
        same_code = ((gpu.cpu() - cpu_batched) * levels).abs()
        lp_cpu, lp_gpu = fp32.log_probs({0: cpu}), fp32.log_probs({0: gpu})
        top = torch.topk(lp_cpu, 10, dim=-1)
        fidelity[preset] = {
            "grey_levels_mean": float(diff.mean()), "grey_levels_max": float(diff.max()),
            "fraction_over_1_level": float((diff > 1.01).float().mean()),
            "gpu_vs_cpu_batched_max_levels": float(same_code.max()),
            "teacher_top1_agreement": float((lp_cpu.argmax(-1) == lp_gpu.argmax(-1)).float().mean()),
            "teacher_top10_logprob_max_abs_diff": float((torch.gather(lp_gpu, 1, top.indices) - top.values).abs().max()),
        }
    results["fidelity"] = fidelity
    save()

    # -- rendering teacher batches of 256 samples, as the job does ---------------------------------------------------
    render = {}
    for preset in () if args.job_only else ("imagenet+rrc", "imagenet+mix", "imagenet+rare", "imagenet+rare+mix"):
        pipe = make_pipeline(preset)
        g = pipe.group_size
        rows = min(max(g, 256 // n), len(images) // g * g)  # a teacher batch's rows: a teacher block, or one group
        per = [pipe.sample(0, i, n, Context(im.shape[-2], im.shape[-1], i % g, g, n)) for i, im in enumerate(images)]
        picks = [(r, j) for r in range(rows) for j in range(min(n, 256 // rows))]
        gpu_images = [im.to(device) for im in images]

        def run(imgs, batched):
            def go():
                for a in range(0, len(imgs) - rows + 1, rows):
                    pipe.render_samples(imgs[a:a + rows], per[a:a + rows], picks, out, batched=batched)
            return go

        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        cpu_s = synced(run(images, False), 1)
        torch.set_num_threads(saved)
        run(gpu_images, True)()  # warm-up
        run(gpu_images, False)()
        samples = len(images) // rows * len(picks)
        render[preset] = {name: samples / synced(fn, 3) for name, fn in
                          (("gpu_batched", run(gpu_images, True)), ("gpu_per_sample", run(gpu_images, False)))}
        render[preset]["cpu_per_sample_1_thread"] = samples / cpu_s
    results["render_samples_per_s"] = render
    save()

    # -- the bare teacher --------------------------------------------------------------------------------------------
    bf16 = TeacherEnsemble.from_specs([spec], device=device, precision="bf16")
    teacher = {}
    dry = not device.startswith("cuda")
    for batch in (n, 256):
        x = torch.randn(batch, 3, *out.size, device=device)
        for _ in range(1 if dry else 3):
            bf16.log_probs({0: x})
        steps = 1 if dry else max(4, 4096 // batch)
        teacher[batch] = steps * batch / synced(lambda: [bf16.log_probs({0: x}) for _ in range(steps)], 1 if dry else 3)
    results["teacher_bf16_samples_per_s"] = {str(k): v for k, v in teacher.items()}
    # what --precision costs: fp32 (the default: strict float32, cuDNN's TF32 off) and tf32, batches of 256
    x = torch.randn(256, 3, *out.size, device=device)
    by_precision = {}
    for precision, ensemble in (("fp32", fp32), ("tf32", TeacherEnsemble.from_specs([spec], device=device,
                                                                                    precision="tf32"))):
        for _ in range(1 if dry else 3):
            ensemble.log_probs({0: x})
        steps = 1 if dry else 8
        by_precision[precision] = steps * 256 / synced(lambda: [ensemble.log_probs({0: x}) for _ in range(steps)],
                                                       1 if dry else 3)
    results["teacher_samples_per_s_by_precision"] = {**by_precision, "bf16": teacher[256]}
    # compiled (--compile): on a GPU reduce-overhead, each forward replayed as one CUDA graph
    compile_mode = "reduce-overhead" if not dry else "default"
    compiled = TeacherEnsemble.from_specs([spec], device=device, precision="bf16", compile_mode=compile_mode)
    x = torch.randn(256, 3, *out.size, device=device)
    for _ in range(1 if dry else 3):
        compiled.log_probs({0: x})
    steps = 1 if dry else 16
    teacher_compiled = steps * 256 / synced(lambda: [compiled.log_probs({0: x}) for _ in range(steps)], 1 if dry else 3)
    results["teacher_bf16_compiled_samples_per_s"] = {"256": teacher_compiled, "mode": compile_mode}
    # traced (--compile trace): eager's kernels, launched from C++ without the GIL
    traced = TeacherEnsemble.from_specs([spec], device=device, precision="bf16", compile_mode="trace")
    for _ in range(1 if dry else 3):
        traced.log_probs({0: x})
    teacher_traced = steps * 256 / synced(lambda: [traced.log_probs({0: x}) for _ in range(steps)], 1 if dry else 3)
    results["teacher_bf16_traced_samples_per_s"] = {"256": teacher_traced}
    save()

    # -- the job, end to end -----------------------------------------------------------------------------------------
    shard_rates = logged_shard_rates()
    job, shard = {}, {}
    from dr_hf.job import default_prepare_threads

    threads = default_prepare_threads(bf16)
    gpu_rows = args.rows * args.gpu_repeat
    # (name, render device, render mode, prepare threads, rows, teachers), each job with its map batch's default
    # (1024 rows at N=64). Options that might beat the defaults run in bench_gpu_ab.py, interleaved against them.
    variants = (("gpu_batched_inline", device, "batched", 0, gpu_rows, bf16),
                ("gpu_batched_threads", device, "batched", threads, gpu_rows, bf16),
                ("gpu_batched_threads_compiled", device, "batched", threads, gpu_rows, compiled),
                ("gpu_batched_threads_traced", device, "batched", threads, gpu_rows, traced),
                ("cpu_per_sample_threads", "cpu", "per-sample", threads, args.rows, bf16))
    for name, render_device, mode, prepare, count, ensemble in variants:
        config = ReinforceConfig(augment="imagenet+rrc", augmentations=make_pipeline("imagenet+rrc").config(),
                                 teachers=bf16.specs, num_samples=n, topk=10, seed=0, num_classes=1000,
                                 precision="bf16", render=mode)
        reinforce(encoded.select(range(min(16, args.rows))), config, ensemble, os.path.join(tmp, f"warm-{name}"),
                  batch_size=16, show_progress=False, render_device=render_device, prepare_threads=0)
        rows_here = datasets.concatenate_datasets([encoded] * (count // args.rows))
        folder = os.path.join(tmp, f"job-{name}")
        shard_rates.clear()
        seconds = synced(lambda: reinforce(rows_here, config, ensemble, folder, show_progress=False,
                                           render_device=render_device, prepare_threads=prepare))
        job[name] = count * n / seconds
        shard[name] = shard_rates[-1] if shard_rates else float("nan")
        results["job_samples_per_s"], results["job_shard_samples_per_s"] = job, shard
        save()

    best = max(("gpu_batched_inline", "gpu_batched_threads"), key=lambda name: shard[name])
    results["job_over_teacher"] = shard[best] / teacher[256]  # the job's teacher batches hold 256 samples at N=64
    results["job_over_teacher_variant"] = best
    results["compiled_job_over_teacher"] = shard["gpu_batched_threads_compiled"] / teacher[256]
    results["compiled_job_over_compiled_teacher"] = shard["gpu_batched_threads_compiled"] / teacher_compiled
    results["traced_job_over_teacher"] = shard["gpu_batched_threads_traced"] / teacher[256]
    results["traced_job_over_traced_teacher"] = shard["gpu_batched_threads_traced"] / teacher_traced
    save()

    f = results["fidelity"]
    log("# The reinforce job on a GPU")
    log("")
    log(f"{results['device']}, torch {results['torch']}, {results['cpu_threads']} CPU threads. Real ImageNet images "
        f"(imagenet-sample, repeated to {args.rows} rows), N={n}, `imagenet+rrc`, teacher timm `tf_efficientnet_lite0` "
        f"({'random' if args.weights is None else 'given'} weights: the architecture's speed) at "
        f"{out.size[0]} px, {out.interpolation}, bf16 autocast.")
    log("")
    log("| what | samples/s |")
    log("|---|---|")
    log(f"| bare teacher forward, batches of {n} (N samples of one row) | {teacher[n]:,.0f} |")
    log(f"| bare teacher forward, batches of 256 (the job's: all samples of a teacher block of rows) | {teacher[256]:,.0f} |")
    log(f"| bare teacher forward, batches of 256, `torch.compile` mode {compile_mode} (`--compile`) | {teacher_compiled:,.0f} |")
    log(f"| bare teacher forward, batches of 256, traced (`--compile trace`) | {teacher_traced:,.0f} |")
    log(f"| bare teacher forward, batches of 256, `--precision fp32` (the default: strict float32) | "
        f"{by_precision['fp32']:,.0f} |")
    log(f"| bare teacher forward, batches of 256, `--precision tf32` | {by_precision['tf32']:,.0f} |")
    labels = {"gpu_batched_inline": "job, rendering on the GPU (batched), rows prepared inline (`--prepare-threads 0`)",
              "gpu_batched_threads": f"job, rendering on the GPU (batched), rows prepared by {threads} threads (the default)",
              "gpu_batched_threads_compiled": f"the same, teacher compiled (`--compile {compile_mode}`)",
              "gpu_batched_threads_traced": "the same, teacher traced (`--compile trace`)",
              "cpu_per_sample_threads": f"job, rendering on the CPU (per sample, 1 render thread), {threads} prepare threads"}
    log("")
    log("| job | rows | whole job, samples/s | its shard, samples/s |")
    log("|---|---|---|---|")
    for name, _, _, _, count, _ in variants:
        log(f"| {labels[name]} | {count} | {job[name]:,.0f} | {shard[name]:,.0f} |")
    log("")
    log(f"Job (the faster GPU variant's shard rate) / bare teacher on the same batches of 256: "
        f"**{results['job_over_teacher']:.2f}** (goal >= 0.8). With the teacher compiled: "
        f"**{results['compiled_job_over_teacher']:.2f}** of the bare eager forward, "
        f"{results['compiled_job_over_compiled_teacher']:.2f} of the bare compiled one. With the teacher traced: "
        f"**{results['traced_job_over_teacher']:.2f}** of the bare eager forward, "
        f"{results['traced_job_over_traced_teacher']:.2f} of the bare traced one. "
        f"Decoding (PIL or TorchCodec on the CPU) costs {results['decode_ms_per_image']:.2f} ms an image here. "
        f"Options that might beat the defaults: `scripts/bench_gpu_ab.py`.")
    if render:
        log("")
        log("Rendering teacher batches of 256 samples as the job does (samples/s):")
        log("")
        log("| preset | GPU, batched | GPU, per sample | CPU, per sample, 1 thread |")
        log("|---|---|---|---|")
        for preset, r in render.items():
            log(f"| `{preset}` | {r['gpu_batched']:,.0f} | {r['gpu_per_sample']:,.0f} | {r['cpu_per_sample_1_thread']:,.0f} |")
    if f:
        log("")
        log("Fidelity of batched GPU renders against the per-sample CPU renders training replays (8 images x 16 samples):")
        log("")
        log("| preset | mean grey levels | max | pixels > 1 level | GPU vs CPU batched, max | teacher top-1 agreement | "
            "top-10 log-prob max diff (fp32) |")
        log("|---|---|---|---|---|---|---|")
        for preset, v in f.items():
            log(f"| `{preset}` | {v['grey_levels_mean']:.3f} | {v['grey_levels_max']:.0f} | "
                f"{v['fraction_over_1_level']:.2%} | {v['gpu_vs_cpu_batched_max_levels']:.0f} | "
                f"{v['teacher_top1_agreement']:.2%} | {v['teacher_top10_logprob_max_abs_diff']:.4f} |")
    log("")
    log("Command: `python scripts/bench_gpu.py" + (" --job-only" if args.job_only else "") + "` (on a machine with a CUDA GPU).")
    write_markdown(args.out, lines)
    save()


if __name__ == "__main__":
    main()
