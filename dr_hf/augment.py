"""Replayable augmentations: each transform *samples* its parameters and *applies* given ones.

As in ``torchvision.transforms.v2`` (``make_params`` / ``transform``), sampling and applying are split,
and the same object does both: ``dr-hf reinforce`` samples parameters, stores them, and renders the
teacher's input from the stored values; training replays the stored values through the same code, so
a replay is identical by construction.

Parameters are quantised *before* they are applied (boxes to 1/4096 of the image side, MixUp weights
to 1/65535, RandAugment magnitudes to tenths), so what is stored is exactly what was rendered. Boxes are relative to the image
size, so a replay also works on a re-encoded or resized copy of the dataset, and at any output size.

The stored layout (one struct column ``dr_params``, each field a fixed-width array per sample) is
documented in ``docs/format.md`` and listed by :meth:`AugmentPipeline.param_fields`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

Q_BOX = 4096  # box coordinates (relative to the image side) are stored as round(x * Q_BOX) in uint16
Q16 = 65535  # MixUp weights are stored as round(lam * Q16) in uint16

INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


def quantize(x: float, levels: int = Q_BOX) -> int:
    return int(round(min(max(x, 0.0), 1.0) * levels))


def box_to_pixels(box: Sequence[int], height: int, width: int) -> Tuple[int, int, int, int]:
    """A stored (top, left, height, width) box, in 1/4096ths of the image side, as pixels (at least 1 px)."""
    top = min(int(round(int(box[0]) * height / Q_BOX)), height - 1)
    left = min(int(round(int(box[1]) * width / Q_BOX)), width - 1)
    h = min(max(int(round(int(box[2]) * height / Q_BOX)), 1), height - top)
    w = min(max(int(round(int(box[3]) * width / Q_BOX)), 1), width - left)
    return top, left, h, w


def sample_box(rng: np.random.Generator, height: int, width: int, scale, log_ratio) -> Optional[Tuple[float, ...]]:
    """One try of torchvision's RandomResizedCrop box sampling, as relative (top, left, h, w)."""
    area = height * width
    target = area * rng.uniform(scale[0], scale[1])
    ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target * ratio)))
    h = int(round(math.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        return top / height, left / width, h / height, w / width
    return None


@dataclass
class Output:
    """What a render produces: size (h, w), interpolation and normalisation (from a teacher or a student)."""

    size: Tuple[int, int]
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"


@dataclass
class Context:
    """What sampling may look at: the source image size and the row's place in its mixing group."""

    height: int
    width: int
    position: int = 0  # row position inside its mixing group
    group_rows: int = 1  # rows in the group (the last group of a split may be partial)


class ReplayableTransform:
    """Base class. ``fields`` maps each stored field to (per-sample shape, dtype)."""

    name: str = ""
    fields: Dict[str, Tuple[Tuple[int, ...], str]] = {}

    def make_params(self, rng: np.random.Generator, ctx: Context) -> Dict[str, Any]:
        raise NotImplementedError

    def empty_params(self) -> Dict[str, Any]:
        return {k: np.zeros(shape, dtype=dtype) if shape else np.zeros((), dtype=dtype)[()] for k, (shape, dtype) in self.fields.items()}

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}  # type: ignore[call-overload]


@dataclass
class RandomResizedCrop(ReplayableTransform):
    """Crop a random box (area ``scale``, aspect ``ratio``) and resize it to the output size."""

    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    name = "random_resized_crop"
    fields = {"crop": ((4,), "uint16")}

    def make_params(self, rng, ctx):
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        box = None
        for _ in range(10):
            box = sample_box(rng, ctx.height, ctx.width, self.scale, log_ratio)
            if box is not None:
                break
        if box is None:  # torchvision's fallback: the central crop at the clamped aspect ratio
            in_ratio = ctx.width / ctx.height
            if in_ratio < self.ratio[0]:
                w, h = ctx.width, int(round(ctx.width / self.ratio[0]))
            elif in_ratio > self.ratio[1]:
                h, w = ctx.height, int(round(ctx.height * self.ratio[1]))
            else:
                w, h = ctx.width, ctx.height
            h, w = min(h, ctx.height), min(w, ctx.width)
            box = ((ctx.height - h) // 2 / ctx.height, (ctx.width - w) // 2 / ctx.width, h / ctx.height, w / ctx.width)
        return {"crop": np.array([quantize(v) for v in box], dtype=np.uint16)}

    def apply(self, image: torch.Tensor, params, out: Output) -> torch.Tensor:
        top, left, h, w = box_to_pixels(params["crop"], image.shape[-2], image.shape[-1])
        return F.resized_crop(image, top, left, h, w, list(out.size), interpolation=INTERPOLATIONS[out.interpolation], antialias=True)


@dataclass
class CenterCrop(ReplayableTransform):
    """Deterministic evaluation view: the central ``crop_pct`` of the shorter side, resized (no parameters)."""

    crop_pct: float = 0.875
    name = "center_crop"
    fields = {}

    def make_params(self, rng, ctx):
        return {}

    def apply(self, image, params, out: Output):
        height, width = image.shape[-2:]
        side = max(1, int(round(min(height, width) * self.crop_pct)))
        top, left = (height - side) // 2, (width - side) // 2
        return F.resized_crop(image, top, left, side, side, list(out.size), interpolation=INTERPOLATIONS[out.interpolation], antialias=True)


@dataclass
class HorizontalFlip(ReplayableTransform):
    """Mirror the image left-right with probability ``p``."""

    p: float = 0.5
    name = "horizontal_flip"
    fields = {"flip": ((), "uint8")}

    def make_params(self, rng, ctx):
        return {"flip": np.uint8(rng.random() < self.p)}

    def apply(self, image, params, out):
        return F.horizontal_flip(image) if params["flip"] else image


# RandAugment, timm's "rand-m9-mstd0.5" flavour. Magnitudes are stored in tenths (0..100 of max 10),
# signed for the ops that have a direction. Each entry: (name, signed, apply(image, level in [-1, 1])).
_FILL = [124, 116, 104]


def _affine(image, **kw):
    base = dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0])
    base.update(kw)
    return F.affine(image, interpolation=InterpolationMode.BILINEAR, fill=_FILL, **base)


