"""On a GPU: the reinforce job's candidate options against its defaults, in interleaved rounds.

``bench_gpu.py`` runs each variant once, one after another; on the lent H100 a run's figures moved by 5-10% with the
variants' order and the machine's pace, as much as the candidates could gain. Here each round runs every arm (the
job as its defaults run it, and each candidate) once, in an order rotated from round to round, and each candidate's
figure is its shard rate over the default's *in the same round*: the median and the range of those ratios say
whether a candidate gains more than the noise. Each candidate's stored top-K must be the default's, bit for bit
(float32 crops against the default's TF32 ones: the share of samples with the same top-1 class).

The job: EfficientNet-Lite0 (random weights: the architecture's speed) in bf16, compiled (``--compile
reduce-overhead``; ``--eager``: not compiled, as the job runs by default, its forward launched op by op from Python
beside the render and preparing threads), N=64, ``imagenet+rrc`` (``--augment``), 4 preparing threads, the default
map batch (1024 rows at N=64).

``--host-proxy``: the same job's host on a CPU, where the host's work is most of what there is: CIFAR-10's 32-px
images, a 1-layer ViT with 8-px patches at 32 px (fp32, eager), the GPU job's batched render on CPU tensors, its
render thread and 4 preparing threads, one intra-op thread. A proxy for options that change the host's work (how the
render thread's ops take the GIL, how many it dispatches), not for the GPU's.

    python scripts/bench_gpu_ab.py --dataset PATH      # -> results/bench_gpu_ab.md, results/bench_gpu_ab.json
    python scripts/bench_gpu_ab.py --host-proxy --arms script_off,render_threads_2,crop_groups_64
                                                       # -> results/bench_gpu_ab_host_proxy.md
"""

import argparse
import glob
import importlib
import json
import os
import statistics
import sys
import tempfile
import types

import numpy as np
import torch

from bench_gpu import lite0_spec, logged_shard_rates, repeated_rows, synced  # noqa: E402  (scripts/)
from bench_render import tiny_vit  # noqa: E402
from results_md import host, write_markdown  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _on_main_thread(preparer, device, item):  # a row prepared as before prepare_pinned: its image pinned at its copy
    return preparer(item)


def _crops_in_groups_of_64(*args, **kwargs):
    from dr_hf.resample import resized_crops

    return resized_crops(*args, **kwargs, group_size=64)


