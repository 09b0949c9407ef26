"""The reinforcement job driver: shards, resume, the folder's lock, parquet writing and the card, around the map
function :class:`dr_hf.reinforcer.Reinforcer` (re-exported here).

The output does not depend on ``--batch-size``, on processing order, or on the number of processes (see
:mod:`dr_hf.reinforcer`); the unit of work and of resume is a shard (:mod:`dr_hf.shards`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .format import (
    AGREEMENT_KEY,
    DR_PARAMS,
    DR_TOPK_INDICES,
    DR_TOPK_LOGPROBS,
    METADATA_KEY,
    NewerFormatError,
    ReinforceConfig,
    check_class_ids,
    check_classes,
    class_ids,
    config_from_parquet,
    reinforcement_features,
)
from .ahead import read_ahead
from .errors import require_at_least
from .joblock import output_lock
from .processes import Processes, current_processes
from .reinforcer import (SKIP_COLUMN, Reinforcer, check_on_bad_row, check_preparation, preparation_pool,
                         teacher_block_rows)
from .rows import as_rows
from .shards import (card_config, check_split_name, describe_differences, error_report_path, num_shards,
                     parse_shard_name, rows_per_shard, shard_name, shard_rows, written_whole)
from .streams import StreamError, stream_length, stream_tables
from .teacher import TeacherEnsemble, usable_device

__all__ = ["Reinforcer", "reinforce", "ReinforceResult", "StreamError"]

logger = logging.getLogger(__name__)

# A streamed source's shards read ahead of the one being computed, by a thread of their own (each holds one more
# shard of rows in memory); 0: read each when it is needed (the baseline of scripts/bench_stream.py).
READ_AHEAD_SHARDS = 1


# ----------------------------------------------------------------------------------------------------
# Writing


def write_parquet(dataset, path: str, config: ReinforceConfig, agreement: Optional[Tuple[int, int]] = None) -> None:
    """Write ``dataset`` to ``path`` atomically (tmp file + rename), zstd, with the config in the schema metadata
    (and ``agreement`` = (hits, samples), the teacher's agreement with labels the shard does not hold, beside it)."""
    import pyarrow.parquet as pq
    from datasets.arrow_writer import get_writer_batch_size_from_data_size, get_writer_batch_size_from_features
    from datasets.features.features import require_storage_embed
    from datasets.table import embed_table_storage

    table = dataset.with_format("arrow")[:]
    if any(require_storage_embed(f) for f in dataset.features.values()):
        table = embed_table_storage(table)
    schema = dataset.features.arrow_schema
    metadata = {**(schema.metadata or {}), METADATA_KEY: config.to_json().encode()}
    if agreement is not None:
        metadata[AGREEMENT_KEY] = json.dumps({"hits": agreement[0], "samples": agreement[1]}).encode()
    schema = schema.with_metadata(metadata)
    table = table.cast(schema)
    # Row groups as `datasets` writes them (push_to_hub, to_parquet): at most datasets.config.MAX_ROW_GROUP_SIZE
    # (100 MB) of Arrow data each, so that a stream holds one such group at a time in each reader, the Hub's viewer
    # reads them, and a stream can be split by row group (IterableDataset.reshard) across processes and workers.
    row_group = get_writer_batch_size_from_features(dataset.features) or \
        get_writer_batch_size_from_data_size(table.num_rows, table.nbytes)
    group = config.pipeline().group_size  # whole MixUp/CutMix groups in each
    row_group = max(group, row_group // group * group)
    # The reinforcement columns are small and written once: compress them hard (zstd 19, byte-stream-split
    # floats and boxes, no dictionaries); other columns (often JPEG bytes) get a fast zstd level.
    leaves = list(_leaf_paths(table.schema))
    dr_leaves = [p for p in leaves if p.startswith("dr_")]
    with written_whole(path) as tmp:
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
    batch_size: Optional[int] = None,
    show_progress: bool = True,
    command: Optional[str] = None,
    num_rows: Optional[int] = None,
    processes: Optional[Processes] = None,
    render_threads: Optional[int] = None,
    on_bad_row: str = "fail",
    wait: bool = False,
    render_device: Optional[str] = None,
    prepare_workers: int = 0,
    prepare_threads: Optional[int] = None,
) -> ReinforceResult:
    """Reinforce a ``datasets.Dataset`` or a streamed ``IterableDataset`` into ``output_dir``
    (Hub layout: ``README.md`` + ``data/{split}-XXXXX-of-YYYYY.parquet``).

    The unit of work is a shard of ``config.rows_per_shard`` rows, written atomically (tmp file + rename).
    Under ``accelerate launch``/``torchrun`` each process takes a contiguous range of shards and the main process
    writes the card once every shard exists; the output is the same for any number of processes. Rerunning
    skips complete shards, so an interrupted job resumes; a rerun with other settings into the folder is refused.
    ``processes``: this process's part of the job (default: the launcher's, :func:`~dr_hf.processes.current_processes`);
    a job can also run as parts one at a time (an array job), each given ``Processes(rank=r, world=W)``, the main part
    (rank 0) last or beside the others: it waits for their shards to write the card.
    ``num_rows`` gives a stream's length when its metadata lacks it (otherwise it comes from its parquet files'
    footers, or the stream is counted first; :mod:`dr_hf.streams`, which also seeks each process's first row).
    ``batch_size``: rows per map batch (default :func:`default_batch_size`), rounded up to whole teacher blocks.
    ``render_threads``, ``render_device``: see :class:`Reinforcer`; by default (:func:`default_render`) inputs are
    rendered on the teachers' device when ``config.render`` is ``"batched"``, else on the CPU. ``prepare_threads``
    threads (default: :func:`default_prepare_threads`, 4 with teachers on a GPU, 0 on the CPU) or ``prepare_workers``
    processes (default 0) decode rows and draw their parameters ahead of the teacher; the output is the same for any
    number of either. Threads share the job's memory (JPEG decoding releases the GIL); processes copy each decoded
    image back, and on an H100 host (results/bench_gpu.md) they made the job slower; they are meant for jobs whose
    preparation holds the GIL (slow Python decoders).
    ``on_bad_row``: ``"fail"`` (default) stops at the first undecodable image or out-of-range label, naming the row and
    column; ``"skip"`` leaves such rows out (with their MixUp/CutMix group) and lists each one, with the reason, in
    ``errors/<shard>.jsonl``; the card counts them. Nothing is dropped silently.
    One job per folder: the job holds ``output_dir``'s lock (:mod:`dr_hf.joblock`) for its whole run; another job is
    refused at once, or waits for it with ``wait=True``. The card is written only once every shard carries this
    job's configuration and its rows (:func:`dr_hf.shards.check_shards`).
    """
    import datasets
    from datasets import Image

    check_on_bad_row(on_bad_row)
    check_preparation(prepare_workers, prepare_threads)
    require_at_least(1, batch_size=batch_size, num_rows=num_rows)
    require_at_least(0, render_threads=render_threads)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"`output_dir` {output_dir} is a file, not a folder")
    if render_device is not None:
        usable_device(render_device, "render_device")
    check_split_name(split)
    procs = processes or current_processes()
    streaming = isinstance(dataset, datasets.IterableDataset)
    if isinstance(dataset, datasets.Dataset):
        if dataset.format.get("type") == "custom":
            logger.warning("the dataset's transform (set_transform / with_transform) is set aside: the job reinforces "
                           "its stored images (%r); dataset.reset_format() silences this", config.image_column)
        dataset = as_rows(dataset)  # (with_format numpy, torch, arrow: the job decodes its rows itself)
    if streaming and dataset.features is None:
        dataset = dataset._resolve_features()
    check_columns(dataset, config, teachers)
    if not streaming:
        check_mixing_order(dataset, config)
    block = teacher_block_rows(config)  # a multiple of the mixing group size
    batch_size = default_batch_size(config.num_samples) if batch_size is None else batch_size
    batch_size = max(block, int(math.ceil(batch_size / block)) * block)
    per_shard = rows_per_shard(config)

    decoded = dataset
    if isinstance(dataset.features.get(config.image_column), Image):
        decoded = dataset.cast_column(config.image_column, Image(decode=False))
    if not streaming and num_rows not in (None, len(dataset)):
        raise ValueError(f"`num_rows` {num_rows} is for a streamed dataset; this one holds {len(dataset)} rows")
    n = len(dataset) if not streaming else (num_rows or stream_length(decoded, split, config.label_column or config.image_column))
    if n < 1:
        raise ValueError("the dataset is empty: nothing to reinforce")
    recorded = config.source.get("num_rows")
    if recorded is None:  # recorded, so that verify checks every shard's row range and no row goes missing unseen
        config = dataclasses.replace(config, source={**config.source, "num_rows": n})
    elif recorded != n:
        raise ValueError(f"`config` records {recorded} source rows (source['num_rows']), but the dataset holds {n}")
    count = num_shards(config, n)
    if render_device is None:
        render_device = default_render(teachers, render=config.render)[0]
    if prepare_threads is None:
        prepare_threads = default_prepare_threads(teachers) if not prepare_workers else 0
    if procs.is_main:
        for advice in gpu_advice(teachers):
            logger.info(advice)
    with output_lock(output_dir, procs, wait=wait):
        pool = preparation_pool(prepare_workers, prepare_threads)
        try:
            return _run_shards(decoded, dataset, config, teachers, output_dir, split, batch_size, show_progress, command,
                               n, count, per_shard, procs, render_threads, on_bad_row, streaming, render_device, pool)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)


