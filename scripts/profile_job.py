"""Where the reinforce job's time goes: `dr_hf.reinforce` with EfficientNet-Lite0 (random weights, bf16) at N=64,
rendering batched on the GPU, rows prepared as by default (threads, on a GPU).

* ``--profiler cprofile`` (default): cProfile of the main thread; prints the 28 most expensive functions by own time.
* ``--profiler none``: the timing alone.
* ``--profiler torch``: torch.profiler (CPU and, on a GPU, CUDA activity) of the timed job: the ops and kernels by
  own device time, and where the GPU's time goes: its kernels' busy time against the job's wall time, and the device
  time of the kernels the job's render (``dr_hf.render``) and teacher (``dr_hf.teacher``) ranges launched;
  ``PREFIX.trace.json.gz`` holds the timeline (chrome://tracing, Perfetto). Use few rows (``--rows 256``).
* ``--profiler py-spy``: py-spy (``pip install py-spy``) attached to the timed job alone (after the warm-up and any
  compilation), sampling every thread without pausing it: ``PREFIX.threads.txt`` holds what each thread runs,
  ``PREFIX.gil.txt`` only the thread holding the GIL (the host's single lane, in a job whose threads all need it), both
  as collapsed stacks (one line a stack: frames joined by ``;``, then the count of samples); a summary by thread and
  by the library's functions is printed.

    python scripts/profile_job.py --dataset PATH [--device cuda] [--compile reduce-overhead]
    python scripts/profile_job.py --dataset PATH --profiler py-spy --out-prefix /tmp/job
    python scripts/profile_job.py --dataset PATH --profiler torch --rows 256 --out-prefix /tmp/job
"""

import argparse
import collections
import cProfile
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

from bench_gpu import lite0_spec, repeated_rows  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def start_py_spy(prefix: str, rate: int):
    """Two py-spy samplers attached to this process: every thread, and the GIL's holder."""
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    common = [exe, "record", "--pid", str(os.getpid()), "--rate", str(rate), "--format", "raw", "--nonblocking"]
    spies = [subprocess.Popen(common + ["--threads", "--output", f"{prefix}.threads.txt"]),
             subprocess.Popen(common + ["--threads", "--gil", "--output", f"{prefix}.gil.txt"])]
    time.sleep(1.0)  # attached
    return spies


def stop_py_spy(spies):
    for spy in spies:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    for spy in spies:
        spy.wait(timeout=60)


def summarise(path: str, top: int = 24) -> None:
    """Samples by thread (the first frame), and by the innermost dr_hf function of each stack."""
    threads, ours, total = collections.Counter(), collections.Counter(), 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack.startswith("thread (") or not count.isdigit():  # a misread frame name (a newline) splits one
                continue
            count = int(count)
            total += count
            frames = stack.split(";")
            threads[frames[0].split(": ", 1)[-1]] += count  # "thread (id): name": by name (pools come and go)
            inner = [fr for fr in frames if "dr_hf/" in fr]
            leaf = frames[-1]
            ours[(inner[-1] if inner else "(outside dr_hf) " + frames[min(len(frames) - 1, 2)]) + "  <-  " + leaf] += count
    print(f"\n== {path}: {total} samples")
    for name, count in threads.most_common(8):
        print(f"{count / total:7.1%}  {name}")
    print("-- innermost dr_hf frame <- leaf frame")
    for name, count in ours.most_common(top):
        print(f"{count / total:7.1%}  {name}")


WAITING_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::copy_", "aten::_to_copy",
               "aten::pin_memory", "aten::_pin_memory")


def summarise_torch(profile, seconds: float, gpu: bool, prefix: str) -> None:
    """The top ops and kernels by own time (device time on a GPU), the host's time in the job's ranges and its waits
    for the device, and on a GPU :func:`device_time` of the exported trace."""
    events = profile.key_averages()
    sort = ("self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total") \
        if gpu else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=30, max_name_column_width=60))
    # Where host threads wait for the device: CUDA runtime calls (a copy from pageable memory, a synchronize) and the
    # ops that read a value back (bool(), .item(), .cpu()), by their host time, all threads together.
    waits = [e for e in events if e.key.startswith(("cuda", "cu")) or e.key in WAITING_OPS]
    waits.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    print("host waits and CUDA runtime calls: " + (", ".join(
        f"{e.key} {e.self_cpu_time_total / 1e3:.1f} ms ({e.count} calls)" for e in waits[:12] if e.self_cpu_time_total)
        or "none recorded"))
    profile.export_chrome_trace(f"{prefix}.trace.json.gz")  # (gzipped when the name says so)
    print(f"timeline: {prefix}.trace.json.gz")
    events = trace_events(f"{prefix}.trace.json.gz")
    print(host_ranges(events))
    if gpu:
        print(device_time(events, seconds))


RANGES = ("dr_hf.render", "dr_hf.teacher")  # the job's record_function ranges (dr_hf.reinforcer)


def trace_events(trace: str) -> list:
    """The events of a torch.profiler chrome trace (gzipped when its name ends in .gz)."""
    import gzip
    import json

    with (gzip.open if trace.endswith(".gz") else open)(trace, "rt") as f:
        return json.load(f)["traceEvents"]


def job_ranges(events: list) -> list:
    """A trace's host events of :data:`RANGES` (each call of a range on the thread that ran it)."""
    return [e for e in events if e.get("cat") == "user_annotation" and e["name"] in RANGES]


