"""The training loader: images/s of `ReinforcedTrainer.get_train_dataloader()` on a reinforced copy of real ImageNet
images against a plain `transformers.Trainer` fed by the standard torchvision pipeline (`RandomResizedCrop(224)` +
flip + `ToTensor` + `Normalize` via `set_transform`, the same interpolation), `dataloader_num_workers` 0 and 2, side by
side in one run, each to float pixels, and the loaders a GPU run can use: uint8 batches, normalised on the device,
and ``replay_on_device`` (the workers hand over JPEG bytes, the device decodes and renders; on a CPU only the
workers' part is timed, ``--device cuda`` times the whole), and, with workers, the loader writing every batch into
fresh shared memory as ``default_collate`` does, float batches and ``replay_on_device``'s JPEG bytes (what the
workers' recycled blocks, ``dr_hf.batch_memory``, save). The reinforced copy stores the paper's N=400 samples per
image (its teacher, a 1-layer ViT, only fills the columns), so each row carries what a real ImageNet+ row carries.

    python scripts/bench_loader.py                 # -> results/bench_loader.md
    python scripts/bench_loader.py --device cuda   # on a GPU machine
"""

import argparse
import os
import sys
import tempfile
import time

import torch

from bench_render import reinforced_sample  # noqa: E402  (scripts/)
from results_md import host, write_markdown  # noqa: E402  (scripts/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRESH = "ReinforcedTrainer, fresh shared memory a batch (no BatchPool)"
FRESH_ON_DEVICE = "ReinforcedTrainer, replay_on_device=True, fresh shared memory a batch"
UINT8 = "ReinforcedTrainer, uint8_pixels=True (loader only)"
ON_DEVICE = "ReinforcedTrainer, replay_on_device=True"
PLAIN_PERSISTENT = "plain Trainer + torchvision, persistent workers"
PERSISTENT = "ReinforcedTrainer, persistent workers"
sys.path.insert(0, ROOT)