def _run_shards(decoded, dataset, config, teachers, output_dir, split, batch_size, show_progress, command, n, count,
                per_shard, procs, render_threads, on_bad_row, streaming, render_device, pool) -> ReinforceResult:
    """The job, under the folder's lock: the shards still to do, then (main process) the card."""
    import datasets

    pipeline = config.pipeline()
    data_dir = os.path.join(output_dir, "data")
    mine = procs.shards(count)
    paths = [os.path.join(data_dir, shard_name(split, s, count)) for s in range(count)]
    check_output_dir(data_dir, config, split, count, remove_tmp=[paths[s] + ".tmp" for s in mine])
    os.makedirs(data_dir, exist_ok=True)
    existing = {s for s in range(count) if os.path.exists(paths[s])}
    todo = [s for s in mine if s not in existing]

    added = reinforcement_features(pipeline, config.num_samples, config.topk, config.num_classes)
    features = datasets.Features({**dataset.features, **added}) if config.keep_source else added

    t0 = time.time()
    done_rows = 0
    total = sum(len(shard_rows(s, per_shard, n)) for s in mine)
    initial = sum(len(shard_rows(s, per_shard, n)) for s in mine if s in existing)
    # A finished shard is written (zstd 19, fsync) by a thread while the next one is computed: pyarrow releases the
    # GIL, and on a GPU host the write would otherwise stall the teacher for a third of a shard's time. At most one
    # write is pending, so at most two shards are held in memory.
    writer = ThreadPoolExecutor(1, thread_name_prefix="dr-write")
    written = None
    with job_progress(show_progress and procs.is_main, total, initial) as bar:
        try:
            shards = pending_shards(decoded, todo, per_shard, n, streaming)
            if streaming and READ_AHEAD_SHARDS:  # the next shard's rows download while this one is computed
                shards = read_ahead(shards, READ_AHEAD_SHARDS, name="dr-stream")
            for s, part in shards:
                t_shard = time.time()
                if streaming:
                    check_mixing_order(part, config, streaming, where=f"shard {s + 1}/{count} of the stream")
                job = Reinforcer(config, teachers, num_rows=n, index_offset=s * per_shard,
                                 progress=bar.update if bar else None, render_threads=render_threads,
                                 on_bad_row=on_bad_row, render_device=render_device, pool=pool)
                columns = part.map(job, batched=True, batch_size=batch_size, with_indices=True, keep_in_memory=True,
                                   load_from_cache_file=False, new_fingerprint=f"dr-{s}-{time.time_ns()}")
                out, agreement = shard_output(part, columns, bool(job.bad_rows), config, features)
                if job.bad_rows:
                    logger.warning(procs.tag("shard %d/%d: %d row(s) skipped (listed in %s)"), s + 1, count,
                                   len(job.bad_rows), error_report_path(output_dir, paths[s]))
                write_error_report(output_dir, paths[s], job.bad_rows)
                if written is not None:
                    written.result()  # the previous shard is on disk (or its error raised here)
                written = writer.submit(write_parquet, out, paths[s], config, agreement)
                dt = time.time() - t_shard
                done_rows += len(out)
                left = sum(len(shard_rows(t, per_shard, n)) for t in todo[todo.index(s) + 1:])
                eta = ""
                if left and done_rows:  # at this process's pace so far
                    eta = f"; {left} images left here, about {duration(left * (time.time() - t0) / done_rows)}"
                logger.info(procs.tag("shard %d/%d, %d images in %.1fs: %.2f images/s, %.1f samples/s%s"), s + 1, count,
                            len(out), dt, len(out) / dt, len(out) * config.num_samples / dt, eta)
            if written is not None:
                written.result()
        finally:
            writer.shutdown(wait=True)  # a shard already computed is still written (atomically) if the job stops
    seconds = time.time() - t0
    if todo and procs.world > 1:  # one process's share; the job's total follows from the main process
        logger.info(procs.tag("%d images in %.1fs: %.2f images/s, %.1f samples/s"), done_rows, seconds,
                    done_rows / seconds, done_rows * config.num_samples / seconds)
    if not procs.is_main:
        return ReinforceResult(output_dir, n, len(todo), len(mine) - len(todo), seconds, {}, procs.rank, procs.world)

    wait_for_shards(paths, procs)
    seconds = time.time() - t0
    new_rows = n - sum(len(shard_rows(s, per_shard, n)) for s in existing)
    stats = card_for_shards(output_dir, config, split, features, command, n, new_rows, seconds, procs.world)
    return ReinforceResult(output_dir, n, len(todo), len(mine) - len(todo), seconds, stats, procs.rank, procs.world)


