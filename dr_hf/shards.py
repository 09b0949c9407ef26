"""The one shard layout of a reinforced folder, and the check that its card and shards tell the same story.

A reinforced folder is Hub layout::

    README.md                                  the card: a view of the shards, never a second truth
    data/{split}-{shard:05d}-of-{count:05d}.parquet   shard s holds source rows [s * R, (s + 1) * R), R = rows per shard
    errors/{split}-{shard:05d}-of-{count:05d}.jsonl   rows of shard s left out as bad input (--on-bad-row skip)
    preview.png

:func:`check_folder` reads every shard's footer and ``dr_index`` column and the card's ``reinforcement:`` block and
names each shard that disagrees (another configuration, rows outside its range, a missing or unreadable file).
``write_card``, ``dr-hf verify`` and ``dr-hf push`` all rely on it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .format import DR_INDEX, NewerFormatError, ReinforceConfig, card_columns, config_from_parquet, without_configuration

DATA_DIR = "data"
ERRORS_DIR = "errors"
CARD = "README.md"
PREVIEW = "preview.png"
_NAME = re.compile(r"^(?P<split>.+)-(?P<shard>\d{5})-of-(?P<count>\d{5})\.parquet$")


@contextlib.contextmanager
def written_whole(path: str) -> Iterator[str]:
    """A temporary path beside ``path`` to write the file to; once written, it is flushed to disk and renamed onto
    ``path``, so that a reader (``load_dataset``, a push, a resuming job) finds the old file or the new one, never a
    part of one. A failure leaves ``path`` as it was and no temporary file."""
    tmp = path + ".tmp"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_split_name(split: str) -> None:
    """Refuse a split that cannot name shards and the card's split (``datasets``' rule for split names): a slice
    such as ``train[:1000]`` is not one."""
    if not re.match(r"^\w+(\.\w+)*$", split):
        raise ValueError(f"`split` {split!r} is not a split name (a slice is not one): give the split, and `limit` M "
                         "for its first M rows")


def shard_name(split: str, shard: int, num_shards: int) -> str:
    return f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"


def first_shard_pattern(split: str) -> str:
    """The name pattern of a split's first shard, whatever the shard count."""
    return f"{split}-{0:05d}-of-*.parquet"


def parse_shard_name(name: str) -> Optional[Tuple[str, int, int]]:
    """(split, shard, number of shards) of a shard file name, or ``None`` for another name."""
    m = _NAME.match(os.path.basename(name))
    return (m.group("split"), int(m.group("shard")), int(m.group("count"))) if m else None


def data_files_pattern(split: str) -> str:
    """The card's ``data_files`` glob for a split (what ``load_dataset`` reads)."""
    return f"{DATA_DIR}/{split}-*.parquet"


def shard_paths(folder: str, split: str = "train") -> List[str]:
    return sorted(glob.glob(os.path.join(folder, DATA_DIR, f"{split}-*.parquet")))


def splits(folder: str) -> List[str]:
    """The splits a folder's shards hold."""
    names = map(parse_shard_name, glob.glob(os.path.join(folder, DATA_DIR, "*.parquet")))
    return sorted({parsed[0] for parsed in names if parsed})


def error_report_path(folder: str, shard_path: str) -> str:
    return os.path.join(folder, ERRORS_DIR, os.path.basename(shard_path).replace(".parquet", ".jsonl"))


def rows_per_shard(config: ReinforceConfig) -> int:
    """Rows per shard: the configured number, rounded up to whole MixUp/CutMix groups."""
    g = config.pipeline().group_size
    return max(g, int(math.ceil(config.rows_per_shard / g)) * g)


def shard_rows(shard: int, per_shard: int, num_rows: int) -> range:
    """The source rows shard ``shard`` covers."""
    return range(shard * per_shard, min(num_rows, (shard + 1) * per_shard))


def num_shards(config: ReinforceConfig, num_rows: int) -> int:
    return max(1, math.ceil(num_rows / rows_per_shard(config)))


def _skipped(folder: str, path: str) -> List[int]:
    report = error_report_path(folder, path)
    if not os.path.isfile(report):
        return []
    with open(report) as f:
        return [int(json.loads(line)[DR_INDEX]) for line in f if line.strip()]


