"""What teacher precision changes: top-1 flips and mean KL of bf16 autocast and tf32 against fp32, on the same
rendered samples of real ImageNet images (../shared/datasets/imagenet-sample) with EfficientNet-Lite0.

On a GPU (when one is lent) tf32 means TF32 matmuls/convolutions; on the CPU it is float32 matmul precision "high"
(which PyTorch's CPU kernels may treat as fp32) and bf16 is CPU autocast: a proxy for what a GPU does.

    python scripts/bench_precision.py            # -> results/bench_precision.md
"""

import argparse
import os
import sys

import torch

from results_md import write_markdown  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dr_hf import TeacherEnsemble, make_pipeline  # noqa: E402
from dr_hf.augment import Context  # noqa: E402
from dr_hf.pipeline import params_at  # noqa: E402
from dr_hf.images import decode  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--teacher", default="efficientnet-lite0")
    ap.add_argument("--samples", type=int, default=256, help="rendered samples per preset")
    ap.add_argument("--presets", nargs="+", default=["imagenet+rrc", "imagenet+rare"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_precision.md"))
    args = ap.parse_args()

    import datasets

    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = datasets.load_dataset(args.dataset, split="train").cast_column("image", datasets.Image(decode=False))
    ensembles = {p: TeacherEnsemble.from_specs([args.teacher], device=args.device, precision=p) for p in ("fp32", "tf32", "bf16")}
    out = ensembles["fp32"].outputs()[0]
    lines = [f"teacher `{args.teacher}`, {args.samples} samples per preset (one per image of the first "
             f"{args.samples} rows, seed 0), device `{args.device}` ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU, 2 threads'})", "",
             "| preset | precision | top-1 flips vs fp32 | mean KL(fp32 ‖ p) | max abs log-prob diff (top-10) |", "|---|---|---|---|---|"]
    for preset in args.presets:
        pipe = make_pipeline(preset)
        xs = []
        for i in range(args.samples):
            image = decode(rows[i]["image"], row=i)
            params = params_at(pipe.sample(0, i, 1, Context(image.shape[-2], image.shape[-1])), 0)
            xs.append(pipe.render(image, params, out))
        x = torch.stack(xs)
        logp = {p: torch.cat([e.log_probs({0: x[k:k + 64]}) for k in range(0, len(x), 64)]) for p, e in ensembles.items()}
        ref = logp["fp32"]
        top = ref.topk(10, dim=-1).indices
        for p in ("tf32", "bf16"):
            flips = float((logp[p].argmax(-1) != ref.argmax(-1)).float().mean())
            kl = float((ref.exp() * (ref - logp[p])).sum(-1).mean())
            diff = float((ref.gather(1, top) - logp[p].gather(1, top)).abs().max())
            lines.append(f"| `{preset}` | {p} | {flips:.2%} | {kl:.2e} | {diff:.3g} |")
    lines += ["", "Command: `python scripts/bench_precision.py`. fp32 is the default (`--precision`), as in ml-dr."]
    write_markdown(args.out, ["# Teacher precision: what bf16 and tf32 change against fp32", ""] + lines)


if __name__ == "__main__":
    main()
