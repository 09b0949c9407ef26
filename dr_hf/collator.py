"""The training collator: replays a stored augmentation per example and builds the student's batch.

It runs in DataLoader workers (``dataloader_num_workers``), so decoding and replay stay out of the training loop.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .augment import AugmentPipeline, Context, Output, make_pipeline, params_at
from .format import DR_INDEX, DR_PARAMS, DR_TOPK_INDICES, DR_TOPK_LOGPROBS, missing_columns
from .images import decode


def _rows(example: Dict[str, Any]) -> List[Dict[str, Any]]:
    """A row, or a group of rows (a dict of lists, as ``Dataset.batch`` / a slice yields), as a list of rows."""
    if isinstance(example.get(DR_INDEX), list):
        keys = list(example)
        return [dict(zip(keys, values)) for values in zip(*(example[k] for k in keys))]
    return [example]


class ReinforcedCollator:
    """Build ``pixel_values`` (student size and normalisation) and the sparse teacher target for each example.

    * Reinforced examples (with the ``dr_*`` columns): pick one of the N stored samples at random (torch's RNG,
      which the Trainer seeds, and which DataLoader workers reseed every epoch), replay it, and return
      ``teacher_indices`` / ``teacher_logprobs`` (B x K). Rows of one mixing group (a group example) share the
      sample index, so MixUp/CutMix partners are in the batch.
    * With probability ``1 - reinforced_prob`` an example is the original image (center crop) with its one-hot label.
    * Plain examples: ``train=True`` samples fresh parameters from ``augment`` (plain training and online KD);
      ``train=False`` is the evaluation view (center crop). ``teacher_outputs`` also renders each live teacher's view.
    """

    def __init__(self, output: Output, image_column: str = "image", label_column: Optional[str] = "label",
                 train: bool = True, augment: Optional[str] = "rrc+flip", reinforced_prob: float = 1.0,
                 teacher_outputs: Sequence[Output] = (), crop_pct: float = 0.875, crop_scale: Optional[float] = None,
                 num_classes: Optional[int] = None):
        self.output = output
        self.image_column = image_column
        self.label_column = label_column
        self.train = train
        self.augment = augment
        self.reinforced_prob = reinforced_prob
        self.teacher_outputs = list(teacher_outputs)
        self.num_classes = num_classes
        self.center = AugmentPipeline([], crop_pct=crop_pct)
        self._replay: Dict[tuple, AugmentPipeline] = {}
        self._fresh = make_pipeline(augment, crop_scale=crop_scale) if augment else None
        if self._fresh is not None and self._fresh.mix is not None:
            raise ValueError(f"augment={augment!r}: fresh sampling (plain training / online KD) supports presets without "
                             "MixUp/CutMix; reinforced datasets replay their stored mixing")

    def _pipeline(self, params: Dict[str, Any]) -> AugmentPipeline:
        key = tuple(sorted(params))
        if key not in self._replay:
            self._replay[key] = AugmentPipeline.from_fields(key)
        return self._replay[key]

    def _check_target(self, index: int, j: int, n: int, row, idx: np.ndarray, lp: np.ndarray, seen) -> None:
        """Refuse tampered or corrupt teacher targets, naming the row and column, before they reach the loss."""
        where = f"row {index}, sample {j}"
        if len(row[DR_TOPK_LOGPROBS]) != n:
            raise ValueError(f"{where}, column {DR_TOPK_LOGPROBS!r}: {len(row[DR_TOPK_LOGPROBS])} samples, "
                             f"but {DR_TOPK_INDICES!r} has {n}")
        for name, values in row[DR_PARAMS].items():
            if len(values) != n:
                raise ValueError(f"{where}, column {DR_PARAMS!r}: field {name!r} holds {len(values)} samples, "
                                 f"{DR_TOPK_INDICES!r} {n}")
        k = next(len(i) for i in seen if i is not None)
        if idx.ndim != 1 or lp.shape != idx.shape or len(idx) != k:
            raise ValueError(f"{where}, columns {DR_TOPK_INDICES!r}/{DR_TOPK_LOGPROBS!r}: shapes {idx.shape}/{lp.shape}, "
                             f"expected ({k},) each")
        if (idx < 0).any() or (self.num_classes is not None and (idx >= self.num_classes).any()):
            raise ValueError(f"{where}, column {DR_TOPK_INDICES!r}: class id(s) {idx.tolist()} outside "
                             f"[0, {self.num_classes}), the student's {self.num_classes} classes" if self.num_classes
                             else f"{where}, column {DR_TOPK_INDICES!r}: negative class id(s) {idx.tolist()}")
        if not np.isfinite(lp).all() or (lp > 1e-3).any():
            raise ValueError(f"{where}, column {DR_TOPK_LOGPROBS!r}: {lp.tolist()} are not log-probabilities "
                             "(finite, <= 0)")

    def _label(self, row: Dict[str, Any]) -> int:
        if not self.label_column or self.label_column not in row or row[self.label_column] is None:
            return -1
        return int(row[self.label_column])

    def _views(self, image: torch.Tensor, render) -> List[torch.Tensor]:
        return [render(image, out) for out in [self.output] + self.teacher_outputs]

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        views: List[List[torch.Tensor]] = []
        labels, partners, lams, idx, lps, picked = [], [], [], [], [], []

        def add_unmixed(view: List[torch.Tensor], label: int) -> None:
            views.append(view)
            labels.append(label)
            partners.append(-1)
            lams.append(1.0)

        for example in examples:
            rows = _rows(example)
            if missing_columns(rows[0]) and not self.train:
                for row in rows:
                    image = decode(row[self.image_column], column=self.image_column)
                    add_unmixed(self._views(image, lambda im, out: self.center.render(im, {}, out)), self._label(row))
                continue
            if missing_columns(rows[0]):
                if self._fresh is None:
                    raise ValueError(f"training example lacks the reinforcement columns {missing_columns(rows[0])} and no "
                                     "augment preset is set for plain training")
                for row in rows:
                    image = decode(row[self.image_column], column=self.image_column)
                    seed = int(torch.randint(0, 2**62, ()).item())
                    p = self._fresh.make_params(seed, 0, 0, Context(image.shape[-2], image.shape[-1]))
                    add_unmixed(self._views(image, lambda im, out: self._fresh.render(im, p, out)), self._label(row))
                continue
            # reinforced: one sample index for the whole group
            n = len(rows[0][DR_TOPK_INDICES])
            j = int(torch.randint(0, n, ()).item())
            base = len(views)
            pos = {int(row[DR_INDEX]): k for k, row in enumerate(rows)}
            group_views, group_params = [], []
            for row in rows:
                image = decode(row[self.image_column], row=int(row[DR_INDEX]), column=self.image_column)
                p = params_at(row[DR_PARAMS], j)
                pipe = self._pipeline(p)
                group_params.append((p, pipe, image))
                group_views.append(self._views(image, lambda im, out: pipe.render(im, p, out)))
            for k, row in enumerate(rows):
                p, pipe, image = group_params[k]
                label = self._label(row)
                if self.reinforced_prob < 1.0 and float(torch.rand(())) >= self.reinforced_prob:
                    add_unmixed(self._views(image, lambda im, out: self.center.render(im, {}, out)), label)
                    idx.append(None)
                    lps.append(None)
                    continue
                own = group_views[k]
                partner = -1
                lam = 1.0
                if "mix_partner" in p and int(p["mix_partner"]) != 0:
                    target = int(row[DR_INDEX]) + int(p["mix_partner"])
                    if target not in pos:
                        raise ValueError(f"row {int(row[DR_INDEX])}, sample {j}: its MixUp/CutMix partner row {target} is not in "
                                         "the same example group; feed mixing datasets through ReinforcedTrainer, which "
                                         "groups rows")
                    other = group_views[pos[target]]
                    own = [pipe.render_mixed(a, b, p) for a, b in zip(own, other)]
                    partner = base + pos[target]
                    lam = pipe.mix.weight(p, *own[0].shape[-2:])
                views.append(own)
                picked.append((len(views) - 1, j))
                labels.append(label)
                partners.append(partner)
                lams.append(lam)
                idx.append(np.asarray(row[DR_TOPK_INDICES][j], dtype=np.int64))
                lps.append(np.asarray(row[DR_TOPK_LOGPROBS][j], dtype=np.float32))
                self._check_target(int(row[DR_INDEX]), j, n, row, idx[-1], lps[-1], idx)
        labels_t = torch.tensor(labels, dtype=torch.long)
        batch: Dict[str, torch.Tensor] = {"pixel_values": torch.stack([v[0] for v in views]), "labels": labels_t}
        for o in range(len(self.teacher_outputs)):
            batch[f"teacher_pixel_values_{o}"] = torch.stack([v[o + 1] for v in views])
        if any(p >= 0 for p in partners):
            batch["mix_labels"] = torch.tensor([labels[p] if p >= 0 else -1 for p in partners], dtype=torch.long)
            batch["mix_lam"] = torch.tensor(lams, dtype=torch.float32)
        sample_index = torch.full((len(views),), -1, dtype=torch.long)
        for pos_, j_ in picked:
            sample_index[pos_] = j_
        batch["sample_index"] = sample_index  # which stored sample each example replays (-1: none)
        if idx and any(i is not None for i in idx):
            k = next(len(i) for i in idx if i is not None)
            batch["teacher_indices"] = torch.tensor(np.stack([i if i is not None else np.full(k, -1) for i in idx]))
            batch["teacher_logprobs"] = torch.tensor(np.stack([v if v is not None else np.full(k, np.nan, np.float32) for v in lps]))
        return batch
