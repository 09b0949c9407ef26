"""The reinforcement map function: ``Dataset.map(Reinforcer(...), batched=True, with_indices=True)`` computes the
augmentation-parameter and sparse teacher-output columns of a dataset's rows (the job driver, :mod:`dr_hf.job`,
joins them to the source and writes the shards).

Determinism: the parameters of sample j of row i are a pure function of (seed, i, j) and the image; the
teacher runs on fixed batches, all N samples of a *teacher block* of consecutive rows (:func:`teacher_block_rows`,
counted from the shard's first row) or, where N alone fills batches, a sample range of one mixing group, never across
map batches. So the output does not depend on the map's batch size, on processing order, on the number of processes
or of threads rendering and preparing rows, or on the shard size where shards hold whole blocks (the default 2048
rows do).
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import torch
from datasets import Features, Value
from datasets.features.features import numpy_to_pyarrow_listarray

from .ahead import SideStream, computed_ahead, prefetched
from .augment import Context
from .pipeline import AugmentPipeline, empty_batch
from .format import (DR_FINGERPRINT, DR_INDEX, DR_PARAMS, DR_TOPK_INDICES, DR_TOPK_LOGPROBS, ReinforceConfig, index_dtype,
                     outside_classes, outside_classes_message, reinforcement_features)
from .images import BadImageError, decode, fingerprint
from .errors import require_at_least
from .teacher import TeacherEnsemble, usable_device
from .transfer import pinned, to_device


def default_render_threads(teachers: TeacherEnsemble, pipeline: AugmentPipeline) -> int:
    """Threads rendering teacher batches ahead of the teacher when none are asked for. On the CPU: 0, as they would
    only compete with the teacher for the same cores. With teachers on a GPU: 2 where the augmentations include
    RandAugment, whose host work (an op slot's runs, their constants) is as long as the GPU's per batch: 1.13x the
    job's samples/s (median of 3 interleaved rounds, 1.01-1.22) with ``imagenet+rare`` on the H100
    (results/bench_gpu_ab_rare.md); else 1, since with crops and flips alone a second thread gave 0.97x there."""
    if teachers.device.type != "cuda":
        return 0
    return 2 if pipeline.get("rand_augment") is not None else 1


class Reinforcer:
    """``Dataset.map(reinforcer, batched=True, with_indices=True)``: the reinforcement columns, row for row.

    A batch must hold whole teacher blocks (``batch_size`` a multiple of :func:`teacher_block_rows`, itself a
    multiple of the mixing group size, as :func:`reinforce` arranges; ``block_rows`` overrides it, e.g. one group to
    replay a single group); ``index_offset`` is added to the map's indices to give source-split row indices (the
    shard's first row, where blocks start).
    ``render_threads`` threads render the next teacher batches while the teacher runs the current one (0: render
    inline; default: :func:`default_render_threads`); rendering is a pure function of the stored parameters, so this
    changes no output.
    ``render_device`` (default ``"cpu"``): where teacher inputs are rendered; ``"cuda"`` moves each decoded image to
    the GPU once. ``config.render`` says how: ``"per-sample"`` (torch's crop+resize per sample) or ``"batched"``
    (all of an image's samples by two matrix products, :mod:`dr_hf.resample`: the GPU path, also correct on the CPU,
    where it is slower); verify replays with the recorded mode.
    ``pool`` (:func:`preparation_pool`): threads or processes that decode rows and draw their parameters ahead of the
    teacher (the CPU work a GPU job's main thread would otherwise do while the GPU waits); the same values as without.
    ``render_stream``: on a GPU, images are copied and rendered on a CUDA stream of their own, the teacher's stream
    waiting for each batch (:class:`~dr_hf.ahead.SideStream`, as ``replay_on_device`` renders in training), so that
    rendering's kernels and copies need not queue behind the teacher's forward; off by default, as on the H100 it gave
    a median 1.01x the job's pace over 4 interleaved rounds (results/bench_gpu_ab.md); the same values either way. ``read_back_late`` (default: with
    teachers on a GPU): each teacher batch's results are read back once the next forward is queued (see compute).
    ``progress(rows)`` is told of rows as they are done: kept rows when their teacher block is, skipped rows at the
    end of their map batch.
    It runs in the process that made it: ``Dataset.map(..., num_proc=N)`` is refused (its copies of the teachers would
    share the cores, torch may hang after the fork, and its parts split teacher blocks); several processes are
    ``accelerate launch`` or ``torchrun`` with :func:`~dr_hf.job.reinforce`, one Reinforcer each.
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
        pool=None,
        block_rows: Optional[int] = None,
        render_stream: bool = False,
        read_back_late: Optional[bool] = None,
    ):
        check_on_bad_row(on_bad_row)
        self.made_in = os.getpid()
        self.on_bad_row = on_bad_row
        self.bad_rows: List[Dict[str, Any]] = []  # with on_bad_row="skip": what was skipped, and why
        self.config = config
        self.pipeline: AugmentPipeline = config.pipeline()
        self.teachers = teachers
        self.num_rows = num_rows
        self.index_offset = index_offset
        self.progress = progress
        self.render_threads = default_render_threads(teachers, self.pipeline) if render_threads is None else render_threads
        self.fields = self.pipeline.param_fields()
        skip = {SKIP_COLUMN: Value("bool")} if on_bad_row == "skip" else {}  # which rows to drop, only where some may be
        #: the typed ``Features`` of the columns it returns (``IterableDataset.map(..., features=...)`` takes them)
        self.features = Features({**reinforcement_features(self.pipeline, config.num_samples, config.topk,
                                                           config.num_classes), **skip})
        self.schema = self.features.arrow_schema
        self.render_device = usable_device(render_device, "render_device")
        self.side = SideStream(self.render_device, enabled=render_stream)
        self.read_back_late = teachers.device.type == "cuda" if read_back_late is None else read_back_late
        self.pool = pool
        self.buffers = Buffers()
        self.block_rows = teacher_block_rows(config) if block_rows is None else block_rows
        if self.block_rows % self.pipeline.group_size:
            raise ValueError(f"block_rows={self.block_rows} must hold whole mixing groups of {self.pipeline.group_size}")
        self.preparer = RowPreparer(self.pipeline, config.seed, config.num_samples, num_rows, config.num_classes,
                                    config.image_column, config.label_column)
        if teachers.num_classes != config.num_classes:
            raise ValueError(f"the teachers have {teachers.num_classes} classes, the config says {config.num_classes}")
        if teachers.precision != config.precision:
            raise ValueError(f"the teachers run at precision {teachers.precision!r}, the config says {config.precision!r}")
        if teachers.specs != list(config.teachers):  # the data would name teachers that did not make it
            raise ValueError(f"the teachers are {teachers.specs}, the config records {list(config.teachers)}")

    # -- one teacher batch --------------------------------------------------------------------------
    def render_rows(self, images: Sequence[torch.Tensor], params: Sequence[Dict[str, Any]], js: Sequence[int], out,
                    into: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The teacher inputs for samples ``js`` of whole mixing groups' rows at ``out``: (rows * len(js), 3, H, W),
        row-major (written into ``into`` when given), in one call (batched rendering then computes all of a teacher
        batch's resampling matrices at once). ``params[r]``: row r's N samples' parameters in the stored layout (each
        field an (N, ...) array); mixing partners are found by row offset, so groups must be whole."""
        picks = [(r, j) for r in range(len(images)) for j in js]
        return self.pipeline.render_samples(images, params, picks, out, into=into, batched=self.config.render == "batched")

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

    def _prepared(self, batch: Dict[str, List[Any]], indices: List[int],
                  stored: Optional[Sequence[Dict[str, Any]]] = None) -> Iterator[Prepared]:
        """Each row decoded, its label checked and its N samples' parameters drawn (or taken from ``stored``), in
        order: in the ``pool``'s threads or processes, two teacher blocks ahead of the teacher, when there is one, else
        here as the rows are needed."""
        cfg = self.config
        labels = batch.get(cfg.label_column) if cfg.label_column else None
        if stored is not None:
            stored = [{name: np.asarray(p[name], dtype=dtype) for name, (_, dtype) in self.fields.items()}
                      for p in stored]
        items = [(value, i, labels[pos] if labels is not None else None, stored[pos] if stored is not None else None)
                 for pos, (value, i) in enumerate(zip(batch[cfg.image_column], indices))]
        if self.pool is None:
            return map(self.preparer, items)
        ahead = 2 * self.block_rows  # the next teacher batch's rows and the one after: memory stays bounded
        if isinstance(self.pool, ThreadPoolExecutor):  # decoding releases the GIL; sampling is per-row generators
            prepare = functools.partial(prepare_pinned, self.preparer, self.render_device)
            return computed_ahead(items, prepare, ahead, self.pool)
        return map(unpack, computed_ahead(items, functools.partial(prepare_packed, self.preparer), ahead, self.pool))

    def _checked_groups(self, batch, indices, stored=None) -> Iterator[Tuple[int, int, List[int], List[Prepared]]]:
        """Per mixing group: its positions (a, b), the positions kept and their prepared rows. Bad rows raise
        (``fail``) or are recorded and left out (``skip``) with the rest of their group, whose samples may be mixed
        with them."""
        prepared = self._prepared(batch, indices, stored)
        g = self.pipeline.group_size
        for a, b in self._groups(indices):
            rows = [next(prepared) for _ in range(a, b)]
            bad: Dict[int, Dict[str, Any]] = {}
            for pos, row in zip(range(a, b), rows):
                if row.error is not None:
                    if self.on_bad_row == "fail":  # (the remedy said; both kinds of error take one message)
                        raise type(row.error)(f"{row.error}; `on_bad_row` skip leaves such rows out, each listed "
                                              "with its reason in the output's errors/") from row.error
                    column = self.config.label_column if isinstance(row.error, BadRowError) else self.config.image_column
                    bad[pos] = {DR_INDEX: indices[pos], "column": column, "error": str(row.error)}
            if bad and g > 1:
                culprit = bad[min(bad)][DR_INDEX]
                for pos in range(a, b):
                    if pos not in bad:
                        bad[pos] = {DR_INDEX: indices[pos], "column": None, "error": f"row {indices[pos]}: skipped "
                                    f"with its MixUp/CutMix group, which holds bad row {culprit}"}
            self.bad_rows.extend(bad[pos] for pos in sorted(bad))
            keep = [pos for pos in range(a, b) if pos not in bad]
            yield a, b, keep, [rows[pos - a] for pos in keep]

    def _blocks(self, batch, indices, stored=None) -> Iterator[List[Tuple[List[int], List[Prepared]]]]:
        """The map batch's teacher blocks (:attr:`block_rows` consecutive rows, counted from ``index_offset``), each as
        its mixing groups' kept positions and prepared rows (groups with no row left are dropped)."""
        first = indices[0] - self.index_offset if indices else 0
        if first % self.block_rows:
            raise RuntimeError(f"map batch starts at row {indices[0]}, inside a teacher block of {self.block_rows} rows: "
                               f"use a batch size that is a multiple of {self.block_rows}")
        block: List[Tuple[List[int], List[Prepared]]] = []
        for _, b, keep, rows in self._checked_groups(batch, indices, stored):
            if keep:
                block.append((keep, rows))
            if b == len(indices) or (indices[b] - self.index_offset) % self.block_rows == 0:  # the block is complete
                if block:
                    yield block
                block = []

    def compute(self, batch: Dict[str, List[Any]], indices: List[int],
                stored: Optional[Sequence[Dict[str, Any]]] = None, topk: Optional[int] = None):
        """Per row: the N samples' parameters (the stored layout: each field an (N, ...) array) and the (N, C) teacher
        log-probabilities (``None`` for skipped rows), or with ``topk`` only each sample's K largest as (values,
        indices), both (N, K), taken where the teachers run. ``stored``: per row, parameters to render instead of
        drawing them (``dr-hf verify`` replays what a dataset holds)."""
        indices = [i + self.index_offset for i in indices]
        params: List[Optional[Dict[str, np.ndarray]]] = [None] * len(indices)
        logps: List[Optional[torch.Tensor]] = [None] * len(indices)
        outputs = self.teachers.outputs()
        n = self.config.num_samples

        def teacher_batches():  # (positions, rows, sample range): fixed per teacher block, whatever the map batch
            for block in self._blocks(batch, indices, stored):
                keep = [pos for group_keep, _ in block for pos in group_keep]
                rows = [row for _, group_rows in block for row in group_rows]  # whole groups, in order
                with self.side.queue():  # once per image, not waiting, where the render runs
                    images = [to_device(row.image, self.render_device) for row in rows]
                for pos, row in zip(keep, rows):
                    params[pos] = row.params
                per_chunk = max(1, self.config.teacher_batch_size // len(keep))
                # equal sample ranges: N=400 in batches of 256 as 2 x 200, not 256 + 144 (padded to 256 when compiled)
                per_chunk = -(-n // -(-n // per_chunk))
                for j0 in range(0, n, per_chunk):
                    yield keep, (images, [row.params for row in rows]), range(j0, min(n, j0 + per_chunk))

        def render(item):
            keep, (images, row_params), js = item
            inputs = {}
            with torch.profiler.record_function("dr_hf.render"), self.side.queue():  # (named in scripts/profile_job.py)
                for o, out in enumerate(outputs):
                    inputs[o] = self.buffers.take(len(keep) * len(js), out.size, self.render_device)
                    self.render_rows(images, row_params, js, out, inputs[o])
                return inputs, self.side.done()

        per_row: Dict[int, List[Tuple[torch.Tensor, ...]]] = {}

        def collect(keep, js, inputs, finite, parts, done):
            if done is not None:
                done.synchronize()  # this batch's results are on the host (the next batch's forward runs on)
            self.buffers.give(*inputs.values())  # (on a GPU, later renders into them queue behind this forward)
            if not bool(finite):
                raise FloatingPointError(f"the teacher produced NaN/inf outputs for rows {indices[keep[0]]}.."
                                         f"{indices[keep[-1]]}, sample indices {js.start}..{js.stop - 1}")
            parts = [part.view(len(keep), len(js), -1) for part in parts]
            for r, pos in enumerate(keep):
                per_row.setdefault(pos, []).append(tuple(part[r] for part in parts))
            if self.progress and js.stop == n:  # these rows are done
                self.progress(len(keep))

        # read_back_late (on a GPU): each batch's results are read back after the next batch's forward is queued, so
        # that the GPU does not wait for the host between forwards: the reductions and copies to the host queue behind
        # a batch's forward and an event marks them done. (On a CPU they are done at once, and read back at once.)
        # torch's TF32 flags are set once here, from the teachers' precision, and written by no thread while the
        # forwards and the render threads run (the renders' float32 products follow them)
        waiting = None
        with self.teachers.float32_flags():
            for (keep, _, js), (inputs, rendered) in prefetched(teacher_batches(), render, self.render_threads):
                SideStream.hand_over(rendered, list(inputs.values()))
                with torch.profiler.record_function("dr_hf.teacher"):
                    logp = self.teachers.log_probs(inputs, on_device=True)
                finite = torch.isfinite(logp).all()
                parts = tuple(torch.topk(logp, topk, dim=-1)) if topk else (logp,)
                finite, *parts = (t.to("cpu", non_blocking=True) for t in (finite, *parts))
                done = torch.cuda.Event() if logp.is_cuda else None
                if done is not None:
                    done.record()
                if waiting is not None:
                    collect(*waiting)
                    waiting = None
                if self.read_back_late:
                    waiting = (keep, js, inputs, finite, parts, done)
                else:
                    collect(keep, js, inputs, finite, parts, done)
            if waiting is not None:
                collect(*waiting)
        for pos, chunks in per_row.items():
            joined = tuple(torch.cat(part) for part in zip(*chunks))
            logps[pos] = joined if topk else joined[0]
        return indices, params, logps

    def __call__(self, batch: Dict[str, List[Any]],
                 indices: Optional[List[int]] = None) -> Union[pa.Table, Dict[str, list]]:
        """The batch's reinforcement columns, as an Arrow table with one row per input row (``Dataset.map`` then
        gives a dataset of them alone; :func:`~dr_hf.job.reinforce` joins it to the source with
        ``concatenate_datasets(..., axis=1)``), or as Python lists where the batch is a ``dict`` of them, as
        ``IterableDataset.map`` gives and takes (a stream reinforced lazily, row for row as ``Dataset.map``'s;
        ``features=`` :attr:`features` with the stream's own keeps its columns typed); a formatted batch (numpy
        arrays, tensors, an Arrow table, a DataFrame) is refused: map over ``dataset.with_format(None)``. With
        ``on_bad_row="skip"``, a column ``_dr_skip`` says which rows were skipped (placeholders; the driver drops
        them). The top-K is taken where the teachers run, and the columns are
        built for the whole batch at once (Arrow arrays from stacked NumPy arrays): between map batches a GPU waits
        for this work, and for ``datasets`` to write what the map returns."""
        if indices is None or isinstance(indices, int):  # map(..) without with_indices=True, or without batched=True
            raise TypeError("Reinforcer is a batched map function that needs each row's index (its seeds derive from "
                            "it): Dataset.map(reinforcer, batched=True, with_indices=True)")
        if os.getpid() != self.made_in:  # a copy in another process: Dataset.map(..., num_proc=N)
            raise RuntimeError("Reinforcer runs in the process that made it, not in Dataset.map's num_proc workers: "
                               "map without num_proc, and for several processes (one per GPU, or CPU processes) run "
                               "dr-hf reinforce or dr_hf.reinforce() under accelerate launch or torchrun")
        cfg = self.config
        if not isinstance(batch, Mapping):  # with_format("arrow" / "pandas"): a table, not columns of values
            raise TypeError(f"Reinforcer takes a dataset's rows unformatted, but the batch is a {type(batch).__name__}, "
                            "as with_format('arrow') or ('pandas') gives it: map over dataset.with_format(None)")
        for column in (cfg.image_column, cfg.label_column):
            kind = array_kind(batch, column)
            if kind:  # with_format("numpy" / "torch"): images decoded to arrays, labels as tensors
                raise TypeError(f"Reinforcer takes a dataset's rows unformatted, but column {column!r} holds {kind} "
                                "values, as with_format('numpy') or ('torch') gives them: map over "
                                "dataset.with_format(None)")
        fingerprints = self._fingerprints(batch[cfg.image_column], [i + self.index_offset for i in indices])
        rows, n, k = len(indices), cfg.num_samples, cfg.topk
        indices, params, tops = self.compute(batch, indices, topk=k)
        skipped = [p is None for p in params]
        kept = [pos for pos, skip in enumerate(skipped) if not skip]
        top_indices = np.zeros((rows, n, k), np.dtype(index_dtype(cfg.num_classes)))
        top_logprobs = np.zeros((rows, n, k), np.float16)
        if kept:
            top_logprobs[kept] = torch.stack([tops[pos][0] for pos in kept]).numpy()
            top_indices[kept] = torch.stack([tops[pos][1] for pos in kept]).numpy()
        fields = {name: np.zeros((rows, n, *shape), dtype) for name, (shape, dtype) in self.fields.items()}
        for pos in kept:
            for name, values in fields.items():
                values[pos] = params[pos][name]
        columns = {
            DR_INDEX: pa.array(np.asarray(indices, dtype=np.int64)),
            DR_FINGERPRINT: pa.array(["" if skip else fingerprints(pos) for pos, skip in enumerate(skipped)],
                                     pa.string()),
            DR_PARAMS: pa.StructArray.from_arrays([numpy_to_pyarrow_listarray(v) for v in fields.values()],
                                                  names=list(fields)),
            DR_TOPK_INDICES: numpy_to_pyarrow_listarray(top_indices),
            DR_TOPK_LOGPROBS: numpy_to_pyarrow_listarray(top_logprobs),
        }
        if self.on_bad_row == "skip":
            columns[SKIP_COLUMN] = pa.array(skipped, pa.bool_())
        if self.progress and len(kept) < rows:  # skipped rows count as done at the end of their map batch
            self.progress(rows - len(kept))
        table = pa.table(columns).cast(self.schema)  # the typed Features, e.g. List(..., length=K) per sample
        # IterableDataset.map hands its rows over as a dict of Python lists and takes them back as such, not as a table
        return table.to_pydict() if isinstance(batch, dict) else table

    def _fingerprints(self, values: Sequence[Any], indices: Sequence[int]) -> Callable[[int], str]:
        """Each row's image fingerprint, by position: hashed by the preparing threads while the teacher runs when
        there are some (hashing releases the GIL), else here when asked for."""
        column = self.config.image_column
        if isinstance(self.pool, ThreadPoolExecutor):
            futures = [self.pool.submit(fingerprint, value, row=i, column=column) for value, i in zip(values, indices)]
            return lambda pos: futures[pos].result()
        return lambda pos: fingerprint(values[pos], row=indices[pos], column=column)


def array_kind(batch, column: Optional[str]) -> Optional[str]:
    """The type name of a map batch's ``column`` where it holds numpy arrays or tensors (a formatted dataset's
    batch), else ``None``."""
    if not column or not isinstance(batch, Mapping) or column not in batch or not len(batch[column]):
        return None
    values = batch[column]
    first = values if isinstance(values, (np.ndarray, torch.Tensor)) else values[0]
    return type(first).__name__ if isinstance(first, (np.ndarray, torch.Tensor)) else None


def teacher_block_rows(config: ReinforceConfig) -> int:
    """Rows whose samples share teacher batches (a *teacher block*): all N samples of as many whole mixing groups as
    fit in ``teacher_batch_size``, rounded down to a power of two times the group size (so blocks tile any shard of a
    power-of-two multiple of them, as the default 2048 rows are); one group where even that does not fit (then its
    samples are split into several batches). With N=64 and 256-sample batches: 4 rows a batch, not 1."""
    g = config.pipeline().group_size
    fit = config.teacher_batch_size // (config.num_samples * g)
    return g * (1 << (fit.bit_length() - 1)) if fit >= 1 else g


class Buffers:
    """Teacher-input batches to render into, reused from one teacher batch to the next (thread-safe).

    A fresh batch (tens of MB) comes from the OS on every allocation, and touching its new pages costs a CPU about
    as much time as rendering into them; reusing a few (the one the teacher reads and those rendered ahead) does not.
    """

    def __init__(self):
        self._free: Dict[Tuple, List[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, n: int, size: Sequence[int], device: torch.device) -> torch.Tensor:
        """An (n, 3, *size) float32 batch (:func:`~dr_hf.pipeline.empty_batch`) on ``device``."""
        key = (n, tuple(size), str(device))
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
        return empty_batch(n, size, torch.float32, device)

    def give(self, *tensors: torch.Tensor) -> None:
        with self._lock:
            for t in tensors:
                self._free.setdefault((t.shape[0], tuple(t.shape[2:]), str(t.device)), []).append(t)


BAD_ROW_POLICIES = ("fail", "skip")
SKIP_COLUMN = "_dr_skip"


def check_on_bad_row(on_bad_row: str) -> None:
    """Refuse an ``on_bad_row`` policy other than :data:`BAD_ROW_POLICIES`."""
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"`on_bad_row` must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")


class BadRowError(ValueError):
    """A row that cannot be reinforced (its label is outside the teacher's classes); the message names it."""


class Prepared(NamedTuple):
    """One row, ready for rendering: its decoded image and its N samples' parameters (the stored layout: each field
    an (N, ...) array, a few bytes to hand between processes), or why it cannot be."""

    image: Optional[torch.Tensor]
    params: Optional[Dict[str, np.ndarray]]
    error: Optional[Exception]


@dataclass
class RowPreparer:
    """Decodes a row's image, checks its label and draws its N samples' parameters: a pure function of
    (seed, row index, image), picklable, so that worker processes can run it ahead of the teacher."""

    pipeline: AugmentPipeline
    seed: int
    num_samples: int
    num_rows: int
    num_classes: int
    image_column: str
    label_column: Optional[str]

    def __call__(self, item: Tuple[Any, int, Any, Optional[Dict[str, np.ndarray]]]) -> Prepared:
        """``item``: (image value, row index, label, stored parameters to replay or ``None`` to draw them)."""
        value, index, label, stored = item
        try:
            self._check_label(label, index)
            image = decode(value, row=index, column=self.image_column)
        except (BadImageError, BadRowError) as exc:
            return Prepared(None, None, exc)
        params = self.sample(index, image.shape[-2], image.shape[-1]) if stored is None else stored
        return Prepared(image, params, None)

    def sample(self, index: int, height: int, width: int) -> Dict[str, np.ndarray]:
        """Row ``index``'s N samples' parameters for an image of ``height`` x ``width``, in the stored layout."""
        g = self.pipeline.group_size
        start = (index // g) * g
        ctx = Context(height=height, width=width, position=index - start, group_rows=min(g, self.num_rows - start),
                      num_samples=self.num_samples)
        return self.pipeline.sample(self.seed, index, self.num_samples, ctx)

    def _check_label(self, label: Any, index: int) -> None:
        if label is None:
            return
        if not isinstance(label, (int, np.integer)) or outside_classes(label, self.num_classes):
            raise BadRowError(outside_classes_message(f"row {index}", self.label_column, label, self.num_classes,
                                                      "the teacher's"))


def prepare_pinned(preparer: RowPreparer, device: torch.device, item) -> Prepared:
    """:class:`RowPreparer` in a preparing thread: for a GPU, the image is also copied to pinned memory there, so that
    the thread that queues the GPU's work only queues its copy to the device (in one H100 profile of the compiled
    job, 128 rows, pinning their images took that thread 121 ms while its 32 forwards ran over 0.47 s)."""
    row = preparer(item)
    return row if row.image is None else row._replace(image=pinned(row.image, device))


def prepare_packed(preparer: RowPreparer, item) -> Prepared:
    """:class:`RowPreparer` in a worker process: the image travels back as a numpy HWC array (plain bytes)."""
    row = preparer(item)
    return row if row.image is None else row._replace(image=row.image.permute(1, 2, 0).numpy())


def unpack(row: Prepared) -> Prepared:
    return row if row.image is None else row._replace(image=torch.from_numpy(row.image).permute(2, 0, 1))


def check_preparation(workers: int = 0, threads: Optional[int] = 0) -> None:
    """Refuse negative counts, or both processes and threads, for preparing rows (:func:`preparation_pool`)."""
    require_at_least(0, prepare_workers=workers, prepare_threads=threads)
    if workers and threads:
        raise ValueError(f"`prepare_workers` {workers} and `prepare_threads` {threads}: give one of them (processes or "
                         "threads)")


def preparation_pool(workers: int = 0, threads: int = 0):
    """What prepares rows ahead of the teacher: ``threads`` threads (JPEG decoding releases the GIL, and nothing is
    copied between processes) or ``workers`` processes (spawned: safe next to CUDA); ``None`` for neither."""
    check_preparation(workers, threads)
    if threads:
        return ThreadPoolExecutor(threads, thread_name_prefix="dr-prepare")
    if not workers:
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
