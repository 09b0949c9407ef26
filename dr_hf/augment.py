"""Replayable augmentations: each transform *samples* its parameters and *applies* given ones.

As in ``torchvision.transforms.v2`` (``make_params`` / ``transform``), sampling and applying are split,
and the same object does both: ``dr-hf reinforce`` samples parameters, stores them, and renders the
teacher's input from the stored values; training replays the stored values through the same code, so
a replay is identical by construction. Sampling is vectorised: a transform draws all N samples of a row at once
(:meth:`ReplayableTransform.sample`, from :class:`Draws`), with torchvision's distributions.

Parameters are quantised *before* they are applied (boxes to 1/4096 of the image side, MixUp weights to 1/65535;
RandAugment stores torchvision's op ids and magnitude bins), so what is stored is exactly what was rendered. Boxes
are relative to the image size, so a replay also works on a re-encoded or resized copy of the dataset, and at any
output size.

The transforms are registered by name (:data:`TRANSFORMS`); :mod:`dr_hf.pipeline` runs them in stage order and
holds the presets, :mod:`dr_hf.randaugment_ops` RandAugment's batched ops. The stored layout (one struct column
``dr_params``, each field a fixed-width array per sample) is documented in the README (The format) and listed by
:meth:`dr_hf.pipeline.AugmentPipeline.param_fields`.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from . import script
from .inputs import InputSpec
from .randaugment_ops import (RA_CONSTANTS, RANDAUGMENT_BINS, RANDAUGMENT_OPS, RANDAUGMENT_SIGNED, _randaugment,
                              randaugment_constants, randaugment_op, randaugment_runs, rotation_path)
from .resample import resized_crop, runs
from .transfer import to_device

Q_BOX = 4096  # box coordinates (relative to the image side) are stored as round(x * Q_BOX) in uint16
Q16 = 65535  # MixUp weights are stored as round(lam * Q16) in uint16

INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


def quantize(x: np.ndarray, levels: int = Q_BOX) -> np.ndarray:
    """Relative values in [0, 1] (clipped) as integers in 1/``levels``ths, rounded half to even."""
    return np.rint(np.clip(x, 0.0, 1.0) * levels).astype(np.int64)


def boxes_to_pixels(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Stored (top, left, height, width) boxes, in 1/4096ths of the image side, as pixels (at least 1 px, inside the
    image): (..., 4) -> (..., 4) int64."""
    b = np.rint(np.asarray(boxes, dtype=np.int64) * np.array([height, width, height, width]) / Q_BOX).astype(np.int64)
    top, left = np.minimum(b[..., 0], height - 1), np.minimum(b[..., 1], width - 1)
    h = np.minimum(np.maximum(b[..., 2], 1), height - top)
    w = np.minimum(np.maximum(b[..., 3], 1), width - left)
    return np.stack([top, left, h, w], axis=-1)


def box_to_pixels(box: Sequence[int], height: int, width: int) -> Tuple[int, int, int, int]:
    """One stored box as pixels: :func:`boxes_to_pixels` for one box, in plain Python, as per-sample renders call it
    once a sample (1.7 us a call against numpy's 12; tests keep the two equal)."""
    top = min(int(round(int(box[0]) * height / Q_BOX)), height - 1)
    left = min(int(round(int(box[1]) * width / Q_BOX)), width - 1)
    h = min(max(int(round(int(box[2]) * height / Q_BOX)), 1), height - top)
    w = min(max(int(round(int(box[3]) * width / Q_BOX)), 1), width - left)
    return top, left, h, w


def box_masks(boxes: np.ndarray, height: int, width: int, device=None) -> torch.Tensor:
    """(M, 1, H, W) bool masks of stored boxes (M, 4) at ``height`` x ``width`` (an all-zero box: no pixel)."""
    boxes = np.asarray(boxes)
    px = np.where(((boxes[:, 2] > 0) & (boxes[:, 3] > 0))[:, None], boxes_to_pixels(boxes, height, width), 0)
    b = to_device(px, device)
    ys, xs = torch.arange(height, device=device), torch.arange(width, device=device)
    rows = (ys >= b[:, :1]) & (ys < b[:, :1] + b[:, 2:3])
    cols = (xs >= b[:, 1:2]) & (xs < b[:, 1:2] + b[:, 3:4])
    return (rows[:, :, None] & cols[:, None, :])[:, None]


