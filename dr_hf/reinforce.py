"""The reinforcement job: a batched ``Dataset.map`` function, and the driver that writes Hub-layout parquet shards.

Determinism: the parameters of sample j of row i are a pure function of (seed, i, j) and the image; the
teacher runs on fixed batches formed per mixing group and sample range, never across map batches, so the
output does not depend on ``--batch-size``, on processing order, or on the number of processes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .augment import AugmentPipeline, Context
from .format import (
    DR_FINGERPRINT,
    DR_INDEX,
    DR_PARAMS,
    DR_TOPK_INDICES,
    DR_TOPK_LOGPROBS,
    METADATA_KEY,
    ReinforceConfig,
    config_from_parquet,
    index_dtype,
    reinforcement_features,
)
from .images import BadImageError, decode, fingerprint
from .joblock import output_lock
from .processes import Processes, current_processes
from .shards import error_report_path, num_shards, rows_per_shard, shard_name, shard_rows
from .teacher import TeacherEnsemble

logger = logging.getLogger(__name__)


class Reinforcer:
    """``Dataset.map(reinforcer, batched=True, with_indices=True)``: adds the reinforcement columns.

    A batch must hold whole mixing groups (``batch_size`` a multiple of the group size, as :func:`reinforce`
    arranges); ``index_offset`` is added to the map's indices to give source-split row indices.
    ``render_threads`` threads render the next teacher batches while the teacher runs the current one (0: render
    inline; default: 1 when the teacher runs on a GPU, else 0, as on the CPU they would only compete for the same
    cores); rendering is a pure function of the stored parameters, so this changes no output.
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
        return self.pipeline.render_samples(images, lambda r, j: params[r][j], picks, out)

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


# ----------------------------------------------------------------------------------------------------
# Writing


def write_parquet(dataset, path: str, config: ReinforceConfig) -> None:
    """Write ``dataset`` to ``path`` atomically (tmp file + rename), zstd, with the config in the schema metadata."""
    import pyarrow.parquet as pq
    from datasets import config as ds_config
    from datasets.features.features import require_storage_embed
    from datasets.table import embed_table_storage

    table = dataset.with_format("arrow")[:]
    if any(require_storage_embed(f) for f in dataset.features.values()):
        table = embed_table_storage(table)
    schema = dataset.features.arrow_schema
    schema = schema.with_metadata({**(schema.metadata or {}), METADATA_KEY: config.to_json().encode()})
    table = table.cast(schema)
    has_images = any(type(f).__name__ in ("Image", "Video") for f in dataset.features.values())
    row_group = ds_config.PARQUET_ROW_GROUP_SIZE_FOR_IMAGE_DATASETS if has_images else 10_000
    tmp = path + ".tmp"
    # The reinforcement columns are small and written once: compress them hard (zstd 19, byte-stream-split
    # floats and boxes, no dictionaries); other columns (often JPEG bytes) get a fast zstd level.
    leaves = list(_leaf_paths(table.schema))
    dr_leaves = [p for p in leaves if p.startswith("dr_")]
    pq.write_table(
        table,
        tmp,
        row_group_size=row_group,
        compression="zstd",
        compression_level={p: 19 if p.startswith("dr_") else 3 for p in leaves},
        use_byte_stream_split=[p for p in dr_leaves if p.startswith((DR_TOPK_LOGPROBS, f"{DR_PARAMS}.crop", f"{DR_PARAMS}.erase", f"{DR_PARAMS}.mix_box"))],
        use_dictionary=[p for p in leaves if not p.startswith("dr_")],
        write_page_checksum=True,  # a flipped bit is then an error naming the file, never a silently wrong value
    )
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _leaf_paths(schema):
    """Parquet leaf column paths ("a.list.element", "s.field") of an arrow schema."""
    import pyarrow as pa

    def walk(name, typ):
        if pa.types.is_struct(typ):
            for i in range(typ.num_fields):
                yield from walk(f"{name}.{typ.field(i).name}", typ.field(i).type)
        elif pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
            yield from walk(f"{name}.list.element", typ.value_type)
        else:
            yield name

    for f in schema:
        yield from walk(f.name, f.type)


@dataclass
class ReinforceResult:
    output_dir: str
    num_rows: int
    shards_written: int
    shards_skipped: int
    seconds: float
    stats: Dict[str, Any]
    rank: int = 0
    world: int = 1