def _shear(level):
    return math.degrees(math.atan(0.3 * level))


RANDAUGMENT_OPS: List[Tuple[str, bool, Callable[[torch.Tensor, float], torch.Tensor]]] = [
    ("identity", False, lambda im, lv: im),
    ("autocontrast", False, lambda im, lv: F.autocontrast(im)),
    ("equalize", False, lambda im, lv: F.equalize(im)),
    ("rotate", True, lambda im, lv: F.rotate(im, 30.0 * lv, interpolation=InterpolationMode.BILINEAR, fill=_FILL)),
    ("solarize", False, lambda im, lv: F.solarize(im, threshold=int(round(256 - 256 * abs(lv))))),
    ("color", True, lambda im, lv: F.adjust_saturation(im, 1.0 + 0.9 * lv)),
    ("posterize", False, lambda im, lv: F.posterize(im, bits=max(1, 8 - int(round(4 * abs(lv)))))),
    ("contrast", True, lambda im, lv: F.adjust_contrast(im, 1.0 + 0.9 * lv)),
    ("brightness", True, lambda im, lv: F.adjust_brightness(im, 1.0 + 0.9 * lv)),
    ("sharpness", True, lambda im, lv: F.adjust_sharpness(im, 1.0 + 0.9 * lv)),
    ("shear_x", True, lambda im, lv: _affine(im, shear=[_shear(lv), 0.0])),
    ("shear_y", True, lambda im, lv: _affine(im, shear=[0.0, _shear(lv)])),
    ("translate_x", True, lambda im, lv: _affine(im, translate=[int(round(0.45 * lv * im.shape[-1])), 0])),
    ("translate_y", True, lambda im, lv: _affine(im, translate=[0, int(round(0.45 * lv * im.shape[-2]))])),
]


