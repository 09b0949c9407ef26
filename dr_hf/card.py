"""The dataset card: YAML metadata that ``load_dataset`` parses, plus the sections a reader needs."""

from __future__ import annotations

import html
import json
import os
import re
from importlib import resources
from typing import Any, Dict, Optional

from huggingface_hub import DatasetCard, DatasetCardData

from .format import ReinforceConfig, index_dtype
from .shards import CARD, check_shards, data_files_pattern, raise_if, written_whole
from .stats import agreement_text


def md_code(text: Any) -> str:
    """``text`` as one inline Markdown code span, whatever it holds (backticks, HTML, newlines, table pipes)."""
    text = " ".join(str(text).splitlines()).replace("|", "\\|")
    run = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (run + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_text(text: Any) -> str:
    """``text`` as plain Markdown text: Markdown syntax escaped, then HTML's (so that an entity's ``#`` stays), one
    line."""
    text = re.sub(r"([\\`*_\[\]{}#!|~])", r"\\\1", " ".join(str(text).splitlines()))
    return html.escape(text, quote=False)


def md_block(text: Any, lang: str = "") -> str:
    """``text`` as a fenced code block whose fence no line of the text can close."""
    text = str(text)
    run = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, run + 1)
    return f"{fence}{lang}\n{text}\n{fence}"


def py_str(text: Any) -> str:
    """``text`` as a Python string literal (for the code snippets)."""
    return json.dumps(str(text))


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


REPO_PLACEHOLDER = "org/name-plus"
"""The repo id the card's code names until ``dr-hf push`` publishes it under its own (:func:`published_card`)."""


def published_card(text: str, repo_id: str, revision: Optional[str] = None) -> str:
    """A card's text as published to ``repo_id`` (at a branch ``revision``): its code snippets load that repo, at
    that revision, instead of the placeholder."""
    where = py_str(repo_id) + (f", revision={py_str(revision)}" if revision else "")
    return text.replace(py_str(REPO_PLACEHOLDER), where)


RENDER_TEXT = {
    "per-sample": "per sample, by torch's antialiased crop+resize (`--render per-sample`)",
    "batched": "each image's samples at once by resampling matrices (`--render batched`, the GPU path): within about "
               "0.2 grey levels on average of the per-sample renders a student replays",
}


def card_data(config: ReinforceConfig, stats: Dict[str, Any], features, split: str) -> DatasetCardData:
    from datasets import DatasetInfo

    info = DatasetInfo(features=features)._to_yaml_dict()
    info["splits"] = [{"name": split, "num_bytes": int(stats["total_bytes"]), "num_examples": int(stats["rows"])}]
    source = config.source.get("path", "")
    return DatasetCardData(
        license=config.source.get("license") or "other",
        task_categories=["image-classification"],
        tags=["dataset-reinforcement", "knowledge-distillation", "dr-hf"],
        pretty_name=f"{os.path.basename(os.path.normpath(source)) or 'dataset'}+ (reinforced)",
        configs=[{"config_name": "default", "data_files": [{"split": split, "path": data_files_pattern(split)}]}],
        dataset_info=info,
        source_datasets=[source] if source and not config.source.get("local") else None,
        reinforcement={**config.to_dict(), "stats": stats},
    )


def write_card(output_dir: str, config: ReinforceConfig, stats: Dict[str, Any], features, split: str = "train",
               command: Optional[str] = None, repo_id: Optional[str] = None, preview: Optional[str] = None) -> DatasetCard:
    """Render ``cards/reinforced_dataset.md`` into ``output_dir/README.md``, once every shard is checked to carry
    ``config`` and its rows (the card is a view of the shards, never a second truth)."""
    raise_if(check_shards(output_dir, split, config, num_rows=stats.get("source_rows")),
             f"not writing the card of {output_dir}")
    data = card_data(config, stats, features, split)
    pipeline = config.pipeline()
    fields = pipeline.param_fields()
    agreement = stats.get("teacher_top1_agreement")
    source = config.source.get("path", "?")
    split_name = config.source.get("split") or split
    repo = repo_id or REPO_PLACEHOLDER
    # Everything a user or a source controls goes through an escaper: code spans, code blocks, string literals.
    card = DatasetCard.from_template(
        data,
        template_path=template_path(),
        pretty_name=md_text(data.pretty_name),
        source_code=md_code(source) + (" (a local folder)" if config.source.get("local") else ""),
        source_py=py_str(source),
        source_split=md_code(config.source["split"]) if config.source.get("split") else None,
        split_py=py_str(split_name),
        source_revision=md_code(config.source["revision"]) if config.source.get("revision") else None,
        shuffle_code=None if config.source.get("shuffle_seed") is None else
        md_code(f"shuffle(seed={config.source['shuffle_seed']})"),
        teachers_text=", ".join(md_code(t) for t in config.teachers),
        agreement_text="n/a (no labels)" if agreement is None else
        md_text(agreement_text(agreement, config.num_classes, stats["rows"], stats["agreement_samples"])),
        num_samples=config.num_samples,
        topk=config.topk,
        num_classes=config.num_classes,
        seed=config.seed,
        augment=md_code(config.augment),
        render_text=RENDER_TEXT[config.render],
        augmentations_json=md_block(json.dumps(config.augmentations, indent=2), "json"),
        dr_hf_version=config.dr_hf_version,
        format_version=config.format_version,
        stats=stats,
        params_text=", ".join(f"`{k}` ({'x'.join(map(str, shape)) or 'scalar'} {dtype})" for k, (shape, dtype) in fields.items()),
        index_dtype=index_dtype(config.num_classes),
        command=md_block(command or config.source.get("command", "dr-hf reinforce ..."), "bash"),
        repo_py=py_str(repo),
        preview=preview,
        keep_source=config.keep_source,
    )
    with written_whole(os.path.join(output_dir, CARD)) as tmp:
        card.save(tmp)
    return card
