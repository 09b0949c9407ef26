"""``ReinforcedTrainer``: a ``transformers.Trainer`` that replays stored augmentations and distils from the stored
sparse teacher outputs, from a map-style or a streaming dataset. The same class trains plainly (ERM) or with a live
teacher (online KD) on a plain dataset, so the three can be compared with one code path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import types
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import has_length

from .pipeline import PRESETS, AugmentPipeline, normalise_pixels
from .collator import SKIPPED_BATCH, AugmentCollator, EvalCollator, ReinforcedCollator
from .inputs import INTERPOLATION_NAMES, InputSpec, is_timm_model, resolve_input_spec
from .format import (DR_COLUMNS, DR_FINGERPRINT, DR_PARAMS, check_class_ids, check_classes, class_ids,
                     class_label_names, outside_classes, outside_classes_message, reordered_class, require_reinforced)
from .images import image_column_of
from .shards import data_files_of, name_bad_files
from .loss import dense_teacher_log_probs, distillation_loss, one_hot_target
from .replay import RenderedAhead
from .rows import ReplayRows, as_rows, combined_advice

logger = logging.getLogger(__name__)

OUTSIDE_TOPK = ("uniform", "renormalize")


@dataclass
class ReinforcedTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the distillation options, validated in ``__post_init__``.

    The defaults follow ml-dr's DR trainer: pure KD on the stored targets (``ce_weight=0``), with the mass outside the
    top K spread uniformly, and 1% of examples (``reinforced_prob=0.99``) the original image through the training
    augmentation with its (label-smoothed, ``label_smoothing_factor``) label. Plain training and online KD on a
    dataset without reinforcement columns must be asked for (``augment=...``, ``online_teachers=[...]``)."""

    temperature: float = field(default=1.0, metadata={"help": "Distillation temperature (> 0); the KD term is scaled by T^2."})
    outside_topk: str = field(default="uniform", metadata={
        "help": "Teacher mass outside the stored top K: 'uniform' (spread over the other classes; ml-dr's 'smooth') "
                "or 'renormalize' (dropped, top K renormalised)."})
    ce_weight: float = field(default=0.0, metadata={
        "help": "Weight in [0, 1) of cross-entropy on the (MixUp/CutMix-mixed) labels; the KD term gets 1 - ce_weight."})
    reinforced_prob: float = field(default=0.99, metadata={
        "help": "Probability in [0, 1] that an example replays a stored sample; otherwise it is the original image "
                "through the training augmentation with its label (ml-dr: 0.99); a row without a label always "
                "replays a stored sample."})
    augment: Optional[str] = field(default=None, metadata={
        "help": "Preset sampled afresh for a dataset WITHOUT reinforcement columns: plain training (ERM), or online KD "
                "with online_teachers. None: such a dataset is refused."})
    crop_scale: Optional[float] = field(default=None, metadata={
        "help": "RandomResizedCrop's smallest area fraction for `augment` (default 0.08)."})
    online_teachers: Optional[List[str]] = field(default=None, metadata={
        "help": "Teacher specs for online KD on a plain dataset (with `augment`)."})
    image_size: Optional[int] = field(default=None, metadata={
        "help": "Student input size; default: the processing_class, else the model (timm pretrained_cfg / HF config)."})
    image_mean: Optional[List[float]] = field(default=None, metadata={
        "help": "Student normalisation mean; default: the processing_class, else the model, else ImageNet's."})
    image_std: Optional[List[float]] = field(default=None, metadata={
        "help": "Student normalisation std; default: the processing_class, else the model, else ImageNet's."})
    interpolation: Optional[str] = field(default=None, metadata={
        "help": "Resize interpolation: nearest, bilinear or bicubic; default: the processing_class, else the model."})
    image_column: Optional[str] = field(default=None, metadata={
        "help": "The dataset's image column; default: its one column of type datasets.Image ('img' in some Hub "
                "copies of CIFAR), else 'image'."})
    label_column: str = field(default="label", metadata={"help": "The dataset's label column ('' for none)."})
    shuffle_buffer_size: int = field(default=1000, metadata={
        "help": "Streaming: shuffle buffer, in examples (in groups of rows for MixUp/CutMix data)."})
    uint8_pixels: Optional[bool] = field(default=None, metadata={
        "help": "Hand replayed images from the DataLoader to the model's device as uint8 and normalise them there (a "
                "quarter of the bytes through worker queues and to the GPU; the same floats). Not for MixUp/CutMix "
                "data, whose mixed pixels are floats. None: when training on an accelerator (on a CPU the workers "
                "normalise better than the training process); False: float32 batches."})
    replay_on_device: bool = field(default=False, metadata={
        "help": "Decode and render replayed images in the training process, on the model's device, a batch at once "
                "(JPEGs decoded by TorchCodec or torchvision.io, on CUDA with nvJPEG; the reinforce job's batched renderer): DataLoader "
                "workers then only read rows and hand over the encoded images. For GPU runs whose host cores cannot "
                "decode and crop as fast as the student trains. False: the workers render each image on the host."})
    dataset_id: Optional[str] = field(default=None, metadata={
        "help": "The reinforced dataset's Hub id, named in the model card; default: the train dataset's name."})

    def __post_init__(self):
        super().__post_init__()
        problems = []
        if self.label_names is None:
            self.label_names = ["labels"]
        elif list(self.label_names) != ["labels"]:  # Trainer would take the batches for unlabelled ones
            problems.append(f"label_names must be ['labels'] (or unset): the collators hand the model its labels as "
                            f"'labels', got {self.label_names}; the dataset's label column is label_column "
                            f"({self.label_column!r})")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.outside_topk not in OUTSIDE_TOPK:
            problems.append(f"outside_topk must be one of {OUTSIDE_TOPK}, got {self.outside_topk!r}")
        if not 0.0 <= self.ce_weight < 1.0:
            problems.append(f"ce_weight must be in [0, 1) (1 would drop the distillation term), got {self.ce_weight}")
        if not 0.0 <= self.reinforced_prob <= 1.0:
            problems.append(f"reinforced_prob must be in [0, 1], got {self.reinforced_prob}")
        if self.augment is not None and self.augment not in PRESETS:
            problems.append(f"augment must be one of {sorted(PRESETS)} or None, got {self.augment!r}")
        if self.online_teachers and not self.augment:
            problems.append("online_teachers needs augment=... (the views the live teachers and the student see)")
        if self.crop_scale is not None and not 0.0 < self.crop_scale <= 1.0:
            problems.append(f"crop_scale must be in (0, 1], got {self.crop_scale}")
        if self.image_size is not None and self.image_size < 1:
            problems.append(f"image_size must be >= 1, got {self.image_size}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                problems.append(f"{name} must have 3 values, got {value}")
        if self.interpolation is not None and self.interpolation not in INTERPOLATION_NAMES:
            problems.append(f"interpolation must be one of {INTERPOLATION_NAMES}, got {self.interpolation!r}")
        if self.replay_on_device and self.uint8_pixels:
            problems.append("uint8_pixels=True shapes batches rendered in the DataLoader workers; replay_on_device=True "
                            "renders them on the device instead: choose one")
        if self.replay_on_device and (self.augment or self.online_teachers):
            problems.append("replay_on_device replays reinforced datasets; plain training and online KD (augment=...) "
                            "render in the DataLoader workers")
        if self.shuffle_buffer_size < 1:
            problems.append(f"shuffle_buffer_size must be >= 1, got {self.shuffle_buffer_size}")
        if problems:
            raise ValueError("ReinforcedTrainingArguments: " + "; ".join(problems))

    def __getstate__(self):
        """The pickled arguments (``training_args.bin``, which ``Trainer`` writes into every checkpoint and pushes with
        the model) leave ``hub_token`` out: a token is never written."""
        return {**self.__dict__, "hub_token": None}

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments, **overrides) -> "ReinforcedTrainingArguments":
        """Upgrade a plain ``TrainingArguments`` (as TRL's trainers do: through ``to_dict()``)."""
        values = args.to_dict()
        values["hub_token"] = args.hub_token  # to_dict masks it
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in {**values, **overrides}.items() if k in names})


