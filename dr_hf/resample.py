"""Many antialiased crops of one image at once: each (box, flip) as two resampling matrices, applied by two batched
matrix products. This is how the reinforce job renders on a GPU, where one small kernel per sample would leave it
waiting on launches.

The matrices hold exactly the weights of torch's antialiased ``interpolate`` (``antialias=True``, bilinear or
bicubic; the same filter, support and edge renormalisation), so a crop equals ``F.resized_crop(...,
antialias=True)`` up to float rounding: the same uint8 pixels, but for a rare half-grey-level tie. A horizontal
flip is the horizontal matrix with its rows reversed, so it costs nothing. The products run in float32, TF32 off (under the flags' lock the teacher also takes).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as tnf
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .teacher import float32_precision

FILTERS = ("bilinear", "bicubic")
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}  # half the filter width at scale 1 (torch's interp_size / 2)


def _filter(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    """torch's antialiasing filters: the triangle, and Keys' cubic with a = -0.5."""
    x = x.abs()
    if interpolation == "bilinear":
        return (1.0 - x).clamp_(min=0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resized_crop(image: torch.Tensor, top: int, left: int, height: int, width: int, size: Sequence[int],
                 interpolation: str = "bilinear") -> torch.Tensor:
    """One crop of a (C, H, W) image resized to ``size`` with antialiasing: ``F.resized_crop(..., antialias=True)``.

    On the CPU a uint8 image goes to torch's uint8 kernel as channels-last memory (decoded images are laid out so),
    and its crop comes back channels-last: the same pixels as torchvision's call, without the two repacks between
    layouts that call makes (1.3-2.5x faster for a 224-px crop)."""
    if image.device.type == "cpu" and image.dtype == torch.uint8 and image.ndim == 3 and interpolation in FILTERS:
        hwc = image[:, top:top + height, left:left + width].permute(1, 2, 0)
        if not hwc.is_contiguous():
            hwc = hwc.contiguous()
        x = hwc[None].permute(0, 3, 1, 2)  # (1, C, h, w), channels-last contiguous (the kernel's layout)
        return tnf.interpolate(x, size=tuple(size), mode=interpolation, antialias=True, align_corners=False)[0]
    return F.resized_crop(image, top, left, height, width, list(size), interpolation=InterpolationMode(interpolation),
                          antialias=True)


def resample_weights(starts: torch.Tensor, lengths: torch.Tensor, in_size: int, out_size: int,
                     interpolation: str = "bilinear") -> torch.Tensor:
    """(S, out_size, in_size) float32 matrices: row i of matrix s holds the weights with which output pixel i of the
    crop ``[starts[s], starts[s] + lengths[s])`` of an ``in_size`` axis, resized to ``out_size`` with antialiasing,
    reads each input pixel (zero outside the crop). Computed in float32, as torch's CUDA kernel computes its weights."""
    if interpolation not in FILTERS:
        raise ValueError(f"interpolation must be one of {FILTERS}, got {interpolation!r}")
    device = starts.device
    starts = starts.to(torch.float32)[:, None, None]
    lengths = lengths.to(torch.float32)[:, None, None]
    scale = lengths / out_size  # torch's area_pixel_compute_scale (align_corners=False)
    downscale = scale >= 1.0
    support = torch.where(downscale, _SUPPORT[interpolation] * scale, torch.full_like(scale, _SUPPORT[interpolation]))
    invscale = torch.where(downscale, 1.0 / scale, torch.ones_like(scale))
    center = scale * (torch.arange(out_size, device=device, dtype=torch.float32)[None, :, None] + 0.5)
    x = torch.arange(in_size, device=device, dtype=torch.float32)[None, None, :] - starts  # crop coordinates
    # torch's taps: [trunc(center - support + 0.5), trunc(center + support + 0.5)), clipped to the crop
    lo = torch.clamp(torch.trunc(center - support + 0.5), min=0.0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), lengths)
    w = _filter((x - center + 0.5) * invscale, interpolation) * ((x >= lo) & (x < hi))
    total = w.sum(-1, keepdim=True)
    return w.div_(torch.where(total == 0, torch.ones_like(total), total))


def resized_crops(image: torch.Tensor, boxes: Sequence[Tuple[int, int, int, int]], flips: Sequence[bool],
                  size: Tuple[int, int], interpolation: str = "bilinear", chunk_bytes: int = 256 << 20) -> torch.Tensor:
    """The (top, left, height, width) pixel ``boxes`` of a uint8 (3, H, W) ``image``, each resized to ``size`` with
    antialiasing and mirrored where ``flips`` says: (S, 3, *size) uint8, on the image's device (rounded and clamped
    as torchvision rounds a float resize of uint8 pixels)."""
    height, width = image.shape[-2:]
    device = image.device
    box = torch.tensor([list(b) for b in boxes], dtype=torch.int64).reshape(-1, 4).to(device)
    wy = resample_weights(box[:, 0], box[:, 2], height, size[0], interpolation)
    wx = resample_weights(box[:, 1], box[:, 3], width, size[1], interpolation)
    flip = torch.tensor([bool(f) for f in flips], dtype=torch.bool).to(device)
    wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    channels = image.shape[0]
    pixels = image.to(torch.float32).reshape(channels * height, width)
    out = torch.empty((len(box), channels, *size), dtype=torch.uint8, device=device)
    per_sample = 4 * channels * height * size[1]  # the horizontal pass's output, the largest intermediate
    step = max(1, chunk_bytes // per_sample)
    with float32_precision(tf32=False):
        for a in range(0, len(box), step):
            s = len(wx[a:a + step])
            # horizontal pass, one matrix product for all s crops: (3H, W) @ (W, s * out_w)
            rows = pixels @ wx[a:a + step].permute(2, 0, 1).reshape(width, s * size[1])
            rows = rows.view(channels, height, s, size[1]).permute(2, 1, 0, 3).reshape(s, height, channels * size[1])
            # vertical pass, one batched product: (s, out_h, H) @ (s, H, 3 * out_w)
            crops = torch.bmm(wy[a:a + step], rows).view(s, size[0], channels, size[1]).permute(0, 2, 1, 3)
            out[a:a + step] = crops.round_().clamp_(0, 255)
    return out