@contextlib.contextmanager
def job_progress(show: bool, total: int, initial: int):
    """A progress bar over the job's images (``None`` unless ``show``), with ``datasets``' own bars off meanwhile and
    log lines written above the bar."""
    import datasets

    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="img", desc="reinforce", initial=initial)
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    redirect = contextlib.nullcontext()
    if bar:  # log lines above the bar, not at its end
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = logging_redirect_tqdm()  # the root handler, with its format
    try:
        with redirect:
            yield bar
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
        if bar:
            bar.close()


def shard_output(part, columns, skipping: bool, config: ReinforceConfig, features):
    """A shard's rows as written, from its source rows ``part`` and the map's reinforcement ``columns``: beside the
    source's columns (or alone, ``keep_source=False``), rows marked skipped (``skipping``) left out, the image column
    in the declared feature; and the teachers' agreement with the labels (``None`` without labels), counted here,
    before a reinforcement-only shard drops them, for the shard's footer."""
    import datasets

    from .stats import agreement_counts

    # without the source's columns, its labels stay until the teacher's agreement with them is counted
    labels = [] if config.keep_source or config.label_column not in part.column_names else [config.label_column]
    kept = part if config.keep_source else part.select_columns(labels)
    out = datasets.concatenate_datasets([kept, columns], axis=1) if kept.column_names else columns
    if skipping:
        out = out.filter(lambda skip: not skip, input_columns=SKIP_COLUMN, keep_in_memory=True)
    if SKIP_COLUMN in out.column_names:
        out = out.remove_columns(SKIP_COLUMN)
    agreement = None  # kept in the shard's footer: the card's figures then read no column (stats.summarize)
    if config.label_column and config.label_column in out.column_names:
        counted = out.select_columns([DR_TOPK_INDICES, DR_PARAMS, config.label_column]).with_format("arrow")[:]
        agreement = agreement_counts(counted, config.label_column, config.topk)
    if labels:
        out = out.remove_columns(labels)
    if config.keep_source and out.features[config.image_column] != features[config.image_column]:
        out = out.cast_column(config.image_column, features[config.image_column])
    return out, agreement