def card_config(folder: str) -> Optional[ReinforceConfig]:
    """The configuration in the card's ``reinforcement:`` block (``None`` without a card)."""
    path = os.path.join(folder, CARD)
    if not os.path.isfile(path):
        return None
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(path).data.to_dict()
    if not card.get("reinforcement"):
        raise ValueError(without_configuration(f"{path} has no `reinforcement:` block", card_columns(card)))
    return ReinforceConfig.from_dict(card["reinforcement"])


def _settings(config: ReinforceConfig) -> Dict[str, object]:
    """A configuration's identity with nested settings under dotted names (``source.split``), so that a difference
    names the setting itself, not the whole block around it."""
    flat: Dict[str, object] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value

    walk("", config.identity())
    return flat


def _differences(a: ReinforceConfig, b: ReinforceConfig) -> List[str]:
    x, y = _settings(a), _settings(b)
    return sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))


def describe_differences(stored: ReinforceConfig, new: ReinforceConfig) -> str:
    """The settings in which two configurations differ, with both values: ``seed 0 there, 1 here; ...``."""
    x, y = _settings(stored), _settings(new)

    def short(value) -> str:
        text = json.dumps(value, sort_keys=True)
        return text if len(text) <= 60 else text[:57] + "..."

    return "; ".join(f"{k} {short(x.get(k))} there, {short(y.get(k))} here" for k in _differences(stored, new))


def check_shards(folder: str, split: str = "train", config: Optional[ReinforceConfig] = None,
                 num_rows: Optional[int] = None, card: Optional[ReinforceConfig] = None) -> List[str]:
    """Problems with a folder's shards, each naming the shard: unreadable files, configurations that differ from
    ``config`` (default: the first shard's) or from the ``card``'s, shards missing from the layout, rows outside a
    shard's range or missing from it (other than rows listed in its error report). Empty when the shards are one
    consistent job."""
    paths = shard_paths(folder, split)
    if not paths:
        return [f"no {split} shards in {os.path.join(folder, DATA_DIR)}"]
    configs, problems = _shard_configs(paths)
    if not configs:
        return problems
    reference = config or next(iter(configs.values()))
    for path, found in configs.items():
        diff = _differences(reference, found)
        if diff:
            problems.append(f"{os.path.basename(path)}: configuration differs ({', '.join(diff)}) from "
                            f"{'the job' if config else os.path.basename(next(iter(configs)))}: shards of two jobs are mixed")
        if card is not None and _differences(card, found):
            problems.append(f"{os.path.basename(path)}: its configuration differs from the card's "
                            f"({', '.join(_differences(card, found))}): the card does not describe this shard")
    if problems:
        return problems
    total = num_rows or reference.source.get("num_rows")
    per_shard = rows_per_shard(reference)
    parsed = {p: parse_shard_name(p) for p in paths}
    unnamed = [os.path.basename(p) for p, q in parsed.items() if q is None]
    if unnamed:
        return problems + [f"{unnamed[0]}: not a shard name ({split}-NNNNN-of-NNNNN.parquet)"]
    counts = {q[2] for q in parsed.values()}
    if len(counts) != 1:
        return problems + [f"shard file names disagree on the number of shards ({sorted(counts)})"]
    count = counts.pop()
    if total:
        expected = num_shards(reference, int(total))
        if count != expected:
            problems.append(f"the shards say {count} shard(s), the configuration's {total} rows make {expected}")
    present = {parsed[p][1]: p for p in paths}
    missing = [s for s in range(count) if s not in present]
    if missing:
        problems.append(f"{len(missing)} shard(s) missing, first {shard_name(split, missing[0], count)}")
    for s, path in sorted(present.items()):
        problems += _row_problems(folder, path, s, per_shard, int(total) if total else None)
    return problems


