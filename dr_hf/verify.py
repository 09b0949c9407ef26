"""``dr-hf verify``: check a reinforced dataset's schema and values, and replay rows through the teacher."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from .format import (
    DR_INDEX,
    DR_PARAMS,
    DR_TOPK_INDICES,
    DR_TOPK_LOGPROBS,
    ReinforceConfig,
    config_from_parquet,
    require_reinforced,
)


def load_config(path: str, split: str = "train") -> ReinforceConfig:
    """The reinforcement config of a local folder (parquet metadata) or a Hub repo (card YAML)."""
    from .stats import shard_paths

    if os.path.isdir(path):
        shards = shard_paths(path, split)
        config = config_from_parquet(shards[0]) if shards else None
        if config is not None:
            return config
        readme = os.path.join(path, "README.md")
    else:
        readme = path
    from huggingface_hub import DatasetCard

    data = DatasetCard.load(readme).data.to_dict()
    if "reinforcement" not in data:
        raise ValueError(f"{path} has no reinforcement config (neither in its parquet metadata nor in its card)")
    block = dict(data["reinforcement"])
    block.pop("stats", None)
    return ReinforceConfig.from_dict(block)


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
    if len(set(dr_index.tolist())) != rows:
        problems.append(f"{DR_INDEX}: duplicate row indices")
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
    topk_index_mismatches: int = 0
    agreement: Optional[float] = None

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str, teachers: Sequence[str] = (), rows: int = 8, split: str = "train", seed: int = 0,
           atol: float = 1e-3, rtol: float = 2e-3, device: Optional[str] = None) -> VerifyReport:
    """Check the schema and values; with ``teachers``, replay ``rows`` random rows and compare the teacher outputs."""
    import datasets
    import torch

    from .reinforce import Reinforcer
    from .stats import summarize
    from .teacher import TeacherEnsemble

    ds = datasets.load_dataset(path, split=split)
    require_reinforced(ds.column_names, path)
    config = load_config(path, split)
    report = VerifyReport(rows=len(ds))
    report.problems += check_columns(ds.with_format("arrow")[:], config)
    if os.path.isdir(path):
        report.agreement = summarize(path, split).get("teacher_top1_agreement")
    if not teachers or report.problems:
        return report

    ensemble = TeacherEnsemble.from_specs(list(teachers), device=device)
    replay_config = ReinforceConfig.from_dict({**config.to_dict(), "teachers": list(teachers)})
    pipeline = config.pipeline()
    g = pipeline.group_size
    order = {int(i): r for r, i in enumerate(ds[DR_INDEX])}
    num_rows = config.source.get("num_rows", max(order) + 1)
    picked = np.random.default_rng(seed).choice(sorted(order), size=min(rows, len(order)), replace=False)
    groups = sorted({int(i) // g for i in picked})
    decoded = ds
    if isinstance(ds.features.get(config.image_column), datasets.Image):
        decoded = ds.cast_column(config.image_column, datasets.Image(decode=False))
    job = Reinforcer(replay_config, ensemble, num_rows=num_rows)
    worst = 0.0
    for group in groups:
        members = [i for i in range(group * g, min((group + 1) * g, num_rows)) if i in order]
        batch = decoded.select([order[i] for i in members])[:]
        indices, params, logps = job.compute(batch, members)
        for i, p, lp in zip(indices, params, logps):
            if i not in set(int(x) for x in picked):
                continue
            stored = ds[order[i]]
            report.replayed_rows += 1
            for j, pj in enumerate(p):
                for name, value in pj.items():
                    if not np.array_equal(np.asarray(value), np.asarray(stored[DR_PARAMS][name][j])):
                        report.params_mismatches += 1
                        break
            s_idx = torch.tensor(np.asarray(stored[DR_TOPK_INDICES], dtype=np.int64))
            s_lp = torch.tensor(np.asarray(stored[DR_TOPK_LOGPROBS], dtype=np.float32))
            recomputed = torch.gather(lp, 1, s_idx)
            diff = (recomputed - s_lp).abs()
            worst = max(worst, float(diff.max()))
            report.topk_index_mismatches += int((torch.topk(lp, config.topk, dim=-1).indices != s_idx).any(dim=-1).sum())
            bad = diff > atol + rtol * s_lp.abs()
            if bad.any():
                j = int(bad.any(dim=-1).nonzero()[0])
                report.problems.append(f"row {i}, sample {j}: recomputed log-probs differ by up to {float(diff[j].max()):.4g}")
    report.max_abs_diff = worst
    if report.params_mismatches:
        report.problems.append(f"{report.params_mismatches} stored sample(s) have parameters that differ from a fresh sampling")
    return report
