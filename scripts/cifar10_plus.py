"""CIFAR-10+: does a student trained on the reinforced set beat the same student trained plainly, at plain cost?

On ../shared/datasets/cifar10 (50,000 real training images), on this CPU:

1. hold out a stratified validation split (5,000 images, seed 0); never tune on anything else;
2. train the teacher(s) (cached as safetensors in timm's folder layout, so reruns skip them);
3. reinforce the training split with `dr-hf reinforce` (N samples, top-K), pushing nothing;
4. train the same student three ways, same epochs, augmentation, optimizer and schedule: (a) ERM with labels,
   (b) online KD from the same teacher, (c) ReinforcedTrainer on CIFAR-10+; over several seeds;
5. evaluate on the validation split (and on --test-dataset if given) and write results/cifar10_plus.md.

    python scripts/cifar10_plus.py                 # the full run (about an hour on 2 CPU cores)
    python scripts/cifar10_plus.py --quick         # a few minutes: smoke test of the whole path
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import torch

from results_md import host, write_markdown  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def accuracy(p):
    return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}


def splits(args):
    """(train folder, val folder): a stratified hold-out of the real CIFAR-10 training images."""
    import datasets

    train_dir, val_dir = os.path.join(args.work, "train"), os.path.join(args.work, "val")
    if not os.path.isfile(os.path.join(val_dir, "data", "train-00000-of-00001.parquet")):
        ds = datasets.load_dataset(args.data, split="train")
        parts = ds.train_test_split(test_size=args.val_rows, seed=0, stratify_by_column="label")  # shuffled
        train = parts["train"]
        if args.train_rows:
            train = train.select(range(args.train_rows))
        for folder, part in ((train_dir, train), (val_dir, parts["test"])):
            os.makedirs(os.path.join(folder, "data"), exist_ok=True)
            part.to_parquet(os.path.join(folder, "data", "train-00000-of-00001.parquet"))
    return train_dir, val_dir


def load_test(path):
    """The --test-dataset (its test split, else its first), which must have image and label columns; None: none."""
    import datasets

    if path is None:
        return None
    names = datasets.get_dataset_split_names(path)
    ds = datasets.load_dataset(path, split="test" if "test" in names else names[0])
    missing = {"image", "label"} - set(ds.column_names)
    if missing:
        raise SystemExit(f"--test-dataset {path}: no column(s) {sorted(missing)}")
    return ds


def make_model(arch, seed, num_classes=10):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(arch, num_classes=num_classes, pretrained_cfg_overlay=dict(
        input_size=(3, 32, 32), interpolation="bilinear", mean=CIFAR_MEAN, std=CIFAR_STD, crop_pct=1.0))


def training_args(args, out, seed, epochs, lr, batch):
    from dr_hf import ReinforcedTrainingArguments

    return ReinforcedTrainingArguments(
        out, num_train_epochs=epochs, per_device_train_batch_size=batch, per_device_eval_batch_size=500,
        learning_rate=lr, weight_decay=0.05, optim="adamw_torch", lr_scheduler_type="cosine", warmup_steps=0.05,
        seed=seed, data_seed=seed, image_size=32, image_mean=CIFAR_MEAN, image_std=CIFAR_STD, interpolation="bilinear",
        crop_scale=args.crop_scale, augment="rrc+flip", temperature=1.0, ce_weight=0.0,
        dataloader_num_workers=args.workers, logging_steps=50, save_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=True,
    )


def train_teacher(args, train, val, index):
    """A teacher in timm's folder layout (config.json + model.safetensors), trained once and cached."""
    from timm.models import save_for_hf

    from dr_hf import ReinforcedTrainer

    folder = os.path.join(args.work, f"teacher-{args.teacher_arch}-{index}")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        with open(os.path.join(folder, "dr_hf_result.json")) as f:
            return folder, json.load(f)
    model = make_model(args.teacher_arch, seed=100 + index)
    targs = training_args(args, os.path.join(args.work, "runs", f"teacher-{index}"), 100 + index, args.teacher_epochs,
                          args.teacher_lr, args.batch_size)
    trainer = ReinforcedTrainer(model=model, args=targs, train_dataset=train, eval_dataset=val, compute_metrics=accuracy)
    t0 = time.time()
    trainer.train()
    result = {"accuracy": trainer.evaluate()["eval_accuracy"], "seconds": time.time() - t0}
    save_for_hf(model, folder, safe_serialization=True)
    with open(os.path.join(folder, "dr_hf_result.json"), "w") as f:
        json.dump(result, f)
    return folder, result


