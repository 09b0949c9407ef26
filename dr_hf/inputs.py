"""What an image model expects as input, and the one resolver that finds it for teachers and students alike.

:class:`InputSpec` is the size, center-crop fraction, mean/std and interpolation of a model's input.
:func:`resolve_input_spec` reads it, in order, from explicit arguments, from a ``processing_class`` (any
``transformers`` image processor), then from the model (timm's ``pretrained_cfg``, or a ``transformers`` config);
a clear error names what to pass where none of them says the size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATION_NAMES = ("nearest", "bilinear", "bicubic")
CROP_MODES = ("center", "squash")
# PIL resample codes: 0 NEAREST, 1 LANCZOS, 2 BILINEAR, 3 BICUBIC, 4 BOX, 5 HAMMING (the last three mapped to the
# closest mode torch tensors support)
_PIL_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}


@dataclass(frozen=True)
class InputSpec:
    """A model's input: ``size`` (h, w), ``mean``/``std`` of the normalisation, the resize ``interpolation``
    (``nearest``, ``bilinear`` or ``bicubic``), and its evaluation view: the central ``crop_pct`` of the image,
    a square of the shorter side (``crop_mode="center"``) or the whole image's aspect (``"squash"``, as timm's
    crop mode and a processor that resizes to a height and width), resized to ``size``."""

    size: Tuple[int, int]
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATION_NAMES:
            raise ValueError(f"interpolation must be one of {INTERPOLATION_NAMES}, got {self.interpolation!r}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"image size must be (height, width) >= 1, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"image mean/std must have 3 values each (std > 0), got {self.mean} / {self.std}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")


def _pair(size: Any) -> Optional[Tuple[int, int]]:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    if not isinstance(size, (list, tuple)):  # a dict, or transformers' SizeDict
        size = dict(size) if isinstance(size, dict) else {k: getattr(size, k, None) for k in ("height", "width", "shortest_edge")}
        if size.get("height") and size.get("width"):
            return (int(size["height"]), int(size["width"]))
        if size.get("shortest_edge"):
            return (int(size["shortest_edge"]),) * 2
        return None
    size = tuple(int(s) for s in size)
    return size[-2:] if len(size) >= 2 else (size[0], size[0]) if size else None


def from_timm_data_config(cfg: dict) -> dict:
    """What timm's data config says (``timm.data.resolve_model_data_config``: input size, mean/std, interpolation,
    evaluation crop)."""
    found = dict(size=tuple(cfg["input_size"][1:]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    if cfg.get("interpolation") in INTERPOLATION_NAMES:
        found["interpolation"] = cfg["interpolation"]
    if cfg.get("crop_pct"):
        found["crop_pct"] = float(cfg["crop_pct"])
    if cfg.get("crop_mode") in CROP_MODES:  # timm's third, "border", pads: its central crop is the nearest here
        found["crop_mode"] = cfg["crop_mode"]
    return found


def from_processor(processor: Any) -> dict:
    """What a ``transformers`` image processor says (the keys it sets, nothing else)."""
    found: dict = {}
    if processor is None:
        return found
    processor = getattr(processor, "image_processor", processor)  # a multimodal processor wraps one
    data_config = getattr(processor, "data_config", None)  # a timm model's processor (TimmWrapperImageProcessor)
    if isinstance(data_config, dict) and data_config.get("input_size"):
        return from_timm_data_config(data_config)
    size = _pair(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
    size = size or _pair(getattr(processor, "size", None))
    if size:
        found["size"] = size
    if getattr(processor, "image_mean", None) is not None and getattr(processor, "do_normalize", True):
        found["mean"] = tuple(float(v) for v in processor.image_mean)
        found["std"] = tuple(float(v) for v in processor.image_std)
    elif getattr(processor, "do_normalize", True) is False:
        found["mean"], found["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    applied = _applied_normalisation(processor)
    if applied is not None and not _close(applied, (found.get("mean"), found.get("std"))):
        found["mean"], found["std"] = applied  # what it does differs from what its attributes say
    resample = getattr(processor, "resample", None)
    if resample is not None:
        found["interpolation"] = _PIL_RESAMPLE.get(int(getattr(resample, "value", resample)), "bilinear")
    if size:
        found["crop_pct"], found["crop_mode"] = _evaluation_view(processor)
    return found


def _applied_normalisation(processor: Any) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """(mean, std) such that ``(x / 255 - mean) / std`` is what ``processor`` makes of pixel value ``x``, read off
    its own output for a black and a white image (each channel's value at the center): every rescale, offset and
    normalisation it applies, as it applies them (EfficientNet's processor, with ``include_top``, divides by its std
    a second time; ``rescale_offset``, ``do_rescale=False``, another ``rescale_factor``). ``None`` where it cannot
    process such an image or its output does not grow with the pixel value. (Float32 noise is rounded off: 6
    significant digits.)"""
    import numpy as np
    import PIL.Image

    try:
        centers = []
        for value in (0, 255):
            pixels = processor(images=PIL.Image.new("RGB", (64, 64), (value,) * 3), return_tensors="pt")["pixel_values"]
            pixels = np.asarray(pixels[0], dtype=np.float64)
            centers.append(pixels[:, pixels.shape[1] // 2, pixels.shape[2] // 2])
    except Exception:  # (a processor for other inputs: its attributes say what there is to say)
        return None
    scale = (centers[1] - centers[0]) / 255.0  # each channel: out = scale * x + offset
    if centers[0].shape != (3,) or not (scale > 0).all():
        return None
    std = 1.0 / (255.0 * scale)
    return tuple(float(f"{v:.6g}") for v in -centers[0] * std), tuple(float(f"{v:.6g}") for v in std)


def _close(a, b, rel: float = 1e-4) -> bool:
    """Whether (mean, std) pairs ``a`` and ``b`` are the same normalisation (``b``'s parts may be ``None``)."""
    return all(y is not None and all(abs(u - v) <= rel * max(abs(u), abs(v), 1e-3) for u, v in zip(x, y))
               for x, y in zip(a, b))


def _evaluation_view(processor: Any) -> Tuple[float, str]:
    """``(crop_pct, crop_mode)`` of the processor's own evaluation view: resized to ``size`` (a height and width
    squash the image, a ``shortest_edge`` keeps its aspect), then center-cropped to ``crop_size`` or by
    ``crop_pct``, or not cropped."""
    name = type(processor).__name__
    size = getattr(processor, "size", None)
    resized = _pair(size)
    shortest = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    if name.startswith("ConvNext") and resized and resized[0] >= 384:
        return 1.0, "squash"  # ConvNeXt's processor warps to `size` from 384 px on, whatever its crop_pct
    mode = "squash" if resized and not shortest else "center"
    if getattr(processor, "crop_pct", None):
        return float(processor.crop_pct), mode
    if name.startswith("Levit") and resized:
        resized = (int(256 / 224 * resized[0]),) * 2  # LeViT's resize takes `shortest_edge` as 256/224 of it
    cropped = _pair(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
    return (min(1.0, cropped[0] / resized[0]) if cropped and resized else 1.0), mode


def is_timm_model(model: Any) -> bool:
    """Whether ``model`` is a timm model: it carries timm's ``pretrained_cfg`` (``timm.create_model`` sets it) and no
    ``transformers`` config."""
    return hasattr(model, "pretrained_cfg") and getattr(model, "config", None) is None


def fixed_input_size(model: Any) -> Optional[Tuple[int, int]]:
    """The one input size a timm model built for another than its ``pretrained_cfg``'s takes: a ViT's (and the other
    patch-embedding models') ``create_model(..., img_size=384)``, whose ``pretrained_cfg`` (and so timm's own data
    config) still says 224; ``None`` for a model that takes any size."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is None or not getattr(embed, "strict_img_size", False) or getattr(embed, "dynamic_img_size", False):
        return None
    return _pair(size)


def from_model(model: Any) -> dict:
    """What a timm model (``pretrained_cfg``), a ``transformers`` ``TimmWrapper`` model (the timm ``pretrained_cfg``
    in its config) or another ``transformers`` model (its config) says."""
    found: dict = {}
    if model is None:
        return found
    model = getattr(model, "_orig_mod", model)  # a model torch.compile'd already
    config = getattr(model, "config", None)
    wrapped = isinstance(getattr(config, "pretrained_cfg", None), dict)  # a TimmWrapper model
    if wrapped or is_timm_model(model):
        import timm.data

        found = from_timm_data_config(timm.data.resolve_data_config(pretrained_cfg=config.pretrained_cfg) if wrapped
                                      else timm.data.resolve_model_data_config(model))
        fixed = fixed_input_size(getattr(model, "timm_model", model))
        return {**found, "size": fixed} if fixed else found
    size = _pair(getattr(config, "image_size", None)) if config is not None else None
    if size:
        found["size"] = size
    return found


def resolve_input_spec(model: Any = None, processing_class: Any = None, *, size: Any = None,
                       mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                       interpolation: Optional[str] = None, crop_pct: Optional[float] = None,
                       what: str = "the model") -> InputSpec:
    """The input a model expects: explicit arguments win, then ``processing_class``, then the model itself.

    Raises a ``ValueError`` naming the argument to pass when none of them gives the input size."""
    found = {**from_model(model), **from_processor(processing_class)}
    explicit = {"size": _pair(size), "mean": tuple(mean) if mean is not None else None,
                "std": tuple(std) if std is not None else None, "interpolation": interpolation, "crop_pct": crop_pct}
    found.update({k: v for k, v in explicit.items() if v is not None})
    if not found.get("size"):
        raise ValueError(f"cannot tell the input size of {what}: neither its image processor nor its config says; "
                         "pass image_size=... (and image_mean/image_std if it was not trained on ImageNet statistics)")
    return InputSpec(**found)
