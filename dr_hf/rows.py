"""Replay rows: a reinforced map-style dataset read as Arrow, converting only the samples a collator replays.

At the paper's N=400 a row stores about 10,000 values (N crop boxes, flips, RandAugment ops, top-K ids and
log-probabilities); ``datasets`` would turn every one into a Python object (2.8 ms a row map-style, 2.5 streamed, on
the machine of ``results/bench_rows.md``; ``scripts/bench_rows.py``), where a replay needs one sample of each column. :class:`ReplayRows` hands the collators rows whose
reinforcement columns are :class:`Samples`: ``len()`` is N and ``[s]`` converts sample ``s`` alone; a stream is read
as one-row Arrow tables (``IterableDataset.with_format("arrow")``), which the collators turn into rows with
:func:`rows_of`; a MixUp/CutMix stream as one Arrow table per group (``.with_format("arrow").batch(g)``: one row of
lists), which :func:`ungroup` turns back into the group's rows.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import torch

from .augment import misplaced_row, whole_groups_advice
from .format import DR_INDEX, DR_PARAMS, DR_TOPK_INDICES, DR_TOPK_LOGPROBS


class Samples(Sequence):
    """The N stored samples of one row's list column, converted to Python one at a time."""

    def __init__(self, scalar: pa.Scalar):
        self._values = scalar.values if scalar.is_valid else None

    def __len__(self) -> int:
        return 0 if self._values is None else len(self._values)

    def __getitem__(self, s):
        if isinstance(s, slice):
            return [self[i] for i in range(*s.indices(len(self)))]
        if not -len(self) <= s < len(self):
            raise IndexError(f"sample {s} of {len(self)}")
        return self._values[s].as_py()


def as_rows(dataset):
    """``dataset``, a map-style one read as rows of Python values: a format of ``datasets``' (numpy, torch, arrow,
    pandas, a transform) is set aside, as the collators and the reinforce job decode and render each row themselves
    (an Arrow-formatted set stopped inside ``datasets``' ``__getitems__``)."""
    import datasets

    if isinstance(dataset, datasets.Dataset) and dataset.format.get("type") is not None:
        return dataset.with_format(None)
    return dataset


def is_group(table: pa.Table) -> bool:
    """Whether an Arrow table is a group of rows that ``IterableDataset.batch`` made one row of lists."""
    return table.num_rows == 1 and DR_INDEX in table.column_names and pa.types.is_list(table.schema.field(DR_INDEX).type)


def ungroup(table: pa.Table) -> pa.Table:
    """A one-row table of lists (a group of rows from ``.with_format("arrow").batch(g)``) -> the group's rows."""
    return pa.table({name: pc.list_flatten(table.column(name)) for name in table.column_names})


def rows_of(table: pa.Table) -> List[Dict[str, Any]]:
    """The rows of an Arrow table (or of a group, :func:`is_group`) as dicts: reinforcement columns lazy
    (:class:`Samples`), the others as Python."""
    if is_group(table):
        table = ungroup(table)
    out: List[Dict[str, Any]] = [{} for _ in range(table.num_rows)]
    for name in table.column_names:
        column = table.column(name)
        fields = [field.name for field in column.type] if name == DR_PARAMS else []
        for r in range(table.num_rows):
            value = column[r]
            if name == DR_PARAMS:
                out[r][name] = {f: Samples(value[f]) for f in fields} if value.is_valid else {}
            elif name in (DR_TOPK_INDICES, DR_TOPK_LOGPROBS):
                out[r][name] = Samples(value)
            else:
                out[r][name] = value.as_py()
    return out


