"""Sources and joins: load a source dataset; load a reinforced one; join a reinforcement-only dataset
(``dr-hf reinforce --no-images``) back to the user's own copy of its source, checking every row's fingerprint."""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional

from .errors import require_at_least, said
from .format import (DR_FINGERPRINT, DR_INDEX, ReinforceConfig, card_columns, config_from_parquet, require_reinforced,
                     without_configuration)
from .images import fingerprint


class FingerprintMismatch(ValueError):
    """A source row differs from the one that was reinforced."""


def check_revision(path: str, revision: Optional[str]) -> None:
    """Refuse a Hub ``revision`` for a local folder: it would be read as it is, while the revision is recorded."""
    if revision and os.path.exists(path):
        raise ValueError(f"`revision` {revision!r} names a Hub revision (branch, tag or commit), but {path} is a local "
                         "folder, read as it is")


def load_source(path: str, split: str, name: Optional[str] = None, revision: Optional[str] = None,
                limit: Optional[int] = None, streaming: bool = False, shuffle_seed: Optional[int] = None):
    """Anything ``datasets.load_dataset`` accepts (Hub id, local folder, a plain image folder), optionally in the
    random order ``dataset.shuffle(seed=shuffle_seed)`` (read whole, not streamed), then its first ``limit`` rows."""
    import datasets

    require_at_least(1, limit=limit)
    require_at_least(0, shuffle_seed=shuffle_seed)
    if shuffle_seed is not None and streaming:
        raise ValueError("`shuffle_seed` needs a source read whole: a stream is shuffled only within a buffer, so rows "
                         "stored sorted would stay nearly sorted")
    check_revision(path, revision)
    kwargs: Dict[str, Any] = {"split": split, "streaming": streaming}
    if revision:
        kwargs["revision"] = revision
    if not os.path.exists(path):
        check_hub_dataset(path, revision)
    try:  # (datasets picks the builder from the files: parquet, an image folder, ...)
        if os.path.isfile(os.path.join(path, datasets.config.DATASET_STATE_JSON_FILENAME)):
            ds = saved_split(path, split, streaming)  # which load_dataset refuses ("use load_from_disk")
        else:
            ds = datasets.load_dataset(path, name, **kwargs)
    except ValueError as exc:
        if str(exc).startswith("Unknown split"):  # datasets' message, which names no option
            raise ValueError(f"`split` {split!r} of {path}: {exc}") from exc
        raise
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed, keep_in_memory=True)  # (8 bytes a row; no file in a shared cache)
    if limit is not None:
        ds = ds.take(limit) if streaming else ds.select(range(min(limit, len(ds))))
    return ds


def check_outside_source(output_dir: str, source: str) -> None:
    """Refuse an ``output_dir`` inside the local folder ``source`` was loaded from: ``load_dataset(source)`` reads
    every data file under it, so the rerun that resumes the job would take its shards for source rows."""
    if not os.path.isdir(source):
        return
    inside, folder = os.path.realpath(output_dir), os.path.realpath(source)
    if os.path.commonpath([inside, folder]) == folder:
        raise ValueError(f"`output_dir` {output_dir} is inside the source folder {source}, whose data files "
                         "load_dataset reads, shards and all: a rerun (resuming the job) would take the reinforced "
                         "shards for source rows; write the output outside it")


def saved_split(path: str, split: str, streaming: bool = False):
    """The one split a ``Dataset.save_to_disk`` folder holds (``datasets.load_from_disk``), streamed as
    ``to_iterable_dataset()`` with ``streaming``; another ``split`` is refused, naming the one it holds."""
    import datasets

    ds = datasets.load_from_disk(path)
    held = str(ds.split) if ds.split is not None else None
    if held is not None and split != held:
        raise ValueError(f"`split` {split!r} of {path}: the folder holds one split, {held!r} (Dataset.save_to_disk)")
    return ds.to_iterable_dataset() if streaming else ds


def needs_source(path: str, config: ReinforceConfig, columns, source: Optional[str]) -> bool:
    """Whether ``path``, whose shards hold ``columns``, is reinforcement-only (its images come from a source); a
    ``source`` given for one that holds its images is refused: it would go unused while the caller believes the rows
    were checked against it."""
    if config.image_column not in columns:
        return True
    if source is not None:
        raise ValueError(f"{path} holds its images ({config.image_column!r}); `source` is for a reinforcement-only "
                         "dataset (written with --no-images): leave it out")
    return False