def reinforce(args, train_dir, teacher_specs, preset):
    out = os.path.join(args.work, f"cifar10-plus-{preset}")
    cmd = [sys.executable, "-m", "dr_hf", "reinforce", train_dir, "--output", out, "--augment", preset,
           "--crop-scale", str(args.crop_scale), "--num-samples", str(args.num_samples), "--topk", str(args.topk),
           "--seed", "0", "--teacher-batch-size", "512", "--quiet"]
    for spec in teacher_specs:
        cmd += ["--teacher", spec]
    shown = "dr-hf " + " ".join(shlex.quote(c) for c in cmd[3:])
    t0 = time.time()
    if not os.path.isfile(os.path.join(out, "README.md")):
        subprocess.run(cmd, check=True)
    from dr_hf.stats import summarize

    stats = summarize(out)
    return out, stats, shown, time.time() - t0


def train_student(args, method, seed, train, val, test, teacher_specs):
    from dr_hf import ReinforcedTrainer

    model = make_model(args.student_arch, seed=seed)
    # (per_device_train_batch_size counts images, MixUp/CutMix data's too: the same images per step for every set)
    sargs = training_args(args, os.path.join(args.work, "runs", f"{method}-{seed}"), seed, args.student_epochs,
                          args.student_lr, args.batch_size)
    if method == "online-kd":
        sargs.online_teachers = list(teacher_specs)
    trainer = ReinforcedTrainer(model=model, args=sargs, train_dataset=train, eval_dataset=val, compute_metrics=accuracy)
    out = trainer.train()
    row = {"method": method, "seed": seed, "val": trainer.evaluate()["eval_accuracy"],
           "seconds": out.metrics["train_runtime"], "samples_per_second": out.metrics["train_samples_per_second"]}
    if test is not None:
        row["test"] = trainer.evaluate(eval_dataset=test)["eval_accuracy"]
    log(f"student {method} seed {seed}: {row}")
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "datasets", "cifar10"))
    ap.add_argument("--work", default=os.path.join(ROOT, "out", "cifar10_plus"))
    ap.add_argument("--test-dataset", default=None, help="a dataset with image, label columns, evaluated at the end only")
    ap.add_argument("--val-rows", type=int, default=5000)
    ap.add_argument("--train-rows", type=int, default=0, help="0: all 45,000")
    ap.add_argument("--teacher-arch", default="resnet18d")
    ap.add_argument("--teachers", type=int, default=1)
    ap.add_argument("--teacher-epochs", type=float, default=10)
    ap.add_argument("--teacher-lr", type=float, default=2e-3)
    ap.add_argument("--student-arch", default="resnet10t")
    ap.add_argument("--student-epochs", type=float, default=3)
    ap.add_argument("--student-lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--topk", type=int, default=5)
    ap.add_argument("--crop-scale", type=float, default=0.35)
    ap.add_argument("--presets", nargs="+", default=["rrc+flip"])
    ap.add_argument("--methods", nargs="+", default=["erm", "online-kd", "reinforced"])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the whole path in minutes")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "cifar10_plus.md"))
    args = ap.parse_args()
    if args.quick:
        args.train_rows, args.val_rows, args.teacher_epochs, args.student_epochs = 2000, 500, 1, 1
        args.num_samples, args.seeds, args.work = 4, [0], args.work + "-quick"
        args.out = os.path.join(args.work, "cifar10_plus.md")
    import datasets

    t_start = time.time()
    train_dir, val_dir = splits(args)
    train = datasets.load_dataset(train_dir, split="train")
    val = datasets.load_dataset(val_dir, split="train")
    test = load_test(args.test_dataset)
    log(f"train {len(train)} rows, val {len(val)} rows")

    teachers = []
    for i in range(args.teachers):
        folder, result = train_teacher(args, train, val, i)
        teachers.append((f"timm:local-dir:{folder}", result))
        log(f"teacher {i}: val accuracy {result['accuracy']:.4f} ({result['seconds']:.0f} s)")
    specs = [spec for spec, _ in teachers]
    ensemble_acc = None
    if len(specs) > 1:
        ensemble_acc = evaluate_ensemble(specs, val)

    rows, reinforced = [], {}
    for preset in args.presets:
        out, stats, shown, seconds = reinforce(args, train_dir, specs, preset)
        reinforced[preset] = (out, stats, shown, seconds)
        log(f"reinforced {preset}: {stats}")
    for seed in args.seeds:
        for method in args.methods:
            if method == "reinforced":
                for preset in args.presets:
                    plus = datasets.load_dataset(reinforced[preset][0], split="train")
                    row = train_student(args, "reinforced", seed, plus, val, test, specs)
                    row["method"] = f"reinforced ({preset})"
                    rows.append(row)
            else:
                rows.append(train_student(args, method, seed, train, val, test, specs))
    write_report(args, teachers, ensemble_acc, reinforced, rows, time.time() - t_start)


