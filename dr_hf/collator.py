"""Collators: turn dataset rows into a student's batch. One per mode, each building one :class:`Example` per image.

* :class:`ReinforcedCollator` (training on a reinforced dataset): replays one of each row's N stored samples and
  returns the sparse teacher target (or, ``on_device``, leaves decoding and rendering to the training process:
  :mod:`dr_hf.replay`).
* :class:`AugmentCollator` (plain training, online KD): samples fresh parameters from a preset; with teacher input
  specs it also renders each live teacher's view.
* :class:`EvalCollator` (evaluation and prediction): the deterministic center crop, for plain and reinforced rows.

They run in DataLoader workers (``dataloader_num_workers``), so decoding and replay stay out of the training loop;
there they render image batches into shared-memory blocks the worker recycles once the training process has freed
them (:mod:`dr_hf.batch_memory`). Without workers, the reinforced and evaluation collators spread a batch's rows over
torch's intra-op threads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import torch

from .augment import Context, misplaced_row, whole_groups_advice
from .pipeline import AugmentPipeline, empty_batch, make_pipeline, params_at
from .batch_memory import batch_empty, handed_over, in_worker, worker_pool
from .format import (DR_INDEX, DR_PARAMS, DR_TOPK_INDICES, DR_TOPK_LOGPROBS, missing_columns, outside_classes,
                     outside_classes_message)
from .images import EncodedJpeg, decode, decode_later, image_size
from .inputs import InputSpec
from .replay import DeviceReplay
from .rows import combined_advice, rows_of

SKIPPED_BATCH = "skipped_batch"  # the key of a batch collated unrendered, for the Trainer to drop (True a row)


def _map(fn, items: Sequence) -> list:
    """``fn`` over ``items``, on torch's intra-op threads when it has several (JPEG decoding and the torch ops, the
    heavy part, release the GIL), else in order in this thread: in DataLoader workers, which torch gives one thread
    each. Results come back in order, whichever thread made them."""
    threads = min(torch.get_num_threads(), len(items))
    if threads <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


def _rows(example) -> List[Dict[str, Any]]:
    """A row, or a group of rows (a list of rows, as :class:`~dr_hf.rows.ReplayRows` yields, an Arrow table, as an
    Arrow-formatted stream yields, or a dict of lists, as ``Dataset.batch`` / a slice yields), as a list of rows."""
    if isinstance(example, list):
        return example
    if isinstance(example, pa.Table):
        return rows_of(example)
    if isinstance(example.get(DR_INDEX), list):
        keys = list(example)
        return [dict(zip(keys, values)) for values in zip(*(example[k] for k in keys))]
    return [example]


def _batch(n: int, size: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A collated image batch (:func:`~dr_hf.pipeline.empty_batch`: channels-last); in a DataLoader worker in shared
    memory, so it reaches the training process without another copy, in a block the training process has freed
    (:func:`~dr_hf.batch_memory.batch_empty`)."""
    return empty_batch(n, size, dtype, allocate=batch_empty)


