"""Run under `torchrun --nproc_per_node 2`: record which rows each process trains on in one epoch."""
import json
import os
import sys

import datasets
import timm

from dr_hf import ReinforcedTrainer, ReinforcedTrainingArguments

datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0.2  # as in conftest.py: not 5 s at the end of each streamed epoch

folder, out_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen = []
train = datasets.load_dataset(folder, split="train", streaming=True)
args = ReinforcedTrainingArguments(os.path.join(out_dir, "run"), max_steps=steps, per_device_train_batch_size=2,
                                   report_to=[], save_strategy="no", use_cpu=True, image_size=32, seed=0,
                                   logging_strategy="no", shuffle_buffer_size=4)
trainer = ReinforcedTrainer(model=timm.create_model("resnet10t", num_classes=10), args=args, train_dataset=train)
collate = trainer.data_collator


def recording(examples):
    for e in examples:  # a one-row Arrow table (a stream of replayed rows), a row, or a group of rows
        ids = e["dr_index"].to_pylist() if hasattr(e["dr_index"], "to_pylist") else e["dr_index"]
        seen.extend(ids if isinstance(ids, list) else [ids])
    return collate(examples)


trainer.data_collator = recording
trainer.train()
with open(os.path.join(out_dir, f"rank{trainer.args.process_index}.json"), "w") as f:
    json.dump(seen, f)
import gc  # noqa: E402

from dr_hf.processes import finish  # noqa: E402

del trainer  # the DDP-wrapped model and its reducer go while the process group is alive
gc.collect()
finish()  # tear the process group down before exit (gloo threads otherwise abort at interpreter exit)