BOX_TRIES = 10  # torchvision's tries before RandomResizedCrop's fallback / RandomErasing's giving up


def sample_boxes(u: np.ndarray, height: int, width: int, scale, ratio, strict: bool = False
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """torchvision's box sampling, vectorised: RandomResizedCrop's (``strict``: RandomErasing's, which wants the box
    strictly smaller than the image and reads ``ratio`` as height / width) with ``u.shape[1]`` tries per sample.

    ``u``: (n, tries, 4) uniforms in [0, 1) (area, log-aspect, top, left), used as torchvision uses its draws.
    Returns each sample's first box that fits, as relative (top, left, h, w), shape (n, 4), and whether one did."""
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lo + (hi - lo) * u[..., 1])
    w, h = np.rint(np.sqrt(target * aspect)), np.rint(np.sqrt(target / aspect))
    if strict:
        h, w = w, h
        fits = (w < width) & (h < height)
    else:
        fits = (w <= width) & (h <= height)
    fits &= (w > 0) & (h > 0)
    top = np.floor(u[..., 2] * (height - h + 1))
    left = np.floor(u[..., 3] * (width - w + 1))
    first = (np.arange(len(u)), fits.argmax(axis=1))
    box = np.stack([top[first] / height, left[first] / width, h[first] / height, w[first] / width], axis=-1)
    return box, fits.any(axis=1)


class Draws:
    """The random numbers behind one row's ``n`` samples.

    Each named stream is its own generator, seeded by (seed, row index, CRC-32 of the name), and fills arrays sample
    by sample, so sample j's numbers are a pure function of (seed, row, j): they depend neither on ``n`` nor on the
    other transforms of the pipeline. One generator per transform and row, not per sample: sampling a row's N=64
    parameters takes microseconds, not milliseconds (it runs on the reinforce job's critical path)."""

    def __init__(self, seed: int, index: int, n: int):
        self.seed, self.index, self.n = int(seed), int(index), int(n)

    def _rng(self, stream: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.index, zlib.crc32(stream.encode())])

    def uniform(self, stream: str, width: int) -> np.ndarray:
        """(n, width) uniforms in [0, 1)."""
        return self._rng(stream).random((self.n, width))

    def beta(self, stream: str, a: float, b: float) -> np.ndarray:
        """(n,) draws from Beta(a, b)."""
        return self._rng(stream).beta(a, b, self.n)


@dataclass
class Context:
    """What sampling may look at: the source image size, the row's place in its mixing group, and N."""

    height: int
    width: int
    position: int = 0  # row position inside its mixing group
    group_rows: int = 1  # rows in the group (the last group of a split may be partial)
    num_samples: int = 1  # samples stored per row (a mixing partner's sample index is drawn from them)


# The stage a transform works in, in pipeline order: on the uint8 source/output image ("geometry", "colour"),
# on the float image in [0, 1] before normalisation ("float"), or mixing two rendered samples ("mixing").
STAGES = ("geometry", "colour", "float", "mixing")


class ReplayableTransform:
    """Base class. ``fields`` maps each stored field to (per-sample shape, dtype); ``stage`` is one of
    :data:`STAGES`; ``resizes`` is True for the transform that produces the output size (a crop)."""

    name: str = ""
    stage: str = "geometry"
    resizes: bool = False
    fields: Dict[str, Tuple[Tuple[int, ...], str]] = {}

    def sample(self, draws: Draws, ctx: Context) -> Dict[str, np.ndarray]:
        """The parameters of ``draws.n`` samples: each field an (n, ...) array (the stored layout)."""
        raise NotImplementedError

    def apply(self, image: torch.Tensor, params: Dict[str, Any], out: InputSpec) -> torch.Tensor:
        raise NotImplementedError

    def empty_params(self, n: int) -> Dict[str, np.ndarray]:
        return {k: np.zeros((n, *shape), dtype=dtype) for k, (shape, dtype) in self.fields.items()}

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}  # type: ignore[call-overload]