def student_output(model, args: ReinforcedTrainingArguments, processing_class=None) -> InputSpec:
    """The student's input spec: the arguments, then ``processing_class``, then the model (one resolver)."""
    return resolve_input_spec(model, processing_class, size=args.image_size, mean=args.image_mean, std=args.image_std,
                              interpolation=args.interpolation, what="the student")


class _CollatorEpoch(TrainerCallback):
    """Tell the replaying collator the epoch before the epoch's DataLoader iterator starts (its workers, persistent ones
    included, read it from shared memory), so its choices are a pure function of (seed, epoch, row) and a resumed run
    replays what an uninterrupted one would.

    The epoch is the Trainer's own count, the one it hands the DataLoader (``set_epoch``): :meth:`start` gives the
    epoch training starts in (:meth:`ReinforcedTrainer._init_training_state`), then one more each epoch. Where a
    resumed stream's first epoch drops the batches already trained, they are counted out to the collator
    (``skip_batches``), which leaves them unrendered; a map-style set's are skipped by the sampler, never collated."""

    def __init__(self, collator):
        self.collator = collator
        self.next_epoch = self.skip = 0

    def start(self, epoch: int, skip_batches: int) -> None:
        self.next_epoch, self.skip = epoch, skip_batches

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.collator, "skip_batches"):
            self.collator.skip_batches, self.skip = self.skip, 0
        if hasattr(self.collator, "epoch"):
            self.collator.epoch = self.next_epoch
        self.next_epoch += 1


def stream_position(checkpoint: str, gradient_accumulation_steps: int) -> Tuple[int, int]:
    """(pass, batches of it trained) of a stream at ``checkpoint``. ``Trainer`` counts a stream's passes as epochs and
    records ``state.epoch`` = pass + batches / (``max_steps`` x accumulation steps), the checkpoint's ``max_steps``."""
    saved = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
    epoch = saved.epoch or 0.0
    passes = int(math.floor(epoch + 1e-9))
    batches = int(round((epoch - passes) * saved.max_steps * gradient_accumulation_steps))
    return passes, max(batches, 0)


def with_main_input(model):
    """``model``, whose batches' input ``Trainer`` finds by ``main_input_name``: a timm student has none, and
    ``Trainer`` then looks for ``input_ids`` (``include_for_metrics=["inputs"]`` failed on it, tokens seen went
    uncounted); the batches hold ``pixel_values``, as for a transformers vision model."""
    if model is not None and not hasattr(model, "main_input_name"):
        model.main_input_name = "pixel_values"
    return model