def card_for_shards(output_dir: str, config: ReinforceConfig, split: str, features, command: Optional[str],
                    source_rows: int, new_rows: int, seconds: float, processes: int) -> Dict[str, Any]:
    """Once every shard is on disk (main process): the figures of the whole folder, with this run's pace where it
    computed rows, a preview of replayed samples (where the images are kept) and the card; returns the figures."""
    from .card import write_card
    from .stats import summarize

    stats = summarize(output_dir, split=split)
    stats["source_rows"] = source_rows
    if new_rows:
        stats["images_per_second"] = round(new_rows / seconds, 2)
        stats["samples_per_second"] = round(new_rows * config.num_samples / seconds, 2)
        stats["processes"] = processes
        if processes > 1:  # (one process's figures are its shard lines' and the result's)
            logger.info("all %d processes: %d images in %.1fs: %.2f images/s, %.1f samples/s", processes, new_rows,
                        seconds, stats["images_per_second"], stats["samples_per_second"])
    preview = None
    if config.keep_source:
        from .preview import render_preview

        try:
            preview = os.path.basename(render_preview(output_dir, split=split))
        except Exception as exc:  # the preview decorates the card; say so and go on without it
            logger.warning("no preview image for the card: %s: %s", type(exc).__name__, exc)
    write_card(output_dir, config, stats, features=features, split=split, command=command, preview=preview)
    return stats


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
    with written_whole(path) as tmp, open(tmp, "w") as f:
        for row in bad_rows:
            f.write(json.dumps(row) + "\n")