@dataclass
class RandAugment(ReplayableTransform):
    """``num_ops`` random ops, each at magnitude ~ N(magnitude, magnitude_std) of max 10 (timm's rand-m9-mstd0.5)."""

    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    name = "randaugment"

    @property
    def fields(self):  # type: ignore[override]
        return {"ra_op": ((self.num_ops,), "uint8"), "ra_magnitude": ((self.num_ops,), "int8")}

    def make_params(self, rng, ctx):
        ops = rng.integers(0, len(RANDAUGMENT_OPS), size=self.num_ops)
        mags = np.clip(rng.normal(self.magnitude, self.magnitude_std, size=self.num_ops), 0.0, 10.0)
        signs = np.where(rng.random(self.num_ops) < 0.5, -1, 1)
        tenths = np.round(mags * 10).astype(np.int64)
        signed = np.array([s * t if RANDAUGMENT_OPS[o][1] else t for o, s, t in zip(ops, signs, tenths)])
        return {"ra_op": ops.astype(np.uint8), "ra_magnitude": signed.astype(np.int8)}

    def apply(self, image, params, out):
        for op, mag in zip(params["ra_op"], params["ra_magnitude"]):
            if op >= len(RANDAUGMENT_OPS):
                raise ValueError(f"dr_params.ra_op holds {int(op)}, but only {len(RANDAUGMENT_OPS)} RandAugment ops exist")
            image = RANDAUGMENT_OPS[int(op)][2](image, int(mag) / 100.0)
        return image


@dataclass
class RandomErasing(ReplayableTransform):
    """With probability ``p`` replace a random box (area ``scale``, aspect ``ratio``) by per-pixel N(0, 1) noise.

    The noise is a pure function of the stored box, so it needs no extra storage.
    """

    p: float = 0.25
    scale: Tuple[float, float] = (0.02, 1 / 3)
    ratio: Tuple[float, float] = (0.3, 3.3)
    name = "random_erasing"
    fields = {"erase": ((4,), "uint16")}

    def make_params(self, rng, ctx):
        if rng.random() >= self.p:
            return self.empty_params()
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            box = sample_box(rng, ctx.height, ctx.width, self.scale, log_ratio)
            if box is not None:
                return {"erase": np.array([quantize(v) for v in box], dtype=np.uint16)}
        return self.empty_params()

    def apply(self, x, params, out):
        box = params["erase"]
        if box[2] == 0 or box[3] == 0:
            return x
        top, left, h, w = box_to_pixels(box, x.shape[-2], x.shape[-1])
        seed = int.from_bytes(np.asarray(box, dtype="<u2").tobytes(), "little") % (2**63)
        noise = torch.randn((x.shape[-3], h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        x = x.clone()
        x[..., top : top + h, left : left + w] = noise.to(x.dtype)
        return x


@dataclass
class MixUpCutMix(ReplayableTransform):
    """Mix each sample with the same sample index of a partner row from its group of ``group_size`` rows.

    With probability ``p`` a sample is mixed: MixUp (weight ~ Beta(mixup_alpha)) or, with probability
    ``switch_prob``, CutMix (a box of the partner, area ~ 1 - Beta(cutmix_alpha)). The partner is another row
    of the same group of ``group_size`` consecutive rows, stored as a signed row offset, so a streaming reader
    that keeps each group together can replay it without random access. The partner enters with *its own*
    stored crop/flip/RandAugment/erasing parameters for that sample index.
    """

    mixup_alpha: float = 0.2
    cutmix_alpha: float = 1.0
    switch_prob: float = 0.5
    p: float = 1.0
    group_size: int = 8
    name = "mixup_cutmix"
    fields = {"mix_partner": ((), "int8"), "mix_lam": ((), "uint16"), "mix_box": ((4,), "uint16")}

    def make_params(self, rng, ctx):
        # Draws do not depend on the group being partial, so params are a pure function of (seed, row, sample).
        mixed = rng.random() < self.p
        offset = int(rng.integers(1, max(self.group_size, 2)))
        cutmix = rng.random() < self.switch_prob
        lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha) if cutmix else rng.beta(self.mixup_alpha, self.mixup_alpha))
        cy, cx = rng.random(), rng.random()
        partner = (ctx.position + offset) % self.group_size
        if not mixed or self.group_size < 2 or partner >= ctx.group_rows:
            return self.empty_params()
        out = self.empty_params()
        out["mix_partner"] = np.int8(partner - ctx.position)
        if cutmix:  # timm's rand_bbox: a box of relative side sqrt(1 - lam), centre uniform, clipped
            side = math.sqrt(1.0 - lam)
            y0, y1 = max(cy - side / 2, 0.0), min(cy + side / 2, 1.0)
            x0, x1 = max(cx - side / 2, 0.0), min(cx + side / 2, 1.0)
            out["mix_box"] = np.array([quantize(y0), quantize(x0), quantize(y1 - y0), quantize(x1 - x0)], dtype=np.uint16)
            out["mix_lam"] = np.uint16(0)  # derived from the box at apply time
        else:
            out["mix_lam"] = np.uint16(quantize(lam, Q16))
        return out

    @staticmethod
    def is_mixed(params) -> bool:
        return int(params["mix_partner"]) != 0

    @staticmethod
    def weight(params, height: int, width: int) -> float:
        """Weight of the row's own image in the mix (its area share for CutMix)."""
        box = params["mix_box"]
        if box[2] and box[3]:
            _, _, h, w = box_to_pixels(box, height, width)
            return 1.0 - (h * w) / (height * width)
        return int(params["mix_lam"]) / Q16

    def apply_mix(self, x: torch.Tensor, partner: torch.Tensor, params) -> torch.Tensor:
        box = params["mix_box"]
        if box[2] and box[3]:
            top, left, h, w = box_to_pixels(box, x.shape[-2], x.shape[-1])
            x = x.clone()
            x[..., top : top + h, left : left + w] = partner[..., top : top + h, left : left + w]
            return x
        lam = int(params["mix_lam"]) / Q16
        return x * lam + partner * (1.0 - lam)


