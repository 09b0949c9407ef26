"""Replayable augmentations: each transform *samples* its parameters and *applies* given ones.

As in ``torchvision.transforms.v2`` (``make_params`` / ``transform``), sampling and applying are split,
and the same object does both: ``dr-hf reinforce`` samples parameters, stores them, and renders the
teacher's input from the stored values; training replays the stored values through the same code, so
a replay is identical by construction. Sampling is vectorised: a transform draws all N samples of a row at once
(:meth:`ReplayableTransform.sample`, from :class:`Draws`), with torchvision's distributions.

Parameters are quantised *before* they are applied (boxes to 1/4096 of the image side, MixUp weights
to 1/65535; RandAugment stores torchvision's op ids and magnitude bins), so what is stored is exactly what was rendered. Boxes are relative to the image
size, so a replay also works on a re-encoded or resized copy of the dataset, and at any output size.

The stored layout (one struct column ``dr_params``, each field a fixed-width array per sample) is
documented in the README (The format) and listed by :meth:`AugmentPipeline.param_fields`.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F
# torchvision's own helpers for its affine kernels, so that RandAugment's geometric ops give its exact floats
from torchvision.transforms.v2.functional._geometry import _apply_grid_transform, _get_inverse_affine_matrix

from . import script
from .inputs import InputSpec
from .resample import FILTERS, resized_crop, resized_crops, runs
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


def _randaugment():
    from torchvision.transforms.v2 import RandAugment as TorchvisionRandAugment

    return TorchvisionRandAugment


RANDAUGMENT_OPS: List[str] = list(_randaugment()._AUGMENTATION_SPACE)  # torchvision's op order (= ml-dr's)
RANDAUGMENT_BINS = 31  # torchvision's num_magnitude_bins (ml-dr: the default)
RANDAUGMENT_SIGNED = np.array([_randaugment()._AUGMENTATION_SPACE[op][1] for op in RANDAUGMENT_OPS])  # random sign?


RA_CONSTANTS = 17
"""Values :func:`randaugment_constants` gives an op: its inverse affine matrix (6), its grid's scale (2), the
sharpening kernel (9)."""


def randaugment_constants(op: str, magnitude: float, height: int, width: int) -> List[float]:
    """The constants torchvision's RandAugment op ``op`` at ``magnitude`` builds on the device from Python lists, for
    an image of ``height`` x ``width``, computed here on the host (:data:`RA_CONSTANTS` values, zero where the op has
    none), so that a batch's reach its device in one copy that does not wait (torchvision makes a blocking copy of
    each, run after run): a geometric op's inverse affine matrix (torchvision's own function computes it) and grid
    scale, sharpness' kernel."""
    values = [0.0] * RA_CONSTANTS
    matrix: List[float] = []
    if op in ("ShearX", "ShearY"):  # (torchvision: shear by degrees(atan(magnitude)) about the corner)
        degrees = math.degrees(math.atan(magnitude))
        shear = [degrees, 0.0] if op == "ShearX" else [0.0, degrees]
        matrix = _get_inverse_affine_matrix([0.0 - width * 0.5, 0.0 - height * 0.5], 0.0, [0.0, 0.0], 1.0, shear)
    elif op in ("TranslateX", "TranslateY"):
        shift = float(int(magnitude))
        translate = [shift, 0.0] if op == "TranslateX" else [0.0, shift]
        matrix = _get_inverse_affine_matrix([0.0, 0.0], 0.0, translate, 1.0, [0.0, 0.0])
    elif op == "Rotate" and not rotation_path(op, magnitude, height, width):
        matrix = _get_inverse_affine_matrix([0.0, 0.0], -(magnitude % 360), [0.0, 0.0], 1.0, [0.0, 0.0])
    elif op == "Sharpness":
        a, b = 1.0 / 13.0, 5.0 / 13.0
        values[8:17] = [a, a, a, a, b, a, a, a, a]
    if matrix:
        values[:6] = matrix
        values[6:8] = [0.5 * width, 0.5 * height]
    return values