@dataclass
class RandomResizedCrop(ReplayableTransform):
    """Crop a random box (area ``scale``, aspect ``ratio``; torchvision's sampling, with its central fallback)
    and resize it to the output size."""

    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    name = "random_resized_crop"
    resizes = True
    fields = {"crop": ((4,), "uint16")}

    def sample(self, draws, ctx):
        box, found = sample_boxes(draws.uniform(self.name, 4 * BOX_TRIES).reshape(-1, BOX_TRIES, 4), ctx.height,
                                  ctx.width, self.scale, self.ratio)
        if not found.all():  # torchvision's fallback: the central crop at the clamped aspect ratio
            in_ratio = ctx.width / ctx.height
            if in_ratio < self.ratio[0]:
                w, h = ctx.width, int(round(ctx.width / self.ratio[0]))
            elif in_ratio > self.ratio[1]:
                h, w = ctx.height, int(round(ctx.height * self.ratio[1]))
            else:
                w, h = ctx.width, ctx.height
            h, w = min(h, ctx.height), min(w, ctx.width)
            box[~found] = ((ctx.height - h) // 2 / ctx.height, (ctx.width - w) // 2 / ctx.width, h / ctx.height,
                           w / ctx.width)
        return {"crop": quantize(box).astype(np.uint16)}

    def apply(self, image, params, out):
        top, left, h, w = box_to_pixels(params["crop"], image.shape[-2], image.shape[-1])
        return resized_crop(image, top, left, h, w, out.size, out.interpolation)


@dataclass
class ResizeRandomCrop(ReplayableTransform):
    """ml-dr's CIFAR-100+/Flowers-102+/Food-101+ crop: resize the shorter side to the output size, pad by
    ``padding`` pixels (at ``reference_size``, scaled with the output) and crop a random output-sized window.

    The window's top-left is stored relative to the resized image's extent on each axis (int16, 1/4096ths; negative
    inside the padding), so it replays at any output size; at ``reference_size`` it is exact."""

    padding: int = 16
    reference_size: int = 224
    name = "resize_random_crop"
    resizes = True
    fields = {"pad_crop": ((2,), "int16")}

    @staticmethod
    def _extent(height: int, width: int, side: int) -> Tuple[int, int]:
        scale = side / min(height, width)
        return max(side, int(round(height * scale))), max(side, int(round(width * scale)))

    def sample(self, draws, ctx):
        extent = np.array(self._extent(ctx.height, ctx.width, self.reference_size), dtype=np.float64)
        positions = extent + 2 * self.padding - self.reference_size + 1  # window offsets per axis, padding included
        offsets = np.floor(draws.uniform(self.name, 2) * positions) - self.padding
        return {"pad_crop": np.rint(offsets * Q_BOX / extent).astype(np.int16)}

    def apply(self, image, params, out):
        side = min(out.size)
        eh, ew = self._extent(image.shape[-2], image.shape[-1], side)
        x = F.resize(image, [eh, ew], interpolation=INTERPOLATIONS[out.interpolation], antialias=True)
        pad = int(round(self.padding * side / self.reference_size))
        x = F.pad(x, [pad, pad, pad, pad], fill=0)
        oh, ow = out.size
        top = min(max(int(round(int(params["pad_crop"][0]) * eh / Q_BOX)) + pad, 0), x.shape[-2] - oh)
        left = min(max(int(round(int(params["pad_crop"][1]) * ew / Q_BOX)) + pad, 0), x.shape[-1] - ow)
        return x[..., top : top + oh, left : left + ow]


@dataclass
class CenterCrop(ReplayableTransform):
    """Deterministic evaluation view: the central ``crop_pct`` (default: the spec's) of the shorter side, or of
    each side where the spec's ``crop_mode`` is ``squash``, resized to the output size."""

    crop_pct: Optional[float] = None
    name = "center_crop"
    resizes = True
    fields = {}

    def sample(self, draws, ctx):
        return {}

    def apply(self, image, params, out: InputSpec):
        height, width = image.shape[-2:]
        kept = self.crop_pct or out.crop_pct
        if out.crop_mode == "squash":
            h, w = max(1, int(round(height * kept))), max(1, int(round(width * kept)))
        else:
            h = w = max(1, int(round(min(height, width) * kept)))
        top, left = (height - h) // 2, (width - w) // 2
        return resized_crop(image, top, left, h, w, out.size, out.interpolation)