def duration(seconds: float) -> str:
    """``seconds`` in words a log line can carry: ``45 s``, ``12 min``, ``3 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = int(round(seconds / 60))
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


def pending_shards(decoded, todo: Sequence[int], per_shard: int, n: int, streaming: bool, retries: int = 3):
    """``(shard, Dataset of its rows)`` for the shards in ``todo``; a stream is read once, in order, from the first
    of them (:func:`~dr_hf.streams.seek`), a shard of rows at a time as an Arrow table, keeping only wanted shards.
    A stream that fails mid-way (a dropped connection) is reopened at the shard it reached, up to ``retries`` times,
    before :class:`StreamError` stops the job (complete shards are kept: rerunning the command resumes)."""
    import datasets
    from datasets.table import InMemoryTable

    if not streaming:
        for s in todo:
            yield s, decoded.select(shard_rows(s, per_shard, n))
        return
    if not todo:
        return
    wanted, first, last = set(todo), min(todo), max(todo)
    tables = stream_tables(decoded, first * per_shard, per_shard, retries)
    info = datasets.DatasetInfo(features=decoded.features)
    for s in range(first, last + 1):
        expected = len(shard_rows(s, per_shard, n))
        table = next(tables, None)
        got = 0 if table is None else len(table)
        if got < expected:
            raise ValueError(f"the stream ended after {s * per_shard + got} rows, but {n} were expected (pass the "
                             "right `num_rows`)")
        if got > expected or ((s + 1) * per_shard >= n and next(tables, None) is not None):
            raise ValueError(f"the stream holds more than the {n} rows expected (pass the right `num_rows`)")
        if s in wanted:
            yield s, datasets.Dataset(InMemoryTable(table), info=info)


def wait_for_shards(paths: Sequence[str], procs: Processes, poll: float = 2.0) -> None:
    """On the main process: block until the other processes have written their shards."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        logger.info(procs.tag("waiting for %d shard(s) from the other processes"), len(missing))
    while missing:
        time.sleep(poll)
        missing = [p for p in missing if not os.path.exists(p)]