def rotation_path(op: str, magnitude: float, height: int, width: int) -> int:
    """Which way torchvision's ``rotate_image`` turns an image of ``height`` x ``width`` by ``magnitude`` degrees: 0
    by its matrix, 1 not at all (a copy), 2, 3, 4 by a quarter, half or three-quarter turn (0 for other ops)."""
    if op != "Rotate":
        return 0
    angle = magnitude % 360
    quarter = {90: 2, 270: 4}.get(angle, 0) if height == width else 0
    return {0: 1, 180: 3}.get(angle, quarter)


def randaugment_op(image: torch.Tensor, op: str, magnitude: float, constants: torch.Tensor,
                   path: int = 0) -> torch.Tensor:
    """torchvision's RandAugment op ``op`` (a name of its table) at ``magnitude`` on uint8 or float (..., C, H, W)
    ``image``: what its ``_apply_image_or_video_transform`` does with RandAugment's defaults (nearest interpolation,
    no fill: black), the same floats (tested op by op against it), but with the constants it would copy to the device
    given, on ``image``'s device (:func:`randaugment_constants`), and a rotation's ``path`` (:func:`rotation_path`).
    Written for TorchScript, so that :func:`randaugment_runs` runs without the GIL."""
    if op == "Identity":
        return image
    if op in ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"]:
        if path == 1:
            return image.clone()
        if path > 1:
            return torch.rot90(image, k=path - 1, dims=(-2, -1))
        return _affine(image, constants[:6].view(1, 2, 3), constants[6:8])
    if op == "Brightness":
        return F.adjust_brightness(image, brightness_factor=1.0 + magnitude)
    if op == "Color":
        return F.adjust_saturation(image, saturation_factor=1.0 + magnitude)
    if op == "Contrast":
        return F.adjust_contrast(image, contrast_factor=1.0 + magnitude)
    if op == "Sharpness":
        return _sharpen(image, 1.0 + magnitude, constants[8:17].view(3, 3))
    if op == "Posterize":
        return F.posterize(image, bits=int(magnitude))
    if op == "Solarize":  # (torchvision: the dtype's largest value times the magnitude)
        return F.solarize(image, threshold=_bound(image) * magnitude)
    if op == "AutoContrast":
        return _autocontrast(image)
    if op == "Equalize":
        return F.equalize(image)
    raise ValueError("no RandAugment op named '" + op + "'")


def _bound(image: torch.Tensor) -> float:
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise ValueError("RandAugment's ops take uint8 or float images")
    return 255.0 if image.dtype == torch.uint8 else 1.0


def _affine(image: torch.Tensor, theta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """torchvision's ``affine_image`` / ``rotate_image`` from the inverse matrix ``theta`` (1, 2, 3) and grid scale
    (2,) on the image's device: its ``_affine_grid`` (an image-sized grid) and ``_apply_grid_transform`` (nearest, no
    fill)."""
    height, width = image.shape[-2], image.shape[-1]
    dtype = image.dtype if image.is_floating_point() else torch.float32
    theta = theta.to(dtype)
    base_grid = torch.empty(1, height, width, 3, dtype=dtype, device=image.device)
    base_grid[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=image.device))
    base_grid[..., 1].copy_(torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height,
                                           device=image.device).unsqueeze_(-1))
    base_grid[..., 2].fill_(1)
    rescaled_theta = theta.transpose(1, 2).div(scale.to(dtype))
    grid = base_grid.view(1, height * width, 3).bmm(rescaled_theta).view(1, height, width, 2)
    return _apply_grid_transform(image, grid, "nearest", None)