# name: (Reinforcer options, TF32 flags: None for the teachers' own (on for bf16 and tf32 teachers, off for fp32 ones),
# False: off, the crops' products in float32; reinforce() options; library names replaced for the arm's runs,
# "module.name": function or value; "torch.num_threads": torch's intra-op threads for the arm;
# "teachers.compile_mode": the arm's teachers, the same ones compiled or traced so)
ARMS = {
    "default": ({}, None, {}, {}),
    "render_threads_1": ({}, None, {"render_threads": 1}, {}),
    "render_threads_2": ({}, None, {"render_threads": 2}, {}),
    # the crops' products in float32 beside the bf16 teacher, as before TF32 crops became the default for bf16 teachers
    "float32_crops": ({}, False, {}, {}),
    "render_stream": ({"render_stream": True}, None, {}, {}),
    "read_back_at_once": ({"read_back_late": False}, None, {}, {}),
    "prepare_threads_2": ({}, None, {"prepare_threads": 2}, {}),
    "prepare_threads_3": ({}, None, {"prepare_threads": 3}, {}),
    # torch's intra-op threads 1 for the job (16 on the H100's host): the preparing threads' CPU tensor work (pinned
    # copies) in the calling thread, no OpenMP team of each thread's own spinning beside the main thread's launches
    "intra_op_threads_1": ({}, None, {}, {"torch.num_threads": 1}),
    # the teacher's forward as a TorchScript trace (`--compile trace`): eager's kernels bit for bit, launched from C++
    # with the GIL let go (on a CPU core beside 2 preparing threads, Lite0's small forward ran 1.71-2.30x, bench_trace.md)
    "trace_teacher": ({}, None, {}, {"teachers.compile_mode": "trace"}),
    "map_batches_256": ({}, None, {"batch_size": 256}, {}),
    "pin_on_main_thread": ({}, None, {}, {"dr_hf.reinforcer.prepare_pinned": _on_main_thread}),
    # a teacher batch's crops in groups of 64 boxes, not 32: 170 aten ops a batch of 256 instead of 238 (imagenet+rrc,
    # 224 px, results/bench_resample.md), at about the same GPU time in bench_resample (0.95-1.04x, three H100 runs)
    "crop_groups_64": ({}, None, {}, {"dr_hf.pipeline.resized_crops": _crops_in_groups_of_64}),
    # rows prepared by 4 spawned processes instead of 4 threads: no GIL shared with the render thread, a copy of each
    # decoded image between processes
    "prepare_workers_4": ({}, None, {"prepare_workers": 4, "prepare_threads": 0}, {}),
    # the batched render's tensor work (the crops, RandAugment's ops) op by op from Python, as before it ran as
    # TorchScript calls without the GIL (beside a thread drawing parameters, 8-px crops took several times as long so
    # on a CPU, results/bench_resample.md)
    "script_off": ({}, None, {}, {"dr_hf.script.ENABLED": False}),
}
LABELS = {
    "default": "the job as its defaults run it ({render_threads}, {crops} crops, the render's tensor work as "
               "TorchScript calls, the teacher's stream)",
    "render_threads_1": "1 render thread (`--render-threads 1`)",
    "render_threads_2": "2 render threads (`--render-threads 2`)",
    "float32_crops": "the crops' products in float32 (TF32 flags off, as `--precision fp32` teachers set them)",
    "render_stream": "rendering on a CUDA stream of its own (`Reinforcer(render_stream=True)`)",
    "read_back_at_once": "each batch's results read back before the next forward is queued "
                         "(`Reinforcer(read_back_late=False)`)",
    "prepare_threads_2": "2 preparing threads (`--prepare-threads 2`; 4 by default on a GPU)",
    "prepare_threads_3": "3 preparing threads (`--prepare-threads 3`)",
    "intra_op_threads_1": "torch's intra-op threads 1 (`torch.set_num_threads(1)`) for the job",
    "trace_teacher": "the teacher's forward as a TorchScript trace (`--compile trace`), launched without the GIL",
    "map_batches_256": "map batches of 256 rows (`--batch-size 256`; the default at N=400)",
    "pin_on_main_thread": "each image copied to pinned memory by the thread that queues the GPU's work, not by the "
                          "preparing thread that decoded it",
    "crop_groups_64": "the batched crops in groups of up to 64 boxes (32 by default)",
    "prepare_workers_4": "rows prepared by 4 processes (`--prepare-workers 4`), not 4 threads",
    "script_off": "the batched render's tensor work (crops, RandAugment) op by op from Python "
                  "(`dr_hf.script.ENABLED = False`), not as TorchScript calls",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=None, help="default: imagenet-sample (CIFAR-10 with --host-proxy)")
    ap.add_argument("--rows", type=int, default=1024, help="rows of each timed job (the dataset repeated)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--arms", default="render_threads_2,float32_crops,render_stream",
                    help=f"candidates, comma-separated, among {', '.join(a for a in ARMS if a != 'default')}")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--augment", default="imagenet+rrc", help="the preset the job draws and renders")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run (no figures worth reading)")
    ap.add_argument("--eager", action="store_true", help="the teacher not compiled (the job's default)")
    ap.add_argument("--host-proxy", action="store_true",
                    help="the GPU job's host on this CPU with 32-px images and a tiny teacher (see above)")
    ap.add_argument("--out", default=None, help="default: results/bench_gpu_ab.md (bench_gpu_ab_host_proxy.md)")
    args = ap.parse_args()
    shared = os.path.join(ROOT, "..", "shared", "datasets")
    args.dataset = args.dataset or os.path.join(shared, "cifar10" if args.host_proxy else "imagenet-sample")
    args.out = args.out or os.path.join(ROOT, "results", "bench_gpu_ab_host_proxy.md" if args.host_proxy
                                        else "bench_gpu_ab.md")
    if args.host_proxy:
        args.device = "cpu"
        torch.set_num_threads(1)
    arms = ["default"] + [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        sys.exit(f"--arms: unknown {unknown}; choose among {list(ARMS)}")
    dry = not args.device.startswith("cuda") and not args.host_proxy
    if not dry and not args.host_proxy and not torch.cuda.is_available():
        sys.exit("bench_gpu_ab needs a CUDA GPU (--device cpu: a dry run)")

    import datasets

    from dr_hf import ReinforceConfig, make_pipeline
    from dr_hf.job import default_prepare_threads, reinforce
    from dr_hf.reinforcer import Reinforcer, default_render_threads
    from dr_hf.teacher import TeacherEnsemble, float32_precision

    datasets.disable_progress_bars()
    encoded = repeated_rows(args.dataset, args.rows)
    tmp = tempfile.mkdtemp()
    base_options = {}
    if args.host_proxy:  # a GPU job's render thread and preparing threads (on a CPU the job has neither by default)
        # a 1-layer ViT at 32 px, 8-px patches, CIFAR-10's classes
        spec = tiny_vit(tmp, size=32, patch=8, classes=10, resample=3)
        teachers = TeacherEnsemble.from_specs([spec], device="cpu")
        threads, classes, precision = 4, 10, "fp32"
        base_options = {"render_threads": default_render_threads(types.SimpleNamespace(device=torch.device("cuda")),
                                                                 make_pipeline(args.augment))}  # a GPU job's
    else:
        spec = lite0_spec(tmp)
        teachers = TeacherEnsemble.from_specs([spec], device=args.device, precision="bf16",
                                              compile_mode=None if args.eager else "default" if dry else "reduce-overhead")
        threads, classes, precision = default_prepare_threads(teachers), 1000, "bf16"
    config = ReinforceConfig(augment=args.augment, augmentations=make_pipeline(args.augment).config(),
                             teachers=teachers.specs, num_samples=args.num_samples, topk=min(10, classes), seed=0,
                             num_classes=classes, precision=precision, render="batched")

    rates = logged_shard_rates()

    init, flags = Reinforcer.__init__, TeacherEnsemble.float32_flags
    device_name = f"CPU (host proxy: {host()})" if args.host_proxy else "CPU (dry run)" if dry else torch.cuda.get_device_name()
    results = {"device": device_name, "torch": torch.__version__,
               "rows": args.rows, "num_samples": args.num_samples, "prepare_threads": threads, "rounds": []}
    base = os.path.splitext(args.out)[0]

    variants = {}  # compile mode: the teachers compiled or traced so (arms that name one)

    def run(arm, rows, folder):
        options, tf32, job_options, patches = ARMS[arm]
        Reinforcer.__init__ = lambda self, *a, **kw: init(self, *a, **{**kw, **options})
        TeacherEnsemble.float32_flags = flags if tf32 is None else lambda self: float32_precision(tf32)
        replaced, threads_before, arm_teachers = {}, torch.get_num_threads(), teachers
        for where, value in patches.items():
            if where == "torch.num_threads":
                torch.set_num_threads(value)
                continue
            if where == "teachers.compile_mode":
                if value not in variants:
                    variants[value] = TeacherEnsemble.from_specs([spec], device=teachers.device,
                                                                 precision=teachers.precision, compile_mode=value)
                arm_teachers = variants[value]
                continue
            module, name = where.rsplit(".", 1)
            module = importlib.import_module(module)
            replaced[module, name] = getattr(module, name)
            setattr(module, name, value)
        try:
            rates.clear()
            synced(lambda: reinforce(rows, config, arm_teachers, folder, show_progress=False,
                                     render_device=args.device, **{"prepare_threads": threads, **base_options, **job_options}))
            return rates[-1] if rates else float("nan")
        finally:
            Reinforcer.__init__, TeacherEnsemble.float32_flags = init, flags
            torch.set_num_threads(threads_before)
            for (module, name), original in replaced.items():
                setattr(module, name, original)

    for arm in arms:  # warm each arm (the compiled graphs, the render threads' first kernels)
        run(arm, encoded.select(range(min(64, args.rows))), os.path.join(tmp, f"warm-{arm}"))
    for r in range(args.rounds):
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        shard = {arm: run(arm, encoded, os.path.join(tmp, f"job-{r}-{arm}")) for arm in order}
        results["rounds"].append({"order": order, "shard_samples_per_s": shard})
        with open(base + ".json", "w") as f:
            json.dump(results, f, indent=1)

    def top_k(folder):
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = sorted(glob.glob(os.path.join(tmp, folder, "data", "*.parquet")))
        table = pa.concat_tables([pq.read_table(f, columns=["dr_topk_indices", "dr_topk_logprobs"]) for f in files])
        return table

    reference = top_k("job-0-default")
    ratios = {}
    for arm in arms[1:]:
        per_round = [rd["shard_samples_per_s"][arm] / rd["shard_samples_per_s"]["default"] for rd in results["rounds"]]
        other = top_k(f"job-0-{arm}")
        same = reference.equals(other)
        top1 = [np.asarray(t["dr_topk_indices"].combine_chunks().flatten().flatten()).reshape(-1, config.topk)[:, 0]
                for t in (reference, other)]
        ratios[arm] = {"per_round": per_round, "median": statistics.median(per_round),
                       "same_outputs": same, "same_top1": float(np.mean(top1[0] == top1[1]))}
    results["ratios"] = ratios
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1)

    if args.host_proxy:
        job = (f"The GPU job's host on this CPU, one intra-op thread: CIFAR-10's 32-px images ({args.rows} rows), "
               f"N={args.num_samples}, `{args.augment}` at 32 px, a 1-layer ViT with 8-px patches (fp32, eager), the "
               f"batched render on CPU tensors in a render thread, {threads} preparing threads, the default map batch.")
        title = "The GPU job's host on a CPU: candidate options, interleaved rounds"
    else:
        job = (f"Real ImageNet images (imagenet-sample, repeated to {args.rows} rows), N={args.num_samples}, "
               f"`{args.augment}`, timm `tf_efficientnet_lite0` (random weights) in bf16 at 224 px, "
               + ("eager (not compiled, the job's default)" if args.eager else
                  "compiled (`--compile reduce-overhead`)") + f", {threads} preparing threads, the default map batch.")
        title = f"The {'eager' if args.eager else 'compiled'} GPU job's candidate options, interleaved rounds"
    lines = [f"# {title}", "",
             f"{results['device']}, torch {results['torch']}. {job} {args.rounds} rounds; each runs every arm once, "
             "in an order rotated from round to round.", "",
             "| arm | shard samples/s, each round | / the default in the same round: median (range) | "
             "outputs against the default's |", "|---|---|---|---|"]
    for arm in arms:
        figures = ", ".join(f"{rd['shard_samples_per_s'][arm]:,.0f}" for rd in results["rounds"])
        if arm == "default":
            count = base_options.get("render_threads", default_render_threads(teachers, make_pipeline(args.augment)))
            label = LABELS[arm].format(render_threads=f"{count} render thread" + "s" * (count != 1),
                                       crops="float32" if precision == "fp32" else "TF32")
            lines.append(f"| {label} | {figures} | 1 | |")
            continue
        v = ratios[arm]
        outputs = "the same, bit for bit" if v["same_outputs"] else f"the same top-1 class in {v['same_top1']:.2%}"
        lines.append(f"| {LABELS[arm]} | {figures} | **{v['median']:.2f}x** ({min(v['per_round']):.2f}-"
                     f"{max(v['per_round']):.2f}) | {outputs} |")
    where = "" if args.host_proxy else " (on a machine with a CUDA GPU)"
    preset = ((f" --augment {args.augment}" if args.augment != "imagenet+rrc" else "") + (" --eager" if args.eager else "")
              + (f" --rows {args.rows}" if args.rows != ap.get_default("rows") else "")
              + (f" --num-samples {args.num_samples}" if args.num_samples != ap.get_default("num_samples") else ""))
    lines += ["", f"Command: `python scripts/bench_gpu_ab.py{' --host-proxy' if args.host_proxy else ''}{preset} --arms "
                  f"{','.join(arms[1:])} --rounds {args.rounds}`{where}."]
    write_markdown(args.out, lines)


if __name__ == "__main__":
    main()
