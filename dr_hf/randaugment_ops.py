"""torchvision's RandAugment ops, batched and on any device: the same floats as its ``_apply_image_or_video_transform``
(tested op by op), with the constants it would copy to the device computed on the host and passed in, and written
for TorchScript, so that a batch's runs of one op go through one call without the GIL
(:meth:`dr_hf.augment.RandAugment.apply_batch`)."""

from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F
# torchvision's own helpers for its affine kernels, so that RandAugment's geometric ops give its exact floats
from torchvision.transforms.v2.functional._geometry import _apply_grid_transform, _get_inverse_affine_matrix


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