def with_timm_checkpointing(model):
    """``model``, which ``Trainer`` switches to activation checkpointing (``activation_checkpointing=True``, or its
    older name ``gradient_checkpointing``) by calling its ``activation_checkpointing_enable``: a timm student (PEFT's
    too) has timm's ``set_grad_checkpointing`` instead, and training stopped with an ``AttributeError``."""
    base = classifier_of(model) if model is not None else None
    if (is_timm_model(base) and hasattr(base, "set_grad_checkpointing")
            and not hasattr(base, "activation_checkpointing_enable")):
        base.activation_checkpointing_enable = types.MethodType(_timm_checkpointing_enable, base)
    return model


def _timm_checkpointing_enable(model, activation_checkpointing_kwargs=None, every_n_layers=1, offload=False):
    """A timm model's ``activation_checkpointing_enable``, as ``Trainer`` calls it: timm checkpoints its own blocks
    (``set_grad_checkpointing``; non-reentrant unless ``timm.layers.set_reentrant_ckpt``), which takes no options."""
    given = dict(activation_checkpointing_kwargs or {})
    if every_n_layers != 1:
        given["every_n_layers"] = every_n_layers
    if offload:
        given["offload"] = offload
    if given:
        raise ValueError(f"activation_checkpointing_kwargs {given}: a timm student checkpoints its blocks as timm "
                         "does (set_grad_checkpointing), which takes no options; leave them unset")
    model.set_grad_checkpointing(True)


