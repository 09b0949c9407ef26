"""Training throughput, side by side in one run: ReinforcedTrainer vs plain transformers.Trainer vs online KD.

Same student (a transformers ResNet from a config), same augmentations (RandomResizedCrop + flip), same batch size,
same input size, on the first --rows rows of ../shared/datasets/imagenet-sample:

* plain:      transformers.Trainer, torchvision v2 RandomResizedCrop+flip collator, cross-entropy (the model's loss);
* reinforced: ReinforcedTrainer on the same rows reinforced with EfficientNet-Lite0 (N=8, top-10), KD from stored outputs;
* online KD:  ReinforcedTrainer with a live EfficientNet-Lite0/1/2 ensemble (same augmentation, teacher at its own size).

Writes results/bench_train.md with samples/s and the ratios (goals: reinforced/plain >= 0.95, reinforced/online >= 3).

    python scripts/bench_train.py --rows 64 --steps 12
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import datasets
import torch
from torchvision.transforms import v2 as T
from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainerCallback, TrainingArguments

from dr_hf import ReinforcedTrainer, ReinforcedTrainingArguments
from dr_hf.images import decode

from results_md import host, write_markdown  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StepTimer(TrainerCallback):
    """Seconds between consecutive optimizer-step ends after ``warmup`` steps: data loading, collation (decode and
    augmentation replay), forward, backward and the update all count."""

    def __init__(self, warmup=2):
        self.warmup, self.times, self.t = warmup, [], None

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        if self.t is not None and state.global_step > self.warmup:
            self.times.append(now - self.t)
        self.t = now


def student(size):
    torch.manual_seed(0)
    cfg = ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                       layer_type="basic", num_labels=1000, image_size=size)
    return ResNetForImageClassification(cfg)


def plain_collator(size):
    tf = T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def collate(rows):
        return {"pixel_values": torch.stack([tf(decode(r["image"])) for r in rows]),
                "labels": torch.tensor([r["label"] for r in rows])}

    return collate


def rate(timer, batch):
    return batch * len(timer.times) / sum(timer.times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--online-steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_train.md"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    plain_ds = datasets.load_dataset(args.dataset, split="train").select(range(args.rows))
    common = dict(per_device_train_batch_size=args.batch, report_to=[], save_strategy="no", logging_strategy="no",
                  use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        plus = os.path.join(tmp, "plus")
        subprocess.run([sys.executable, "-m", "dr_hf", "reinforce", args.dataset, "--output", plus, "--limit", str(args.rows),
                        "--teacher", "efficientnet-lite0", "--augment", "rrc+flip", "--num-samples", "8", "--topk", "10",
                        "--quiet"], check=True)
        reinforced_ds = datasets.load_dataset(plus, split="train")

        timers = {}
        t = StepTimer()
        Trainer(model=student(args.size), args=TrainingArguments(os.path.join(tmp, "p"), max_steps=args.steps,
                                                                 remove_unused_columns=False, **common),
                train_dataset=plain_ds, data_collator=plain_collator(args.size), callbacks=[t]).train()
        timers["plain Trainer"] = rate(t, args.batch)

        t = StepTimer()
        ReinforcedTrainer(model=student(args.size), args=ReinforcedTrainingArguments(
            os.path.join(tmp, "r"), max_steps=args.steps, image_size=args.size, **common),
            train_dataset=reinforced_ds, callbacks=[t]).train()
        timers["ReinforcedTrainer"] = rate(t, args.batch)

        t = StepTimer(warmup=1)
        ReinforcedTrainer(model=student(args.size), args=ReinforcedTrainingArguments(
            os.path.join(tmp, "o"), max_steps=args.online_steps, image_size=args.size,
            augment="rrc+flip", online_teachers=["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"], **common),
            train_dataset=plain_ds, callbacks=[t]).train()
        timers["online KD (Lite0/1/2)"] = rate(t, args.batch)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({host()})"
    r, p, o = timers["ReinforcedTrainer"], timers["plain Trainer"], timers["online KD (Lite0/1/2)"]
    lines = [
        "# Training throughput: reinforced vs plain vs online KD",
        "",
        f"`python scripts/bench_train.py --rows {args.rows} --steps {args.steps} --batch {args.batch} --size {args.size}` on {device}; "
        f"student: transformers ResNet (basic blocks, 1000 classes) from a config at {args.size}px; RandomResizedCrop+flip; "
        f"batch {args.batch}; dataloader_num_workers=0; samples/s over the steps after warm-up, measured in one run.",
        "",
        "| trainer | samples/s |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in timers.items()],
        "",
        f"- ReinforcedTrainer / plain Trainer: **{r / p:.2f}** (goal >= 0.95)",
        f"- ReinforcedTrainer / online KD: **{r / o:.1f}x** (goal >= 3x)",
    ]
    write_markdown(args.out, lines)


if __name__ == "__main__":
    main()
