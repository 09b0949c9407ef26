"""``dr-hf preview``: a PNG grid of replayed samples captioned with the teacher's top classes, for the card."""

from __future__ import annotations

import os
from typing import List, Optional

import numpy as np
import torch

from .pipeline import params_at
from .errors import require_at_least
from .format import DR_INDEX, DR_PARAMS, DR_TOPK_INDICES, DR_TOPK_LOGPROBS, class_label_names
from .images import decode
from .inputs import InputSpec
from .shards import PREVIEW, written_whole

TILE = 176
CAPTION_LINES = 4
LINE = 12


def class_names(features, label_column: Optional[str], num_classes: int) -> List[str]:
    """Names from the label column's ``ClassLabel``; for 1000 classes without one, ImageNet-1k's (timm's table);
    else ``class N``."""
    names = class_label_names(features, label_column, num_classes)
    if names is not None:
        return names
    if num_classes == 1000:
        try:
            from timm.data import ImageNetInfo

            return [d.split(",")[0] for d in ImageNetInfo().label_descriptions()]
        except Exception:  # names are a nicety for captions
            pass
    return [f"class {i}" for i in range(num_classes)]


def _caption(draw, font, x, y, lines):
    for k, text in enumerate(lines[:CAPTION_LINES]):
        draw.text((x + 3, y + 2 + k * LINE), text[:30], fill=(20, 20, 20), font=font)


class _Lazy:
    """Row r's ``make(r)``, made on first use and kept."""

    def __init__(self, make, n: int):
        self.make, self.n, self.cache = make, n, {}

    def __len__(self):
        return self.n

    def __getitem__(self, r: int):
        if r not in self.cache:
            self.cache[r] = self.make(r)
        return self.cache[r]


def render_preview(folder: str, out: Optional[str] = None, rows: int = 4, samples: int = 4, split: str = "train",
                   source: Optional[str] = None, seed: int = 0, revision: Optional[str] = None) -> str:
    """Replay ``samples`` stored samples of ``rows`` rows of the first shard (mixed samples first, so MixUp/CutMix
    show when the preset has them) and write a captioned grid; returns its path. ``folder``: a reinforced folder, or
    a Hub dataset's id (at ``revision``), of which the card and the split's first shard are downloaded to the
    Hugging Face cache (``out`` then defaults to ``preview.png`` in the working directory)."""
    import PIL.Image
    import PIL.ImageDraw
    import PIL.ImageFont
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from datasets import Features

    from .source import local_folder, needs_source, reinforcement_config
    from .shards import shard_paths

    require_at_least(1, rows=rows, samples=samples)
    require_at_least(0, seed=seed)
    out = out or (os.path.join(folder, PREVIEW) if os.path.isdir(folder) else PREVIEW)
    image_format = PIL.Image.registered_extensions().get(os.path.splitext(out)[1].lower())
    if image_format is None:
        raise ValueError(f"`out` {out!r}: name an image file (.png, .jpg, ...)")
    folder = local_folder(folder, revision, first_shard_of=split)
    config = reinforcement_config(folder, split)
    table = pq.read_table(shard_paths(folder, split)[0])
    features = Features.from_arrow_schema(table.schema)
    cells = None
    if needs_source(folder, config, table.column_names, source):
        import datasets

        from .source import base_of, join_source

        joined = join_source(datasets.Dataset(table), base_of(folder, config, source, split), config.image_column)
        cells = joined.cast_column(config.image_column, datasets.Image(decode=False))
        features = joined.features  # the class names are the source's
    names = class_names(features, config.label_column, config.num_classes)
    pipeline = config.pipeline()
    display = InputSpec(size=(TILE, TILE), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")  # [0, 1]
    n_rows = table.num_rows
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(n_rows, size=min(rows, n_rows), replace=False).tolist())
    columns = table.select([DR_INDEX, DR_PARAMS, DR_TOPK_INDICES, DR_TOPK_LOGPROBS])
    data = _Lazy(lambda r: columns.slice(r, 1).to_pylist()[0], n_rows)  # a shard holds many rows; the grid a few

    def image(r):
        cell = cells[r][config.image_column] if cells is not None else table.column(config.image_column)[r].as_py()
        return decode(cell, row=data[r][DR_INDEX], column=config.image_column)

    images = _Lazy(image, n_rows)  # render_samples reaches mixing partners by row
    row_params = _Lazy(lambda r: data[r][DR_PARAMS], n_rows)

    font = PIL.ImageFont.load_default()
    cell_h = TILE + CAPTION_LINES * LINE + 6
    stored = pc.min(pc.list_value_length(table.column(DR_TOPK_INDICES))).as_py()
    samples = max(1, min(samples, stored))  # no more columns than stored samples
    grid = PIL.Image.new("RGB", (samples * TILE + (samples - 1) * 4, len(chosen) * cell_h), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(grid)
    for gi, r in enumerate(chosen):
        params = data[r][DR_PARAMS]
        n = len(data[r][DR_TOPK_INDICES])
        mixed = [j for j in range(n) if "mix_partner" in params and pipeline.mix.is_mixed(params_at(params, j))]
        half = max(1, samples // 2)
        order = mixed[:half] + [j for j in range(n) if j not in mixed] + mixed[half:]
        for col, j in enumerate(order[:samples]):
            p = params_at(params, j)
            partner = r + int(p["mix_partner"]) if "mix_partner" in p else r
            x = pipeline.render_samples(images, row_params, [(r, j)], display)[0]
            tile = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            x0, y0 = col * (TILE + 4), gi * cell_h
            grid.paste(PIL.Image.fromarray(np.ascontiguousarray(tile)), (x0, y0))
            probs = np.exp(np.asarray(data[r][DR_TOPK_LOGPROBS][j], dtype=np.float32))
            top = data[r][DR_TOPK_INDICES][j]
            head = f"row {data[r][DR_INDEX]} #{j}"
            if partner != r:
                kind = "cutmix" if p["mix_box"][2] and p["mix_box"][3] else "mixup"
                head += f" {kind} {pipeline.mix.weight(p, TILE, TILE):.0%}"
            _caption(draw, font, x0, y0 + TILE, [head] + [f"{probs[k]:.0%} {names[int(top[k])]}" for k in range(min(3, len(top)))])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with written_whole(out) as tmp:
        grid.save(tmp, format=image_format)
    return out