def check_columns(dataset, config: ReinforceConfig, teachers: TeacherEnsemble) -> None:
    """Fail early, naming the option, if the dataset lacks a column or its label space differs from the teacher's."""
    import datasets
    from datasets import ClassLabel

    if isinstance(dataset.column_names, dict):  # a DatasetDict: load_dataset without split=
        raise ValueError(f"the dataset holds the splits {sorted(dataset.column_names)} (a DatasetDict): reinforce one "
                         f"of them, e.g. dataset[{sorted(dataset.column_names)[0]!r}] (`split`)")
    cols = list(dataset.column_names)
    if config.image_column not in cols:
        raise ValueError(f"`image_column` {config.image_column!r} is not a column of the dataset (columns: {cols})")
    if getattr(dataset.features.get(config.image_column), "dtype", None) in ("string", "large_string"):
        raise ValueError(f"`image_column` {config.image_column!r} holds strings, not images (file paths?): cast it "
                         f"first, dataset.cast_column({config.image_column!r}, datasets.Image())")
    if isinstance(dataset.features.get(config.image_column), (datasets.List, datasets.LargeList, datasets.Array2D,
                                                               datasets.Array3D)):
        raise ValueError(f"`image_column` {config.image_column!r} holds arrays, not images: cast it first, "
                         f"dataset.cast_column({config.image_column!r}, datasets.Image()) (each array stored as a PNG)")
    clash = [c for c in cols if c.startswith("dr_")]
    if clash:
        raise ValueError(f"the dataset already has reinforcement column(s) {clash}; reinforce the source dataset instead")
    if config.label_column:
        if config.label_column not in cols:
            raise ValueError(f"`label_column` {config.label_column!r} is not a column of the dataset (columns: {cols}); "
                             "pass `label_column` '' for unlabelled data")
        feature = dataset.features[config.label_column]
        check_class_ids(config.label_column, feature, "pass `label_column` '' to reinforce without labels")
        if isinstance(feature, ClassLabel):
            check_classes(config.label_column, feature.names, teachers.num_classes, teachers.class_names,
                          "the teachers", f"use teachers trained on these classes, not {teachers.specs} (e.g. "
                          "timm:NAME@FILE.safetensors with your fine-tuned weights), or pass `label_column` '' to keep "
                          "the teachers' own classes without the labels")


def check_mixing_order(rows, config: ReinforceConfig, streaming: bool = False, where: str = "the dataset") -> None:
    """Refuse MixUp/CutMix over ``rows`` (a ``datasets.Dataset``: the whole source, or a streamed source's shard) that
    are stored sorted by label: a row mixes with the rows of its group of consecutive rows, which would be mostly its
    own class (:func:`~dr_hf.augment.sorted_by_label`). The labels are the label column's, or, in a job without
    labels, the source's one ``ClassLabel`` column's."""
    from datasets import ClassLabel

    from .augment import label_agreement_in_groups, sorted_by_label

    g = config.pipeline().group_size
    column = config.label_column if config.label_column in rows.column_names else None
    if column is None:  # reinforced without labels (the teachers' classes are others): the source's classes still tell
        classes = [name for name, f in rows.features.items() if isinstance(f, ClassLabel)]
        column = classes[0] if len(classes) == 1 else None
    if g < 2 or column is None:
        return
    agreement, chance, groups = label_agreement_in_groups(class_ids(rows, column), g)
    if not sorted_by_label(agreement, chance, groups):
        return
    fix = ("a stream is shuffled only within a buffer: store the source in a random order, or reinforce it read "
           "whole (without `streaming`) and shuffled (`shuffle_seed`)" if streaming else
           "reinforce them in a random order: `shuffle_seed` (dataset.shuffle(seed=...), recorded as "
           "source['shuffle_seed'] in the config)")
    raise ValueError(f"{where}: MixUp/CutMix would mix each image mostly with images of its own class: "
                     f"{agreement:.0%} of the pairs of rows in a group ({g} consecutive rows, `group_size`) share their "
                     f"{'`label_column`' if column == config.label_column else 'class column'} {column!r}, against "
                     f"{chance:.0%} in a random order (the rows are stored sorted by label; the paper mixes random "
                     f"pairs); {fix}")


def check_output_dir(data_dir: str, config: ReinforceConfig, split: str, num_shards: int,
                     remove_tmp: Optional[Sequence[str]] = None) -> None:
    """Refuse to mix two different jobs' shards in one folder, or to write the card over a README.md that is not
    one; remove this process's half-written shards (``remove_tmp``; all of them when ``None``): they are redone."""
    folder = os.path.dirname(data_dir)
    try:
        card_config(folder)
    except NewerFormatError:
        raise
    except Exception:  # no `reinforcement:` block, or no YAML a card has
        raise ValueError(f"{folder} holds a README.md that is not a dr-hf card, which the job would write its card "
                         "over: choose a new or empty `output_dir`") from None
    if not os.path.isdir(data_dir):
        return
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
            raise ValueError(f"{path} is not readable as a reinforced shard ({exc}); use an empty `output_dir`") from exc
        parsed = parse_shard_name(name)
        if parsed is not None and parsed[0] != split:
            raise ValueError(f"{os.path.dirname(data_dir)} already holds the {parsed[0]!r} split ({name}): a reinforced "
                             f"folder holds one split (its card, stats and preview describe it); reinforce {split!r} "
                             "into another `output_dir`")
        same_layout = parsed is None or parsed[2] == num_shards
        differs = existing is not None and existing.identity() != config.identity()
        if existing is None or differs or not same_layout:
            raise ValueError(
                f"{os.path.dirname(data_dir)} already holds data of a different job "
                f"({name}{': ' + describe_differences(existing, config) if differs else ''}); "
                "rerun with the same settings to resume, or choose another `output_dir`"
            )


