"""Many antialiased crops at once: each (box, flip) as two resampling matrices, applied by two batched matrix
products over a window of its image that holds the box (boxes of similar size share a window size). This is how the
reinforce job renders on a GPU, where one small kernel per sample would leave it waiting on launches.

The matrices hold exactly the weights of torch's antialiased ``interpolate`` (``antialias=True``, bilinear or
bicubic; the same filter, support and edge renormalisation), so a crop equals ``F.resized_crop(...,
antialias=True)`` up to float rounding: the same uint8 pixels, but for a rare half-grey-level tie. A horizontal
flip is the horizontal matrix with its rows reversed, so it costs nothing. The float32 products follow torch's TF32
flag and write no flag (a render thread beside a teacher or a training step must not: on torch >= 2.9 a reader
between the two halves of a legacy flag write raises). The reinforce job sets the flag from its teachers' precision
(:meth:`dr_hf.teacher.TeacherEnsemble.float32_flags`: on for tf32 and bf16 teachers); with TF32, as on an H100, the crops
differ from float32's on about 2.4% of pixels by one grey level, and from the per-sample crops training replays on the
CPU by 0.174 grey levels on average instead of 0.171 (``tests/test_resample.py``).

The host plans a call's groups with numpy; its tensor work, a few hundred ops for a teacher batch, runs as one
TorchScript call (:func:`crop_windows`, :mod:`dr_hf.script`), without the GIL, which a render thread shares with
threads that hold it.
"""

from __future__ import annotations

import math
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as tnf
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from . import script
from .transfer import to_device

FILTERS = ("bilinear", "bicubic")


def _support(interpolation: str) -> float:
    """Half the filter's width at scale 1 (torch's interp_size / 2)."""
    return 1.0 if interpolation == "bilinear" else 2.0


def _filter(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    """torch's antialiasing filters: the triangle, and Keys' cubic with a = -0.5."""
    x = x.abs()
    if interpolation == "bilinear":
        return (1.0 - x).clamp_(min=0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, 0.0))


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
                     interpolation: str = "bilinear", flips: Optional[torch.Tensor] = None,
                     max_length: Optional[int] = None) -> torch.Tensor:
    """(S, out_size, in_size) float32 matrices: row i of matrix s holds the weights with which output pixel i of the
    crop ``[starts[s], starts[s] + lengths[s])`` of an ``in_size`` axis, resized to ``out_size`` with antialiasing,
    reads each input pixel (zero outside the crop); rows reversed where ``flips[s]`` (a mirrored crop). Computed in
    float32, as torch's CUDA kernel computes its weights.

    Only each output pixel's taps are computed (at most ``2 * support + 1`` of them, ``support`` the filter's half
    width at the largest crop's scale: ``max_length``, at least the longest of ``lengths``, which it defaults to), then
    scattered into the zero matrix: the work per matrix falls from ``out_size * in_size`` to ``out_size * taps``."""
    if interpolation not in ["bilinear", "bicubic"]:  # (FILTERS; TorchScript reads no global tuple)
        raise ValueError("interpolation must be one of ('bilinear', 'bicubic'), got '" + interpolation + "'")
    device = starts.device
    if max_length is None:  # (a sync on a GPU: resized_crops passes it from the host's boxes)
        max_length = int(lengths.max()) if len(lengths) else 1
    taps = int(math.ceil(2.0 * _support(interpolation) * max(1.0, max_length / out_size))) + 1
    starts = starts.to(torch.float32).view(-1, 1, 1)
    lengths = lengths.to(torch.float32).view(-1, 1, 1)
    scale = lengths / out_size  # torch's area_pixel_compute_scale (align_corners=False)
    downscale = scale >= 1.0
    support = torch.where(downscale, _support(interpolation) * scale, _support(interpolation))
    invscale = torch.where(downscale, 1.0 / scale, 1.0)
    center = scale * (torch.arange(out_size, device=device, dtype=torch.float32).view(1, -1, 1) + 0.5)
    # torch's taps: [trunc(center - support + 0.5), trunc(center + support + 0.5)), clipped to the crop
    lo = torch.clamp(torch.trunc(center - support + 0.5), min=0.0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), lengths)
    x = lo + torch.arange(taps, device=device, dtype=torch.float32)  # (S, out, taps): crop coordinates
    w = _filter((x - center + 0.5) * invscale, interpolation) * (x < hi)
    total = w.sum(-1, keepdim=True)
    w = w.div_(torch.where(total == 0, 1.0, total))
    column = (x + starts).to(torch.int64)  # < in_size + taps: past-the-end taps (weight 0) land in the padding
    if flips is not None:
        mirrored = flips.to(torch.bool).view(-1, 1, 1)
        w, column = torch.where(mirrored, w.flip(1), w), torch.where(mirrored, column.flip(1), column)
    matrix = torch.zeros((len(w), out_size, in_size + taps), dtype=torch.float32, device=device)
    return matrix.scatter_(2, column, w).narrow(2, 0, in_size)


