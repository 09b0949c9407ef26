"""``ReinforcedTrainer``: a ``transformers.Trainer`` that replays stored augmentations and distils from the stored
sparse teacher outputs, from a map-style or a streaming dataset. The same class trains plainly (ERM) or with a live
teacher (online KD) on a plain dataset, so the three can be compared with one code path.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments

from .augment import AugmentPipeline, Output
from .collator import ReinforcedCollator
from .format import DR_PARAMS, require_reinforced
from .loss import dense_teacher_log_probs, distillation_loss, one_hot_target


@dataclass
class ReinforcedTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the distillation options. ``remove_unused_columns`` defaults to False: the
    reinforcement columns must reach the collator."""

    temperature: float = field(default=1.0, metadata={"help": "distillation temperature"})
    outside_topk: str = field(default="uniform", metadata={"help": "mass outside the top K: 'uniform' or 'renormalize'"})
    ce_weight: float = field(default=0.0, metadata={"help": "weight of cross-entropy on the labels (1 - weight on KD)"})
    reinforced_prob: float = field(default=1.0, metadata={"help": "probability of a reinforced sample (else original image, one-hot label)"})
    augment: Optional[str] = field(default="rrc+flip", metadata={"help": "preset sampled afresh for plain datasets (ERM / online KD)"})
    crop_scale: Optional[float] = field(default=None, metadata={"help": "RandomResizedCrop's smallest area for `augment` (default 0.08)"})
    online_teachers: Optional[List[str]] = field(default=None, metadata={"help": "teacher specs for online KD on a plain dataset"})
    image_size: Optional[int] = field(default=None, metadata={"help": "student input size (default: from the model)"})
    image_mean: Optional[List[float]] = field(default=None)
    image_std: Optional[List[float]] = field(default=None)
    interpolation: Optional[str] = field(default=None)
    image_column: str = field(default="image")
    label_column: str = field(default="label")
    shuffle_buffer_size: int = field(default=1000, metadata={"help": "streaming: shuffle buffer, in examples (groups for mixing data)"})
    remove_unused_columns: bool = field(default=False)

    def __post_init__(self):
        super().__post_init__()
        if self.label_names is None:
            self.label_names = ["labels"]


def student_output(model, args: ReinforcedTrainingArguments) -> Output:
    """The student's input: size, mean/std, interpolation, from the arguments or the model (timm cfg / HF config)."""
    size, mean, std, interp = None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic"
    if isinstance(model, PreTrainedModel):
        s = getattr(model.config, "image_size", None)
        size = (s, s) if isinstance(s, int) else tuple(s) if s else None
    elif hasattr(model, "pretrained_cfg"):
        import timm.data

        cfg = timm.data.resolve_model_data_config(model)
        size, mean, std = tuple(cfg["input_size"][1:]), tuple(cfg["mean"]), tuple(cfg["std"])
        interp = cfg.get("interpolation", interp) if cfg.get("interpolation") in ("bilinear", "bicubic", "nearest") else interp
    if args.image_size:
        size = (args.image_size, args.image_size)
    if size is None:
        raise ValueError("cannot tell the student's input size: pass ReinforcedTrainingArguments(image_size=...)")
    return Output(size=tuple(size), mean=tuple(args.image_mean or mean), std=tuple(args.image_std or std),
                  interpolation=args.interpolation or interp)


def num_classes_of(model) -> int:
    if isinstance(model, PreTrainedModel):
        return int(model.config.num_labels)
    if hasattr(model, "num_classes"):
        return int(model.num_classes)
    raise ValueError("cannot tell the student's number of classes (expected a transformers or timm classifier)")


class GroupedRows(torch.utils.data.Dataset):
    """A map-style view whose items are whole mixing groups (``group_size`` consecutive rows, as a dict of lists)."""

    def __init__(self, dataset, group_size: int):
        self.dataset, self.group_size = dataset, group_size

    def __len__(self):
        return (len(self.dataset) + self.group_size - 1) // self.group_size

    def __getitem__(self, g):
        return self.dataset[g * self.group_size : (g + 1) * self.group_size]


def _dr_param_fields(dataset) -> Optional[List[str]]:
    features = getattr(dataset, "features", None)
    if not features or DR_PARAMS not in features:
        return None
    return list(features[DR_PARAMS])


