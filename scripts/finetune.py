"""Fine-tune a pretrained transformers image classifier on a reinforced dataset: transformers'
``examples/pytorch/image-classification/run_image_classification.py``, ported by swapping ``Trainer`` for
``ReinforcedTrainer``. Everything else is the example's shape: ``HfArgumentParser``, the checkpoint's image processor
(its size and normalisation reach the reinforced replay through ``processing_class``), eval data prepared with
``set_transform`` (by the image processor itself, which also serves timm checkpoints) and the script's own
``collate_fn`` (used for evaluation), checkpoints and ``resume_from_checkpoint``.

    python scripts/finetune.py --model_name_or_path google/vit-base-patch16-224-in21k \
        --dataset_name org/imagenet-plus --eval_dataset_name imagenet-1k --eval_split validation \
        --output_dir out/vit-plus --do_train --do_eval --num_train_epochs 3 --learning_rate 2e-5 \
        --per_device_train_batch_size 64 --eval_strategy epoch --save_strategy epoch

A set that does not fit on disk streams (``--streaming``, with ``--max_steps`` in place of epochs, as ``Trainer`` needs
for a stream, and ``--eval_dataset_name`` to evaluate on: a stream holds no rows out).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
from datasets import ClassLabel, load_dataset
from transformers import AutoImageProcessor, AutoModelForImageClassification, HfArgumentParser

from dr_hf import ReinforcedTrainer, ReinforcedTrainingArguments


@dataclass
class DataTrainingArguments:
    dataset_name: str = field(metadata={"help": "The reinforced dataset: a Hub id or a local folder (dr-hf reinforce)."})
    eval_dataset_name: Optional[str] = field(default=None, metadata={
        "help": "A plain image dataset to evaluate on; default: hold out train_val_split of the reinforced rows."})
    eval_split: str = field(default="train", metadata={"help": "The split of eval_dataset_name."})
    train_val_split: float = field(default=0.15, metadata={"help": "Held-out fraction when there is no eval dataset."})
    streaming: bool = field(default=False, metadata={
        "help": "Stream the reinforced dataset (sets that do not fit on disk): needs --max_steps, and to evaluate, "
                "--eval_dataset_name."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the evaluation set (debugging)."})
    image_column_name: str = field(default="image", metadata={"help": "The image column."})
    label_column_name: str = field(default="label", metadata={"help": "The label column (a ClassLabel)."})


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A pretrained checkpoint (Hub id or folder) with its image processor."})
    ignore_mismatched_sizes: bool = field(default=False, metadata={"help": "Replace a classifier head of another size."})


def main(argv: Optional[List[str]] = None) -> ReinforcedTrainer:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, ReinforcedTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    if data_args.streaming and training_args.do_eval and not data_args.eval_dataset_name:
        parser.error("--streaming --do_eval needs --eval_dataset_name: a stream holds no rows out")
    train = load_dataset(data_args.dataset_name, split="train", streaming=data_args.streaming)
    if data_args.eval_dataset_name:
        evaluation = load_dataset(data_args.eval_dataset_name, split=data_args.eval_split)
    elif data_args.streaming:
        evaluation = None
    else:
        # contiguous, at a multiple of 8 rows: MixUp/CutMix partners stay in whole groups
        cut = int(len(train) * (1 - data_args.train_val_split)) // 8 * 8
        train, evaluation = train.select(range(cut)), train.select(range(cut, len(train)))
    if data_args.max_train_samples:
        train = (train.take if data_args.streaming else lambda n: train.select(range(n)))(data_args.max_train_samples)
    if data_args.max_eval_samples and evaluation is not None:
        evaluation = evaluation.select(range(data_args.max_eval_samples))
    label_feature = train.features[data_args.label_column_name]
    if not isinstance(label_feature, ClassLabel):
        raise ValueError(f"--label_column_name {data_args.label_column_name!r} must be a ClassLabel")
    labels = label_feature.names

    image_processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes)

    # Evaluation views by the image processor itself (the example rebuilds them from its `size` with torchvision,
    # which not every processor has: a timm model's, TimmWrapperImageProcessor, keeps timm's data config)
    def preprocess_val(batch):
        images = [image.convert("RGB") for image in batch[data_args.image_column_name]]
        batch["pixel_values"] = list(image_processor(images=images, return_tensors="pt")["pixel_values"])
        return batch

    if evaluation is not None:
        evaluation.set_transform(preprocess_val)

    def collate_fn(examples):  # the example's collator: used for evaluation; training replays the reinforcement
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e[data_args.label_column_name] for e in examples])}

    def compute_metrics(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, axis=1) == prediction.label_ids).mean())}

    trainer = ReinforcedTrainer(model=model, args=training_args, train_dataset=train if training_args.do_train else None,
                                eval_dataset=evaluation if training_args.do_eval else None,
                                compute_metrics=compute_metrics, processing_class=image_processor, data_collator=collate_fn)
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    card = {"finetuned_from": model_args.model_name_or_path, "tasks": "image-classification",
            "dataset": data_args.dataset_name, "dataset_tags": data_args.dataset_name, "tags": ["image-classification"]}
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