def reinforce(
    dataset,
    config: ReinforceConfig,
    teachers: TeacherEnsemble,
    output_dir: str,
    split: str = "train",
    batch_size: int = 32,
    show_progress: bool = True,
    command: Optional[str] = None,
    num_rows: Optional[int] = None,
    processes: Optional[Processes] = None,
    render_threads: Optional[int] = None,
    on_bad_row: str = "fail",
    wait: bool = False,
) -> ReinforceResult:
    """Reinforce a ``datasets.Dataset`` or a streamed ``IterableDataset`` into ``output_dir``
    (Hub layout: ``README.md`` + ``data/{split}-XXXXX-of-YYYYY.parquet``).

    The unit of work is a shard of ``config.rows_per_shard`` rows, written atomically (tmp file + rename).
    Under ``accelerate launch``/``torchrun`` each process takes a contiguous range of shards and the main process
    writes the card once every shard exists; the output is the same for any number of processes. Rerunning
    skips complete shards, so an interrupted job resumes; a rerun with other settings into the folder is refused.
    ``num_rows`` gives a stream's length when its metadata lacks it (otherwise the stream is counted first).
    ``render_threads``: see :class:`Reinforcer`.
    ``on_bad_row``: ``"fail"`` (default) stops at the first undecodable image or out-of-range label, naming the row and
    column; ``"skip"`` leaves such rows out (with their MixUp/CutMix group) and lists each one, with the reason, in
    ``errors/<shard>.jsonl``; the card counts them. Nothing is dropped silently.
    One job per folder: the job holds ``output_dir``'s lock (:mod:`dr_hf.joblock`) for its whole run; another job is
    refused at once, or waits for it with ``wait=True``. The card is written only once every shard carries this
    job's configuration and its rows (:func:`dr_hf.shards.check_shards`).
    """
    import datasets
    from datasets import Image

    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"--on-bad-row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
    procs = processes or current_processes()
    streaming = isinstance(dataset, datasets.IterableDataset)
    if streaming and dataset.features is None:
        dataset = dataset._resolve_features()
    check_columns(dataset, config, teachers)
    pipeline = config.pipeline()
    g = pipeline.group_size
    batch_size = max(g, int(math.ceil(batch_size / g)) * g)
    per_shard = rows_per_shard(config)

    decoded = dataset
    if isinstance(dataset.features.get(config.image_column), Image):
        decoded = dataset.cast_column(config.image_column, Image(decode=False))
    n = len(dataset) if not streaming else (num_rows or stream_length(decoded, split, config.label_column or config.image_column))
    if n < 1:
        raise ValueError("the dataset is empty: nothing to reinforce")
    count = num_shards(config, n)
    with output_lock(output_dir, procs, wait=wait):
        return _run_shards(decoded, dataset, config, teachers, output_dir, split, batch_size, show_progress, command, n,
                           count, per_shard, procs, render_threads, on_bad_row, streaming)


