"""A CPU teacher with glibc's default handling of large freed blocks against ``dr_hf.memory.reuse_freed_memory()``
(what ``dr-hf`` sets): EfficientNet-Lite0 with its real weights, the bare forward at the job's teacher batch (256)
and at 64, and ``reinforce()`` on real ImageNet rows, each in fresh processes (the setting lasts for a process),
alternating, best of ``--repeats``; with the minor page faults and kernel time each spent.

    python scripts/bench_cpu_teacher.py            # -> results/bench_cpu_teacher.md
"""

import argparse
import json
import os
import subprocess
import sys

from results_md import host, write_markdown  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dr_hf.memory import ENV_SWITCH  # noqa: E402

WORKER = r"""
import json, resource, sys, tempfile, time
import torch
import datasets
from dr_hf import ReinforceConfig, TeacherEnsemble, make_pipeline
from dr_hf.memory import reuse_freed_memory
from dr_hf import reinforce

mode, dataset, rows, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
if mode == "reused":
    assert reuse_freed_memory(), "not glibc"
datasets.disable_progress_bars()
teachers = TeacherEnsemble.from_specs(["efficientnet-lite0"], device="cpu")
size = teachers.outputs()[0].size
out = {}

def timed(name, fn, samples):
    fn()  # warm
    r0, t0, n = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0
    while n == 0 or time.perf_counter() - t0 < seconds:
        fn()
        n += samples
    r1, dt = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    out[name] = {"samples_per_s": n / dt, "faults_per_sample": (r1.ru_minflt - r0.ru_minflt) / n,
                 "kernel_share": (r1.ru_stime - r0.ru_stime) / ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))}

for batch in (256, 64):
    x = torch.randn(batch, 3, *size).contiguous(memory_format=torch.channels_last)
    timed(f"forward, batches of {batch}", lambda: teachers.log_probs({0: x}), batch)
source = datasets.load_dataset(dataset, split="train").select(range(rows))
config = ReinforceConfig(augment="imagenet+rrc", augmentations=make_pipeline("imagenet+rrc").config(),
                         teachers=teachers.specs, num_samples=32, topk=10, seed=0, num_classes=1000)

def job():
    with tempfile.TemporaryDirectory() as folder:
        reinforce(source, config, teachers, folder, show_progress=False)

timed(f"reinforce(), {rows} rows x N=32", job, rows * 32)
print(json.dumps(out))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_cpu_teacher.md"))
    args = ap.parse_args()

    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    best = {}
    for _ in range(args.repeats):  # alternating fresh processes
        for mode in ("default", "reused"):
            proc = subprocess.run([sys.executable, "-c", WORKER, mode, args.dataset, str(args.rows), str(args.seconds)],
                                  capture_output=True, text=True, check=True,  # (a CPU ensemble sets it unless told)
                                  env={**env, ENV_SWITCH: "1" if mode == "reused" else "0"})
            for name, m in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                if (mode, name) not in best or m["samples_per_s"] > best[(mode, name)]["samples_per_s"]:
                    best[(mode, name)] = m
    names = list(dict.fromkeys(name for _, name in best))
    lines = ["# A CPU teacher and the C allocator", "",
             f"EfficientNet-Lite0 (real weights) on this CPU ({host()}, torch's default threads), glibc's "
             "default handling of large freed blocks against `dr_hf.memory.reuse_freed_memory()` (what a CPU teacher ensemble sets; the default by `DR_HF_REUSE_FREED_MEMORY=0`), "
             f"fresh processes alternating, best of {args.repeats}; `reinforce()` on real ImageNet rows "
             "(imagenet-sample, `imagenet+rrc`, N=32, teacher batches of 256).", "",
             "| what | default: samples/s | page faults a sample | kernel time | reused: samples/s | page faults a sample "
             "| kernel time | speed-up |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        d, r = best[("default", name)], best[("reused", name)]
        lines.append(f"| {name} | {d['samples_per_s']:.1f} | {d['faults_per_sample']:,.0f} | {d['kernel_share']:.0%} | "
                     f"{r['samples_per_s']:.1f} | {r['faults_per_sample']:,.0f} | {r['kernel_share']:.0%} | "
                     f"**{r['samples_per_s'] / d['samples_per_s']:.2f}x** |")
    lines += ["", "Kernel time: the share of the process's CPU time spent in the kernel (page faults zeroing the "
              "pages of freed and reallocated activations).", "", "Command: `python scripts/bench_cpu_teacher.py`."]
    write_markdown(args.out, lines)


if __name__ == "__main__":
    main()