def check_whole_groups(dataset, group_size: int, what: str = "train_dataset") -> None:
    """Refuse a map-style MixUp/CutMix ``dataset`` whose rows are not whole mixing groups in stored order (shuffled,
    filtered or selected out of them), naming the first row out of place; its last, partial group must hold every
    partner its rows mix with. Reads ``dr_index`` and, for that last group, its partners' offsets."""
    arrow = dataset.with_format("arrow")
    indices = arrow[DR_INDEX].to_numpy()
    r = misplaced_row(indices, group_size)
    if r >= 0:
        raise ValueError(f"{what}'s row {r} (dr_index {indices[r]}) is out of its MixUp/CutMix group (the rows were "
                         f"reordered or some dropped: shuffle, filter, select); {whole_groups_advice(group_size)}")
    tail = len(indices) % group_size
    if not tail or "mix_partner" not in arrow.features[DR_PARAMS]:
        return
    partners = arrow[len(indices) - tail:].column(DR_PARAMS).combine_chunks().field("mix_partner").to_pylist()
    for r, offsets in enumerate(partners):
        for j, offset in enumerate(offsets or []):
            if not 0 <= r + offset < tail:
                row = len(indices) - tail + r
                raise ValueError(f"{what}'s last {tail} rows are part of a MixUp/CutMix group whose other rows are "
                                 f"missing (row {row}, dr_index {indices[row]}, sample {j}, mixes with dr_index "
                                 f"{indices[row] + offset}); {whole_groups_advice(group_size)}")


def combined_advice() -> str:
    """Why a row lacks ``dr_params`` fields that the dataset's other rows hold (the end of the errors that find it)."""
    return ("rows of reinforcements with other transforms were combined (concatenate_datasets and "
            "interleave_datasets give a row nulls for the fields its own reinforcement did not record), which one "
            "replay cannot serve; train on one reinforcement's rows")


def check_params_recorded(dataset, what: str = "train_dataset") -> None:
    """Refuse a map-style reinforced ``dataset`` one of whose rows lacks a ``dr_params`` field that others hold,
    naming the first such row, before training (the replay stopped at its first draw: "sample 1 of 0"). Counts the
    fields' nulls in the Arrow data, and reads rows only where there are some."""
    column = dataset.data.column(DR_PARAMS)
    fields = [f.name for f in column.type]
    if not any(pc.struct_field(column, name).null_count for name in fields):
        return
    arrow = dataset.with_format("arrow").select_columns([DR_INDEX, DR_PARAMS])  # (the rows selected, in order)
    for start in range(0, len(dataset), 4096):
        part = arrow[start:start + 4096]
        for name in fields:
            empty = pc.is_null(pc.struct_field(part.column(DR_PARAMS), name)).to_numpy(zero_copy_only=False)
            if empty.any():
                r = int(empty.argmax())
                raise ValueError(f"{what}'s row {start + r} (dr_index {part.column(DR_INDEX)[r].as_py()}), column "
                                 f"{DR_PARAMS!r}: no field {name!r}, which other rows hold: {combined_advice()}")


class ReplayRows(torch.utils.data.Dataset):
    """A map-style view of a reinforced ``datasets.Dataset`` for the reinforced collator: item ``g`` is the list of
    rows of group ``g`` (``group_size`` consecutive rows: one row, or a whole MixUp/CutMix group, which must be in
    place: :func:`check_whole_groups`), read as Arrow with lazy reinforcement columns; ``__getitems__`` reads a whole
    batch in one take."""

    def __init__(self, dataset, group_size: int = 1):
        check_params_recorded(dataset)
        if group_size > 1:
            check_whole_groups(dataset, group_size)
        self.dataset, self.group_size = dataset, group_size
        self._arrow = dataset.with_format("arrow")

    def __len__(self) -> int:
        return (len(self.dataset) + self.group_size - 1) // self.group_size

    def _rows(self, g: int) -> range:
        if not 0 <= g < len(self):
            raise IndexError(f"group {g} of {len(self)}")
        return range(g * self.group_size, min((g + 1) * self.group_size, len(self.dataset)))

    def __getitem__(self, g: int) -> List[Dict[str, Any]]:
        return self.__getitems__([g])[0]

    def __getitems__(self, groups: Sequence[int]) -> List[List[Dict[str, Any]]]:
        spans = [self._rows(int(g)) for g in groups]
        rows = rows_of(self._arrow[[i for span in spans for i in span]])
        out, start = [], 0
        for span in spans:
            out.append(rows[start:start + len(span)])
            start += len(span)
        return out