def _run_shards(decoded, dataset, config, teachers, output_dir, split, batch_size, show_progress, command, n, count,
                per_shard, procs, render_threads, on_bad_row, streaming) -> ReinforceResult:
    """The job, under the folder's lock: the shards still to do, then (main process) the card."""
    import datasets

    from .card import write_card
    from .stats import summarize

    pipeline = config.pipeline()
    data_dir = os.path.join(output_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    mine = procs.shards(count)
    paths = [os.path.join(data_dir, shard_name(split, s, count)) for s in range(count)]
    check_output_dir(data_dir, config, split, count, remove_tmp=[paths[s] + ".tmp" for s in mine])
    existing = {s for s in range(count) if os.path.exists(paths[s])}
    todo = [s for s in mine if s not in existing]

    added = reinforcement_features(pipeline, config.num_samples, config.topk, config.num_classes)
    features = datasets.Features({**dataset.features, **added}) if config.keep_source else added
    map_features = datasets.Features({**decoded.features, **added, SKIP_COLUMN: datasets.Value("bool")})

    bar = None
    if show_progress and procs.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(shard_rows(s, per_shard, n)) for s in mine), unit="img", desc="reinforce",
                   initial=sum(len(shard_rows(s, per_shard, n)) for s in mine if s in existing))
    t0 = time.time()
    done_rows = 0
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    redirect = contextlib.nullcontext()
    if bar:  # log lines above the bar, not at its end
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = logging_redirect_tqdm()  # the root handler, with its format
    try:
        redirect.__enter__()
        for s, part in pending_shards(decoded, todo, per_shard, n, streaming):
            t_shard = time.time()
            job = Reinforcer(config, teachers, num_rows=n, index_offset=s * per_shard,
                             progress=bar.update if bar else None, render_threads=render_threads, on_bad_row=on_bad_row)
            out = part.map(job, batched=True, batch_size=batch_size, with_indices=True, features=map_features,
                           keep_in_memory=True, load_from_cache_file=False, new_fingerprint=f"dr-{s}-{time.time_ns()}")
            if job.bad_rows:
                out = out.filter(lambda skip: not skip, input_columns=SKIP_COLUMN, keep_in_memory=True)
                logger.warning("%s: shard %d/%d: %d row(s) skipped (listed in %s)", procs, s + 1, count,
                               len(job.bad_rows), error_report_path(output_dir, paths[s]))
            out = out.remove_columns(SKIP_COLUMN)
            write_error_report(output_dir, paths[s], job.bad_rows)
            if not config.keep_source:
                out = out.select_columns(list(added))
            elif out.features[config.image_column] != features[config.image_column]:
                out = out.cast_column(config.image_column, features[config.image_column])
            write_parquet(out, paths[s], config)
            dt = time.time() - t_shard
            done_rows += len(out)
            logger.info("%s: shard %d/%d, %d images in %.1fs: %.2f images/s, %.1f samples/s", procs, s + 1, count,
                        len(out), dt, len(out) / dt, len(out) * config.num_samples / dt)
    finally:
        redirect.__exit__(None, None, None)
        if was_enabled:
            datasets.enable_progress_bars()
        if bar:
            bar.close()
    seconds = time.time() - t0
    if todo:
        logger.info("%s: %d images in %.1fs: %.2f images/s, %.1f samples/s", procs, done_rows, seconds,
                    done_rows / seconds, done_rows * config.num_samples / seconds)
    if not procs.is_main:
        return ReinforceResult(output_dir, n, len(todo), len(mine) - len(todo), seconds, {}, procs.rank, procs.world)

    wait_for_shards(paths, procs)
    seconds = time.time() - t0
    stats = summarize(output_dir, split=split)
    new_rows = n - sum(len(shard_rows(s, per_shard, n)) for s in existing)
    stats["source_rows"] = n
    if new_rows:
        stats["images_per_second"] = round(new_rows / seconds, 2)
        stats["samples_per_second"] = round(new_rows * config.num_samples / seconds, 2)
        stats["processes"] = procs.world
        logger.info("all %d process(es): %d images in %.1fs: %.2f images/s, %.1f samples/s", procs.world, new_rows,
                    seconds, stats["images_per_second"], stats["samples_per_second"])
    preview = None
    if config.keep_source:
        from .preview import render_preview

        try:
            preview = os.path.basename(render_preview(output_dir, split=split))
        except Exception as exc:  # the preview decorates the card; say so and go on without it
            logger.warning("no preview image for the card: %s: %s", type(exc).__name__, exc)
    write_card(output_dir, config, stats, features=features, split=split, command=command, preview=preview)
    return ReinforceResult(output_dir, n, len(todo), len(mine) - len(todo), seconds, stats, procs.rank, procs.world)


def write_error_report(output_dir: str, shard_path: str, bad_rows: Sequence[Dict[str, Any]]) -> None:
    """The skipped rows of one shard, one JSON object per line, written (atomically) before the shard itself;
    a shard without skipped rows has none (a stale one from an interrupted attempt is removed)."""
    import json

    path = error_report_path(output_dir, shard_path)
    if not bad_rows:
        if os.path.exists(path):
            os.remove(path)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for row in bad_rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def pending_shards(decoded, todo: Sequence[int], per_shard: int, n: int, streaming: bool, retries: int = 3):
    """``(shard, Dataset of its rows)`` for the shards in ``todo``; a stream is read once, in order, and only the
    rows of wanted shards are kept (one shard of rows in memory at a time). A stream that fails mid-way (a dropped
    connection) is reopened at the row it reached, up to ``retries`` times, before :class:`StreamError` stops the job
    (complete shards are kept: rerunning the command resumes)."""
    import datasets

    if not streaming:
        for s in todo:
            yield s, decoded.select(shard_rows(s, per_shard, n))
        return
    if not todo:
        return
    wanted, last = set(todo), max(todo)
    pos = min(todo) * per_shard
    rows: List[Dict[str, Any]] = []
    it = stream_rows(decoded, pos, retries)
    for row in it:
        s = pos // per_shard
        if s in wanted:
            rows.append(row)
        pos += 1
        if pos == n or pos % per_shard == 0:
            if s in wanted:
                yield s, datasets.Dataset.from_list(rows, features=decoded.features)
                rows = []
            if s >= last:
                break
    if pos < min(n, (last + 1) * per_shard):
        raise ValueError(f"the stream ended after {pos} rows, but {n} were expected (pass the right --num-rows)")
    if pos == n and next(it, None) is not None:
        raise ValueError(f"the stream holds more than the {n} rows expected (pass the right --num-rows)")