def resized_crops(images, boxes, flips, size: Tuple[int, int], interpolation: str = "bilinear",
                  owners: Optional[Sequence[int]] = None, chunk_bytes: int = 256 << 20,
                  into: Optional[torch.Tensor] = None, group_size: int = 32) -> torch.Tensor:
    """Many antialiased crops at once: the (top, left, height, width) pixel ``boxes`` ((S, 4) integers) of uint8
    (3, H, W) ``images`` (one image, or a list: box s crops ``images[owners[s]]``), each resized to ``size`` and
    mirrored where ``flips`` ((S,), or ``None``: none) says: (S, 3, *size) uint8 on the images' device (written into
    ``into`` when given; rounded and clamped as torchvision rounds a float resize of uint8 pixels).

    Boxes are taken in groups of up to ``group_size`` of similar size (whatever their images): each box's window, a
    group's largest height by its largest width, is cut out of its image, and the group's crops are two batched
    matrix products over those windows, so the products' length is the group's crop size, not the image's (1.6x fewer
    multiply-adds than over whole images for RandomResizedCrop's boxes). All matrices, both axes', are computed in
    one call (for a square output), and boxes, flips and windows reach the device in one transfer: the kernel
    launches per box fall with S, which is what a GPU job's host has time for. A group's float windows and products
    stay under ``chunk_bytes``, and so do the float crops, which are rounded and placed together: up to
    ``chunk_bytes`` of them at once (every crop of a teacher batch of 256 at 224 px), not group by group.

    The host plans the groups with numpy; the tensor work, a few hundred ops a teacher batch, runs as one TorchScript
    call without the GIL (:func:`crop_windows`, :mod:`dr_hf.script`)."""
    images = [images] if isinstance(images, torch.Tensor) else list(images)
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    flips = np.zeros(len(boxes), dtype=np.int64) if flips is None else np.asarray(flips, dtype=np.int64).reshape(-1)
    owners = np.zeros(len(boxes), dtype=np.int64) if owners is None else np.asarray(owners, dtype=np.int64)
    device = images[0].device
    channels = images[0].shape[0]
    out = into if into is not None else torch.empty((len(boxes), channels, *size), dtype=torch.uint8, device=device)
    if interpolation not in FILTERS:
        raise ValueError(f"interpolation must be one of {FILTERS}, got {interpolation!r}")
    if not len(boxes):
        return out
    height, width = max(im.shape[-2] for im in images), max(im.shape[-1] for im in images)
    order, groups = crop_groups(boxes, group_size, chunk_bytes // (4 * channels), size[1])
    window = np.zeros((len(boxes), 2), dtype=np.int64)  # each box's window: its group's (height, width)
    for a, b, tall, wide in groups:
        window[order[a:b]] = tall, wide
    origin = np.minimum(boxes[:, :2], [height, width] - window)  # each window's (top, left), inside the padded images
    first_row = owners * height + origin[:, 0]
    # each matrix's crop in its window: the vertical ones', then the horizontal ones' (only those mirror)
    table = np.stack([(boxes[:, :2] - origin)[order].T.ravel(), boxes[order][:, 2:].T.ravel(),
                      np.concatenate([np.zeros_like(flips), flips[order]])])
    # each group's window rows (in the table of all images' rows) and window columns, a run a group
    lines = [(first_row[order[a:b], None] + np.arange(tall)).ravel() for a, b, tall, _ in groups]
    columns = [(origin[order[a:b], 1, None] + np.arange(wide)).ravel() for a, b, _, wide in groups]
    sent = to_device(np.concatenate([table.ravel(), order, *lines, *columns]), device)
    # the float crops gather in a buffer of up to chunk_bytes (at least a group's)
    span = max(chunk_bytes // (4 * channels * size[0] * size[1]), max(b - a for a, b, _, _ in groups))
    plan = CropPlan(sent, [table.size, len(order), *map(len, lines), *map(len, columns)], groups,
                    (int(window[:, 0].max()), int(window[:, 1].max())), (int(boxes[:, 2].max()), int(boxes[:, 3].max())),
                    (height, width), span)
    return script.call(crop_windows, images, plan, list(size), interpolation, out)


class CropPlan(NamedTuple):
    """What the host's numpy planning of :func:`resized_crops` hands to :func:`crop_windows`: ``sent``, on the images'
    device, holds the split ``sizes`` of [the matrices' (start, length, flip) table, each sorted box's slot, each
    group's window rows, each group's window columns]; ``groups`` (first, stop, height, width) in sorted boxes;
    ``window`` the longest window (height, width); ``longest`` box (height, width); ``padded`` image (height, width);
    ``span`` float crops placed at once."""
    sent: torch.Tensor
    sizes: List[int]
    groups: List[Tuple[int, int, int, int]]
    window: Tuple[int, int]
    longest: Tuple[int, int]
    padded: Tuple[int, int]
    span: int


def crop_windows(images: List[torch.Tensor], plan: CropPlan, size: List[int], interpolation: str,
                 out: torch.Tensor) -> torch.Tensor:
    """:func:`resized_crops`' tensor work on its plan: every box's matrices, the images as one padded table of rows,
    then per group the windows' cut and two batched products; the float crops rounded and placed into ``out``. Written
    for TorchScript (no numpy, typed)."""
    channels = images[0].shape[0]
    device = images[0].device
    parts = plan.sent.split(plan.sizes)
    s, n = plan.sizes[1], len(plan.groups)
    starts, lengths, flip = parts[0].view(3, 2 * s).unbind(0)
    slot, lines, columns = parts[1], parts[2:2 + n], parts[2 + n:]
    window_h, window_w = plan.window
    # every box's matrices at once, over the longest window (a group's windows are a prefix of it): both axes in one
    # call where the output is square (the kernel launches per call are what a GPU job's host pays)
    if size[0] == size[1]:
        both = resample_weights(starts, lengths, max(window_h, window_w), size[0], interpolation, flips=flip,
                                max_length=max(plan.longest))
        wy, wx = both[:s], both[s:]
    else:
        wy = resample_weights(starts[:s], lengths[:s], window_h, size[0], interpolation, max_length=plan.longest[0])
        wx = resample_weights(starts[s:], lengths[s:], window_w, size[1], interpolation, flips=flip[s:],
                              max_length=plan.longest[1])
    # the images as one uint8 table of (R * H) rows of C * W values, padded to the largest (windows read padding with
    # weight 0; uint8 is finite, whatever the memory held)
    height, width = plan.padded
    pixels = torch.empty((len(images), height, channels, width), dtype=torch.uint8, device=device)
    for r, image in enumerate(images):
        pixels[r].narrow(0, 0, image.shape[-2]).narrow(2, 0, image.shape[-1]).copy_(image.permute(1, 0, 2))
    pixels = pixels.view(len(images) * height, channels * width)
    # the groups' float crops gather in one buffer (in the boxes' sorted order) and are rounded, converted and placed
    # together, once the buffer is full or the call ends: per group, only the cut and the two products
    done = torch.empty((min(plan.span, s), size[0], channels, size[1]), dtype=torch.float32, device=device)
    first = 0  # the first sorted box not yet placed
    for k, (a, b, tall, wide) in enumerate(plan.groups):
        if b - first > done.shape[0]:
            _place(done, slot, first, a, out)
            first = a
        g = b - a
        cut = pixels.index_select(0, lines[k]).view(g, tall, channels, width)
        cut = cut.gather(3, columns[k].view(g, 1, 1, wide).expand(g, tall, channels, wide))  # the windows
        # horizontal pass: (g, tall * C, wide) @ (g, wide, out_w); vertical: (g, out_h, tall) @ (g, tall, C * out_w)
        across = torch.bmm(cut.view(g, tall * channels, wide).to(torch.float32), wx[a:b].narrow(2, 0, wide).transpose(1, 2))
        torch.bmm(wy[a:b].narrow(2, 0, tall), across.view(g, tall, channels * size[1]),
                  out=done[a - first:b - first].view(g, size[0], channels * size[1]))
    _place(done, slot, first, s, out)
    return out


def _place(done: torch.Tensor, slot: torch.Tensor, first: int, stop: int, out: torch.Tensor) -> None:
    """Sorted boxes [first, stop), whose float crops ``done`` holds from its start: rounded as torchvision rounds, to
    their places ``slot`` in ``out``."""
    crops = done[:stop - first].permute(0, 2, 1, 3).round_().clamp_(0, 255)
    out.index_copy_(0, slot[first:stop], crops.to(torch.uint8))


def crop_groups(boxes: np.ndarray, group_size: int, max_values: int, out_width: int
                ) -> Tuple[np.ndarray, List[Tuple[int, int, int, int]]]:
    """How :func:`resized_crops` groups (top, left, height, width) ``boxes``: (order, groups), ``order`` the boxes by
    their longer side and each group (a, b, height, width): boxes ``order[a:b]`` and their window, the group's largest
    height and width. A group ends at ``group_size`` boxes, or before its windows or horizontal pass (``max(width,
    out_width)`` values a window row) would hold more than ``max_values`` values (one box at least)."""
    order = np.argsort(np.maximum(boxes[:, 2], boxes[:, 3]), kind="stable")
    heights, widths = boxes[order, 2], boxes[order, 3]
    groups, start = [], 0
    while start < len(order):  # a few numpy calls a group, not a Python step a box (a GPU job's host runs this)
        tall = np.maximum.accumulate(heights[start:start + group_size])
        wide = np.maximum.accumulate(widths[start:start + group_size])
        over = np.arange(1, len(tall) + 1) * tall * np.maximum(wide, out_width) > max_values
        over[0] = False
        size = int(np.argmax(over)) if over.any() else len(tall)
        groups.append((start, start + size, int(tall[size - 1]), int(wide[size - 1])))
        start += size
    return order, groups


def runs(values: Sequence[int]) -> Iterator[Tuple[int, int, int]]:
    """(value, start, stop) of each run of equal consecutive ``values``."""
    values = np.asarray(values)
    if not values.size:
        return
    bounds = np.concatenate([[0], np.flatnonzero(values[1:] != values[:-1]) + 1, [values.size]])
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        yield int(values[start]), start, stop