def base_of(folder: str, config: ReinforceConfig, source: Optional[str], split: str = "train",
            revision: Optional[str] = None, streaming: bool = False):
    """The base dataset that a reinforcement-only ``folder`` (written with ``--no-images``) replays its images from:
    ``source`` loaded at the recorded split and config name, in the recorded order (``shuffle_seed``: read whole,
    not streamed); join rows to it with :func:`join_source`."""
    if source is None:
        raise ValueError(f"{folder} holds no images (a reinforcement-only dataset): pass the base dataset as "
                         "`source`")
    shuffle_seed = config.source.get("shuffle_seed")
    if shuffle_seed is not None and streaming:
        raise ValueError(f"{folder} holds its source's rows shuffled (seed {shuffle_seed}), which only a source read "
                         "whole reproduces: load it with streaming=False to join it")
    return load_source(source, config.source.get("split") or split, config.source.get("name"), revision,
                       streaming=streaming, shuffle_seed=shuffle_seed)


def check_hub_dataset(path: str, revision: Optional[str] = None) -> None:
    """Fail at once, naming both readings, when ``path`` is neither a local folder nor a Hub dataset one can reach
    (instead of ``datasets`` retrying the Hub for half a minute). Offline (``HF_HUB_OFFLINE``), ``datasets`` reads
    its cache, as a cluster's compute nodes without a network do, and says itself when the dataset is not there."""
    import datasets
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    where = os.path.abspath(os.path.expanduser(path))
    looks_local = path.startswith((".", "/", "~")) or path.endswith("/") or path.count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"no local folder {path!r} ({where} does not exist)")
    if constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
        return
    try:
        HfApi().dataset_info(path, revision=revision, timeout=10)
    except Exception as exc:  # not found, private, or no network: say which, once
        answered = isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError))
        hint = "" if answered else "; if it is in your local cache, set HF_HUB_OFFLINE=1 to read it from there"
        raise FileNotFoundError(f"{path!r}: no local folder of that name ({where}), and the Hub has no dataset of that "
                                f"name that can be reached ({said(exc, 300)}){hint}"
                                ) from None


def local_folder(path: str, revision: Optional[str] = None, first_shard_of: Optional[str] = None) -> str:
    """A reinforced dataset's local folder: ``path`` itself, or a Hub dataset's card, shards and error reports
    downloaded to the Hugging Face cache at ``revision`` (as ``huggingface_hub.snapshot_download`` does);
    ``first_shard_of``: a split whose first shard alone is downloaded with the card (what a preview reads)."""
    if os.path.isdir(path):
        check_revision(path, revision)
        return path
    from huggingface_hub import snapshot_download

    from .shards import CARD, DATA_DIR, ERRORS_DIR, first_shard_pattern

    check_hub_dataset(path, revision)  # neither a folder nor a reachable Hub dataset: said at once
    patterns = ([CARD, f"{DATA_DIR}/*", f"{ERRORS_DIR}/*"] if first_shard_of is None else
                [CARD, f"{DATA_DIR}/{first_shard_pattern(first_shard_of)}"])
    return snapshot_download(path, repo_type="dataset", revision=revision, allow_patterns=patterns)


def reinforcement_config(path: str, split: str = "train", revision: Optional[str] = None) -> ReinforceConfig:
    """The configuration of a reinforced dataset: a local folder's parquet metadata, or a Hub repo's card."""
    import pyarrow.parquet as pq

    from .shards import shard_paths

    if os.path.isdir(path):
        shards = shard_paths(path, split)
        if not shards:
            raise FileNotFoundError(f"no {split} shards in {path}/data")
        config = config_from_parquet(shards[0])
        if config is None:
            raise ValueError(without_configuration(f"{shards[0]} carries no dr-hf configuration",
                                                   pq.read_schema(shards[0]).names))
        return config
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(path, repo_type="dataset", revision=revision) if revision else DatasetCard.load(path, repo_type="dataset")
    data = card.data.to_dict()
    if not data.get("reinforcement"):
        raise ValueError(without_configuration(f"the card of {path} has no `reinforcement:` block", card_columns(data)))
    return ReinforceConfig.from_dict(data["reinforcement"])


def _mismatch(position: int, index: int, have: str, want: str) -> FingerprintMismatch:
    return FingerprintMismatch(
        f"row {position} (dr_index {index}), column {DR_FINGERPRINT!r}: the source image's fingerprint {have} differs "
        f"from the reinforced one {want}; your copy of the source is not the one that was reinforced, or not in its "
        "order (a source reinforced shuffled, with its config's source['shuffle_seed'], joins shuffled alike)"
    )