class ReinforcedTrainer(Trainer):
    """Trainer for reinforced datasets; see the module docstring. Overrides ``compute_loss`` and the eval collator."""

    def __init__(self, model=None, args: Optional[ReinforcedTrainingArguments] = None, train_dataset=None,
                 eval_dataset=None, data_collator=None, **kwargs):
        import datasets

        if args is None:
            args = ReinforcedTrainingArguments("reinforced-trainer")
        if not isinstance(args, ReinforcedTrainingArguments):
            raise TypeError("ReinforcedTrainer needs ReinforcedTrainingArguments")
        self.student_output = student_output(model, args)
        self.num_classes = num_classes_of(model)
        self.teachers = None
        if args.online_teachers:
            from .teacher import TeacherEnsemble

            self.teachers = TeacherEnsemble.from_specs(args.online_teachers, dtype="float32" if not torch.cuda.is_available() else None)
            if self.teachers.num_classes != self.num_classes:
                raise ValueError(f"the online teachers predict {self.teachers.num_classes} classes, the student {self.num_classes}")
        fields = _dr_param_fields(train_dataset)
        if train_dataset is not None:
            self._check_train_dataset(train_dataset, fields, args)
            pipeline = AugmentPipeline.from_fields(fields) if fields is not None else None  # refuses newer formats
            if pipeline is not None and pipeline.mix is not None:
                train_dataset = self._group(train_dataset, pipeline.group_size, args)
            elif isinstance(train_dataset, datasets.IterableDataset):
                train_dataset = train_dataset.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
            if isinstance(train_dataset, datasets.IterableDataset) and args.world_size > 1:
                # Each process reads its own part rather than the main process dispatching every batch: accelerate
                # then shards a datasets.IterableDataset by its files (n_shards >= processes), else keeps every
                # world_size-th batch of the shared stream.
                args.accelerator_config.dispatch_batches = False
        teacher_outputs = self.teachers.outputs() if self.teachers else []
        common = dict(output=self.student_output, image_column=args.image_column, label_column=args.label_column,
                      teacher_outputs=teacher_outputs, num_classes=self.num_classes)
        self.train_collator = data_collator or ReinforcedCollator(train=True, augment=args.augment,
                                                                   reinforced_prob=args.reinforced_prob,
                                                                   crop_scale=args.crop_scale, **common)
        self.eval_collator = ReinforcedCollator(train=False, augment=None, **{**common, "teacher_outputs": []})
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         data_collator=self.train_collator, **kwargs)
        self.model_accepts_loss_kwargs = False  # compute_loss returns a batch mean; the Trainer scales for accumulation

    # -- data ---------------------------------------------------------------------------------------
    def _check_train_dataset(self, dataset, fields, args) -> None:
        names = getattr(dataset, "column_names", None)
        if names is None:
            return
        if args.image_column not in names:
            raise ValueError(f"train_dataset has no image column {args.image_column!r} (columns: {names})")
        if fields is None:
            if not args.online_teachers and not args.augment:
                require_reinforced(names, "train_dataset")
            return
        require_reinforced(names, "train_dataset")
        from datasets import ClassLabel

        label = dataset.features.get(args.label_column) if dataset.features else None
        if isinstance(label, ClassLabel) and label.num_classes != self.num_classes:
            raise ValueError(f"the student predicts {self.num_classes} classes, column {args.label_column!r} has {label.num_classes}")

    def _group(self, dataset, group_size: int, args):
        """Keep MixUp/CutMix groups together: each training example becomes one group of rows."""
        import datasets

        if isinstance(dataset, datasets.IterableDataset):
            grouped = dataset.batch(group_size)
            return grouped.shuffle(seed=args.seed, buffer_size=max(1, args.shuffle_buffer_size // group_size))
        return GroupedRows(dataset, group_size)

    @contextlib.contextmanager
    def _collating_with(self, collator):
        saved = self.data_collator
        self.data_collator = collator
        try:
            yield
        finally:
            self.data_collator = saved

    def get_eval_dataloader(self, eval_dataset=None):
        with self._collating_with(self.eval_collator):
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._collating_with(self.eval_collator):
            return super().get_test_dataloader(test_dataset)

    # -- loss ---------------------------------------------------------------------------------------
    def _forward(self, model, pixel_values):
        if isinstance(self.accelerator.unwrap_model(model), PreTrainedModel):
            out = model(pixel_values=pixel_values)
            return out.logits
        return model(pixel_values)

    def target_log_probs(self, inputs: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """(B, C) teacher log-probs: stored sparse top-K (one-hot for original-image rows), or a live teacher."""
        labels = inputs["labels"]
        if self.teachers is not None and "teacher_pixel_values_0" in inputs:
            views = {o: inputs[f"teacher_pixel_values_{o}"] for o in range(len(self.teachers.outputs()))}
            return self.teachers.log_probs(views).to(labels.device)
        if "teacher_indices" not in inputs:
            return None
        idx, lp = inputs["teacher_indices"], inputs["teacher_logprobs"]
        original = idx[:, 0] < 0
        if original.any():
            if (labels[original] < 0).any():
                raise ValueError("an original-image example has no label (reinforced_prob < 1 needs labels)")
            one_idx, one_lp = one_hot_target(labels[original], idx.shape[1], self.num_classes)
            idx, lp = idx.clone(), lp.clone()
            idx[original], lp[original] = one_idx, one_lp
        return dense_teacher_log_probs(idx, lp, self.num_classes, self.args.outside_topk)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """KD (KL from the teacher to the student), optionally mixed with cross-entropy on the (mixed) labels."""
        logits = self._forward(model, inputs["pixel_values"])
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"the student outputs {logits.shape[-1]} classes, expected {self.num_classes}")
        target = self.target_log_probs(inputs) if model.training else None
        ce_weight = 1.0 if target is None else self.args.ce_weight
        loss = logits.new_zeros(())
        if target is not None and ce_weight < 1.0:
            loss = loss + (1.0 - ce_weight) * distillation_loss(logits, target, self.args.temperature)
        if ce_weight > 0.0:
            loss = loss + ce_weight * self._label_loss(logits, inputs)
        return (loss, {"logits": logits}) if return_outputs else loss

    def _label_loss(self, logits, inputs) -> torch.Tensor:
        labels = inputs["labels"]
        logp = torch.log_softmax(logits.float(), dim=-1)
        valid = labels >= 0
        if not valid.any():
            return logits.new_zeros(())
        own = -logp[valid].gather(1, labels[valid, None]).squeeze(1)
        if "mix_labels" in inputs:
            lam = inputs["mix_lam"][valid]
            other_labels = inputs["mix_labels"][valid]
            other = -logp[valid].gather(1, other_labels.clamp_min(0)[:, None]).squeeze(1)
            own = torch.where(other_labels >= 0, lam * own + (1 - lam) * other, own)
        return own.mean()