def refuse_skipped(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``batch``, refused if the collator left it unrendered for the Trainer to drop (a resumed stream's batch
    already trained, :attr:`ReinforcedCollator.skip_batches`), which never reached training until now."""
    if SKIPPED_BATCH in batch:
        raise RuntimeError("a batch the collator counted among a resumed run's skipped batches reached training; "
                           "resume with ignore_data_skip=True, or report this")
    return batch


def classifier_of(model):
    """The student's classifier itself: a PEFT model's base model (LoRA and other adapters wrap it and forward its
    outputs as they are; ``Trainer`` saves the adapters' weights alone), else ``model``."""
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        return model.get_base_model()
    return model


def saved_by_timm(model) -> bool:
    """Whether the student is saved as timm saves a model (its config.json, a card for timm): a timm model itself,
    not one wrapped by PEFT, which saves its adapters and card its own way."""
    return is_timm_model(model) and classifier_of(model) is model


def num_classes_of(model) -> int:
    model = classifier_of(model)
    if isinstance(model, PreTrainedModel):
        return int(model.config.num_labels)
    if hasattr(model, "num_classes"):
        return int(model.num_classes)
    raise ValueError("cannot tell the student's number of classes (expected a transformers or timm classifier)")


def student_class_names(model) -> Optional[List[str]]:
    """A transformers classifier's class names (its ``id2label``), else ``None``."""
    model = classifier_of(model)
    id2label = model.config.id2label if isinstance(model, PreTrainedModel) else None
    return [id2label.get(i, "") for i in range(len(id2label))] if id2label else None


def _dr_param_fields(dataset) -> Optional[List[str]]:
    features = getattr(dataset, "features", None)
    if not features or DR_PARAMS not in features:
        return None
    return list(features[DR_PARAMS])


def encoded_images(dataset, column: str):
    """``dataset`` with its image column left encoded (``Image(decode=False)``; free: the same Arrow data): the
    collators decode each JPEG themselves, faster than the PIL objects ``datasets`` would build (TorchCodec's
    or torchvision.io's decoder, into the layout the resize uses), with the same pixels."""
    import datasets

    features = getattr(dataset, "features", None)
    feature = features.get(column) if features else None
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(column, datasets.Image(mode=feature.mode, decode=False))
    return dataset


def own_transform(dataset) -> bool:
    """Whether a map-style ``dataset`` carries a transform of its own (``set_transform`` / ``with_transform``, as
    transformers' image-classification scripts give their splits)."""
    fmt = getattr(dataset, "format", None)
    return isinstance(fmt, dict) and fmt.get("type") == "custom"


def reinforced_arguments(args: Optional[TrainingArguments]) -> ReinforcedTrainingArguments:
    """``args`` as :class:`ReinforcedTrainingArguments`: the defaults for ``None``, a plain ``TrainingArguments``
    upgraded through ``to_dict()`` (as TRL's trainers take them)."""
    if args is None:
        return ReinforcedTrainingArguments("reinforced-trainer")
    if isinstance(args, ReinforcedTrainingArguments):
        return args
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be TrainingArguments or ReinforcedTrainingArguments, got {type(args).__name__}")
    return ReinforcedTrainingArguments.from_training_arguments(args)


class ReinforcedTrainer(Trainer):
    """A ``transformers.Trainer`` for reinforced datasets (see the module docstring); a drop-in for ``Trainer``.

    * ``args``: ``None``, a plain ``TrainingArguments`` (upgraded through ``to_dict()``) or
      :class:`ReinforcedTrainingArguments`.
    * The student's input (size, mean/std, interpolation, evaluation crop) comes from the arguments, then
      ``processing_class`` (its image processor), then the model.
    * Training always uses the reinforced collator (or the plain/online-KD one when asked for); a ``data_collator``
      you pass is used for evaluation and prediction, as existing scripts need (default: the center-crop view).
    * MixUp/CutMix data is fed in whole groups of rows; ``per_device_train_batch_size`` still counts images.
    * ``peft_config`` (as TRL's trainers take it: a ``peft`` config, LoRA's or another's): the student is wrapped
      by ``peft.get_peft_model``, so that its adapters are what trains; a student wrapped already is taken as it is.
    """

    def __init__(self, model=None, args: Optional[TrainingArguments] = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None, **kwargs):
        args = reinforced_arguments(args)
        self.peft_config = peft_config
        if kwargs.get("compute_loss_func") is not None:  # Trainer's compute_loss calls it; this one would not
            raise ValueError("`compute_loss_func`: ReinforcedTrainer's loss is distillation from the stored teacher "
                             "outputs, set by its arguments (temperature, outside_topk, ce_weight, "
                             "label_smoothing_factor); for another loss, subclass it and override compute_loss (the "
                             "targets: self.target_log_probs(inputs), the pixels: self.pixel_values(inputs))")
        model_init = kwargs.get("model_init")
        if model is None and model_init is not None:  # the checks below need a student now; train() makes its own
            model = Trainer.call_model_init(SimpleNamespace(model_init=model_init))
            kwargs.pop("model_init")
        model = self._student(model)
        self.image_column = args.image_column or image_column_of(train_dataset if train_dataset is not None
                                                                 else eval_dataset)
        self.student_output = student_output(model, args, processing_class)
        self.num_classes = num_classes_of(model)
        # the data's class names, which a timm student's saved config.json carries
        self.class_names = class_label_names(getattr(train_dataset, "features", None), args.label_column, self.num_classes)
        fields = _dr_param_fields(train_dataset)
        self.teachers = self._online_teachers(args, fields, train_dataset)
        self.group_size = 1  # rows a training example holds (a MixUp/CutMix group); set by _prepare_train_dataset
        train_dataset, pipeline = self._prepare_train_dataset(train_dataset, fields, args, model)
        common = dict(output=self.student_output, image_column=self.image_column,
                      label_column=args.label_column or None, num_classes=self.num_classes)
        self.replay_pipeline = pipeline
        self._rendered_ahead: Optional[RenderedAhead] = None
        if fields is not None or train_dataset is None:
            wanted = args.device.type != "cpu" if args.uint8_pixels is None else args.uint8_pixels
            uint8 = bool(wanted and pipeline is not None and pipeline.renders_uint8 and not args.replay_on_device)
            seed = args.data_seed if args.data_seed is not None else args.seed
            self.train_collator = ReinforcedCollator(reinforced_prob=args.reinforced_prob, uint8_pixels=uint8,
                                                     on_device=args.replay_on_device, seed=seed, **common)
        else:  # plain training or online KD
            self.train_collator = AugmentCollator(augment=args.augment, crop_scale=args.crop_scale,
                                                  teacher_outputs=self.teachers.outputs() if self.teachers else (), **common)
        # evaluation reads an evaluation set's labels also after unlabelled training (label_column=''): the default
        # column, or the set's one ClassLabel column under another name (_own_eval_rows)
        self.eval_collator = data_collator or EvalCollator(**{**common, "label_column": args.label_column or "label"})
        # compute_loss applies label_smoothing_factor itself; the Trainer's own label smoother is not used, and its
        # set-up reads model.config, which a timm student has not
        smoothing, args.label_smoothing_factor = args.label_smoothing_factor, 0.0
        try:
            super().__init__(model=model, args=args, data_collator=self.train_collator, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        finally:
            args.label_smoothing_factor = smoothing
        if model_init is not None:  # as Trainer keeps it: train() and hyperparameter_search() make fresh students
            self.model_init = model_init
        self.eval_dataset = self._own_eval_rows(self.eval_dataset)
        self._collator_epoch = _CollatorEpoch(self.train_collator)
        self.add_callback(self._collator_epoch)
        self.model_accepts_loss_kwargs = False  # compute_loss returns a batch mean; the Trainer scales for accumulation

    # -- data ---------------------------------------------------------------------------------------
    def _online_teachers(self, args, fields, train_dataset):
        """The teachers of online KD (``online_teachers``) for a plain dataset; none for a reinforced one, whose
        targets are stored (the options of plain training it ignores are named in a warning)."""
        plain_only = [name for name in ("augment", "online_teachers", "crop_scale") if getattr(args, name)]
        if fields is not None and plain_only:  # (one set of arguments may serve plain and reinforced runs alike)
            dr = [c for c in train_dataset.features if c.startswith("dr_")]
            logger.warning("train_dataset is reinforced: it replays its stored samples and teacher outputs, so %s, "
                           "which apply to a plain dataset (fresh augmentations, online teachers), are not used; to "
                           "train plainly on its images, pass train_dataset.remove_columns(%s)", ", ".join(plain_only), dr)
        if not args.online_teachers or fields is not None:
            return None
        from .teacher import TeacherEnsemble

        teachers = TeacherEnsemble.from_specs(args.online_teachers)
        if teachers.num_classes != self.num_classes:
            raise ValueError(f"the online teachers predict {teachers.num_classes} classes, the student {self.num_classes}")
        return teachers

    def _prepare_train_dataset(self, train_dataset, fields, args, model):
        """``train_dataset`` checked and made ready for the training collator (encoded images, Arrow rows, whole
        MixUp/CutMix groups, a stream's shuffle and shares), and the replay pipeline of its stored parameters (``None``
        for plain training)."""
        import datasets

        if train_dataset is None:
            return None, None
        self._check_train_dataset(train_dataset, fields, args, model)
        if own_transform(train_dataset):
            logger.warning("train_dataset has a transform of its own (set_transform / with_transform), which "
                           "training does not use: the collator renders each row's view itself (%s) at the "
                           "student's input (size, mean and std from the arguments, processing_class or the "
                           "model); dataset.reset_format() silences this",
                           "its stored sample" if fields is not None else "`augment`'s")
        train_dataset = encoded_images(as_rows(train_dataset), self.image_column)
        pipeline = AugmentPipeline.from_fields(fields) if fields is not None else None  # refuses other formats
        if pipeline is not None and pipeline.mix is not None:
            self.group_size = pipeline.group_size
            self._groups_per_batch(args.per_device_train_batch_size)
        if isinstance(train_dataset, datasets.IterableDataset):
            train_dataset = self._even_shares(train_dataset, args)
        if pipeline is not None and isinstance(train_dataset, datasets.Dataset):
            train_dataset = ReplayRows(train_dataset, self.group_size)  # Arrow rows, one sample converted each
        elif pipeline is not None and pipeline.mix is not None:
            train_dataset = self._group(train_dataset, pipeline.group_size, args)
        elif isinstance(train_dataset, datasets.IterableDataset):
            if pipeline is not None:  # one-row Arrow tables, the replayed sample converted alone (dr_hf/rows.py)
                train_dataset = train_dataset.with_format("arrow")
            train_dataset = train_dataset.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
        for path in data_files_of(train_dataset):  # a truncated local shard is named before training starts
            try:
                pq.read_metadata(path)
            except Exception as exc:
                raise name_bad_files([path], exc) from exc
        if isinstance(train_dataset, datasets.IterableDataset) and args.world_size > 1:
            # Each process reads its own part rather than the main process dispatching every batch: accelerate
            # then shards a datasets.IterableDataset by its files (n_shards >= processes), else keeps every
            # world_size-th batch of the shared stream.
            args.accelerator_config.dispatch_batches = False
        return train_dataset, pipeline

    def _check_train_dataset(self, dataset, fields, args, model) -> None:
        names = getattr(dataset, "column_names", None)
        if names is None:
            if args.augment:  # plain training reads the image column, whatever the dataset declares
                return
            import datasets

            if isinstance(dataset, datasets.IterableDataset):  # (IterableDataset.map without features=)
                raise ValueError("train_dataset is a streamed dataset whose features are unknown, so its reinforcement "
                                 "columns cannot be read: keep them through map, e.g. "
                                 "dataset.map(fn, features=dataset.features)")
            raise ValueError(f"train_dataset is a {type(dataset).__name__}, which names no columns: pass a reinforced "
                             "datasets.Dataset or IterableDataset (load_dataset), or ask for plain training "
                             "(augment=...)")
        if isinstance(names, dict):  # a DatasetDict: load_dataset without split=
            raise ValueError(f"train_dataset holds the splits {sorted(names)} (a DatasetDict): pass one of them, e.g. "
                             f"train_dataset=dataset[{sorted(names)[0]!r}], or load_dataset(..., split=...)")
        if self.image_column not in names:
            if DR_FINGERPRINT in names and all(n.startswith("dr_") for n in names):  # written with --no-images
                raise ValueError(f"train_dataset is a reinforcement-only dataset (columns: {names}): join it to its "
                                 "source first, dr_hf.load_reinforced(path, source=...) or dr_hf.join_source")
            raise ValueError(f"train_dataset has no image column {self.image_column!r} (columns: {names}); "
                             "set ReinforcedTrainingArguments(image_column=...)")
        if fields is not None or not args.augment:
            require_reinforced(names, "train_dataset")  # names the missing columns; plain training is opt-in
        from datasets import ClassLabel, Dataset

        label = dataset.features.get(args.label_column) if dataset.features and args.label_column else None
        check_class_ids(args.label_column, label, "train without labels, label_column=''")
        if label is not None and not isinstance(label, ClassLabel) and isinstance(dataset, Dataset):
            ids = class_ids(dataset, args.label_column)
            bad = np.flatnonzero(outside_classes(ids, self.num_classes))
            if bad.size:  # before training, not at the row's first draw
                raise ValueError(outside_classes_message(f"train_dataset's row {bad[0]}", args.label_column,
                                                         int(ids[bad[0]]), self.num_classes, "the student's"))
        label = label if isinstance(label, ClassLabel) else None
        if label is not None:
            alone = ("" if fields is None else
                     ", train on the teachers' targets alone (label_column='', a student of their classes)")
            check_classes(args.label_column, label.names, self.num_classes, student_class_names(model), "the student",
                          f"load it for these classes (from_pretrained(..., num_labels={label.num_classes}, "
                          f"id2label=..., ignore_mismatched_sizes=True)){alone}, or train on data labelled with its own")
        if self.teachers is not None:  # online KD: the teachers' targets in the student's (and the labels') order
            own = student_class_names(model) or (label.names if label is not None else None)
            k = reordered_class(own, self.teachers.class_names)
            if k is not None:
                raise ValueError(f"the online teachers name the student's {self.num_classes} classes in another order "
                                 f"(class {k} is {own[k]!r} for the student, {self.teachers.class_names[k]!r} for the "
                                 "teachers): their targets would train other classes; use teachers whose outputs are "
                                 "in the student's class order")

    def get_batch_samples(self, epoch_iterator, num_batches, device=None, *args, **kwargs):
        """The Trainer's batch fetching; a streamed shard that turns out unreadable mid-training is named. With
        ``replay_on_device``, each batch is decoded and rendered on the device by a background thread, a batch ahead
        of the step (:class:`~dr_hf.replay.RenderedAhead`)."""
        try:
            if not self.args.replay_on_device:
                batches, items = super().get_batch_samples(epoch_iterator, num_batches, device, *args, **kwargs)
                for batch in batches:
                    refuse_skipped(batch)
                return batches, items
            if self._rendered_ahead is None or self._rendered_ahead.source is not epoch_iterator:
                self._stop_rendering_ahead()
                self._rendered_ahead = RenderedAhead(epoch_iterator, self._render_replay, device or self.args.device)
            batches = self._rendered_ahead.take(num_batches)
            return batches, self._get_num_items_in_batch(batches, device)
        except (OSError, pa.ArrowException) as exc:
            if isinstance(exc, pa.ArrowInvalid) and "Schema at index" in str(exc):  # (pyarrow's concat_tables)
                raise ValueError(f"train_dataset streams rows whose columns differ (pyarrow: "
                                 f"{str(exc).splitlines()[0].rstrip(': ')}): {combined_advice()}") from exc
            files = data_files_of(self.train_dataset)
            if not files:
                raise
            raise name_bad_files(files, exc) from exc

    def _render_replay(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return refuse_skipped(batch)["replay"].render(self.replay_pipeline, self.student_output, batch["labels"].device)

    def _stop_rendering_ahead(self) -> None:
        if self._rendered_ahead is not None:
            self._rendered_ahead.close()
            self._rendered_ahead = None

    def train(self, *args, **kwargs):
        """``Trainer.train``; the thread rendering batches ahead (``replay_on_device``) stops with it."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self._stop_rendering_ahead()

    def call_model_init(self, trial=None):
        """``Trainer``'s fresh student from ``model_init``, made as a student passed as ``model`` is."""
        return self._student(super().call_model_init(trial))

    def _student(self, model):
        """The student as it trains: wrapped by ``peft.get_peft_model`` with :attr:`peft_config` where one is given
        and it is not wrapped yet, its input named (:func:`with_main_input`)."""
        if model is not None and self.peft_config is not None and classifier_of(model) is model:
            try:
                from peft import get_peft_model
            except ImportError as exc:
                raise ImportError("`peft_config` needs the peft library: pip install peft") from exc
            model = get_peft_model(model, self.peft_config)
        return with_timm_checkpointing(with_main_input(model))

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):
        """``Trainer``'s (epochs trained, batches of the next one trained), for a resumed stream the pass and the batches
        of it that the checkpoint holds: ``Trainer`` takes a stream's epoch as ``max_steps`` long and so resumed every
        stream in its first pass, dropping all the batches trained (after the first pass, it restarted at the start of
        the second). ``ignore_data_skip=True`` starts the checkpoint's pass from its beginning."""
        epochs, batches = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                                       resume_from_checkpoint, trial)
        stream = not has_length(self.train_dataset)
        if stream and resume_from_checkpoint is not None and self.state.global_step:
            epochs, batches = stream_position(resume_from_checkpoint, self.args.gradient_accumulation_steps)
            batches = 0 if self.args.ignore_data_skip else batches
        self._collator_epoch.start(epochs, batches if stream else 0)
        return epochs, batches

    def _set_signature_columns_if_needed(self):
        """Keep what the collators read (image, label, reinforcement columns) with ``remove_unused_columns=True``."""
        super()._set_signature_columns_if_needed()
        keep = [self.image_column, self.args.label_column, DR_FINGERPRINT, *DR_COLUMNS]
        self._signature_columns += [c for c in keep if c and c not in self._signature_columns]

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """The Trainer's checkpoint loading, then, for a ``transformers`` model, its weights once more through
        ``from_pretrained``: transformers 5.2x's Trainer loads the file's keys as they are, without the renaming that
        ``from_pretrained`` applies, so a ViT silently resumed from partly stale weights (tests/test_hf_contract.py)."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = model if model is not None else self.model
        if isinstance(target, PreTrainedModel) and os.path.isfile(os.path.join(resume_from_checkpoint, "config.json")):
            loaded = type(target).from_pretrained(resume_from_checkpoint, dtype=next(target.parameters()).dtype)
            target.load_state_dict(loaded.state_dict())

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` (checkpoints too); a timm student's folder also gets timm's ``config.json`` beside
        the weights, as ``timm.models.save_for_hf`` writes it: its architecture, the input it was trained at (size,
        mean/std, interpolation, evaluation crop) and the training data's class names, so that
        ``timm.create_model("local-dir:FOLDER", pretrained=True)``, or ``"hf-hub:org/name"`` once pushed, loads it.
        A PEFT student (LoRA, ...) is saved as PEFT saves it: its adapters and their config."""
        super().save_model(output_dir, _internal_call)
        student = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if self.args.should_save and saved_by_timm(student):
            from timm.models._hub import save_config_for_hf

            spec = self.student_output
            try:
                save_config_for_hf(student, os.path.join(output_dir or self.args.output_dir, "config.json"),
                                   model_config={"label_names": self.class_names} if self.class_names else None,
                                   data_config={"input_size": (3, *spec.size), "mean": spec.mean, "std": spec.std,
                                                "interpolation": spec.interpolation, "crop_pct": spec.crop_pct,
                                                "crop_mode": spec.crop_mode})
            except (TypeError, ValueError, KeyError) as exc:  # e.g. an argument JSON cannot hold (act_layer=nn.SiLU)
                logger.warning("the timm student's config.json was not written (%s): its weights are saved "
                               "(model.safetensors), which timm.create_model(<its architecture and arguments>, "
                               "pretrained=True, pretrained_cfg_overlay=dict(file=...)) loads", exc)

    def create_model_card(self, *args, **kwargs):
        """The Trainer's model card, naming the reinforced dataset it was trained on. A student without a transformers
        config (timm) is trained from scratch unless ``finetuned_from`` names its base model, and a timm student's card
        says ``library_name: timm``, the library that loads it."""
        dataset = self.args.dataset_id or getattr(getattr(self.train_dataset, "info", None), "dataset_name", None) \
            or getattr(getattr(getattr(self.train_dataset, "dataset", None), "info", None), "dataset_name", None)
        if dataset:
            kwargs.setdefault("dataset_tags", dataset)
            kwargs.setdefault("dataset", dataset)
        tags = kwargs.get("tags") or []
        kwargs["tags"] = ([tags] if isinstance(tags, str) else list(tags)) + ["dataset-reinforcement", "dr-hf"]
        shim = not hasattr(self.model, "config")  # Trainer's card reads the base model's name from model.config
        if shim:
            self.model.config = SimpleNamespace()
        try:
            card = super().create_model_card(*args, **kwargs)
        finally:
            if shim:
                del self.model.config
        path = os.path.join(self.args.output_dir, "README.md")
        if saved_by_timm(self.model) and self.is_world_process_zero() and os.path.isfile(path):
            from huggingface_hub import ModelCard

            written = ModelCard.load(path)
            written.data.library_name = "timm"
            written.data.tags = list(dict.fromkeys([*(written.data.tags or []), "timm", "image-classification"]))
            written.save(path)
        return card

    def _even_shares(self, dataset, args):
        """A stream whose readers get equal shares. Processes and their DataLoader workers get whole shards (accelerate
        and ``datasets`` split a stream by its files; with fewer files than processes, each reads them all and keeps
        its own batches), so where the files do not divide among the processes some read more rows than others, and
        within an epoch the others' rows are seen more often; where a process has fewer files than workers, some
        workers idle. Such a stream is split by row group instead (``IterableDataset.reshard``; not MixUp/CutMix
        data, whose groups keep to their files) if that shares it better; an uneven split that remains is warned of."""
        world, workers = args.world_size, max(1, args.dataloader_num_workers)

        def shares(n):  # (how much more often the rows of the processes with fewer files are seen, idle workers)
            if world == 1 or n < world:
                return 0.0, max(0, workers - n)
            return (1 / (n // world) if n % world else 0.0), max(0, workers - n // world)

        skew, idle = shares(dataset.n_shards)
        if self.group_size == 1 and (skew >= 0.05 or idle):
            try:
                finer = dataset.reshard()
            except NotImplementedError:  # a source that cannot be split further
                finer = dataset
            if shares(finer.n_shards) < (skew, idle):
                logger.info("train_dataset: %d file(s) split into %d row groups for %d process(es) x %d worker(s)",
                            dataset.n_shards, finer.n_shards, world, workers)
                dataset = finer
                skew, idle = shares(dataset.n_shards)
        if skew >= 0.05:
            k = dataset.n_shards // world
            logger.warning("train_dataset streams %d shards to %d processes, %d or %d each: within an epoch the rows of "
                           "those with %d are seen up to %.0f%% more often than the others'; write it in a number of "
                           "shards (or row groups) that %d divides (dr-hf reinforce --rows-per-shard)",
                           dataset.n_shards, world, k, k + 1, k, 100 * skew, world)
        return dataset

    def get_train_dataloader(self):
        """``Trainer``'s, whose examples are MixUp/CutMix groups of ``group_size`` rows: its batch size, which
        ``Trainer`` keeps in images (``per_device_train_batch_size``, a hyperparameter search trial's,
        ``auto_find_batch_size``'s; its throughput and ``state.train_batch_size`` count images), is taken in groups."""
        images = self._train_batch_size
        self._train_batch_size = self._groups_per_batch(images)
        try:
            return super().get_train_dataloader()
        finally:
            self._train_batch_size = images

    def _groups_per_batch(self, images: int) -> int:
        """The MixUp/CutMix groups (of ``group_size`` rows) a batch of ``images`` holds; refused unless whole."""
        if images % self.group_size:
            raise ValueError(f"per_device_train_batch_size={images} must be a multiple of the MixUp/CutMix group size "
                             f"{self.group_size} (partners are fed together)")
        return images // self.group_size

    def num_examples(self, dataloader) -> int:
        """Images in ``dataloader``'s dataset (the training set's examples are groups of rows)."""
        dataset = getattr(dataloader, "dataset", None)
        return len(dataset.dataset) if isinstance(dataset, ReplayRows) else super().num_examples(dataloader)

    def _group(self, dataset, group_size: int, args):
        """Keep a stream's MixUp/CutMix groups together: each training example becomes one group of rows, an Arrow
        table whose replayed samples alone are converted (dr_hf/rows.py)."""
        grouped = dataset.with_format("arrow").batch(group_size)
        return grouped.shuffle(seed=args.seed, buffer_size=max(1, args.shuffle_buffer_size // group_size))

    @contextlib.contextmanager
    def _collating_with(self, collator):
        saved = self.data_collator
        self.data_collator = collator
        try:
            yield
        finally:
            self.data_collator = saved

    def _own_eval_rows(self, dataset):
        """Evaluation rows left encoded for the default collator, their images under the training set's column name
        and their labels under the label column (an evaluation set of another naming: its one ``datasets.Image``
        column, its one ``ClassLabel`` column); a collator of your own gets them as they are."""
        import datasets

        if not isinstance(self.eval_collator, EvalCollator):
            return dataset
        if isinstance(dataset, dict):
            return {name: self._own_eval_rows(part) for name, part in dataset.items()}
        if own_transform(dataset):  # its transform gives the model's inputs, collated as Trainer would
            return dataset
        dataset = as_rows(dataset)
        names = getattr(dataset, "column_names", None) or []
        column = self.image_column if self.image_column in names or not names else image_column_of(dataset)
        if names and column not in names:
            raise ValueError(f"the evaluation set has no image column {self.image_column!r} and no datasets.Image "
                             f"column (columns: {names})")
        dataset = encoded_images(dataset, column)  # (then renamed as bytes: a streamed rename re-encodes decoded images)
        if column != self.image_column:
            dataset = dataset.rename_column(column, self.image_column)
        label = self.eval_collator.label_column
        classes = [n for n, f in (getattr(dataset, "features", None) or {}).items() if isinstance(f, datasets.ClassLabel)]
        if names and label not in names and len(classes) == 1:  # its labels under another name ('fine_label')
            dataset = dataset.rename_column(classes[0], label)
        feature = (getattr(dataset, "features", None) or {}).get(label)
        if isinstance(feature, datasets.ClassLabel):
            check_classes(label, feature.names, self.num_classes, student_class_names(self.model), "the student",
                          "its accuracy and loss would compare unrelated classes", where="the evaluation set's column")
        return dataset

    def _eval_collator_of(self, dataset):
        """The evaluation collator, or for a set with a transform of its own (and no collator given), the one
        ``Trainer`` would use, ``default_data_collator``: the transform's outputs are the model's inputs."""
        if isinstance(self.eval_collator, EvalCollator) and own_transform(dataset):
            from transformers import default_data_collator

            return default_data_collator
        return self.eval_collator

    def get_eval_dataloader(self, eval_dataset=None):
        chosen = (self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else
                  self.eval_dataset if eval_dataset is None else eval_dataset)
        with self._collating_with(self._eval_collator_of(chosen)):
            return super().get_eval_dataloader(eval_dataset if isinstance(eval_dataset, str) or eval_dataset is None
                                               else self._own_eval_rows(eval_dataset))

    def get_test_dataloader(self, test_dataset):
        with self._collating_with(self._eval_collator_of(test_dataset)):
            return super().get_test_dataloader(self._own_eval_rows(test_dataset))

    # -- loss ---------------------------------------------------------------------------------------
    def _forward(self, model, pixel_values):
        if isinstance(classifier_of(self.accelerator.unwrap_model(model)), PreTrainedModel):
            out = model(pixel_values=pixel_values)
            return out.logits
        weight = next(model.parameters(), None)  # a timm student cast as a whole (bf16_full_eval: Trainer casts it
        if weight is not None and weight.is_floating_point() and weight.dtype != pixel_values.dtype:  # for evaluation)
            pixel_values = pixel_values.to(weight.dtype)  # takes its input in its own dtype, as a transformers one does
        return model(pixel_values)

    def pixel_values(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's normalised float images; uint8 pixels (``uint8_pixels``) are normalised here, on their device,
        and a batch left to replay here (``replay_on_device``) is decoded and rendered on the labels' device."""
        if "replay" in inputs:  # (training renders these a batch ahead, in get_batch_samples)
            return self._render_replay(inputs)
        pixels = inputs["pixel_values"]
        if pixels.dtype == torch.uint8:
            return normalise_pixels(pixels, self.student_output, self.replay_pipeline)
        return pixels

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
        dense = dense_teacher_log_probs(idx, lp, self.num_classes, self.args.outside_topk)
        eps = self.args.label_smoothing_factor
        if original.any() and eps > 0:  # ml-dr smooths the label terms
            smooth = torch.full_like(dense[original], eps / self.num_classes)
            smooth.scatter_add_(1, labels[original, None], torch.full_like(smooth[:, :1], 1.0 - eps))
            dense[original] = smooth.log()
        return dense

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """``Trainer``'s, and for a batch without labels (an unlabelled evaluation or test set) the logits alone, with
        no loss and no label ids, as ``Trainer`` gives them, for any student (``Trainer`` would call
        ``model(**inputs)``, which a timm model does not take)."""
        if "labels" in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if prediction_loss_only:
            return None, None, None
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            return None, self._forward(model, self.pixel_values(inputs)).detach(), None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """KD (KL from the teacher to the student), optionally mixed with cross-entropy on the (mixed) labels."""
        logits = self._forward(model, self.pixel_values(inputs))
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
        eps = self.args.label_smoothing_factor

        def nll(target):  # label-smoothed cross-entropy (label_smoothing_factor)
            hit = -logp[valid].gather(1, target[:, None]).squeeze(1)
            return (1 - eps) * hit - eps * logp[valid].mean(-1) if eps > 0 else hit

        own = nll(labels[valid])
        if "mix_labels" in inputs:
            lam = inputs["mix_lam"][valid]
            other_labels = inputs["mix_labels"][valid]
            other = nll(other_labels.clamp_min(0))
            own = torch.where(other_labels >= 0, lam * own + (1 - lam) * other, own)
        return own.mean()