def gpu_advice(teachers: TeacherEnsemble) -> List[str]:
    """What a job with teachers on a GPU is told when it leaves speed on the table: strict float32 (the default
    precision, fp32) leaves the tensor cores idle, and an eager forward is launched op by op from Python; nothing
    elsewhere."""
    if teachers.device.type != "cuda":
        return []
    advice = []
    if teachers.precision == "fp32":
        advice.append(f"the teachers run in strict float32 on {teachers.device} (--precision fp32, the default): "
                      "--precision bf16 (precision='bf16') runs them on the GPU's tensor cores, as the README's GPU "
                      "figures do, and changes the top-1 class of up to about 2% of samples (results/bench_precision.md); "
                      "tf32 lies between")
    if teachers.compile_mode is None:
        advice.append("the teachers' forwards are launched op by op from Python beside the job's threads: --compile "
                      "reduce-overhead (compile_mode='reduce-overhead') replays each as one CUDA graph, 1.5-1.65x the "
                      "job's samples/s on an H100 (README, Speed); --compile trace needs no compiler")
    return advice


def default_prepare_threads(teachers: TeacherEnsemble) -> int:
    """Threads preparing rows ahead of the teacher when none are asked for. With teachers on a GPU: 4 (at most the
    usable cores but two, at least one), so that decoding and sampling overlap the GPU's forward instead of taking
    turns with it on the main thread (on the H100 host a row took 1.9-4.6 ms to decode, against 3.3 ms of teacher
    forward for its 64 samples). On the CPU: 0, since the teacher's own threads already use every core."""
    if teachers.device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores - 2))


def default_batch_size(num_samples: int) -> int:
    """Rows per map batch when not given: enough for 65,536 samples, from 256 rows (N >= 256, the paper's N=400
    among them) to 1024 (N <= 64). The render pipeline drains between map batches (the last forward's read-back, the
    next rows' preparation, the columns' conversion), so a GPU waits that long once a map batch: on the lent H100 map
    batches of 256 rows at N=64 ran at a median 0.94x the samples/s of 1024 over 3 interleaved rounds
    (results/bench_gpu_ab_defaults.md). The cap bounds the encoded images a map batch holds."""
    return min(1024, max(256, -(-65536 // num_samples)))


def default_teacher_batch_size(teachers: TeacherEnsemble) -> int:
    """Samples per teacher forward when not given: 256 on an accelerator; 64 on a CPU, where larger batches only add
    activation memory for the caches and the page tables to miss (EfficientNet-Lite0 + Lite1 on this project's 2-core
    CPU: 1.6x the samples/s of 256 in under a third of the memory, ``python scripts/bench_reinforce.py``)."""
    return 64 if teachers.device.type == "cpu" else 256


def default_render(teachers: TeacherEnsemble, render_device: Optional[str] = None,
                   render: Optional[str] = None) -> Tuple[str, str]:
    """(where, how) teacher inputs are rendered when not given: on the teachers' device, batched on a GPU (one call
    per teacher batch: measured 4.6x the host-rendered job on an H100, results/bench_gpu.md) and per sample on the
    CPU (torch's kernel, exactly as training replays); a given ``render`` mode picks the device (batched: the teachers',
    per sample: the CPU)."""
    if render_device is None:
        render_device = str(teachers.device) if render in (None, "batched") else "cpu"
    if render is None:
        render = "batched" if render_device.startswith("cuda") else "per-sample"
    return render_device, render