def _sharpen(image: torch.Tensor, factor: float, kernel: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_sharpness_image`` with its 3x3 smoothing ``kernel`` given on the image's device."""
    channels, height, width = image.shape[-3], image.shape[-2], image.shape[-1]
    if image.numel() == 0 or height <= 2 or width <= 2:
        return image
    bound, fp, shape = _bound(image), image.is_floating_point(), image.shape
    image = image.reshape(-1, channels, height, width)
    kernel_dtype = image.dtype if fp else torch.float32
    output = image.to(dtype=kernel_dtype, copy=True)
    blurred = torch.nn.functional.conv2d(output, kernel.to(kernel_dtype).expand(channels, 1, 3, 3), groups=channels)
    if not fp:
        blurred = blurred.round_()
    view = output[..., 1:-1, 1:-1]
    view.add_(blurred.sub_(view), alpha=(1.0 - factor))
    output = output.clamp_(0, bound)
    return (output if fp else output.to(image.dtype)).reshape(shape)


def _autocontrast(image: torch.Tensor) -> torch.Tensor:
    """torchvision's ``autocontrast_image`` (the same floats), with its two scalar fills as selections: in TorchScript
    each fill would make a 0-dim tensor on the device, a copy that waits for it (tested against torchvision's op)."""
    bound = _bound(image)
    float_image = image if image.is_floating_point() else image.to(torch.float32)
    minimum = float_image.amin(dim=(-2, -1), keepdim=True)
    maximum = float_image.amax(dim=(-2, -1), keepdim=True)
    flat = maximum == minimum
    inv_scale = torch.where(flat, 1.0, maximum.sub_(minimum).mul_(1.0 / bound))
    minimum = torch.where(flat, 0.0, minimum)
    diff = float_image.sub(minimum) if image.is_floating_point() else float_image.sub_(minimum)
    return diff.div_(inv_scale).clamp_(0, bound).to(image.dtype)


def randaugment_runs(images: torch.Tensor, runs: List[Tuple[int, int, str, float, int]],
                     constants: torch.Tensor) -> torch.Tensor:
    """RandAugment's ops on runs of a batch, in place: run k = (first, stop, op, magnitude, path) applies
    :func:`randaugment_op` with ``constants[k]`` to ``images[first:stop]`` (torchvision's ops treat a batch image by
    image). Written for TorchScript: one call, without the GIL, for all the runs of an op slot."""
    for k, (first, stop, op, magnitude, path) in enumerate(runs):
        part = images[first:stop]
        part.copy_(randaugment_op(part, op, magnitude, constants[k], path))
    return images


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


@dataclass
class AugmentPipeline:
    """Transforms in stage order: geometry and colour on uint8 -> [0, 1] float (erasing) -> normalise -> mixing.

    Without a crop transform the geometry is the evaluation center crop (the output spec's ``crop_pct``)."""

    transforms: List[ReplayableTransform] = field(default_factory=list)

    def __post_init__(self):
        stages = [STAGES.index(t.stage) for t in self.transforms]
        if stages != sorted(stages):
            raise ValueError(f"transforms must come in stage order {STAGES}: got {[(t.name, t.stage) for t in self.transforms]}")

    # -- description -------------------------------------------------------------------------------
    def get(self, name: str) -> Optional[ReplayableTransform]:
        return next((t for t in self.transforms if t.name == name), None)

    def stage(self, stage: str) -> List[ReplayableTransform]:
        return [t for t in self.transforms if t.stage == stage]

    @property
    def mix(self) -> Optional[MixUpCutMix]:
        return next(iter(self.stage("mixing")), None)  # type: ignore[return-value]

    @property
    def group_size(self) -> int:
        return self.mix.group_size if self.mix else 1

    def without_mixing(self) -> "AugmentPipeline":
        return AugmentPipeline([t for t in self.transforms if t.stage != "mixing"])

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
                                 "was it written by another dr-hf version?")
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
        for kind in TRANSFORMS.values():
            probe = kind()
            if set(probe.fields) <= fields:
                transforms.append(probe)
                fields -= set(probe.fields)
        if fields:
            raise ValueError(f"dr_params has field(s) {sorted(fields)} that this dr-hf does not know; was it written by "
                             "another dr-hf version?")
        return cls(transforms)

    # -- sampling ----------------------------------------------------------------------------------
    def sample(self, seed: int, index: int, n: int, ctx: Context) -> Dict[str, np.ndarray]:
        """Parameters of samples 0..n-1 of row ``index``, in the stored layout (each field an (n, ...) array of its
        dtype; :func:`params_at` picks one sample). Sample j is a pure function of (seed, index, j) and the image size
        (:class:`Draws`); mixing also looks at whether the drawn partner exists, so only rows of a split's last,
        partial group differ, and draws the partner's sample index below ``ctx.num_samples``."""
        draws = Draws(seed, index, n)
        params: Dict[str, np.ndarray] = {}
        for t in self.transforms:
            params.update(t.sample(draws, ctx))
        return params

    # -- applying ----------------------------------------------------------------------------------
    @property
    def renders_uint8(self) -> bool:
        """Whether ``render(..., normalise=False)`` can stop before normalisation: no mixing, and a float stage (if
        any) that only erases to black, which is the same on uint8 pixels."""
        return self.mix is None and all(isinstance(t, RandomErasing) and t.value == 0.0 for t in self.stage("float"))

    def render(self, image: torch.Tensor, params: Dict[str, Any], out: InputSpec,
               into: Optional[torch.Tensor] = None, normalise: bool = True) -> torch.Tensor:
        """Everything but mixing: a uint8 CHW image -> a normalised float CHW tensor at ``out.size`` (written into
        ``into`` when given, e.g. a slot of a batch, which saves an allocation and a copy). ``normalise=False``
        (pipelines that :attr:`renders_uint8`): the uint8 pixels, which :func:`normalise_pixels` turns into the same floats."""
        x = image
        if not any(t.resizes for t in self.transforms):
            x = CenterCrop().apply(x, {}, out)
        for t in self.stage("geometry") + self.stage("colour"):
            x = t.apply(x, params, out)
        floats = self.stage("float")
        if not normalise:
            if not self.renders_uint8:
                raise ValueError("this pipeline cannot stop before normalisation (it mixes, or its float stage does "
                                 "more than erase to black)")
            for t in floats:
                x = t.apply(x, params, out)
            return into.copy_(x) if into is not None else x.contiguous()
        if not floats:
            return normalise_pixels(x, out, self, into)
        x = F.to_dtype(x.contiguous(), torch.float32, scale=True)
        for t in floats:
            x = t.apply(x, params, out)
        x = normalize(x, out)
        return into.copy_(x) if into is not None else x

    def crops_in_batches(self, out: InputSpec) -> bool:
        """Whether :meth:`crop_views` can render this pipeline's geometry stage for ``out``: a RandomResizedCrop
        (then optionally a flip) with bilinear or bicubic resizing."""
        geometry = [type(t) for t in self.stage("geometry")]
        return geometry in ([RandomResizedCrop], [RandomResizedCrop, HorizontalFlip]) and out.interpolation in FILTERS

    def crop_views(self, images: Sequence[torch.Tensor], row_params: Sequence[Mapping[str, Any]],
                   picks: Sequence[Tuple[int, int]], out: InputSpec, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The geometry stage of samples ``picks`` = [(row, sample index), ...] at once (pipelines that
        :meth:`crops_in_batches`): (len(picks), 3, *out.size) uint8 (written into ``into`` when given), by batched
        matrix products (:mod:`dr_hf.resample`); the same pixels as :meth:`render`'s per-sample crop on the same
        device's float path, within one grey level."""
        owners = np.array([r for r, _ in picks], dtype=np.int64)
        stored = gather(row_params, picks, ["crop", "flip"] if self.get("horizontal_flip") is not None else ["crop"])
        boxes = np.zeros((len(picks), 4), dtype=np.int64)
        for r, a, b in runs(owners):
            boxes[a:b] = boxes_to_pixels(stored["crop"][a:b], *images[r].shape[-2:])
        return resized_crops(images, boxes, stored.get("flip"), out.size, out.interpolation, owners=owners, into=into)

    def render_samples(self, images: Sequence[torch.Tensor], row_params: Sequence[Mapping[str, Any]],
                       picks: Sequence[Tuple[int, int]], out: InputSpec,
                       into: Optional[torch.Tensor] = None, normalise: bool = True,
                       batched: Optional[bool] = None) -> torch.Tensor:
        """The rendered, mixed samples ``picks`` = [(row, sample index), ...] of a group of rows: (len(picks), 3, H, W).

        ``row_params[r]``: row r's stored parameters (each field (N, ...), as a dataset row's ``dr_params`` holds them);
        a mixed sample's partner (``row + mix_partner``, at sample ``mix_sample``) must be one of ``images``. Each
        (row, sample) is rendered once, straight into the batch where it is not mixed (``into``: that batch, e.g. rows
        of a larger one). The same code runs on CPU and CUDA tensors: the batch lives where the images do.

        ``batched`` (default: on CUDA tensors; pipelines that :meth:`crops_in_batches`): every stage runs on the whole
        batch at once, as a GPU needs (per-sample kernels would leave it waiting on launches): crops by batched matrix
        products (:meth:`crop_views`), RandAugment op by op, RandomErasing and MixUp/CutMix by masks, normalisation in
        one pass. After the crop, each stage gives what it gives one sample at a time (tested). On a CPU, one sample at
        a time is faster, as each stays in cache through all its stages: ``Reinforcer.compute`` with the tiny ViT on
        32 ImageNet rows at N=64, one thread, ran ``imagenet+rare`` at 258 samples/s with the stages after the crop
        batched against 420 one sample at a time (``imagenet+rrc``: 1,980 against 2,250)."""
        batch = into if into is not None else empty_batch(
            len(picks), out.size, torch.float32 if normalise else torch.uint8, images[0].device if len(images) else None)
        if not normalise and not self.renders_uint8:
            raise ValueError("this pipeline cannot stop before normalisation (it mixes, or its float stage does "
                             "more than erase to black)")
        if batched is None:
            batched = len(images) > 0 and images[0].is_cuda
        if batched and self.crops_in_batches(out):
            return self._render_batched(images, row_params, picks, out, batch, normalise) if picks else batch
        mix = self.mix
        cache: Dict[Tuple[int, int], torch.Tensor] = {}

        def base(r: int, j: int, into: Optional[torch.Tensor] = None, p: Optional[Dict[str, Any]] = None) -> torch.Tensor:
            if (r, j) not in cache:
                cache[(r, j)] = self.render(images[r], params_at(row_params[r], j) if p is None else p, out, into,
                                            normalise)
            elif into is not None:
                into.copy_(cache[(r, j)])
            return cache[(r, j)]

        for k, (r, j) in enumerate(picks):
            p = params_at(row_params[r], j)
            if mix is None or not mix.is_mixed(p):
                base(r, j, batch[k], p)
                continue
            partner = r + int(p["mix_partner"])
            if not 0 <= partner < len(images):
                self._check_partners(np.array([r]), np.array([partner]), np.array([j]), len(images))
            batch[k] = mix.apply_mix(base(r, j), base(partner, int(p["mix_sample"])), p)
        return batch

    @staticmethod
    def _check_partners(rows: np.ndarray, partners: np.ndarray, samples: np.ndarray, count: int) -> None:
        outside = np.flatnonzero((partners < 0) | (partners >= count))
        if outside.size:
            k = outside[0]
            raise ValueError(f"sample {samples[k]} of row {rows[k]} of the group is mixed with row {partners[k]}, which "
                             "is not in the group; feed mixing datasets whole groups of rows")

    def _render_batched(self, images, row_params, picks, out, batch, normalise) -> torch.Tensor:
        """:meth:`render_samples`'s batched path: each stage once over all the (row, sample) views the picks need."""
        mix = self.mix
        if mix is None and not self.stage("colour") and not self.stage("float"):  # crop straight into the batch
            pixels = batch if not normalise else torch.empty_like(batch, dtype=torch.uint8)  # in the batch's layout
            self.crop_views(images, row_params, picks, out, into=pixels)
            return normalise_pixels(pixels, out, self, batch) if normalise else batch
        keys: List[Tuple[int, int]] = list(picks)
        if mix is not None:
            mixing = gather(row_params, picks, mix.fields)
            rows = np.array([r for r, _ in picks])
            mixed = mixing["mix_partner"] != 0
            partners = rows + mixing["mix_partner"].astype(np.int64)
            self._check_partners(rows[mixed], partners[mixed], np.array([j for _, j in picks])[mixed], len(images))
            partner_keys = [(int(pr), int(s)) if m else pick
                            for pick, m, pr, s in zip(picks, mixed, partners, mixing["mix_sample"])]
            keys += partner_keys
        keys = sorted(dict.fromkeys(keys), key=lambda key: key[0])  # each view once, one run per row
        where = {key: i for i, key in enumerate(keys)}
        pixels = self.crop_views(images, row_params, keys, out)
        for t in self.stage("colour"):
            pixels = t.apply_batch(pixels, gather(row_params, keys, t.fields))
        floats = self.stage("float")
        if not normalise:  # (renders_uint8: erasing to black, the same on uint8 pixels)
            for t in floats:
                pixels = t.apply_batch(pixels, gather(row_params, keys, t.fields))
            return batch.copy_(pixels.index_select(0, to_device([where[pick] for pick in picks], pixels.device)))
        if floats:  # render's float path: to [0, 1], erase, normalise
            x = F.to_dtype(pixels, torch.float32, scale=True)
            for t in floats:
                x = t.apply_batch(x, gather(row_params, keys, t.fields))
            x = normalize(x, out)
        else:
            x = normalise_pixels(pixels, out, self)
        own = x.index_select(0, to_device([where[pick] for pick in picks], x.device))
        if mix is not None:
            partner = x.index_select(0, to_device([where[key] for key in partner_keys], x.device))
            own = mix.apply_mix_batch(own, partner, mixing)
        return batch.copy_(own)


def normalise_pixels(pixels: torch.Tensor, out: InputSpec, pipeline: "AugmentPipeline",
              into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) that ``pipeline.render(..., normalise=False)`` returned -> the floats its
    ``render`` returns, bit for bit, on the pixels' device (the trainer normalises on the GPU); ``render`` itself
    normalises through here when it has no float stage."""
    if pipeline.stage("float"):  # render's float path: to [0, 1], (erase), normalise
        return normalize(F.to_dtype(pixels, torch.float32, scale=True), out)
    # (x / 255 - mean) / std as x * scale + bias
    y = into if into is not None else torch.empty_like(pixels, dtype=torch.float32)  # in the pixels' layout
    y.copy_(pixels)
    rows = y.movedim(-3, -1)
    if rows.is_contiguous():  # channels-last: per-channel constants tiled along whole rows, so the loops vectorise
        width = y.shape[-1]
        scale, bias = _affine_normalisation(out, y.device, width)
        rows.view(-1, 3 * width).mul_(scale).add_(bias)
    else:
        scale, bias = _affine_normalisation(out, y.device)
        y.mul_(scale).add_(bias)
    return y


def empty_batch(n: int, size: Sequence[int], dtype: torch.dtype = torch.float32, device=None,
                allocate: Optional[Callable[[Sequence[int], torch.dtype], torch.Tensor]] = None) -> torch.Tensor:
    """An (n, 3, H, W) batch to render into: channels-last on the CPU, the layout of its crops (no repacking),
    contiguous elsewhere. ``allocate(size, dtype)``: where CPU memory comes from (the collators':
    :func:`~dr_hf.batch_memory.batch_empty`, a DataLoader worker's recycled shared memory)."""
    if torch.device(device or "cpu").type != "cpu":
        return torch.empty((n, 3, *size), dtype=dtype, device=device)
    height, width = size
    shape = (n, height, width, 3)
    return (torch.empty(shape, dtype=dtype) if allocate is None else allocate(shape, dtype)).permute(0, 3, 1, 2)


_NORMALISATION: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
_MEAN_STD: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def normalize(x: torch.Tensor, out: InputSpec) -> torch.Tensor:
    """``F.normalize(x, out.mean, out.std)`` (the same floats) with the constants kept on ``x``'s device: torchvision's
    makes them from lists on every call, two blocking copies to a GPU."""
    key = (out.mean, out.std, str(x.device), x.dtype)
    if key not in _MEAN_STD:
        _MEAN_STD[key] = tuple(to_device(torch.tensor(v, dtype=x.dtype).view(-1, 1, 1), x.device)
                               for v in (out.mean, out.std))
    mean, std = _MEAN_STD[key]
    return x.sub(mean).div_(std)


def _affine_normalisation(out: InputSpec, device: torch.device, tiled: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, bias) with ``x * scale + bias == (x / 255 - mean) / std``, on ``device``: shaped (3, 1, 1),
    or with ``tiled`` = W, repeated along a channels-last row of W pixels, (3 * W,)."""
    key = (out.mean, out.std, str(device), tiled)
    if key not in _NORMALISATION:
        mean, std = torch.tensor(out.mean, dtype=torch.float32), torch.tensor(out.std, dtype=torch.float32)
        scale, bias = 1.0 / (255.0 * std), -mean / std
        if tiled:
            scale, bias = scale.repeat(tiled), bias.repeat(tiled)
        else:
            scale, bias = scale[:, None, None], bias[:, None, None]
        _NORMALISATION[key] = (to_device(scale, device), to_device(bias, device))
    return _NORMALISATION[key]


def gather(row_params: Sequence[Mapping[str, Any]], picks: Sequence[Tuple[int, int]], names) -> Dict[str, np.ndarray]:
    """Fields ``names`` of the stored parameters of samples ``picks`` = [(row, sample index), ...]: each
    (len(picks), ...), one numpy lookup per run of picks of one row."""
    rows, samples = np.array(picks, dtype=np.int64).reshape(-1, 2).T
    spans = list(runs(rows))
    return {name: np.concatenate([np.asarray(row_params[r][name])[samples[a:b]] for r, a, b in spans])
            for name in names}


def params_at(row_params: Dict[str, Any], sample: int) -> Dict[str, Any]:
    """One sample's parameters out of a row's stored ``dr_params`` (fields of shape (N, ...))."""
    return {k: np.asarray(v[sample]) for k, v in row_params.items()}  # not all N samples converted to pick one


def _ml_dr(*extra: ReplayableTransform) -> AugmentPipeline:
    return AugmentPipeline([RandomResizedCrop(), HorizontalFlip(), *extra])


# Presets: the paper's ImageNet+ variants with ml-dr's constants (configs/imagenet/reinforce/*.yaml), and its
# CIFAR-100+ / Flowers-102+ / Food-101+ variant (configs/cifar100/reinforce.yaml).
PRESETS: Dict[str, Callable[[], AugmentPipeline]] = {
    "imagenet+rrc": lambda: _ml_dr(),
    "imagenet+rare": lambda: _ml_dr(RandAugment(), RandomErasing()),
    "imagenet+mix": lambda: _ml_dr(MixUpCutMix()),
    "imagenet+rare+mix": lambda: _ml_dr(RandAugment(), RandomErasing(), MixUpCutMix()),
    "cifar100+": lambda: AugmentPipeline([ResizeRandomCrop(), HorizontalFlip(), RandAugment(), RandomErasing()]),
    "rrc+flip": lambda: _ml_dr(),  # the same pipeline as imagenet+rrc, named for what it is
}
PRESET_HELP = {
    "imagenet+rrc": "ImageNet+-RRC: RandomResizedCrop + flip (light CNNs)",
    "imagenet+rare": "ImageNet+-RA/RE: + RandAugment (2 ops, magnitude 9/31) + RandomErasing (p=0.25)",
    "imagenet+mix": "ImageNet+-M*: RandomResizedCrop + flip + MixUp (alpha 1, /2, p=0.5) then CutMix (alpha 1, p=0.5)",
    "imagenet+rare+mix": "ImageNet+-RA/RE+M*: all of the above (transformers)",
    "cifar100+": "CIFAR-100+/Flowers-102+/Food-101+: resize, RandomCrop (padding 16), flip, RandAugment, RandomErasing",
    "rrc+flip": "RandomResizedCrop + flip (= imagenet+rrc)",
}


def make_pipeline(preset: str, crop_scale: Optional[float] = None, group_size: Optional[int] = None) -> AugmentPipeline:
    """A preset by name (see :data:`PRESET_HELP`). ``crop_scale`` sets RandomResizedCrop's smallest area fraction
    (default 0.08; small images such as CIFAR's 32x32 want about 0.35); ``group_size`` the rows of a MixUp/CutMix
    partner group (default 8)."""
    if preset not in PRESETS:
        raise ValueError(f"`preset` {preset!r} is not a preset; choose one of {sorted(PRESETS)}")
    pipeline = PRESETS[preset]()
    if crop_scale is not None:
        if not 0.0 < crop_scale <= 1.0:
            raise ValueError(f"`crop_scale` must be in (0, 1], got {crop_scale}")
        crop = pipeline.get("random_resized_crop")
        if crop is None:
            raise ValueError(f"`crop_scale` applies to RandomResizedCrop, which `preset` {preset!r} does not use")
        crop.scale = (float(crop_scale), 1.0)
    if group_size is not None:
        if pipeline.mix is None:
            raise ValueError(f"`group_size` applies to MixUp/CutMix partner groups, which `preset` {preset!r} does not use")
        pipeline.mix.group_size = dataclasses.replace(pipeline.mix, group_size=group_size).group_size  # checked
    return pipeline