class FreshBlocks:
    """A collator whose worker writes every batch into fresh shared memory, as before dr_hf.batch_memory (and as
    ``default_collate`` does): what recycling the blocks saves."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        from dr_hf.batch_memory import worker_pool

        worker_pool().blocks = 0
        return self.collator(examples)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "datasets", "imagenet-sample"))
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=4, help="times each image is read per epoch")
    ap.add_argument("--epochs", type=int, default=5, help="alternating epochs per loader (best counts)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--interpolation", default="bilinear")
    ap.add_argument("--num-samples", type=int, default=400, help="N stored per image (the paper's 400)")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_loader.md"))
    ap.add_argument("--device", default="cpu", help="cuda: the student's device is the GPU, and the replay_on_device "
                    "rows include decoding and rendering there (on a CPU they time the workers' part alone)")
    args = ap.parse_args()

    import datasets
    import timm
    from torchvision.transforms import v2
    from transformers import Trainer, TrainingArguments

    from dr_hf import ReinforcedTrainer, ReinforcedTrainingArguments

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    mode = getattr(v2.InterpolationMode, args.interpolation.upper())
    tv = v2.Compose([v2.RandomResizedCrop(224, interpolation=mode, antialias=True), v2.RandomHorizontalFlip(),
                     v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def transform(batch):
        return {"pixel_values": [tv(im.convert("RGB")) for im in batch["image"]], "labels": batch["label"]}

    def collate(rows):
        return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]), "labels": torch.tensor([r["labels"] for r in rows])}

    model = timm.create_model("resnet10t", num_classes=1000)
    cuda = args.device == "cuda"

    def drain():
        if cuda:
            torch.cuda.synchronize()

    rates, whole_epoch = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        source, folder = reinforced_sample(args.dataset, args.rows, args.num_samples, tmp)
        epoch = [i % args.rows for i in range(args.rows * args.repeat)]  # each image `repeat` times an epoch
        plus = datasets.load_dataset(folder, split="train").select(epoch)
        plain = source.select(epoch).with_transform(transform)
        for workers in (0, 2):
            common = dict(per_device_train_batch_size=args.batch, dataloader_num_workers=workers, report_to=[],
                          use_cpu=not cuda, remove_unused_columns=False)
            def trainer(**kw):
                return ReinforcedTrainer(model=model, args=ReinforcedTrainingArguments(
                    os.path.join(tmp, "r"), image_size=224, image_mean=mean, image_std=std,
                    interpolation=args.interpolation, **common, **kw), train_dataset=plus)

            # float batches normalised in the workers, named explicitly: on a GPU the default is uint8 (the UINT8 row)
            float_batches, uint8_batches = trainer(uint8_pixels=False), trainer(uint8_pixels=True)
            on_device = trainer(replay_on_device=True)
            fresh, fresh_on_device = trainer(uint8_pixels=False), trainer(replay_on_device=True)
            persistent = trainer(uint8_pixels=False, dataloader_persistent_workers=True) if workers else None
            for t in (fresh, fresh_on_device):
                t.data_collator = FreshBlocks(t.train_collator)
            loaders = {  # (loader, what a batch's images are counted from)
                "plain Trainer + torchvision": (Trainer(
                    model=model, args=TrainingArguments(os.path.join(tmp, "p"), **common), train_dataset=plain,
                    data_collator=collate).get_train_dataloader(), lambda batch: batch["pixel_values"]),
                "ReinforcedTrainer": (float_batches.get_train_dataloader(), float_batches.pixel_values),
                **({FRESH: (fresh.get_train_dataloader(), fresh.pixel_values)} if workers else {}),
                UINT8: (uint8_batches.get_train_dataloader(), uint8_batches.pixel_values if cuda
                        else lambda batch: batch["pixel_values"]),
                ON_DEVICE: (on_device.get_train_dataloader(), on_device.pixel_values if cuda else lambda batch: batch["labels"]),
                **({FRESH_ON_DEVICE: (fresh_on_device.get_train_dataloader(), fresh_on_device.pixel_values if cuda
                                      else lambda batch: batch["labels"])} if workers else {}),
                # workers started once for all epochs (dataloader_persistent_workers=True), on both sides
                **({PLAIN_PERSISTENT: (Trainer(
                    model=model, args=TrainingArguments(os.path.join(tmp, "p"), **common,
                                                        dataloader_persistent_workers=True),
                    train_dataset=plain, data_collator=collate).get_train_dataloader(),
                    lambda batch: batch["pixel_values"]),
                    PERSISTENT: (persistent.get_train_dataloader(), persistent.pixel_values)} if workers else {}),
            }
            for name in loaders:
                rates[(name, workers)] = whole_epoch[(name, workers)] = 0.0
            for _ in range(args.epochs):  # alternating epochs, best of each; each timed from its first batch (steady
                for name, (loader, pixels) in loaders.items():  # state: worker start-up is a fixed cost per epoch)
                    n, t0, start = 0, None, time.perf_counter()
                    for batch in loader:
                        count = pixels(batch).shape[0]
                        if t0 is None:
                            drain()
                            t0, first = time.perf_counter(), count
                        else:
                            n += count
                    drain()
                    end = time.perf_counter()
                    rates[(name, workers)] = max(rates[(name, workers)], n / (end - t0))
                    whole_epoch[(name, workers)] = max(whole_epoch[(name, workers)], (n + first) / (end - start))
            if workers == 0:  # fidelity: the same rows and choices replayed on the device and by the workers
                groups = on_device.train_dataset.__getitems__(list(range(min(64, len(on_device.train_dataset)))))
                replayed = on_device.train_collator(groups)["replay"].render(  # batched: what CUDA runs
                    on_device.replay_pipeline, on_device.student_output, on_device.args.device, batched=True)
                scale = torch.tensor(std)[:, None, None] * 255
                levels = ((replayed.cpu() - float_batches.train_collator(groups)["pixel_values"]).abs() * scale).flatten()
                fidelity = (levels.mean().item(), torch.quantile(levels[::7], 0.999).item(), levels.max().item())
    lines = ["# The training loader", "",
             f"{args.rows} real ImageNet images (imagenet-sample, median 500x375 JPEG), reinforced with N="
             f"{args.num_samples} samples each (K=10, `imagenet+rrc`), each read {args.repeat} times an epoch, 224 px, "
             f"{args.interpolation} on both, batch {args.batch}, {host()}, best of {args.epochs} "
             "alternating epochs, each timed from its first batch (steady state; the last column times the whole "
             "epoch).", "",
             "| loader | workers | images/s | whole epoch, start-up included |", "|---|---|---|---|"]
    lines += [f"| {name} | {w} | {r:.0f} | {whole_epoch[(name, w)]:.0f} |" for (name, w), r in rates.items()]
    for w in (0, 2):
        ratio = rates[("ReinforcedTrainer", w)] / rates[("plain Trainer + torchvision", w)]
        lines.append(f"\nReinforcedTrainer / plain torchvision with {w} workers: **{ratio:.2f}x** (goal >= 1.5x); with "
                     f"uint8 batches as on a GPU: {rates[(UINT8, w)] / rates[('plain Trainer + torchvision', w)]:.2f}x")
    lines += ["", f"`{FRESH}`: each worker writes every batch into fresh shared memory, as `default_collate` does "
              f"and dr-hf did before `dr_hf.batch_memory`; the pooled blocks (the `ReinforcedTrainer` row) deliver "
              f"{rates[('ReinforcedTrainer', 2)] / rates[(FRESH, 2)]:.2f}x its images/s; with `replay_on_device` (the "
              f"JPEG bytes in recycled blocks), {rates[(ON_DEVICE, 2)] / rates[(FRESH_ON_DEVICE, 2)]:.2f}x."]
    lines += ["", f"Persistent workers (`dataloader_persistent_workers=True`: started once, not every epoch): the whole "
              f"epoch, start-up included, at {whole_epoch[(PERSISTENT, 2)]:.0f} images/s against "
              f"{whole_epoch[('ReinforcedTrainer', 2)]:.0f} (ReinforcedTrainer) and {whole_epoch[(PLAIN_PERSISTENT, 2)]:.0f}"
              f" against {whole_epoch[('plain Trainer + torchvision', 2)]:.0f} (plain); ReinforcedTrainer / plain, "
              f"both persistent: **{whole_epoch[(PERSISTENT, 2)] / whole_epoch[(PLAIN_PERSISTENT, 2)]:.2f}x** the "
              "whole epoch's images/s."]
    if cuda:
        lines += ["", f"`{UINT8}`: batches leave the workers as uint8 and the trainer normalises them on "
                  f"{torch.cuda.get_device_name()} (the default on a GPU); the `ReinforcedTrainer` rows are float "
                  "batches normalised in the workers (`uint8_pixels=False`, the default on a CPU)."]
    else:
        lines += ["", f"`{UINT8}`: the loader alone, as a GPU run uses it (the default there): batches leave the workers "
                  "as uint8 and the trainer normalises them on the GPU, which this CPU cannot show; on a CPU the "
                  "default is float batches, normalised in the workers (the `ReinforcedTrainer` rows)."]
    from dr_hf.images import jpeg_decoder_name

    library = jpeg_decoder_name()
    decoder = (f"JPEG bytes, decoded there by nvJPEG ({library})" if library is not None else
               "decoded pixels: no TorchCodec nor torchvision.io decoding there, so the workers decode with PIL")
    where = (f"on {torch.cuda.get_device_name()}, {decoder}" if cuda else
             "on this CPU's tensors (the same JPEG decoder; on a CPU the trainer itself renders one view at a time, "
             "the workers' pixels exactly)")
    lines += ["", f"Fidelity: {min(64, args.rows * args.repeat)} rows replayed with `replay_on_device`'s batched renderer, as on CUDA, {where}, against "
              f"the workers' float batch of the same rows and choices: {fidelity[0]:.3f} grey levels on average, "
              f"{fidelity[1]:.2f} at the 99.9th percentile, {fidelity[2]:.1f} at most."]
    if cuda:
        lines += ["", f"`{ON_DEVICE}`: the workers read rows and hand over each image ({decoder}); the trainer "
                  f"renders each batch on {torch.cuda.get_device_name()}, timed to the rendered batch."]
    else:
        lines += ["", f"`{ON_DEVICE}`: the host's part alone (the workers read rows and hand over JPEG bytes and each "
                  "view's parameters): decoding and rendering are the GPU's, which this CPU cannot show; the figure is "
                  "what the host can feed a GPU. " + "; ".join(
                      f"{w} workers: {rates[(ON_DEVICE, w)] / rates[('ReinforcedTrainer', w)]:.2f}x the workers' own "
                      f"rendering" for w in (0, 2)) + "."]
    given = [a for k, a in enumerate(sys.argv[1:]) if not a.startswith("--out") and sys.argv[k] != "--out"]
    lines += ["", "Command: `" + " ".join(["python scripts/bench_loader.py", *given]) + "`."]
    write_markdown(args.out, lines)


if __name__ == "__main__":
    main()
