"""Figures about a reinforced folder, read from its parquet files: storage per sample and teacher agreement."""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .format import AGREEMENT_KEY, DR_PARAMS, DR_TOPK_INDICES, config_from_parquet
from .shards import shard_paths


def reinforcement_bytes(paths: List[str]) -> Dict[str, int]:
    """Compressed bytes of the ``dr_*`` columns (and of the whole files), from the parquet footers."""
    import pyarrow.parquet as pq

    out = {"dr_columns": 0, "dr_params": 0, "dr_topk": 0, "files": 0}
    for path in paths:
        out["files"] += os.path.getsize(path)
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                top = col.path_in_schema.split(".")[0]
                if top.startswith("dr_"):
                    out["dr_columns"] += col.total_compressed_size
                    kind = "dr_params" if top == DR_PARAMS else "dr_topk" if top.startswith("dr_topk") else None
                    if kind:
                        out[kind] += col.total_compressed_size
    return out


def _count_lines(path: str) -> int:
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def agreement_counts(table: pa.Table, label: str, topk: int) -> Tuple[int, int]:
    """(hits, samples): of ``table``'s unmixed samples with a label, how many the teacher's top-1 class names;
    ``table`` holds the ``dr_topk_indices`` and ``dr_params`` columns and ``label``. Vectorised over the flattened
    samples; a damaged table (ragged N) counts nothing rather than failing."""
    col = table.column(DR_TOPK_INDICES).combine_chunks()
    counts = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
    top1 = col.flatten().flatten().to_numpy(zero_copy_only=False)[::topk].astype(np.int64)
    labels = pc.fill_null(table.column(label).combine_chunks(), -1).to_numpy(zero_copy_only=False).astype(np.int64)
    labels = np.repeat(labels, counts)
    unmixed = np.ones_like(top1, dtype=bool)
    params = table.column(DR_PARAMS).combine_chunks()
    if "mix_partner" in [params.type.field(i).name for i in range(params.type.num_fields)]:
        unmixed = params.field("mix_partner").flatten().to_numpy(zero_copy_only=False) == 0
    if not (len(top1) == len(labels) == len(unmixed)):
        return 0, 0
    valid = unmixed & (labels >= 0)
    return int(((top1 == labels) & valid).sum()), int(valid.sum())


def summarize(output_dir: str, split: str = "train") -> Dict[str, Any]:
    """Rows, N, K, bytes per augmentation sample, and top-1 agreement with labels on the unmixed samples."""
    import pyarrow.parquet as pq

    paths = shard_paths(output_dir, split)
    if not paths:
        raise FileNotFoundError(f"no {split} shards in {output_dir}/data")
    config = config_from_parquet(paths[0])
    n = config.num_samples
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    sizes = reinforcement_bytes(paths)
    stats: Dict[str, Any] = {
        "rows": rows,
        "num_samples": n,
        "topk": config.topk,
        "samples": rows * n,
        "bytes_per_sample": round(sizes["dr_columns"] / max(rows * n, 1), 2),
        "bytes_per_sample_params": round(sizes["dr_params"] / max(rows * n, 1), 2),
        "bytes_per_sample_topk": round(sizes["dr_topk"] / max(rows * n, 1), 2),
        "reinforcement_bytes": sizes["dr_columns"],
        "total_bytes": sizes["files"],
    }
    label = config.label_column
    hits = total = 0
    for path in paths:
        schema = pq.read_schema(path)
        if AGREEMENT_KEY in (schema.metadata or {}):  # counted as the shard was written: its footer alone is read
            counted = json.loads(schema.metadata[AGREEMENT_KEY])
            h, t = int(counted["hits"]), int(counted["samples"])
        elif label and label in schema.names:  # (written with their labels by an earlier dr-hf: counted here)
            h, t = agreement_counts(pq.read_table(path, columns=[DR_TOPK_INDICES, DR_PARAMS, label]), label, config.topk)
        else:
            continue
        hits, total = hits + h, total + t
    if total:
        stats["teacher_top1_agreement"] = round(hits / total, 4)
        stats["agreement_samples"] = total
    reports = sorted(glob.glob(os.path.join(output_dir, "errors", f"{split}-*.jsonl")))
    stats["skipped_rows"] = sum(_count_lines(p) for p in reports)
    return stats


def agreement_text(agreement: float, num_classes: int, rows: int, samples: Optional[int] = None) -> str:
    """The teachers' top-1 agreement with the labels as the CLI and the card say it, pointing out an agreement within
    chance (1 / ``num_classes``, plus two standard deviations over ``rows`` rows): a teacher fit for the data is far
    above it, so its class ids likely mean other classes than the labels' (shifted by one, or in another order)."""
    text = f"{agreement:.1%}" + (f" of {samples} unmixed samples" if samples is not None else "")
    chance = 1 / max(num_classes, 1)
    if num_classes >= 2 and agreement <= chance + 2 * math.sqrt(chance * (1 - chance) / max(rows, 1)):
        text += (f" (about chance for {num_classes} classes: do the teachers' class ids mean the classes of the "
                 "labels' ids?)")
    return text
