"""``dr-hf verify``: check a reinforced dataset's schema and values, and replay rows through the teacher."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from .errors import require_at_least
from .format import (
    DR_COLUMNS,
    DR_INDEX,
    DR_PARAMS,
    DR_TOPK_INDICES,
    DR_TOPK_LOGPROBS,
    ReinforceConfig,
    require_reinforced,
)


def load_config(path: str, split: str = "train") -> ReinforceConfig:
    """The reinforcement config of a local folder (parquet metadata) or a Hub repo (card YAML)."""
    from .source import reinforcement_config

    return reinforcement_config(path, split)


def _nested(column: pa.ChunkedArray, depth: int) -> np.ndarray:
    arr = column.combine_chunks()
    for _ in range(depth):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False)


def check_columns(table: pa.Table, config: ReinforceConfig) -> List[str]:
    """Problems with the reinforcement columns of ``table`` (empty when fine), each naming row and column."""
    problems: List[str] = []
    n, k, c = config.num_samples, config.topk, config.num_classes
    rows = table.num_rows
    idx = _nested(table.column(DR_TOPK_INDICES), 2)
    lp = _nested(table.column(DR_TOPK_LOGPROBS), 2).astype(np.float32)
    if idx.size != rows * n * k or lp.size != rows * n * k:
        return [f"{DR_TOPK_INDICES}/{DR_TOPK_LOGPROBS}: expected {rows} x {n} x {k} entries, found {idx.size}/{lp.size}"]
    idx, lp = idx.reshape(rows, n, k), lp.reshape(rows, n, k)
    dr_index = table.column(DR_INDEX).to_numpy()

    def report(mask: np.ndarray, column: str, what: str):
        bad = np.flatnonzero(mask.reshape(rows, -1).any(axis=1))
        if bad.size:
            problems.append(f"{column}: {what} in {bad.size} row(s), first at row {int(dr_index[bad[0]])}")

    report(idx >= c, DR_TOPK_INDICES, f"class id >= {c}")
    report(~np.isfinite(lp), DR_TOPK_LOGPROBS, "NaN/inf")
    report(lp > 1e-3, DR_TOPK_LOGPROBS, "log-probability > 0")
    report(np.diff(lp, axis=-1) > 0, DR_TOPK_LOGPROBS, "not sorted descending")
    report(np.exp(lp).sum(-1) > 1.0 + 1e-2, DR_TOPK_LOGPROBS, "probabilities summing to more than 1")
    fields = config.pipeline().param_fields()
    params = table.column(DR_PARAMS).combine_chunks()
    present = {params.type.field(i).name for i in range(params.type.num_fields)}
    if present != set(fields):
        problems.append(f"{DR_PARAMS}: fields {sorted(present)} differ from the config's {sorted(fields)}")
    return problems


@dataclass
class VerifyReport:
    rows: int
    problems: List[str] = field(default_factory=list)
    replayed_rows: int = 0
    max_abs_diff: Optional[float] = None
    params_mismatches: int = 0
    params_redrawn: bool = True  # False for data drawn by dr-hf 0.1's per-sample sampler (format < 3), not re-checked
    topk_index_mismatches: int = 0
    agreement: Optional[float] = None
    num_classes: int = 0  # the teachers' classes (what the agreement compares with chance)

    @property
    def ok(self) -> bool:
        return not self.problems


def _rows(paths: Sequence[str], wanted: Sequence[int]):
    """The full rows (all columns) whose ``dr_index`` is in ``wanted``, as a ``datasets.Dataset`` in that order."""
    import datasets
    import pyarrow.parquet as pq

    wanted_set = set(wanted)
    parts = []
    for path in paths:
        idx = pq.read_table(path, columns=[DR_INDEX]).column(0).to_numpy()
        hits = [r for r, i in enumerate(idx) if int(i) in wanted_set]
        if hits:
            parts.append(pq.read_table(path).take(hits))
    table = pa.concat_tables(parts)
    order = {int(i): r for r, i in enumerate(table.column(DR_INDEX).to_numpy())}
    return datasets.Dataset(table.take([order[i] for i in wanted]))


def _check_values(paths: Sequence[str], config, report: VerifyReport) -> Dict[int, int]:
    """Every stored value of the shards ``paths`` checked (:func:`check_columns`), one batch at a time, problems and
    rows counted into ``report``; returns how often each ``dr_index`` was seen."""
    from .shards import BadShardError, checked_batches

    seen: Dict[int, int] = {}
    for shard in paths:
        try:  # every page of every column, checksums verified: a damaged file is named, not a traceback
            for batch in checked_batches(shard):
                table = pa.Table.from_batches([batch]).select(list(DR_COLUMNS))
                report.rows += table.num_rows
                report.problems += check_columns(table, config)
                for i in table.column(DR_INDEX).to_numpy():
                    seen[int(i)] = seen.get(int(i), 0) + 1
        except BadShardError as exc:
            report.problems.append(str(exc))
    return seen


def _compare_row(report: VerifyReport, index: int, params: Dict[str, np.ndarray], logprobs, row: Dict[str, Any],
                 job, atol: float, rtol: float) -> float:
    """Row ``index`` replayed: its recomputed ``logprobs`` (N, classes) against its stored top-K, and (format 3 on)
    its parameters drawn afresh against the stored ``params``; counted into ``report``. Returns the largest difference
    of a stored log-probability."""
    import torch

    from .images import decode

    config = job.config
    report.replayed_rows += 1
    if report.params_redrawn:
        image = decode(row[config.image_column], row=index, column=config.image_column)
        fresh = job.preparer.sample(index, image.shape[-2], image.shape[-1])
        report.params_mismatches += int(np.logical_or.reduce(
            [(fresh[name] != v).reshape(config.num_samples, -1).any(axis=1) for name, v in params.items()]).sum())
    s_idx = torch.tensor(np.asarray(row[DR_TOPK_INDICES], dtype=np.int64))
    s_lp = torch.tensor(np.asarray(row[DR_TOPK_LOGPROBS], dtype=np.float32))
    diff = (torch.gather(logprobs, 1, s_idx) - s_lp).abs()
    report.topk_index_mismatches += int((torch.topk(logprobs, config.topk, dim=-1).indices != s_idx).any(dim=-1).sum())
    bad = (diff > atol + rtol * s_lp.abs()).any(dim=-1)
    if bad.any():
        j = int(bad.nonzero()[0])
        report.problems.append(f"row {index}, sample {j}: recomputed log-probs differ by up to {float(diff[j].max()):.4g}")
    return float(diff.max())


def verify(path: str, teachers: Optional[Sequence[str]] = None, rows: int = 8, split: str = "train", seed: int = 0,
           atol: float = 1e-3, rtol: float = 2e-3, device: Optional[str] = None,
           source: Optional[str] = None, revision: Optional[str] = None) -> VerifyReport:
    """Check the schema and values of a reinforced folder (or Hub dataset, at ``revision``: its card and shards are
    downloaded to the Hugging Face cache first, as ``huggingface_hub.snapshot_download`` does), then replay ``rows``
    random rows: render their stored parameters, re-run the teachers recorded in the data at the recorded precision
    and compare with the stored outputs, and draw the parameters afresh and compare with the stored ones (format 3 on:
    older data was drawn by another sampler, so only its outputs are checked); ``rows=0`` checks only the schema and
    values.

    ``teachers`` (optional) must name the recorded teachers (e.g. local copies of their weights can be given by the
    same specs); a list that differs is refused, naming the recorded ones. A reinforcement-only folder (no images)
    replays its rows joined to ``source``, its base dataset (by ``dr_index``, fingerprints checked). The tolerance
    (``atol + rtol * |x|``) covers one float16 step of the stored log-probabilities, which is what differs between
    intra-op thread counts.
    The parquet files are read directly (never through ``datasets``' Arrow cache), one batch at a time.
    """
    import datasets
    import pyarrow.parquet as pq

    from .job import default_render
    from .reinforcer import Reinforcer
    from .shards import check_folder, shard_paths
    from .source import base_of, join_source, local_folder, needs_source
    from .stats import summarize
    from .teacher import TeacherEnsemble

    require_at_least(0, rows=rows, seed=seed, atol=atol, rtol=rtol)
    path = local_folder(path, revision)
    paths = shard_paths(path, split)
    if not paths:
        raise FileNotFoundError(f"no {split} shards in {path}/data")
    try:
        columns = pq.read_schema(paths[0]).names
    except (OSError, pa.ArrowException):
        columns = None  # an unreadable first shard: check_folder names it
    if columns is not None:
        require_reinforced(columns, path)
    consistency = check_folder(path, split)
    if consistency:  # a card that lies about its shards, mixed jobs, unreadable files: nothing else is meaningful
        return VerifyReport(rows=0, problems=consistency)
    config = load_config(path, split)
    report = VerifyReport(rows=0, num_classes=config.num_classes)
    seen = _check_values(paths, config, report)
    dupes = [i for i, c in seen.items() if c > 1]
    if dupes:
        report.problems.append(f"{DR_INDEX}: {len(dupes)} duplicate row index(es), first {min(dupes)}")
    report.agreement = summarize(path, split).get("teacher_top1_agreement")
    if teachers and list(teachers) != list(config.teachers):
        raise ValueError(f"`teachers` {list(teachers)} differs from the teachers recorded in {path}: {config.teachers} "
                         "(verify replays the recorded teachers; omit `teachers`)")
    if rows <= 0 or report.problems:
        return report
    images_from = base_of(path, config, source, split) if needs_source(path, config, columns, source) else None

    ensemble = TeacherEnsemble.from_specs(config.teachers, device=device, precision=config.precision)
    replay_config = config
    g = config.pipeline().group_size
    num_rows = config.source.get("num_rows") or max(seen) + 1
    picked = {int(i) for i in np.random.default_rng(seed).choice(sorted(seen), size=min(rows, len(seen)), replace=False)}
    # batched renders replay where the teachers run (the GPU path, and where it is fast); per-sample ones on the CPU
    job = Reinforcer(replay_config, ensemble, num_rows=num_rows, block_rows=g,  # one group at a time
                     render_device=default_render(ensemble, render=config.render)[0])
    report.params_redrawn = config.format_version >= 3
    worst = 0.0
    for group in sorted({i // g for i in picked}):
        members = [i for i in range(group * g, min((group + 1) * g, num_rows)) if i in seen]
        ds = _rows(paths, members)
        if images_from is not None:
            ds = join_source(ds, images_from, image_column=config.image_column)
        if isinstance(ds.features.get(config.image_column), datasets.Image):
            ds = ds.cast_column(config.image_column, datasets.Image(decode=False))
        batch = ds[:]
        _, params, logps = job.compute(batch, members, stored=batch[DR_PARAMS])
        for r, (i, p, lp) in enumerate(zip(members, params, logps)):
            if i in picked:
                worst = max(worst, _compare_row(report, i, p, lp, {k: v[r] for k, v in batch.items()}, job, atol, rtol))
    report.max_abs_diff = worst
    if report.params_mismatches:
        report.problems.append(f"{report.params_mismatches} stored sample(s) have parameters that differ from a fresh sampling")
    return report