def _shard_configs(paths: Sequence[str]) -> Tuple[Dict[str, ReinforceConfig], List[str]]:
    """Each readable shard's dr-hf configuration, and the problems of those that have none."""
    import pyarrow.parquet as pq

    problems: List[str] = []
    configs: Dict[str, ReinforceConfig] = {}
    for path in paths:
        name = os.path.basename(path)
        try:
            found = config_from_parquet(path)
        except NewerFormatError:
            raise
        except Exception as exc:  # truncated, bit-flipped footer, not parquet at all
            problems.append(f"{name}: not a readable parquet shard ({type(exc).__name__}: {exc})")
            continue
        if found is None:
            problems.append(without_configuration(f"{name}: carries no dr-hf configuration", pq.read_schema(path).names))
            continue
        configs[path] = found
    return configs, problems


def _row_problems(folder: str, path: str, shard: int, per_shard: int, total: Optional[int]) -> List[str]:
    """Shard ``shard``'s rows against its range (of a job of ``total`` rows, where known): rows outside it, rows of
    it neither stored nor in its error report, rows stored twice."""
    import pyarrow.parquet as pq

    name = os.path.basename(path)
    try:
        index = pq.ParquetFile(path, page_checksum_verification=True).read(columns=[DR_INDEX]).column(0).to_numpy()
    except Exception as exc:
        return [f"{name}: column {DR_INDEX!r} is unreadable ({type(exc).__name__}: {exc})"]
    want = set(shard_rows(shard, per_shard, total)) if total else None
    have = [int(i) for i in index]
    outside = [i for i in have if want is not None and i not in want]
    if outside:
        return [f"{name}: rows {outside[:3]} lie outside its range [{shard * per_shard}, {shard * per_shard + len(want)})"]
    if want is not None and set(have) | set(skipped := _skipped(folder, path)) != want:
        lost = sorted(want - set(have) - set(skipped))
        return [f"{name}: {len(lost)} row(s) of its range neither stored nor listed as skipped, first {lost[0]}"
                if lost else f"{name}: duplicated rows"]
    if len(have) != len(set(have)):
        return [f"{name}: duplicated rows"]
    return []


def check_folder(folder: str, split: str = "train") -> List[str]:
    """:func:`check_shards`, with the card's ``reinforcement:`` block checked against every shard's metadata."""
    return check_shards(folder, split, card=card_config(folder))


class BadShardError(ValueError):
    """A shard file that cannot be read (truncated, bit-flipped); the message names the file."""


def checked_batches(path: str, batch_size: int = 1024, columns: Optional[Sequence[str]] = None):
    """Record batches of a shard, read with its page checksums verified; a damaged file raises
    :class:`BadShardError` naming it (pyarrow says what is wrong, never which file)."""
    import pyarrow.parquet as pq

    try:
        yield from pq.ParquetFile(path, page_checksum_verification=True).iter_batches(batch_size=batch_size,
                                                                                       columns=columns)
    except Exception as exc:
        raise BadShardError(f"{os.path.basename(path)}: unreadable ({type(exc).__name__}: {exc})") from exc


def read_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be read in full as parquet (page checksums verified), or ``None`` if it can."""
    try:
        for _ in checked_batches(path):
            pass
    except BadShardError as exc:
        return str(exc)
    return None


def data_files_of(dataset) -> List[str]:
    """The local data files behind a ``datasets.IterableDataset`` (its innermost iterable's ``files``)."""
    e = getattr(dataset, "_ex_iterable", None)
    while e is not None:
        files = (getattr(e, "kwargs", None) or {}).get("files")
        if files:
            return [f for f in dict.fromkeys(files) if isinstance(f, str) and os.path.isfile(f)]  # (once a file)
        e = getattr(e, "ex_iterable", None)
    return []


def name_bad_files(paths: Sequence[str], cause: BaseException) -> BadShardError:
    """The error to raise after reading ``paths`` failed with ``cause``: it names every unreadable file."""
    bad = [problem for problem in map(read_problem, paths) if problem]
    where = "; ".join(bad) if bad else f"{type(cause).__name__}: {cause} (no single file is unreadable on its own)"
    return BadShardError(f"reading the reinforced data failed: {where}; re-download or re-create those shards "
                         "(`dr-hf reinforce` redoes a deleted shard)")


def raise_if(problems: Sequence[str], what: str) -> None:
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