@dataclass
class HorizontalFlip(ReplayableTransform):
    """Mirror the image left-right with probability ``p``."""

    p: float = 0.5
    name = "horizontal_flip"
    fields = {"flip": ((), "uint8")}

    def sample(self, draws, ctx):
        return {"flip": (draws.uniform(self.name, 1)[:, 0] < self.p).astype(np.uint8)}

    def apply(self, image, params, out):
        return F.horizontal_flip(image) if params["flip"] else image


@dataclass
class RandAugment(ReplayableTransform):
    """torchvision's ``RandAugment`` (as ml-dr uses it): ``num_ops`` ops drawn uniformly from torchvision's table,
    each at magnitude bin ``magnitude`` of 31 with a random sign where the op has one, nearest interpolation,
    black fill, applied with probability ``p``. Stored: the op ids and the signed magnitude bins (0 ops = skipped:
    ``ra_ops`` all 255)."""

    num_ops: int = 2
    magnitude: int = 9
    p: float = 1.0
    name = "rand_augment"
    stage = "colour"

    def __post_init__(self):
        if not 0 <= self.magnitude < RANDAUGMENT_BINS:
            raise ValueError(f"RandAugment magnitude must be a bin in [0, {RANDAUGMENT_BINS}), got {self.magnitude}")

    @property
    def fields(self):  # type: ignore[override]
        return {"ra_ops": ((self.num_ops,), "uint8"), "ra_bins": ((self.num_ops,), "int8")}

    def sample(self, draws, ctx):
        k = self.num_ops
        u = draws.uniform(self.name, 1 + 2 * k)
        skip = u[:, :1] >= self.p
        ops = np.minimum(np.floor(u[:, 1:1 + k] * len(RANDAUGMENT_OPS)), len(RANDAUGMENT_OPS) - 1).astype(np.int64)
        signs = np.where(u[:, 1 + k:] < 0.5, -1, 1)
        bins = np.where(RANDAUGMENT_SIGNED[ops], signs * self.magnitude, self.magnitude)
        return {"ra_ops": np.where(skip, 255, ops).astype(np.uint8), "ra_bins": np.where(skip, 0, bins).astype(np.int8)}

    @staticmethod
    def magnitude_of(op: str, signed_bin: int, height: int, width: int) -> float:
        """torchvision's magnitude for ``op`` at a signed bin (0.0 for ops without magnitudes)."""
        values = _randaugment()._AUGMENTATION_SPACE[op][0](RANDAUGMENT_BINS, height, width)
        if values is None:
            return 0.0
        return float(values[abs(signed_bin)]) * (-1.0 if signed_bin < 0 else 1.0)

    @staticmethod
    def _check_ops(ops: np.ndarray) -> None:
        bad = ops[(ops != 255) & (ops >= len(RANDAUGMENT_OPS))]
        if bad.size:
            raise ValueError(f"dr_params.ra_ops holds {int(bad[0])}, but only {len(RANDAUGMENT_OPS)} RandAugment ops exist")

    def apply(self, image, params, out):
        ops = np.asarray(params["ra_ops"])
        self._check_ops(ops)
        for op, b in zip(ops, params["ra_bins"]):
            if op != 255:
                name, magnitude, constants, path = self._run(int(op), int(b), *image.shape[-2:])
                image = randaugment_op(image, name, magnitude, torch.tensor(constants, device=image.device), path)
        return image

    def _run(self, op: int, signed_bin: int, height: int, width: int) -> Tuple[str, float, List[float], int]:
        """What :func:`randaugment_op` takes for op ``op`` at ``signed_bin`` on an image of this size: its name,
        magnitude, constants (host values) and rotation path."""
        name = RANDAUGMENT_OPS[op]
        magnitude = self.magnitude_of(name, signed_bin, height, width)
        return (name, magnitude, randaugment_constants(name, magnitude, height, width),
                rotation_path(name, magnitude, height, width))

    def apply_batch(self, images: torch.Tensor, params: Dict[str, np.ndarray]) -> torch.Tensor:
        """:meth:`apply` to a batch (M, 3, H, W) of uint8 images, with each field of ``params`` (M, ...): each op slot
        sorts the batch by (op, signed bin), then each op runs once on the run of images that drew it, in place
        (torchvision's ops treat a batch image by image, the same pixels as one at a time; tested), so a batch costs
        a few dozen ops' calls, not M * ``num_ops``, one TorchScript call (:func:`randaugment_runs`) and two transfers
        that do not wait a slot (the index, the ops' constants)."""
        ops, bins = np.asarray(params["ra_ops"]), np.asarray(params["ra_bins"]).astype(np.int64)
        self._check_ops(ops)
        height, width = images.shape[-2:]
        for slot in range(ops.shape[1]):
            keys = np.where(ops[:, slot] == 255, -1, ops[:, slot].astype(np.int64) * 256 + bins[:, slot] + 128)
            if (keys < 0).all():
                continue
            order = np.argsort(keys, kind="stable")
            index = to_device(order, images.device)
            x = images.index_select(0, index)  # by (op, signed bin): each run a slice
            todo, constants = [], []
            for key, a, b in runs(keys[order]):
                if key >= 0:
                    op, signed_bin = divmod(key, 256)
                    name, magnitude, values, path = self._run(op, signed_bin - 128, height, width)
                    todo.append((a, b, name, magnitude, path))
                    constants.append(values)
            constants = to_device(np.array(constants, dtype=np.float32).reshape(-1, RA_CONSTANTS), images.device)
            x = script.call(randaugment_runs, x, todo, constants)
            images = torch.empty_like(x).index_copy_(0, index, x)  # back in the batch's order
        return images