TRANSFORMS = {t.name: t for t in (RandomResizedCrop, HorizontalFlip, RandAugment, RandomErasing, MixUpCutMix)}


@dataclass
class AugmentPipeline:
    """The paper's pipeline: crop+resize, flip, RandAugment (uint8) -> normalise -> erasing -> mixing."""

    transforms: List[ReplayableTransform] = field(default_factory=list)
    crop_pct: float = 0.875  # the center crop used when there is no RandomResizedCrop (evaluation view)

    # -- description -------------------------------------------------------------------------------
    def get(self, name: str) -> Optional[ReplayableTransform]:
        return next((t for t in self.transforms if t.name == name), None)

    @property
    def mix(self) -> Optional[MixUpCutMix]:
        return self.get("mixup_cutmix")  # type: ignore[return-value]

    @property
    def group_size(self) -> int:
        return self.mix.group_size if self.mix else 1

    def param_fields(self) -> Dict[str, Tuple[Tuple[int, ...], str]]:
        out: Dict[str, Tuple[Tuple[int, ...], str]] = {}
        for t in self.transforms:
            out.update(t.fields)
        return out

    def config(self) -> List[Dict[str, Any]]:
        return [t.config() for t in self.transforms]

    @classmethod
    def from_config(cls, config: List[Dict[str, Any]]) -> "AugmentPipeline":
        transforms = []
        for entry in config:
            entry = dict(entry)
            name = entry.pop("name", None)
            if name not in TRANSFORMS:
                raise ValueError(f"unknown augmentation {name!r} in the reinforcement config (known: {sorted(TRANSFORMS)}); "
                                 "was it written by a newer dr-hf?")
            kind = TRANSFORMS[name]
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(entry) - names
            if unknown:
                raise ValueError(f"augmentation {name!r}: unknown option(s) {sorted(unknown)}")
            transforms.append(kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}))
        return cls(transforms)

    @classmethod
    def from_fields(cls, fields: Sequence[str]) -> "AugmentPipeline":
        """The replay pipeline implied by the stored ``dr_params`` fields (sampling constants are not needed)."""
        fields = set(fields)
        transforms: List[ReplayableTransform] = []
        for kind in (RandomResizedCrop, HorizontalFlip, RandAugment, RandomErasing, MixUpCutMix):
            probe = kind()
            if set(probe.fields) <= fields:
                transforms.append(probe)
                fields -= set(probe.fields)
        if fields:
            raise ValueError(f"dr_params has field(s) {sorted(fields)} that this dr-hf does not know; was it written by a newer dr-hf?")
        return cls(transforms)

    # -- sampling ----------------------------------------------------------------------------------
    def make_params(self, seed: int, index: int, sample: int, ctx: Context) -> Dict[str, Any]:
        """Parameters of sample ``sample`` of row ``index``: a pure function of (seed, index, sample, image size).

        (Mixing also looks at whether the drawn partner exists: only rows in a split's last, partial group differ.)
        """
        rng = np.random.default_rng([seed, index, sample])
        params: Dict[str, Any] = {}
        for t in self.transforms:
            params.update(t.make_params(rng, ctx))
        return params

    # -- applying ----------------------------------------------------------------------------------
    def render(self, image: torch.Tensor, params: Dict[str, Any], out: Output) -> torch.Tensor:
        """Everything but mixing: a uint8 CHW image -> a normalised float CHW tensor at ``out.size``."""
        x = image
        crop = self.get("random_resized_crop")
        if crop is None:
            x = CenterCrop(self.crop_pct).apply(x, {}, out)
        for t in self.transforms:
            if t.name in ("random_resized_crop", "horizontal_flip", "randaugment"):
                x = t.apply(x, params, out)
        x = F.normalize(F.to_dtype(x, torch.float32, scale=True), list(out.mean), list(out.std))
        erase = self.get("random_erasing")
        if erase is not None:
            x = erase.apply(x, params, out)
        return x

    def render_mixed(self, x: torch.Tensor, partner: Optional[torch.Tensor], params: Dict[str, Any]) -> torch.Tensor:
        """Mix a rendered sample with its partner's rendering of the same sample index (if the sample is mixed)."""
        mix = self.mix
        if mix is None or not mix.is_mixed(params):
            return x
        if partner is None:
            raise ValueError("this sample is mixed, but its partner row is not available")
        return mix.apply_mix(x, partner, params)


