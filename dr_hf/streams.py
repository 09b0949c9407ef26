"""Reading a streamed source (``load_dataset(..., streaming=True)``): its length, its rows from any position, and
retries when a read fails.

A stream of parquet files (what the Hub serves, and what ``datasets`` streams from a local folder of them) is sought,
not skipped: each file's footer holds its row count, so the rows from position ``p`` start at the file that holds
``p``, and no file before it is downloaded. ``IterableDataset.skip(p)`` reads and drops all ``p`` rows: in a job of W
processes, process k would download k/W of the source before its first row (31/32 of it on four 8-GPU nodes). Other
streams (other formats; shuffled, filtered, taken or node-split streams) are skipped as ``datasets`` skips them.
"""

from __future__ import annotations

import bisect
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, List, Optional, Tuple

logger = logging.getLogger(__name__)


class StreamError(RuntimeError):
    """Reading a streamed source failed, and kept failing after retries; the message names the row."""


def source_row_counts(stream) -> Optional[List[int]]:
    """The rows of each of ``stream``'s data sources (its ``num_shards`` parquet files), in stream order, read from
    the files' footers; ``None`` for a stream that is not a plain parquet stream (another format; shuffled, filtered,
    taken, mapped or split by node; row filters) or whose footers cannot be read."""
    from datasets.iterable_dataset import ArrowExamplesIterable
    from datasets.packaged_modules.parquet.parquet import Parquet

    ex = getattr(stream, "_ex_iterable", None)
    if type(ex) is not ArrowExamplesIterable or getattr(stream, "_distributed", None) is not None \
            or getattr(stream, "_starting_state_dict", None) is not None:  # (shuffled, taken, ...: other iterables)
        return None
    builder = getattr(ex.generate_tables_fn, "__self__", None)
    config = getattr(builder, "config", None)
    if not isinstance(builder, Parquet) or getattr(config, "filters", None) is not None \
            or getattr(config, "on_bad_files", "error") != "error" or set(ex.kwargs) != {"files", "row_groups_list"}:
        return None
    files, groups = ex.kwargs["files"], ex.kwargs["row_groups_list"]
    if not isinstance(files, list) or len(files) != stream.num_shards or len(groups) != len(files):
        return None
    try:
        counts = list(_footer_rows(tuple(files), tuple(None if g is None else tuple(g) for g in groups)))
    except Exception as exc:  # a file system without credentials here, a file that is not parquet: read it all
        logger.warning("could not read the row counts of the stream's parquet files (%s: %s); positions in it are "
                       "reached by reading the rows before them", type(exc).__name__, exc)
        return None
    splits = getattr(stream.info, "splits", None) or {}
    recorded = splits[stream.split].num_examples if stream.split in splits else None
    if recorded and recorded != sum(counts):
        logger.warning("the stream's parquet footers hold %d rows, its metadata says %d; positions in it are reached "
                       "by reading the rows before them", sum(counts), recorded)
        return None
    return counts


def _footer_rows(files: Tuple[str, ...], groups: Tuple[Optional[Tuple[int, ...]], ...]) -> Tuple[int, ...]:
    """Rows of each (file, row groups) from the file's footer: a ranged read at its end (``hf://`` files through
    ``huggingface_hub``'s file system), many files at once; read again at each call (a local file may have been
    rewritten since)."""
    import fsspec
    import pyarrow.parquet as pq

    def rows(file: str, row_groups: Optional[Tuple[int, ...]]) -> int:
        with fsspec.open(file, "rb", block_size=1 << 16) as f:
            meta = pq.ParquetFile(f).metadata
        if row_groups is None:
            return meta.num_rows
        return sum(meta.row_group(i).num_rows for i in row_groups)

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(files)))) as pool:
        return tuple(pool.map(rows, files, groups))


def seek(stream, start: int):
    """``stream`` from row ``start``: ``stream.skip(start)``, but where :func:`source_row_counts` knows each file's
    rows, it reads nothing of the files before the one that holds row ``start`` (and of that one, its rows up to it)."""
    if start <= 0:
        return stream
    counts = source_row_counts(stream)
    if counts is None:
        logger.info("reaching row %d of the stream by reading the rows before it (not a plain parquet stream)", start)
        return stream.skip(start)
    import datasets

    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    if start >= starts[-1]:
        return stream.take(0)
    first = bisect.bisect_right(starts, start) - 1  # the file holding row `start`
    n = len(counts)
    logger.info("row %d of the stream sought from the parquet footers: file %d of %d, its row %d", start, first + 1, n,
                start - starts[first])
    parts = [stream.shard(num_shards=n, index=i, contiguous=True) for i in range(first, n)]
    rest = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    offset = start - starts[first]
    return rest.skip(offset) if offset else rest


def stream_tables(stream, start: int, rows_per_table: int, retries: int = 3,
                  backoff: float = 1.0) -> Iterator[Any]:
    """The rows of ``stream`` from position ``start`` (:func:`seek`) as Arrow tables of ``rows_per_table`` rows (the
    last may be shorter), read as Arrow throughout: no row becomes Python objects. On a read error the stream is
    reopened at the first row of the table being read, up to ``retries`` times in a row, before :class:`StreamError`."""
    pos, failures = start, 0
    while True:
        it = iter(seek(stream, pos).with_format("arrow").iter(batch_size=rows_per_table))
        try:
            for table in it:
                yield table
                pos += len(table)
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
    """A stream's row count: from its metadata, else its parquet files' footers (:func:`source_row_counts`), else by
    reading one column of it once."""
    from datasets import Image

    info = getattr(stream, "info", None)
    splits = getattr(info, "splits", None) or {}
    if split in splits and splits[split].num_examples:
        return int(splits[split].num_examples)
    counts = source_row_counts(stream)
    if counts is not None:
        return sum(counts)
    logger.info("counting the rows of the stream (pass --num-rows to skip this pass)")
    stream = stream.select_columns([column])
    if stream.features is not None and isinstance(stream.features.get(column), Image):
        stream = stream.cast_column(column, Image(decode=False))
    return sum(1 for _ in stream)