def host_ranges(events: list) -> str:
    """Each of :data:`RANGES`' host time from a trace's events: in all, per call, and on which thread (the
    profiler's table shows a range's CPU time as 0 when the GPU is profiled too); and the host's time pinning
    memory, per thread."""
    spans = collections.defaultdict(list)
    for e in job_ranges(events):
        spans[e["name"]].append(e)
    pins = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") == "aten::pin_memory":
            pins[e["tid"]] += e["dur"]
    ranges = ", ".join(f"{name} {sum(e['dur'] for e in found) / 1e6:.3f} s ({len(found)} calls, "
                       f"{sum(e['dur'] for e in found) / len(found) / 1e3:.2f} ms each, thread "
                       f"{sorted(set(e['tid'] for e in found))})" for name, found in sorted(spans.items()))
    pinned = ", ".join(f"thread {tid} {t / 1e3:.1f} ms" for tid, t in pins.most_common()) or "none"
    return f"host time in {ranges or 'no range recorded'}; pinning memory: {pinned}"


def device_time(events: list, seconds: float) -> str:
    """From a torch.profiler chrome trace: the GPU's busy time (the union of its kernels and copies) against the span
    from the first to the last and against the job's wall time, and each of :data:`RANGES`' kernel time, each kernel
    counted once, for the range whose host thread launched it (through the launch's correlation id). The profiler's
    own table cannot give these: it lists ops beside the kernels they launched, and a range's device time there is
    its span on the device, gaps and other threads' kernels included."""
    work = sorted((e["ts"], e["ts"] + e["dur"], e) for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not work:
        return "no kernels recorded"
    busy, start, end = 0.0, work[0][0], work[0][1]
    for a, b, _ in work[1:]:
        if a > end:
            busy, start = busy + end - start, a
        end = max(end, b)
    busy += end - start
    span = max(b for _, b, _ in work) - work[0][0]
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") == "cuda_runtime"}
    opened = collections.defaultdict(list)  # host thread: its ranges' (start, end, name)
    for e in job_ranges(events):
        opened[e["tid"]].append((e["ts"], e["ts"] + e["dur"], e["name"]))
    launched = collections.Counter()
    for _, _, kernel in work:
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        names = [n for a, b, n in opened.get(launch["tid"], ()) if a <= launch["ts"] <= b] if launch else []
        launched[names[0] if names else "elsewhere"] += kernel["dur"]
    return (f"GPU busy {busy / 1e6:.3f} s: {busy / span:.0%} of the {span / 1e6:.3f} s from its first kernel to its last, "
            f"{busy / 1e6 / seconds:.0%} of the job's {seconds:.2f} s; kernel time by the range that launched it: "
            + ", ".join(f"{name} {t / 1e6:.3f} s" for name, t in sorted(launched.items())))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", default=None, help="the teacher's torch.compile mode (e.g. reduce-overhead)")
    ap.add_argument("--prepare-threads", type=int, default=None, help="default: the job's")
    ap.add_argument("--profiler", choices=("cprofile", "py-spy", "torch", "none"), default="cprofile")
    ap.add_argument("--out-prefix", default=os.path.join(tempfile.gettempdir(), "profile_job"),
                    help="py-spy: where its two collapsed-stack files go; torch: its trace")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    args = ap.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out_prefix)), exist_ok=True)  # (its files go there at the end)

    import datasets

    from dr_hf import ReinforceConfig, TeacherEnsemble, make_pipeline
    from dr_hf import reinforce

    datasets.disable_progress_bars()
    rows = repeated_rows(args.dataset, args.rows)
    tmp = tempfile.mkdtemp()
    teachers = TeacherEnsemble.from_specs([lite0_spec(tmp)], device=args.device, precision="bf16",
                                          compile_mode=args.compile)
    config = ReinforceConfig(augment="imagenet+rrc", augmentations=make_pipeline("imagenet+rrc").config(),
                             teachers=teachers.specs, num_samples=64, topk=10, seed=0, num_classes=1000,
                             precision="bf16", render="batched")
    job = dict(show_progress=False, render_device=args.device, prepare_threads=args.prepare_threads)
    reinforce(rows.select(range(min(256, args.rows))), config, teachers, os.path.join(tmp, "warm"), **job)
    if args.profiler == "py-spy":
        spies = start_py_spy(args.out_prefix, args.rate)
    elif args.profiler == "cprofile":
        profile = cProfile.Profile()
        profile.enable()
    elif args.profiler == "torch":
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.device(args.device).type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        try:  # the render thread's ops too (torch >= 2.7 or so; before, the main thread's and the GPU's only)
            threads = dict(experimental_config=torch._C._profiler._ExperimentalConfig(profile_all_threads=True))
        except TypeError:
            threads = {}
        profile = torch.profiler.profile(activities=activities, **threads)
        profile.start()
    t0 = time.perf_counter()
    reinforce(rows, config, teachers, os.path.join(tmp, "job"), **job)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if args.profiler == "py-spy":
        stop_py_spy(spies)
    elif args.profiler == "cprofile":
        profile.disable()
    elif args.profiler == "torch":
        profile.stop()
    print(f"{args.rows} rows x 64 samples in {seconds:.2f} s: {args.rows * 64 / seconds:,.0f} samples/s "
          f"(compile {args.compile}, prepare threads {args.prepare_threads if args.prepare_threads is not None else 'default'})")
    if args.profiler == "py-spy":
        for kind in ("threads", "gil"):
            summarise(f"{args.out_prefix}.{kind}.txt")
    elif args.profiler == "cprofile":
        pstats.Stats(profile).sort_stats("tottime").print_stats(28)
    elif args.profiler == "torch":
        summarise_torch(profile, seconds, gpu=torch.device(args.device).type == "cuda", prefix=args.out_prefix)


if __name__ == "__main__":
    main()
