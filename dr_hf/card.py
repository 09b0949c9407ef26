"""The dataset card: YAML metadata that ``load_dataset`` parses, plus the sections a reader needs."""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any, Dict, Optional

from huggingface_hub import DatasetCard, DatasetCardData

from .format import ReinforceConfig, index_dtype


def template_path() -> str:
    return str(resources.files("dr_hf.cards").joinpath("reinforced_dataset.md"))


def source_license(source: str) -> Optional[str]:
    """The license declared in the source dataset's local card, if any."""
    readme = os.path.join(source, "README.md") if source and os.path.isdir(source) else None
    if readme and os.path.isfile(readme):
        try:
            return DatasetCard.load(readme).data.get("license")
        except Exception:
            return None
    return None


def card_data(config: ReinforceConfig, stats: Dict[str, Any], features, split: str) -> DatasetCardData:
    from datasets import DatasetInfo

    info = DatasetInfo(features=features)._to_yaml_dict()
    info["splits"] = [{"name": split, "num_bytes": int(stats["total_bytes"]), "num_examples": int(stats["rows"])}]
    source = config.source.get("path", "")
    return DatasetCardData(
        license=source_license(source) or "other",
        task_categories=["image-classification"],
        tags=["dataset-reinforcement", "knowledge-distillation", "dr-hf"],
        pretty_name=f"{os.path.basename(os.path.normpath(source)) or 'dataset'}+ (reinforced)",
        configs=[{"config_name": "default", "data_files": [{"split": split, "path": f"data/{split}-*.parquet"}]}],
        dataset_info=info,
        source_datasets=[source] if source else None,
        reinforcement={**config.to_dict(), "stats": stats},
    )


def write_card(output_dir: str, config: ReinforceConfig, stats: Dict[str, Any], features, split: str = "train",
               command: Optional[str] = None, repo_id: Optional[str] = None, preview: Optional[str] = None) -> DatasetCard:
    """Render ``cards/reinforced_dataset.md`` into ``output_dir/README.md``."""
    data = card_data(config, stats, features, split)
    pipeline = config.pipeline()
    fields = pipeline.param_fields()
    agreement = stats.get("teacher_top1_agreement")
    card = DatasetCard.from_template(
        data,
        template_path=template_path(),
        pretty_name=data.pretty_name,
        source_name=config.source.get("path", "?"),
        source_split=config.source.get("split"),
        source_revision=config.source.get("revision"),
        teachers_text=", ".join(f"`{t}`" for t in config.teachers),
        agreement_text=f"{agreement:.1%} of {stats['agreement_samples']} samples" if agreement is not None else "n/a (no labels)",
        num_samples=config.num_samples,
        topk=config.topk,
        num_classes=config.num_classes,
        seed=config.seed,
        augment=config.augment,
        augmentations_json=json.dumps(config.augmentations, indent=2),
        dr_hf_version=config.dr_hf_version,
        format_version=config.format_version,
        stats=stats,
        params_text=", ".join(f"`{k}` ({'x'.join(map(str, shape)) or 'scalar'} {dtype})" for k, (shape, dtype) in fields.items()),
        index_dtype=index_dtype(config.num_classes),
        command=command or config.source.get("command", "dr-hf reinforce ..."),
        repo_id=repo_id or "org/name-plus",
        preview=preview,
        keep_source=config.keep_source,
    )
    card.save(os.path.join(output_dir, "README.md"))
    return card
