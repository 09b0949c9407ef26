"""An eager teacher's forward beside threads that want the GIL, against its TorchScript trace (``--compile trace``).

On a GPU an eager forward is hundreds of small kernels, each launched from Python; in the reinforce job that launch
loop shares the GIL with the preparing threads (decoding rows, drawing their parameters) and the render thread, and
on the lent H100 it took 26.2 ms of host time a teacher batch in the job against 13.2 ms for the bare forward
(results/bench_gpu.md, run G). Called from Python, every op lets go of the GIL and must take it back; a trace
(:class:`dr_hf.teacher.TracedForward`) runs the same ops from C++ with the GIL let go once.

The proxy on this CPU: EfficientNet-Lite0 (random weights) on 4 images at 32 px, one intra-op thread, a forward of
~10 ms that is mostly per-op work, as a GPU's host sees it. Each forward is timed alone, beside the job's preparing
work (``RowPreparer`` on real imagenet-sample JPEGs: decode and N=64 samples' parameters, in 1 and 2 threads, looping)
and beside a thread running pure Python (the worst case), eager and traced in interleaved rounds; the preparing
threads' rows/s are counted too. Both forwards give the same outputs, bit for bit (checked). A third arm runs the eager
forward with a short GIL switch interval (``sys.setswitchinterval``, ``--switch-interval`` ms; Python's default is
5 ms, the longest a thread running Python keeps the GIL from one that waits for it): the remedy without a trace, if
the launches waited on threads running Python.

    python scripts/bench_trace.py      # -> results/bench_trace.md
"""

import argparse
import os
import statistics
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from results_md import host, write_markdown  # noqa: E402  (scripts/)

SWITCHED = "eager, short GIL switch interval"


class Busy:
    """Threads running ``work`` in a loop until stopped, counting their iterations."""

    def __init__(self, work, threads: int):
        self.work, self.count, self.stop = work, 0, threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self):
        while not self.stop.is_set():
            self.work()
            self.count += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="timed per forward and condition, each round")
    ap.add_argument("--switch-interval", type=float, default=0.2,
                    help="ms: the GIL switch interval (sys.setswitchinterval; Python's default 5 ms) of the third arm")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_trace.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    import datasets
    import timm

    from dr_hf import make_pipeline
    from dr_hf.reinforcer import RowPreparer
    from dr_hf.teacher import TracedForward

    rows = datasets.load_dataset(args.dataset, split="train").select(range(64))
    rows = rows.cast_column("image", datasets.Image(decode=False))
    values, labels = rows["image"], rows["label"]
    preparer = RowPreparer(make_pipeline("imagenet+rrc"), 0, 64, len(rows), 1000, "image", "label")
    cursor = iter(range(10**12))

    def prepare():  # one row, as a preparing thread of the GPU job does
        i = next(cursor) % len(rows)
        preparer((values[i], i, labels[i], None))

    def python_only():  # pure Python, holding the GIL but for the interpreter's switches
        s = 0
        for i in range(2000):
            s += i * i

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    x = torch.randn(4, 3, 32, 32)
    forwards = {"eager": model, "traced": TracedForward(model, "tf_efficientnet_lite0"), SWITCHED: model}
    with torch.inference_mode():
        outputs = {name: f(x) for name, f in forwards.items()}
        assert torch.equal(outputs["eager"], outputs["traced"]), "the trace changed the outputs"

        def per_forward_ms(forward):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                forward(x)
                n += 1
            return (time.perf_counter() - start) / n * 1e3

        conditions = [("alone", None, 0), ("beside 1 preparing thread", prepare, 1),
                      ("beside 2 preparing threads", prepare, 2), ("beside 1 thread of pure Python", python_only, 1)]
        ms = {(c, f): [] for c, _, _ in conditions for f in forwards}
        rows_per_s = {(c, f): [] for c, work, _ in conditions if work is prepare for f in forwards}
        for r in range(args.rounds):
            for condition, work, threads in conditions:
                order = list(forwards) if r % 2 == 0 else list(forwards)[::-1]
                for name in order:
                    default = sys.getswitchinterval()
                    sys.setswitchinterval(args.switch_interval / 1e3 if name == SWITCHED else default)
                    try:
                        if work is None:
                            ms[condition, name].append(per_forward_ms(forwards[name]))
                            continue
                        with Busy(work, threads) as busy:
                            start = time.perf_counter()
                            ms[condition, name].append(per_forward_ms(forwards[name]))
                            seconds = time.perf_counter() - start
                    finally:
                        sys.setswitchinterval(default)
                    if work is prepare:
                        rows_per_s[condition, name].append(busy.count / seconds)
            print(f"round {r + 1}: " + ", ".join(f"{c} " + "/".join(f"{ms[c, f][-1]:.1f}" for f in forwards) + " ms"
                                                  for c, _, _ in conditions), flush=True)

    lines = ["# An eager teacher's forward beside threads that want the GIL, against its trace", "",
             f"EfficientNet-Lite0 (timm `tf_efficientnet_lite0`, random weights), 4 images at 32 px, fp32, one intra-op "
             f"thread: a forward that is mostly per-op work, as a GPU's host launching it sees it. {host()}, torch "
             f"{torch.__version__}. Each forward timed for {args.seconds:g} s per condition, {args.rounds} rounds, eager "
             "and traced in alternating order; the median of the rounds. The outputs are the same, bit for bit.", "",
             "| condition | eager, ms a forward | traced (`--compile trace`), ms a forward | eager / traced | "
             f"eager, GIL switch interval {args.switch_interval:g} ms, ms a forward | eager / that | rows prepared a "
             "second beside eager / traced / eager with that interval |", "|---|---|---|---|---|---|---|"]
    for condition, work, _ in conditions:
        e, t, w = (statistics.median(ms[condition, f]) for f in ("eager", "traced", SWITCHED))
        prepared = (" / ".join(f"{statistics.median(rows_per_s[condition, f]):.0f}" for f in forwards)
                    if work is prepare else "")
        lines.append(f"| {condition} | {e:.2f} | {t:.2f} | **{e / t:.2f}x** | {w:.2f} | **{e / w:.2f}x** | {prepared} |")
    lines += ["", "Preparing a row: decoding its JPEG (the GIL let go inside the decoder) and drawing its 64 samples' "
              "parameters (`imagenet+rrc`), as the GPU job's preparing threads do (4 of them on a GPU).", "",
              "Command: `python scripts/bench_trace.py`."]
    write_markdown(args.out, lines)


if __name__ == "__main__":
    main()