def evaluate_ensemble(specs, val):
    from dr_hf import TeacherEnsemble
    from dr_hf.pipeline import AugmentPipeline
    from dr_hf.images import decode

    ens = TeacherEnsemble.from_specs(specs)
    center = AugmentPipeline([])  # the teachers' crop_pct (1.0 here) comes with their input spec
    hits = 0
    for start in range(0, len(val), 500):
        batch = val[start:start + 500]
        x = {o: torch.stack([center.render(decode(im), {}, out) for im in batch["image"]]) for o, out in enumerate(ens.outputs())}
        hits += int((ens.log_probs(x).argmax(-1).numpy() == np.asarray(batch["label"])).sum())
    return hits / len(val)


def write_report(args, teachers, ensemble_acc, reinforced, rows, seconds):
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)

    def stat(values):
        values = np.asarray(values, dtype=np.float64)
        return f"{100 * values.mean():.2f} ± {100 * values.std():.2f}" if len(values) > 1 else f"{100 * values.mean():.2f}"

    erm = np.mean([r["val"] for r in by.get("erm", [])]) if "erm" in by else None
    erm_s = np.mean([r["seconds"] for r in by.get("erm", [])]) if "erm" in by else None
    kd = np.mean([r["val"] for r in by.get("online-kd", [])]) if "online-kd" in by else None
    cmd = "python scripts/cifar10_plus.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "# CIFAR-10+: reinforced vs plain vs online distillation, on real CIFAR-10",
        "",
        f"`{cmd.strip()}` on {host()} (torch {torch.__version__}), {seconds / 60:.0f} min in all.",
        "",
        f"- Data: `../shared/datasets/cifar10` (50,000 real training images). Held out: a stratified validation split of "
        f"{args.val_rows} images (seed 0); training split: the other {args.train_rows or 50000 - args.val_rows} (shuffled, "
        "so MixUp groups mix classes). Nothing was tuned on a test set.",
        f"- Teacher: {len(teachers)} x timm `{args.teacher_arch}` trained from scratch for {args.teacher_epochs} epochs "
        f"(rrc+flip, crop scale {args.crop_scale}, AdamW, cosine), cached as safetensors. Val accuracy: "
        + ", ".join(f"{100 * r['accuracy']:.2f}% ({r['seconds'] / 60:.0f} min)" for _, r in teachers)
        + (f"; ensemble {100 * ensemble_acc:.2f}%" if ensemble_acc is not None else "") + ".",
        f"- Student: timm `{args.student_arch}` from scratch, {args.student_epochs} epochs, batch {args.batch_size}, AdamW "
        f"lr {args.student_lr}, wd 0.05, cosine with 5% warm-up; the same for all three; KD loss at T=1 (no CE term).",
        "",
    ]
    for preset, (out, stats, shown, secs) in reinforced.items():
        lines += [f"- Reinforcement `{preset}`: N={stats['num_samples']}, K={stats['topk']}, "
                  f"{stats['bytes_per_sample']} bytes/sample, teacher agreement with labels on the stored unmixed samples "
                  f"{100 * stats.get('teacher_top1_agreement', float('nan')):.2f}%, made in {secs / 60:.1f} min:",
                  "", f"  `{shown}`", ""]
    lines += ["| student trained with | val accuracy (%) | " + ("test accuracy (%) | " if any("test" in r for r in rows) else "")
              + "wall time (s) | samples/s | vs ERM (points) | wall time / ERM |",
              "|---|---|" + ("---|" if any("test" in r for r in rows) else "") + "---|---|---|---|"]
    for method, rs in by.items():
        acc = np.mean([r["val"] for r in rs])
        sec = np.mean([r["seconds"] for r in rs])
        cells = [method, stat([r["val"] for r in rs])]
        if any("test" in r for r in rows):
            cells.append(stat([r["test"] for r in rs]) if all("test" in r for r in rs) else "")
        cells += [f"{sec:.0f}", f"{np.mean([r['samples_per_second'] for r in rs]):.1f}",
                  f"{100 * (acc - erm):+.2f}" if erm is not None else "", f"{sec / erm_s:.2f}x" if erm_s else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Seeds: {args.seeds} (mean ± std over seeds). Per run:", "", "```json",
              *[json.dumps(r) for r in rows], "```", ""]
    goal = []
    for method, rs in by.items():
        if method.startswith("reinforced") and erm is not None:
            acc = np.mean([r["val"] for r in rs])
            sec = np.mean([r["seconds"] for r in rs])
            goal.append(f"- {method}: {100 * (acc - erm):+.2f} points over ERM (goal >= +1.5)"
                        + (f", {100 * (acc - kd):+.2f} vs online KD (goal >= -0.5)" if kd is not None else "")
                        + f", wall time {sec / erm_s:.2f}x ERM (goal <= 1.1x)")
    lines += ["## Against the goals", "", *goal, ""]
    write_markdown(args.out, lines)


if __name__ == "__main__":
    main()
