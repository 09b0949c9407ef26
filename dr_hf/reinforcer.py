"""The reinforcement map function: ``Dataset.map(Reinforcer(...), batched=True, with_indices=True)`` adds the
augmentation-parameter and sparse teacher-output columns to a batch of rows (the job driver is :mod:`dr_hf.reinforce`).

Determinism: the parameters of sample j of row i are a pure function of (seed, i, j) and the image; the
teacher runs on fixed batches formed per mixing group and sample range, never across map batches, so the
output does not depend on the map's batch size, on processing order, or on the number of processes.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .augment import AugmentPipeline, Context
from .format import DR_FINGERPRINT, DR_INDEX, DR_PARAMS, DR_TOPK_INDICES, DR_TOPK_LOGPROBS, ReinforceConfig, index_dtype
from .images import BadImageError, decode, fingerprint
from .teacher import TeacherEnsemble


class Reinforcer:
    """``Dataset.map(reinforcer, batched=True, with_indices=True)``: adds the reinforcement columns.

    A batch must hold whole mixing groups (``batch_size`` a multiple of the group size, as :func:`reinforce`
    arranges); ``index_offset`` is added to the map's indices to give source-split row indices.
    ``render_threads`` threads render the next teacher batches while the teacher runs the current one (0: render
    inline; default: 1 when the teacher runs on a GPU, else 0, as on the CPU they would only compete for the same
    cores); rendering is a pure function of the stored parameters, so this changes no output.
    ``render_device`` (default ``"cpu"``): where teacher inputs are rendered; ``"cuda"`` moves each decoded image to
    the GPU once. ``config.render`` says how: ``"per-sample"`` (torch's crop+resize per sample) or ``"batched"``
    (all of an image's samples by two matrix products, :mod:`dr_hf.resample`: the GPU path, also correct on the CPU,
    where it is slower); verify replays with the recorded mode.
    """

    def __init__(
        self,
        config: ReinforceConfig,
        teachers: TeacherEnsemble,
        num_rows: int,
        index_offset: int = 0,
        progress: Optional[Callable[[int], None]] = None,
        render_threads: Optional[int] = None,
        on_bad_row: str = "fail",
        render_device: str = "cpu",
    ):
        if on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"--on-bad-row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
        self.on_bad_row = on_bad_row
        self.bad_rows: List[Dict[str, Any]] = []  # with on_bad_row="skip": what was skipped, and why
        self.config = config
        self.pipeline: AugmentPipeline = config.pipeline()
        self.teachers = teachers
        self.num_rows = num_rows
        self.index_offset = index_offset
        self.progress = progress
        self.render_threads = (1 if str(teachers.device).startswith("cuda") else 0) if render_threads is None else render_threads
        self.fields = self.pipeline.param_fields()
        self.render_device = torch.device(render_device)
        if teachers.num_classes != config.num_classes:
            raise ValueError(f"the teachers have {teachers.num_classes} classes, the config says {config.num_classes}")
        if teachers.precision != config.precision:
            raise ValueError(f"the teachers run at precision {teachers.precision!r}, the config says {config.precision!r}")

    # -- one row -----------------------------------------------------------------------------------
    def _row_params(self, index: int, image: torch.Tensor) -> List[Dict[str, Any]]:
        g = self.pipeline.group_size
        start = (index // g) * g
        ctx = Context(height=image.shape[-2], width=image.shape[-1], position=index - start,
                      group_rows=min(g, self.num_rows - start), num_samples=self.config.num_samples)
        return [self.pipeline.make_params(self.config.seed, index, j, ctx) for j in range(self.config.num_samples)]

    def _check_label(self, label: Any, index: int) -> None:
        if label is None:
            return
        if not isinstance(label, (int, np.integer)) or label < -1 or label >= self.config.num_classes:
            raise BadRowError(
                f"row {index}, column {self.config.label_column!r}: label {label!r} is outside the teacher's "
                f"{self.config.num_classes} classes (use -1 for unlabelled rows)"
            )

    # -- one mixing group --------------------------------------------------------------------------
    def render_group(self, images: Sequence[torch.Tensor], params: Sequence[List[Dict[str, Any]]], js: Sequence[int], out) -> torch.Tensor:
        """The teacher inputs for samples ``js`` of a group's rows at ``out``: (rows * len(js), 3, H, W), row-major."""
        picks = [(r, j) for r in range(len(images)) for j in js]
        return self.pipeline.render_samples(images, lambda r, j: params[r][j], picks, out,
                                            batched=self.config.render == "batched")

    def _teacher_batches(self, groups: Sequence[Tuple[int, int]]) -> List[Tuple[int, int, range]]:
        """(group start, group stop, sample indices) per teacher batch: fixed per group, whatever the map batch."""
        n = self.config.num_samples
        items = []
        for a, b in groups:
            per_chunk = max(1, self.config.teacher_batch_size // (b - a))
            items.extend((a, b, range(j0, min(n, j0 + per_chunk))) for j0 in range(0, n, per_chunk))
        return items

    def _groups(self, indices: Sequence[int]) -> List[Tuple[int, int]]:
        """Split a batch's positions into whole mixing groups."""
        g = self.pipeline.group_size
        groups, start = [], 0
        while start < len(indices):
            group = indices[start] // g
            stop = start
            while stop < len(indices) and indices[stop] // g == group:
                stop += 1
            expected = min(g, self.num_rows - group * g) - (indices[start] - group * g)
            if stop - start != expected and g > 1:
                raise RuntimeError(f"map batch splits mixing group {group} (rows {indices[start]}..): "
                                   "use a batch size that is a multiple of the group size")
            groups.append((start, stop))
            start = stop
        return groups

    def _load_rows(self, batch: Dict[str, List[Any]], indices: List[int]):
        """Decoded images and checked labels; bad rows raise (``fail``) or are recorded and left out (``skip``),
        with the rest of their mixing group, whose samples may be mixed with them."""
        cfg = self.config
        labels = batch.get(cfg.label_column) if cfg.label_column else None
        images: List[Optional[torch.Tensor]] = []
        bad: Dict[int, Dict[str, Any]] = {}
        for pos, (value, i) in enumerate(zip(batch[cfg.image_column], indices)):
            try:
                if labels is not None:
                    self._check_label(labels[pos], i)
                images.append(decode(value, row=i, column=cfg.image_column))
            except (BadImageError, BadRowError) as exc:
                if self.on_bad_row == "fail":
                    raise
                images.append(None)
                column = cfg.label_column if isinstance(exc, BadRowError) else cfg.image_column
                bad[pos] = {DR_INDEX: i, "column": column, "error": str(exc)}
        g = self.pipeline.group_size
        if bad and g > 1:
            for pos, i in enumerate(indices):
                if pos not in bad:
                    culprit = next((b[DR_INDEX] for b in bad.values() if b[DR_INDEX] // g == i // g), None)
                    if culprit is not None:
                        bad[pos] = {DR_INDEX: i, "column": None,
                                    "error": f"row {i}: skipped with its MixUp/CutMix group, which holds bad row {culprit}"}
        self.bad_rows.extend(bad[pos] for pos in sorted(bad))
        return images, set(bad)

    def compute(self, batch: Dict[str, List[Any]], indices: List[int]):
        """Per row: the N samples' parameters and the (N, C) teacher log-probabilities (``None`` for skipped rows)."""
        indices = [i + self.index_offset for i in indices]
        all_images, bad = self._load_rows(batch, indices)
        keep = [pos for pos in range(len(indices)) if pos not in bad]
        kept_indices, images = [indices[p] for p in keep], [all_images[p] for p in keep]
        kept_params, kept_logps = self._compute_rows(kept_indices, images)
        params: List[Optional[List[Dict[str, Any]]]] = [None] * len(indices)
        logps: List[Optional[torch.Tensor]] = [None] * len(indices)
        for p, pr, lp in zip(keep, kept_params, kept_logps):
            params[p], logps[p] = pr, lp
        return indices, params, logps

    def _compute_rows(self, indices: List[int], images: List[torch.Tensor]):
        params = [self._row_params(i, im) for i, im in zip(indices, images)]
        images = [im.to(self.render_device, non_blocking=True) for im in images]  # once per image
        outputs = self.teachers.outputs()

        def render(item):
            a, b, js = item
            return {o: self.render_group(images[a:b], params[a:b], js, out) for o, out in enumerate(outputs)}

        per_row: List[List[torch.Tensor]] = [[] for _ in indices]
        for (a, b, js), inputs in prefetched(self._teacher_batches(self._groups(indices)), render, self.render_threads):
            logp = self.teachers.log_probs(inputs)
            if not torch.isfinite(logp).all():
                raise FloatingPointError(f"the teacher produced NaN/inf outputs for rows {indices[a]}..{indices[b - 1]}, "
                                         f"sample indices {js.start}..{js.stop - 1}")
            for r, chunk in zip(range(a, b), logp.view(b - a, len(js), -1)):
                per_row[r].append(chunk)
        return params, [torch.cat(chunks) for chunks in per_row]

    def __call__(self, batch: Dict[str, List[Any]], indices: List[int]) -> Dict[str, Any]:
        """The reinforcement columns; skipped rows get placeholders and ``_dr_skip`` = True (the driver drops them)."""
        cfg = self.config
        indices, params, logps = self.compute(batch, indices)
        n, k = cfg.num_samples, cfg.topk
        idx_dtype = np.dtype(index_dtype(cfg.num_classes))
        out: Dict[str, Any] = {DR_INDEX: np.asarray(indices, dtype=np.int64), DR_FINGERPRINT: [], DR_PARAMS: [],
                               DR_TOPK_INDICES: [], DR_TOPK_LOGPROBS: [], SKIP_COLUMN: []}
        for value, i, row, lp in zip(batch[cfg.image_column], indices, params, logps):
            skip = row is None
            out[SKIP_COLUMN].append(skip)
            if skip:
                out[DR_FINGERPRINT].append("")
                out[DR_PARAMS].append({name: np.zeros((n, *shape), dtype) for name, (shape, dtype) in self.fields.items()})
                out[DR_TOPK_INDICES].append(np.zeros((n, k), idx_dtype))
                out[DR_TOPK_LOGPROBS].append(np.zeros((n, k), np.float16))
                continue
            top = torch.topk(lp, k, dim=-1)
            out[DR_FINGERPRINT].append(fingerprint(value, row=i, column=cfg.image_column))
            out[DR_PARAMS].append({name: np.stack([np.asarray(p[name]) for p in row]) for name in self.fields})
            out[DR_TOPK_INDICES].append(top.indices.numpy().astype(idx_dtype))
            out[DR_TOPK_LOGPROBS].append(top.values.numpy().astype(np.float16))
        if self.progress:
            self.progress(len(indices))
        return out


BAD_ROW_POLICIES = ("fail", "skip")
SKIP_COLUMN = "_dr_skip"


class BadRowError(ValueError):
    """A row that cannot be reinforced (its label is outside the teacher's classes); the message names it."""


def prefetched(items: Sequence[Any], fn: Callable[[Any], Any], threads: int) -> Iterator[Tuple[Any, Any]]:
    """``(item, fn(item))`` in order, computing up to ``threads + 1`` items ahead on a thread pool (0: inline)."""
    if threads <= 0:
        for item in items:
            yield item, fn(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="dr-render") as pool:
        pending: Deque = deque()
        it = iter(items)
        for item in itertools.islice(it, threads + 1):
            pending.append((item, pool.submit(fn, item)))
        while pending:
            item, future = pending.popleft()
            nxt = next(it, _END)
            if nxt is not _END:
                pending.append((nxt, pool.submit(fn, nxt)))
            yield item, future.result()


_END = object()