def params_at(row_params: Dict[str, Any], sample: int) -> Dict[str, Any]:
    """One sample's parameters out of a row's stored ``dr_params`` (fields of shape (N, ...))."""
    return {k: np.asarray(v)[sample] for k, v in row_params.items()}


PRESETS: Dict[str, Callable[[], AugmentPipeline]] = {
    "rrc+flip": lambda: AugmentPipeline([RandomResizedCrop(), HorizontalFlip()]),
    "rrc+flip+ra+re": lambda: AugmentPipeline([RandomResizedCrop(), HorizontalFlip(), RandAugment(), RandomErasing()]),
    "rrc+flip+mix": lambda: AugmentPipeline([RandomResizedCrop(), HorizontalFlip(), MixUpCutMix()]),
    "rrc+flip+ra+re+mix": lambda: AugmentPipeline(
        [RandomResizedCrop(), HorizontalFlip(), RandAugment(), RandomErasing(), MixUpCutMix()]
    ),
}


def make_pipeline(preset: str, crop_scale: Optional[float] = None) -> AugmentPipeline:
    """A preset by name: ``rrc+flip`` (light CNNs), ``rrc+flip+ra+re``, ``rrc+flip+mix``, ``rrc+flip+ra+re+mix`` (ViTs).

    ``crop_scale`` sets RandomResizedCrop's smallest area fraction (default 0.08; small images such as CIFAR's
    32x32 want about 0.35)."""
    if preset not in PRESETS:
        raise ValueError(f"--augment {preset!r} is not a preset; choose one of {sorted(PRESETS)}")
    pipeline = PRESETS[preset]()
    if crop_scale is not None:
        if not 0.0 < crop_scale <= 1.0:
            raise ValueError(f"--crop-scale must be in (0, 1], got {crop_scale}")
        crop = pipeline.get("random_resized_crop")
        crop.scale = (float(crop_scale), 1.0)
    return pipeline