@dataclass
class RandomErasing(ReplayableTransform):
    """torchvision's ``RandomErasing`` as ml-dr uses it: with probability ``p`` a box (area ``scale``, aspect
    ``ratio``, torchvision's sampling) of the [0, 1] image is set to ``value`` (0: black) *before* normalisation."""

    p: float = 0.25
    scale: Tuple[float, float] = (0.02, 0.33)
    ratio: Tuple[float, float] = (0.3, 3.3)
    value: float = 0.0
    name = "random_erasing"
    stage = "float"
    fields = {"erase_box": ((4,), "uint16")}

    def sample(self, draws, ctx):
        u = draws.uniform(self.name, 1 + 4 * BOX_TRIES)
        # torchvision erases the *rendered* image: sample against a reference output size
        box, found = sample_boxes(u[:, 1:].reshape(-1, BOX_TRIES, 4), 224, 224, self.scale, self.ratio, strict=True)
        erase = (u[:, 0] < self.p) & found
        return {"erase_box": np.where(erase[:, None], quantize(box), 0).astype(np.uint16)}

    def apply(self, x, params, out):
        box = params["erase_box"]
        if box[2] == 0 or box[3] == 0:
            return x
        top, left, h, w = box_to_pixels(box, x.shape[-2], x.shape[-1])
        return F.erase(x, top, left, h, w, torch.tensor(self.value, dtype=x.dtype))

    def apply_batch(self, x: torch.Tensor, params: Dict[str, np.ndarray]) -> torch.Tensor:
        """:meth:`apply` to a batch (M, 3, H, W), ``params["erase_box"]`` (M, 4): one masked fill."""
        return x.masked_fill(box_masks(params["erase_box"], x.shape[-2], x.shape[-1], x.device), self.value)


def misplaced_row(indices: np.ndarray, group_size: int) -> int:
    """The first position in ``indices`` (rows' ``dr_index``, read in groups of ``group_size`` from the first, as the
    trainer reads MixUp/CutMix data) whose row is not where its mixing group puts it, else -1: group ``g`` holds the
    rows ``dr_index`` ``g * group_size`` ... ``g * group_size + group_size - 1``, in order."""
    indices = np.asarray(indices, dtype=np.int64)
    first = indices - np.arange(len(indices)) % group_size  # each row's group's first dr_index, were it in place
    bad = np.flatnonzero((first % group_size != 0) | (first != np.repeat(first[::group_size], group_size)[:len(first)]))
    return int(bad[0]) if bad.size else -1