def _stacked(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """Views of one size as a batch in their own channels-last layout (``torch.stack`` would repack each into CHW)."""
    batch = _batch(len(views), views[0].shape[-2:], views[0].dtype)
    for slot, view in zip(batch, views):
        slot.copy_(view)
    return batch


def fresh_params(pipeline: AugmentPipeline, seed: int, height: int, width: int) -> Dict[str, Any]:
    """One sample's parameters drawn afresh from ``seed`` for an image of that size."""
    return params_at(pipeline.sample(seed, 0, 1, Context(height, width)), 0)


@dataclass
class Example:
    """One image of a batch: its rendered views (the student's first, then each live teacher's), its label, and
    what it was mixed with (``partner``: the partner's position in the batch, -1 for none; ``lam``: own weight),
    which stored sample it replays (-1: none) and that sample's sparse teacher target. Replayed on the training
    process's device (``ReinforcedCollator(on_device=True)``), ``views`` is empty and ``source`` (the image, left
    encoded where it is a JPEG) and ``view_params`` (the parameters of its view, then of its mixing partner's view,
    if mixed) say what to render there."""

    views: List[torch.Tensor]
    label: int
    partner: int = -1
    lam: float = 1.0
    sample: int = -1
    teacher_indices: Optional[np.ndarray] = None
    teacher_logprobs: Optional[np.ndarray] = None
    source: Union[torch.Tensor, EncodedJpeg, None] = None
    view_params: List[Dict[str, Any]] = field(default_factory=list)


class _Collator:
    def __init__(self, output: InputSpec, image_column: str = "image", label_column: Optional[str] = "label",
                 teacher_outputs: Sequence[InputSpec] = (), num_classes: Optional[int] = None):
        self.output = output
        self.image_column = image_column
        self.label_column = label_column
        self.teacher_outputs = list(teacher_outputs)
        self.num_classes = num_classes

    @property
    def specs(self) -> List[InputSpec]:
        return [self.output] + self.teacher_outputs

    def label(self, row: Dict[str, Any]) -> int:
        """The row's class id; -1 where it has none (``None`` or -1). An id outside the student's classes is refused,
        naming the row: it would index past the logits, or wrap around to another class in a one-hot target."""
        if not self.label_column or row.get(self.label_column) is None:
            return -1
        label = int(row[self.label_column])
        if outside_classes(label, self.num_classes if self.num_classes is not None else float("inf")):
            index = row.get(DR_INDEX)
            where = f"row {int(index)} (dr_index)" if index is not None else "a row"
            raise ValueError(outside_classes_message(where, self.label_column, label, self.num_classes, "the student's"))
        return label

    def image(self, row: Dict[str, Any]) -> torch.Tensor:
        index = row.get(DR_INDEX)
        return decode(row[self.image_column], row=int(index) if index is not None else None, column=self.image_column)

    def fresh(self, pipeline: AugmentPipeline, row: Dict[str, Any], seed: Optional[int] = None,
              image: Optional[torch.Tensor] = None, normalise: bool = True) -> Example:
        """A view with freshly sampled parameters (from ``seed``; default: torch's RNG, which the Trainer and
        DataLoader workers seed) of the row's image (``image``: already decoded)."""
        image = self.image(row) if image is None else image
        seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else seed
        p = fresh_params(pipeline, seed, *image.shape[-2:])
        return Example([pipeline.render(image, p, spec, normalise=normalise) for spec in self.specs], self.label(row))

    def collate(self, examples: List[Example], pixel_values: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The batch; ``pixel_values``: the student views' batch, where most were rendered in place already."""
        if pixel_values is None:
            pixel_values = _stacked([e.views[0] for e in examples])
        else:
            for k, e in enumerate(examples):
                if e.views[0].data_ptr() != pixel_values[k].data_ptr():
                    pixel_values[k].copy_(e.views[0])
        batch: Dict[str, torch.Tensor] = {"pixel_values": pixel_values, **self.targets(examples)}
        for o in range(len(self.teacher_outputs)):
            batch[f"teacher_pixel_values_{o}"] = _stacked([e.views[o + 1] for e in examples])
        return handed_over(batch)

    @staticmethod
    def targets(examples: List[Example]) -> Dict[str, torch.Tensor]:
        """What the loss needs besides the pixels: labels, mixing partners' labels and weights, replayed samples and
        their sparse teacher targets."""
        labels = [e.label for e in examples]
        batch: Dict[str, torch.Tensor] = {"labels": torch.tensor(labels, dtype=torch.long)}
        if any(e.partner >= 0 for e in examples):
            batch["mix_labels"] = torch.tensor([labels[e.partner] if e.partner >= 0 else -1 for e in examples])
            batch["mix_lam"] = torch.tensor([e.lam for e in examples], dtype=torch.float32)
        if any(e.sample >= 0 for e in examples):
            batch["sample_index"] = torch.tensor([e.sample for e in examples], dtype=torch.long)
            k = next(len(e.teacher_indices) for e in examples if e.teacher_indices is not None)
            batch["teacher_indices"] = torch.tensor(np.stack([
                e.teacher_indices if e.teacher_indices is not None else np.full(k, -1) for e in examples]))
            batch["teacher_logprobs"] = torch.tensor(np.stack([
                e.teacher_logprobs if e.teacher_logprobs is not None else np.full(k, np.nan, np.float32) for e in examples]))
        return batch


class EvalCollator(_Collator):
    """The evaluation view (center crop at the spec's ``crop_pct``) with labels, for plain and reinforced rows; rows
    without the label column (an unlabelled test set) give a batch without ``labels``, as ``Trainer`` expects."""

    def __init__(self, output: InputSpec, image_column: str = "image", label_column: Optional[str] = "label", **kw):
        super().__init__(output, image_column, label_column, **kw)
        self.center = AugmentPipeline([])

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        def view(row: Dict[str, Any]) -> Example:
            image = self.image(row)
            return Example([self.center.render(image, {}, spec) for spec in self.specs], self.label(row))

        rows = [row for example in examples for row in _rows(example)]
        batch = self.collate(_map(view, rows))
        if not any(self.label_column in row for row in rows):
            del batch["labels"]
        return batch


class AugmentCollator(_Collator):
    """Plain training and online KD: fresh parameters from the preset ``augment`` for each row (no mixing)."""

    def __init__(self, output: InputSpec, augment: str, crop_scale: Optional[float] = None, **kw):
        super().__init__(output, **kw)
        self.pipeline = make_pipeline(augment, crop_scale=crop_scale)
        if self.pipeline.mix is not None:
            raise ValueError(f"augment={augment!r}: fresh sampling (plain training / online KD) supports presets without "
                             "MixUp/CutMix; reinforced datasets replay their stored mixing")

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        return self.collate([self.fresh(self.pipeline, row) for example in examples for row in _rows(example)])


def check_whole_group(pipe: AugmentPipeline, indices: List[int], stored: Sequence[Dict[str, Any]], sample: int) -> None:
    """Refuse a MixUp/CutMix training example whose rows (``dr_index`` ``indices``, each replaying ``sample`` with
    the ``stored`` parameters) are not one group in stored order, or lack a row one of them is mixed with (a group cut
    short), before anything is rendered."""
    g = pipe.group_size
    if misplaced_row(indices, g) >= 0 or len(indices) > g:
        raise ValueError(f"a training example's rows (dr_index {indices}) are not one MixUp/CutMix group "
                         f"(reordered or some dropped before the trainer: shuffle, filter, select); "
                         f"{whole_groups_advice(g)}")
    members = set(indices)
    for index, drawn in zip(indices, stored):  # a stream's take(n) or skip(n), n not a multiple of the group size
        mate = index + int(drawn["mix_partner"])
        if pipe.mix.is_mixed(drawn) and mate not in members:
            raise ValueError(f"row {index}, sample {sample}: its MixUp/CutMix partner row {mate} is not among the "
                             f"training example's rows (dr_index {indices}, of a group of {g}; a stream cut within a "
                             f"group, by take(n) or skip(n) with n not a multiple of {g}?); {whole_groups_advice(g)}")


class ReinforcedCollator(_Collator):
    """Training on a reinforced dataset: for each row pick one of its N stored samples at random, replay it at the
    student's input spec and return ``teacher_indices`` / ``teacher_logprobs`` (B x K). Rows of one mixing group (a
    group example) share the sample index, so MixUp/CutMix partners are in the batch.

    With probability ``1 - reinforced_prob`` (ml-dr: 0.01) an example is instead the original image seen through
    the training augmentation (the dataset's own transforms, freshly sampled, without mixing) with its label; a row
    without a label (unlabelled data, ``label_column=''``) always replays a stored sample, its only target.

    ``pixel_values`` is a channels-last (B, 3, H, W) tensor (the layout crops are rendered in, so each is copied
    into its slot without repacking), allocated in shared memory in a DataLoader worker (so it reaches the training
    process without another copy).

    ``uint8_pixels`` (pipelines that can, see :attr:`AugmentPipeline.renders_uint8`): ``pixel_values`` are the uint8
    pixels before normalisation, a quarter of the bytes to hand from DataLoader workers and to the GPU;
    :func:`~dr_hf.pipeline.normalise_pixels` (the trainer, on the device) gives the float views bit for bit.

    ``on_device``: nothing is rendered here; the batch's ``replay`` (:class:`~dr_hf.replay.DeviceReplay`: the images
    as stored, JPEGs still encoded, and each view's parameters) is decoded and rendered by the training process on its
    device, and ``pixel_values`` is left out.

    Every choice is a pure function of (``seed``, ``epoch``, the group's first ``dr_index``), so a run resumed from
    a checkpoint sees the same samples as an uninterrupted one; ``ReinforcedTrainer`` sets ``epoch`` each epoch, and
    DataLoader workers see it, persistent ones too. It also sets ``skip_batches`` when it resumes a stream: the
    batches the Trainer drops, which are then collated unrendered (``{"skipped_batch": ...}``)."""

    def __init__(self, output: InputSpec, reinforced_prob: float = 0.99, seed: int = 0, uint8_pixels: bool = False,
                 on_device: bool = False, **kw):
        super().__init__(output, **kw)
        if on_device and (uint8_pixels or self.teacher_outputs):
            raise ValueError("on_device=True renders no pixels here: it takes neither uint8_pixels nor teacher_outputs")
        self.reinforced_prob = reinforced_prob
        self.uint8_pixels = uint8_pixels
        self.on_device = on_device
        self.seed = seed
        # in shared memory, so that DataLoader workers started in an earlier epoch (persistent_workers) see it change
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._skip = torch.zeros((), dtype=torch.int64).share_memory_()
        self._collated = [0, 0]  # (epoch, batches this process collated in it)
        self._pipelines: Dict[tuple, AugmentPipeline] = {}

    @property
    def epoch(self) -> int:
        """The epoch whose samples are replayed; set it before the epoch's DataLoader iterator starts (the same value
        in this process and in every worker, persistent ones included)."""
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(int(value))
        self._collated = [int(value), 0]

    @property
    def skip_batches(self) -> int:
        """How many of the epoch's first batches the Trainer drops unseen (a resumed stream's batches already trained):
        they are not rendered. Set it with :attr:`epoch`, before the epoch's DataLoader iterator starts."""
        return int(self._skip)

    @skip_batches.setter
    def skip_batches(self, value: int) -> None:
        self._skip.fill_(int(value))

    def _skipped(self) -> bool:
        """Whether the batch being collated is one of the epoch's first :attr:`skip_batches`. DataLoader workers take
        batches in turn (those with a part of the stream: ``n_shards`` of them at most), so this process's c-th batch
        of the epoch is the loader's (c * workers + worker)-th, or an earlier one once another worker's part has
        ended: a batch counted as skipped always is one (one skipped may still be rendered)."""
        skip = int(self._skip)
        if not skip:
            return False
        epoch = self.epoch
        if self._collated[0] != epoch:
            self._collated = [epoch, 0]
        info, worker, workers = torch.utils.data.get_worker_info(), 0, 1
        if info is not None:
            worker, workers = info.id, min(info.num_workers, getattr(info.dataset, "n_shards", info.num_workers))
        position = self._collated[1] * workers + worker
        self._collated[1] += 1
        return position < skip

    def pipeline(self, params: Dict[str, Any]) -> AugmentPipeline:
        key = tuple(sorted(params))
        if key not in self._pipelines:
            self._pipelines[key] = AugmentPipeline.from_fields(key)
        return self._pipelines[key]

    @staticmethod
    def check_samples(row, n: int) -> None:
        """Refuse a row whose stored parameters are not ``n`` samples a field (the samples of its teacher targets),
        naming the row, column and field, before one is replayed."""
        for name, values in row[DR_PARAMS].items():
            held = 0 if values is None else len(values)
            if held == 0 and n:  # a null field: the row's reinforcement had no such transform
                raise ValueError(f"row {int(row[DR_INDEX])}, column {DR_PARAMS!r}: no field {name!r}, which other rows "
                                 f"hold: {combined_advice()}")
            if held != n:
                raise ValueError(f"row {int(row[DR_INDEX])}, column {DR_PARAMS!r}: field {name!r} holds {held} samples, "
                                 f"{DR_TOPK_INDICES!r} {n}")

    def check_target(self, index: int, j: int, n: int, row, idx: np.ndarray, lp: np.ndarray, k: int) -> None:
        """Refuse tampered or corrupt teacher targets, naming the row and column, before they reach the loss."""
        where = f"row {index}, sample {j}"
        if len(row[DR_TOPK_LOGPROBS]) != n:
            raise ValueError(f"{where}, column {DR_TOPK_LOGPROBS!r}: {len(row[DR_TOPK_LOGPROBS])} samples, "
                             f"but {DR_TOPK_INDICES!r} has {n}")
        if idx.ndim != 1 or lp.shape != idx.shape or len(idx) != k:
            raise ValueError(f"{where}, columns {DR_TOPK_INDICES!r}/{DR_TOPK_LOGPROBS!r}: shapes {idx.shape}/{lp.shape}, "
                             f"expected ({k},) each")
        if (idx < 0).any() or (self.num_classes is not None and (idx >= self.num_classes).any()):
            raise ValueError(f"{where}, column {DR_TOPK_INDICES!r}: class id(s) {idx.tolist()} outside "
                             f"[0, {self.num_classes}), the student's {self.num_classes} classes" if self.num_classes
                             else f"{where}, column {DR_TOPK_INDICES!r}: negative class id(s) {idx.tolist()}")
        if not np.isfinite(lp).all() or (lp > 1e-3).any():
            raise ValueError(f"{where}, column {DR_TOPK_LOGPROBS!r}: {lp.tolist()} are not log-probabilities "
                             "(finite, <= 0)")

    def group(self, rows: List[Dict[str, Any]], base: int, into: Optional[torch.Tensor] = None) -> List[Example]:
        """The examples of one group of rows (one row, or a whole mixing group), at batch positions ``base``...
        (``into``: their slots of the batch, where the student views are rendered)."""
        missing = missing_columns(rows[0])
        if missing:
            raise ValueError(f"training example lacks the reinforcement columns {missing}: train on a reinforced "
                             "dataset, or ask for plain training (augment=...) or online KD (online_teachers=...)")
        n = len(rows[0][DR_TOPK_INDICES])
        rng = np.random.default_rng([self.seed, self.epoch, int(rows[0][DR_INDEX])])
        j = int(rng.integers(0, n))
        k = len(rows[0][DR_TOPK_INDICES][j])
        pos = {int(row[DR_INDEX]): r for r, row in enumerate(rows)}
        pipe = self.pipeline(rows[0][DR_PARAMS])
        for row in rows:
            self.check_samples(row, n)
        stored = [params_at(row[DR_PARAMS], j) for row in rows]  # each row's replayed sample's parameters
        if pipe.mix is not None:
            check_whole_group(pipe, [int(row[DR_INDEX]) for row in rows], stored, j)
        if self.on_device:  # the images as stored, for the training process to decode and render
            images = [decode_later(row[self.image_column], int(row[DR_INDEX]), self.image_column) for row in rows]
        else:
            images = [self.image(row) for row in rows]
            picks = [(r, j) for r in range(len(rows))]
            views = [pipe.render_samples(images, [row[DR_PARAMS] for row in rows], picks, spec, into if o == 0 else None,
                                         normalise=not self.uint8_pixels) for o, spec in enumerate(self.specs)]
        out = []
        for r, row in enumerate(rows):
            index = int(row[DR_INDEX])
            label = self.label(row)
            original, fresh_seed = rng.random() >= self.reinforced_prob, int(rng.integers(0, 2**62))
            original = original and label >= 0  # a row without a label has only its stored targets
            if original and self.on_device:
                p = fresh_params(pipe.without_mixing(), fresh_seed, *image_size(images[r]))
                if pipe.mix is not None:
                    p.update(params_at(pipe.mix.empty_params(1), 0))
                out.append(Example([], label, source=images[r], view_params=[p]))
                continue
            if original:
                out.append(self.fresh(pipe.without_mixing(), row, fresh_seed, images[r], normalise=not self.uint8_pixels))
                continue
            p = stored[r]
            partner, lam = -1, 1.0
            if pipe.mix is not None and pipe.mix.is_mixed(p):
                target = index + int(p["mix_partner"])  # (in the group: checked above)
                partner = base + pos[target]
                lam = pipe.mix.weight(p, *self.output.size)
            idx = np.asarray(row[DR_TOPK_INDICES][j], dtype=np.int64)
            lp = np.asarray(row[DR_TOPK_LOGPROBS][j], dtype=np.float32)
            self.check_target(index, j, n, row, idx, lp, k)
            if self.on_device:  # the partner's view by its position in the batch (DeviceReplay)
                mixed = []
                if partner >= 0:
                    mixed = [params_at(rows[pos[target]][DR_PARAMS], int(p["mix_sample"]))]
                    p = {**p, "mix_partner": np.asarray(pos[target] - r)}
                out.append(Example([], label, partner, lam, j, idx, lp, images[r], [p, *mixed]))
            else:
                out.append(Example([v[r] for v in views], label, partner, lam, j, idx, lp))
        return out

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, Any]:
        if self._skipped():  # the Trainer drops it: nothing to decode or render
            return {SKIPPED_BATCH: torch.ones(len(examples), dtype=torch.bool)}
        groups = [_rows(example) for example in examples]
        starts = np.cumsum([0] + [len(rows) for rows in groups]).tolist()
        if self.on_device:
            done = [e for part in _map(lambda g: self.group(groups[g], starts[g]), range(len(groups))) for e in part]
            replay = DeviceReplay.of([e.source for e in done], [e.view_params for e in done],
                                     [int(row[DR_INDEX]) for rows in groups for row in rows], self.image_column)
            return {**self.targets(done), "replay": replay}
        pixel_values = _batch(starts[-1], self.output.size, torch.uint8 if self.uint8_pixels else torch.float32)

        def group(g: int) -> List[Example]:  # student views rendered straight into the batch: no copy to stack them
            return self.group(groups[g], starts[g], pixel_values[starts[g]:starts[g + 1]])

        try:
            examples = [e for part in _map(group, range(len(groups))) for e in part]
        except BaseException:
            if in_worker():  # the batch's block goes back to the pool: nothing will lease it
                worker_pool().give_back()
            raise
        return self.collate(examples, pixel_values)