class StreamError(RuntimeError):
    """Reading a streamed source failed, and kept failing after retries; the message names the row."""


def stream_rows(stream, start: int, retries: int = 3, backoff: float = 1.0) -> Iterator[Dict[str, Any]]:
    """The rows of ``stream`` from position ``start``; on a read error the stream is reopened at the row reached
    (``IterableDataset.skip``), up to ``retries`` times in a row."""
    pos, failures = start, 0
    while True:
        it = iter(stream.skip(pos) if pos else stream)
        try:
            for row in it:
                yield row
                pos += 1
                failures = 0
            return
        except GeneratorExit:
            raise
        except Exception as exc:  # network errors surface as many types (OSError, httpx, fsspec, HfHubHTTPError)
            failures += 1
            if failures > retries:
                raise StreamError(f"reading the streamed source failed at row {pos} after {retries} retries "
                                  f"({type(exc).__name__}: {exc}); complete shards are kept: rerun the same command "
                                  "to resume") from exc
            logger.warning("reading the stream failed at row %d (%s: %s); reopening it there (retry %d/%d)", pos,
                           type(exc).__name__, exc, failures, retries)
            time.sleep(backoff * failures)


def stream_length(stream, split: str, column: str) -> int:
    """A stream's row count from its metadata, else by reading one column of it once."""
    from datasets import Image

    info = getattr(stream, "info", None)
    splits = getattr(info, "splits", None) or {}
    if split in splits and splits[split].num_examples:
        return int(splits[split].num_examples)
    logger.info("counting the rows of the stream (pass --num-rows to skip this pass)")
    stream = stream.select_columns([column])
    if stream.features is not None and isinstance(stream.features.get(column), Image):
        stream = stream.cast_column(column, Image(decode=False))
    return sum(1 for _ in stream)


def wait_for_shards(paths: Sequence[str], procs: Processes, poll: float = 2.0) -> None:
    """On the main process: block until the other processes have written their shards."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        logger.info("%s: waiting for %d shard(s) from the other processes", procs, len(missing))
    while missing:
        time.sleep(poll)
        missing = [p for p in missing if not os.path.exists(p)]


def check_columns(dataset, config: ReinforceConfig, teachers: TeacherEnsemble) -> None:
    """Fail early, naming the option, if the dataset lacks a column or its label space differs from the teacher's."""
    from datasets import ClassLabel

    cols = list(dataset.column_names)
    if config.image_column not in cols:
        raise ValueError(f"--image-column {config.image_column!r} is not a column of the dataset (columns: {cols})")
    clash = [c for c in cols if c.startswith("dr_")]
    if clash:
        raise ValueError(f"the dataset already has reinforcement column(s) {clash}; reinforce the source dataset instead")
    if config.label_column:
        if config.label_column not in cols:
            raise ValueError(f"--label-column {config.label_column!r} is not a column of the dataset (columns: {cols}); "
                             "pass --label-column '' for unlabelled data")
        feature = dataset.features[config.label_column]
        if isinstance(feature, ClassLabel) and feature.num_classes != teachers.num_classes:
            raise ValueError(
                f"label space mismatch: column {config.label_column!r} has {feature.num_classes} classes, "
                f"the teacher(s) {teachers.specs} predict {teachers.num_classes}"
            )


def check_output_dir(data_dir: str, config: ReinforceConfig, split: str, num_shards: int,
                     remove_tmp: Optional[Sequence[str]] = None) -> None:
    """Refuse to mix two different jobs' shards in one folder; remove this process's half-written shards
    (``remove_tmp``; all of them when ``None``): they are redone."""
    for name in sorted(os.listdir(data_dir)):
        path = os.path.join(data_dir, name)
        if name.endswith(".tmp"):
            if remove_tmp is None or path in remove_tmp:
                os.remove(path)
            continue
        if not name.endswith(".parquet"):
            continue
        try:
            existing = config_from_parquet(path)
        except Exception as exc:
            raise ValueError(f"{path} is not readable as a reinforced shard ({exc}); use an empty --output") from exc
        same_layout = not name.startswith(f"{split}-") or name.endswith(f"-of-{num_shards:05d}.parquet")
        if existing is None or existing.identity() != config.identity() or not same_layout:
            raise ValueError(
                f"{os.path.dirname(data_dir)} already holds data of a different job ({name}); "
                "rerun with the same settings to resume, or choose another --output"
            )