def whole_groups_advice(group_size: int) -> str:
    """What to do with MixUp/CutMix rows that are not in whole groups (the end of the errors that find them)."""
    return (f"MixUp/CutMix data is read in groups of {group_size} consecutive rows as stored, whose samples mix with "
            "one another: pass its rows in stored order and whole groups (ReinforcedTrainer shuffles whole groups "
            f"itself; hold out whole groups, e.g. dataset.filter(lambda i: i // {group_size} % 10 != 0, "
            "input_columns='dr_index'))")


def label_agreement_in_groups(labels, group_size: int) -> Tuple[float, float, int]:
    """How often two rows of one MixUp/CutMix group (``group_size`` consecutive ``labels`` from the first; negative:
    unlabelled, left out) share a label, how often two rows drawn at random from all of ``labels`` would, and the
    groups counted. Rows stored sorted by label agree almost always, so they would mix mostly with their own class
    (the paper mixes random pairs); in a random order the two rates are close."""
    labels = np.asarray(labels, dtype=np.int64)
    groups = labels[:len(labels) // group_size * group_size].reshape(-1, group_size)
    known = groups >= 0
    rows = known.sum(1)
    pairs = rows * (rows - 1)  # ordered pairs of two rows
    same = ((groups[:, :, None] == groups[:, None, :]) & known[:, :, None] & known[:, None, :]).sum((1, 2)) - rows
    counted = pairs > 0
    if not counted.any():
        return 0.0, 0.0, 0
    freq = np.unique(labels[labels >= 0], return_counts=True)[1] / np.count_nonzero(labels >= 0)  # (any ids)
    return float(same[counted].sum() / pairs[counted].sum()), float((freq ** 2).sum()), int(counted.sum())


def sorted_by_label(agreement: float, chance: float, groups: int, min_groups: int = 32) -> bool:
    """Whether rows whose groups share labels at the rate ``agreement`` (:func:`label_agreement_in_groups`) against
    ``chance`` are stored in label order rather than a random one: at least ``min_groups`` groups, agreeing at least
    0.25 above chance (a random order of 32 groups of 8 stays within 0.1 of it)."""
    return groups >= min_groups and agreement - chance >= 0.25


@dataclass
class MixUpCutMix(ReplayableTransform):
    """ml-dr's reinforcement mixing: MixUp (partner weight ~ Beta(``mixup_alpha``) / ``mixup_div_by``, so the own
    image dominates) with probability ``mixup_p``, then CutMix (a box of the partner, side sqrt(1 - Beta(
    ``cutmix_alpha``)), centre uniform, clipped) with probability ``cutmix_p``, in sequence: with the defaults 25% of
    samples get both, 25% neither.

    The partner is another row of the same group of ``group_size`` consecutive rows (a signed row offset, so a
    streaming reader that keeps each group together can replay it) and enters with *its own* stored parameters for
    an independently drawn sample index (``mix_sample``), as ml-dr draws the partner's augmentation afresh."""

    mixup_alpha: float = 1.0
    mixup_div_by: float = 2.0
    mixup_p: float = 0.5
    cutmix_alpha: float = 1.0
    cutmix_p: float = 0.5
    group_size: int = 8
    name = "mixup_cutmix"
    stage = "mixing"
    fields = {"mix_partner": ((), "int8"), "mix_sample": ((), "uint16"), "mix_lam": ((), "uint16"),
              "mix_box": ((4,), "uint16")}

    def __post_init__(self):
        if self.mixup_div_by < 1.0:
            raise ValueError(f"`mixup_div_by` must be >= 1, got {self.mixup_div_by}")
        if not 1 <= self.group_size <= 127:
            raise ValueError(f"`group_size` must be in [1, 127], got {self.group_size}")

    def sample(self, draws, ctx):
        u = draws.uniform(self.name, 6)  # partner offset, partner sample, MixUp?, CutMix?, CutMix centre (y, x)
        partner_weight = draws.beta(self.name + ".mixup", self.mixup_alpha, self.mixup_alpha) / self.mixup_div_by
        cut_lam = draws.beta(self.name + ".cutmix", self.cutmix_alpha, self.cutmix_alpha)
        g = self.group_size
        offset = 1 + np.floor(u[:, 0] * (max(g, 2) - 1)).astype(np.int64)
        partner = (ctx.position + offset) % g
        mixup, cutmix = u[:, 2] < self.mixup_p, u[:, 3] < self.cutmix_p
        lam = np.where(mixup, np.maximum(1, quantize(1.0 - partner_weight, Q16)), 0)
        half = np.sqrt(1.0 - cut_lam) / 2
        y0, y1 = np.maximum(u[:, 4] - half, 0.0), np.minimum(u[:, 4] + half, 1.0)
        x0, x1 = np.maximum(u[:, 5] - half, 0.0), np.minimum(u[:, 5] + half, 1.0)
        box = quantize(np.stack([y0, x0, y1 - y0, x1 - x0], axis=-1))
        box = np.where((cutmix & (box[:, 2] > 0) & (box[:, 3] > 0))[:, None], box, 0)
        mixed = ((lam > 0) | (box[:, 2] > 0)) & (g >= 2) & (partner < ctx.group_rows)
        out = self.empty_params(draws.n)
        out["mix_partner"][mixed] = (partner - ctx.position)[mixed]
        out["mix_sample"][mixed] = np.floor(u[:, 1] * max(ctx.num_samples, 1)).astype(np.int64)[mixed]
        out["mix_lam"][mixed] = lam[mixed]
        out["mix_box"][mixed] = box[mixed]
        return out

    @staticmethod
    def is_mixed(params) -> bool:
        return int(params["mix_partner"]) != 0

    @staticmethod
    def weight(params, height: int, width: int) -> float:
        """Weight of the row's own image in the mix: MixUp weight times the area CutMix leaves it."""
        if not MixUpCutMix.is_mixed(params):
            return 1.0
        lam = int(params["mix_lam"]) / Q16 if int(params["mix_lam"]) else 1.0
        box = params["mix_box"]
        if box[2] and box[3]:
            _, _, h, w = box_to_pixels(box, height, width)
            lam *= 1.0 - (h * w) / (height * width)
        return lam

    def apply_mix_batch(self, x: torch.Tensor, partner: torch.Tensor, params: Dict[str, np.ndarray]) -> torch.Tensor:
        """:meth:`apply_mix` to a batch: ``x`` and ``partner`` (P, 3, H, W), each field of ``params`` (P, ...); samples
        that are not mixed come back unchanged. The same arithmetic as one at a time, so the same floats (tested)."""
        q = np.asarray(params["mix_lam"]).astype(np.int64)
        mixup = to_device(q > 0, x.device)[:, None, None, None]
        lam = torch.from_numpy(np.where(q > 0, q / Q16, 1.0))  # float64, as Python computes 1 - lam
        own, other = to_device(torch.stack([lam, 1.0 - lam]).to(x.dtype), x.device)  # one transfer
        x = torch.where(mixup, x * own[:, None, None, None] + partner * other[:, None, None, None], x)
        return torch.where(box_masks(params["mix_box"], x.shape[-2], x.shape[-1], x.device), partner, x)

    def apply_mix(self, x: torch.Tensor, partner: torch.Tensor, params) -> torch.Tensor:
        if int(params["mix_lam"]):
            lam = int(params["mix_lam"]) / Q16
            x = x * lam + partner * (1.0 - lam)
        box = params["mix_box"]
        if box[2] and box[3]:
            top, left, h, w = box_to_pixels(box, x.shape[-2], x.shape[-1])
            x = x.clone()
            x[..., top : top + h, left : left + w] = partner[..., top : top + h, left : left + w]
        return x


TRANSFORMS = {t.name: t for t in (RandomResizedCrop, ResizeRandomCrop, HorizontalFlip, RandAugment, RandomErasing,
                                  MixUpCutMix)}