def join_source(reinforced, source, image_column: str = "image", batch_size: int = 1000):
    """Put the source's columns next to a reinforcement-only dataset's ``dr_*`` columns, row by ``dr_index``
    (``source`` in the order it was reinforced in: shuffled alike, where its config records a ``shuffle_seed``).

    Map-style (``Dataset`` + ``Dataset``): every row's fingerprint is checked up front (one read of the image
    bytes). Streaming (``IterableDataset`` + ``IterableDataset``, same order): each row is checked as it is read.
    A row whose image differs from the reinforced one raises :class:`FingerprintMismatch` naming it.
    """
    import datasets

    require_reinforced(reinforced.column_names or [], "the reinforced dataset")
    if DR_FINGERPRINT not in (reinforced.column_names or []):
        raise ValueError(f"the reinforced dataset has no {DR_FINGERPRINT!r} column to check the join against")
    if image_column not in (source.column_names or []):
        raise ValueError(f"the source has no image column {image_column!r} (columns: {source.column_names})")
    clash = [c for c in source.column_names if c in reinforced.column_names]
    if clash:
        raise ValueError(f"the source and the reinforced dataset both have column(s) {clash}")
    if isinstance(reinforced, datasets.IterableDataset) != isinstance(source, datasets.IterableDataset):
        raise ValueError("join a streamed reinforced dataset with a streamed source, and a map-style one with a map-style source")
    if isinstance(reinforced, datasets.IterableDataset):
        return _join_streams(reinforced, source, image_column)

    indices = reinforced[DR_INDEX]
    if indices and (min(indices) < 0 or max(indices) >= len(source)):
        bad = next(i for i, k in enumerate(indices) if k < 0 or k >= len(source))
        raise ValueError(f"row {bad}, column {DR_INDEX!r}: index {indices[bad]} is outside the source's {len(source)} rows")
    base = source.select(indices)
    raw = base.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    stored = reinforced[DR_FINGERPRINT]
    pos = 0
    for batch in raw.iter(batch_size=batch_size):
        for cell in batch[image_column]:
            have = fingerprint(cell, row=indices[pos], column=image_column)
            if have != stored[pos]:
                raise _mismatch(pos, indices[pos], have, stored[pos])
            pos += 1
    return datasets.concatenate_datasets([base.flatten_indices(), reinforced], axis=1)


def _join_streams(reinforced, source, image_column: str):
    import datasets

    raw_source = source.cast_column(image_column, datasets.Image(decode=False)) \
        if isinstance(source.features.get(image_column), datasets.Image) else source
    features = datasets.Features({**source.features, **reinforced.features})

    def rows() -> Iterator[Dict[str, Any]]:
        src = iter(raw_source)
        at = -1
        row: Dict[str, Any] = {}
        for position, r in enumerate(reinforced):
            index = r[DR_INDEX]
            if index <= at:
                raise ValueError(f"row {position}, column {DR_INDEX!r}: index {index} is out of order (a stream joins in source order)")
            while at < index:
                row = next(src, None)
                if row is None:
                    raise ValueError(f"row {position}, column {DR_INDEX!r}: index {index} is beyond the end of the source stream")
                at += 1
            have = fingerprint(row[image_column], row=index, column=image_column)
            if have != r[DR_FINGERPRINT]:
                raise _mismatch(position, index, have, r[DR_FINGERPRINT])
            yield {**row, **r}

    return datasets.IterableDataset.from_generator(rows, features=features)


def load_reinforced(path: str, split: str = "train", source: Optional[str] = None, streaming: bool = False,
                    revision: Optional[str] = None, **kwargs):
    """``load_dataset`` for a reinforced dataset (Hub id or folder); a reinforcement-only one is joined to its source
    (``source``: your copy of the base dataset; default: the one it was made from), every row checked."""
    import datasets

    from .shards import check_shards, name_bad_files, raise_if, shard_paths

    local = os.path.isdir(path)
    if local:  # footers, configurations and row ranges of every shard: a damaged or foreign file is named up front
        raise_if(check_shards(path, split), f"cannot load {path}")
    try:
        ds = datasets.load_dataset(path, split=split, streaming=streaming, revision=revision, **kwargs)
    except Exception as exc:
        if not local:
            raise
        raise name_bad_files(shard_paths(path, split), exc) from exc
    config = reinforcement_config(path, split=split, revision=revision)
    if not needs_source(path, config, ds.column_names or [], source):
        return ds
    src = source or (None if config.source.get("local") else config.source.get("path"))
    if not src:
        raise ValueError(f"{path} is reinforcement-only and was made from a local copy of "
                         f"{config.source.get('path') or 'its source'}: pass source= (your copy of it)")
    base = base_of(path, config, src, split, config.source.get("revision") if source is None else None, streaming)
    return join_source(ds, base, image_column=config.image_column)
