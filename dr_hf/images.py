"""Decode any image a dataset may hold into an RGB uint8 CHW tensor, with errors that name the row."""

from __future__ import annotations

import functools
import io
import logging
import re
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.ExifTags
import PIL.Image
import PIL.ImageOps
import torch

from .errors import said
from .transfer import to_device

logger = logging.getLogger(__name__)


class BadImageError(ValueError):
    """An image that cannot be decoded; the message names the row and the column."""


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB view of a PIL image: CMYK/YCbCr/palette/grayscale converted, alpha composited on white, 16-bit and float
    pixels scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.int64)
        peak = 65535 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255
        gray = np.clip(array * 255 // peak, 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "F":  # float pixels in [0, 1] (scientific TIFFs), else on the 8- or 16-bit scale
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        top = array.max(initial=0.0)
        peak = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0
        gray = np.clip(np.round(array * (255.0 / peak)), 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@functools.lru_cache(maxsize=None)
def _jpeg_decoder() -> Optional[Callable[..., Any]]:
    """The JPEG decoder, ``decode_jpeg(data, mode="RGB", device=...)``: TorchCodec's (libjpeg-turbo on the CPU, one
    batched nvJPEG call on CUDA); where TorchCodec is not installed or cannot load (e.g. built for another torch, or
    no release with image decoding for this one), torchvision.io's (the same libraries and pixels; deprecated there
    since torchvision 0.29 for TorchCodec, which comes first); ``None`` where neither loads (then PIL decodes
    everything, the same pixels, more slowly). A TorchCodec that is installed but cannot load is said once."""
    try:
        from torchcodec.decoders import decode_jpeg
    except ImportError:  # not installed
        return _torchvision_jpeg_decoder()
    except (OSError, RuntimeError) as exc:
        fallback = _torchvision_jpeg_decoder()
        logger.warning("TorchCodec is installed but cannot load with torch %s (%s): JPEGs are decoded by %s instead "
                       "(the same pixels). Install the torchcodec release made for your torch (TorchCodec's README has "
                       "the table).", torch.__version__, said(exc),
                       "torchvision.io" if fallback is not None else "PIL (about 1.3x slower)")
        return fallback
    return decode_jpeg


def _byte_tensor(data: Union[bytes, torch.Tensor]) -> torch.Tensor:
    """Encoded bytes as the 1-D uint8 tensor the JPEG decoders take (a tensor as it is)."""
    return data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _torchvision_jpeg_decoder() -> Optional[Callable[..., Any]]:
    """torchvision.io's ``decode_jpeg`` called as TorchCodec's is (bytes or a uint8 tensor, or a list of them;
    ``mode="RGB"``; on the CPU the EXIF orientation applied, as TorchCodec's CPU decoder does; on CUDA nvJPEG leaves
    it out, so :func:`decode_later` hands over only JPEGs stored upright), or ``None`` where torchvision has no image
    decoding."""
    import warnings

    try:
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as torchvision_decode_jpeg
    except (ImportError, OSError, RuntimeError):
        return None

    def decode_jpeg(data, mode: str = "RGB", device="cpu"):
        if mode != "RGB":
            raise ValueError(f"mode {mode!r}: only 'RGB' is decoded here")
        as_tensor = [_byte_tensor(d) for d in (data if isinstance(data, list) else [data])]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # (its deprecation for TorchCodec, which is tried first)
            warnings.simplefilter("ignore", DeprecationWarning)
            out = torchvision_decode_jpeg(as_tensor, mode=ImageReadMode.RGB, device=device,
                                          apply_exif_orientation=True)
        return out if isinstance(data, list) else out[0]

    decode_jpeg.library = "torchvision.io"  # type: ignore[attr-defined]
    return decode_jpeg


def jpeg_decoder_name() -> Optional[str]:
    """Which library decodes JPEGs here (:func:`_jpeg_decoder`): ``"TorchCodec"``, ``"torchvision.io"`` or ``None``
    (PIL)."""
    decoder = _jpeg_decoder()
    if decoder is None:
        return None
    return getattr(decoder, "library", "TorchCodec")


def _jpeg_bytes(image: PIL.Image.Image) -> Optional[bytes]:
    """The file bytes of an opened RGB or grayscale JPEG, which the JPEG decoder (:func:`_jpeg_decoder`) decodes to
    PIL's pixels; ``None`` for other formats and modes (CMYK, ...) or without one: PIL decodes those."""
    if _jpeg_decoder() is None or image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return None
    try:
        image.fp.seek(0)
        return image.fp.read()
    except (AttributeError, OSError, ValueError):
        return None


def _decode_jpeg(image: PIL.Image.Image) -> Optional[torch.Tensor]:
    """An RGB or grayscale JPEG that PIL has only opened, decoded by TorchCodec (or torchvision.io) straight into a
    CHW view of HWC memory: the same pixels as PIL's decoder (tested), about 1.25x faster and one copy fewer.
    ``None``: PIL decodes (other formats and modes, no such decoder, or bytes it refuses, so that PIL names the
    error)."""
    data = _jpeg_bytes(image)
    if data is None:
        return None
    try:
        return _jpeg_decoder()(data, mode="RGB")
    except (RuntimeError, ValueError):
        return None


def _orientation(image: PIL.Image.Image) -> int:
    """An image's EXIF orientation (1: as stored), which ``datasets`` and TorchCodec apply when they decode."""
    try:
        return int(image.getexif().get(PIL.Image.ExifTags.Base.Orientation) or 1)
    except (ValueError, TypeError, SyntaxError, OSError):  # an unreadable EXIF block: as stored, as PIL shows it
        return 1


def _where(row: Optional[int], column: str) -> str:
    return f"row {row}, column {column!r}" if row is not None else f"column {column!r}"


def _decode(value: Any, row: Optional[int], column: str, keep_jpeg: bool) -> Union[torch.Tensor, EncodedJpeg]:
    where = _where(row, column)
    try:
        opened = not isinstance(value, PIL.Image.Image)  # by us: free to read its file and close it
        if not opened:
            image = value
        elif isinstance(value, dict):
            if value.get("bytes"):
                image = PIL.Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                image = PIL.Image.open(value["path"])
            else:
                raise BadImageError(f"{where}: the image is empty (no bytes and no path)")
        elif isinstance(value, (bytes, bytearray)):
            if not value:
                raise BadImageError(f"{where}: the image is empty (0 bytes)")
            image = PIL.Image.open(io.BytesIO(value))
        elif value is None:
            raise BadImageError(f"{where}: the image is missing (None)")
        else:
            raise BadImageError(f"{where}: expected an image, got {type(value).__name__}")
        if keep_jpeg and opened:
            data = _jpeg_bytes(image)
            if data is not None and _orientation(image) == 1:  # (on CUDA a turned photo would stay as stored)
                image.close()
                return EncodedJpeg(data, image.height, image.width)
        fast = _decode_jpeg(image) if opened else None  # TorchCodec applies the EXIF orientation itself
        if fast is not None:
            image.close()
            return fast
        image.load()
        if _orientation(image) != 1:  # as datasets' Image feature decodes it (and TorchCodec)
            image = PIL.ImageOps.exif_transpose(image)
        rgb = to_rgb(image)
    except BadImageError:
        raise
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as exc:
        raise _bad(where, exc) from exc
    array = np.asarray(rgb, dtype=np.uint8)
    # CHW with channels-last strides: torch's uint8 antialiased resize works on that layout, so no copy is made twice
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _bad(where: str, exc: BaseException) -> BadImageError:
    # no object addresses in the message: error reports must be the same on every run
    detail = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the image bytes", str(exc))
    return BadImageError(f"{where}: cannot decode the image ({type(exc).__name__}: {detail})")


def decode(value: Any, row: Optional[int] = None, column: str = "image") -> torch.Tensor:
    """A dataset's image cell (PIL image, ``{"bytes", "path"}`` dict, raw bytes) as an RGB uint8 CHW tensor."""
    return _decode(value, row, column, keep_jpeg=False)


class EncodedJpeg(NamedTuple):
    """An RGB or grayscale JPEG left encoded, with its size from the header."""

    data: bytes
    height: int
    width: int


def image_size(image: Union[torch.Tensor, EncodedJpeg]) -> Tuple[int, int]:
    """(height, width) of a decoded CHW image or of a JPEG left encoded (as it will decode, oriented)."""
    if isinstance(image, EncodedJpeg):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def decode_later(value: Any, row: Optional[int] = None, column: str = "image") -> Union[torch.Tensor, EncodedJpeg]:
    """An image cell for decoding elsewhere (on the training process's device): an RGB or grayscale JPEG's bytes
    (:func:`decode_jpegs` gives :func:`decode`'s pixels from them on a CPU), anything else decoded now by
    :func:`decode`, as is a photo turned by its EXIF orientation: torchvision's nvJPEG path leaves that as stored,
    and TorchCodec's CUDA path takes no orientation either.
    Only the header is read, so bytes that are corrupt past it are named when decoded."""
    return _decode(value, row, column, keep_jpeg=True)


_NO_DEVICE_DECODING: Dict[str, str] = {}  # devices the JPEG decoder was seen not to decode on: why


def decode_jpegs(jpegs: Sequence[Union[bytes, torch.Tensor]], device, rows: Sequence[Optional[int]],
                 column: str = "image") -> List[torch.Tensor]:
    """JPEGs (:class:`EncodedJpeg` data, or 1-D uint8 CPU tensors of it) as RGB uint8 CHW tensors on ``device``, in
    one call of the JPEG decoder (TorchCodec's, else torchvision.io's: on CUDA, one batched nvJPEG decode). One that
    it refuses there is decoded by :func:`decode` on the host and copied over; :func:`decode` names its row
    (``rows``) if it is corrupt. Where the decoder cannot decode on ``device`` at all (a build without that device's
    support), which shows as a batch whose every JPEG it refuses there and the host decodes, the JPEGs are decoded on
    the host from then on, and a warning says so once."""
    if not jpegs:
        return []
    tensors = [_byte_tensor(d) for d in jpegs]
    decoder = _jpeg_decoder()
    if decoder is None:  # bytes from a process that had a JPEG decoder
        return [to_device(decode(data.numpy().tobytes(), row, column), device) for data, row in zip(tensors, rows)]
    device = torch.device(device)
    on = torch.device("cpu") if str(device) in _NO_DEVICE_DECODING else device
    try:
        return [to_device(image, device) for image in decoder(tensors, mode="RGB", device=on)]
    except (RuntimeError, ValueError):
        pass
    out, refusals = [], []
    for data, row in zip(tensors, rows):
        try:
            out.append(to_device(decoder(data, mode="RGB", device=on), device))
            continue
        except (RuntimeError, ValueError) as exc:
            refusals.append(exc)
        out.append(to_device(decode(data.numpy().tobytes(), row, column), device))
    if on.type != "cpu" and len(refusals) == len(tensors):  # all refused there, all decoded here: the device
        first_line = (str(refusals[0]).strip().splitlines() or [""])[0][:200]
        _NO_DEVICE_DECODING[str(device)] = f"{type(refusals[0]).__name__}: {first_line}"
        logger.warning("%s cannot decode JPEGs on %s (%s); decoding them on the host instead", jpeg_decoder_name(),
                       device, _NO_DEVICE_DECODING[str(device)])
    return out


def image_bytes(value: Any, row: Optional[int] = None, column: str = "image") -> bytes:
    """The encoded bytes of an image cell (what the source dataset stores), for fingerprints."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            with open(value["path"], "rb") as f:
                return f.read()
    if isinstance(value, PIL.Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    raise BadImageError(f"{_where(row, column)}: no image bytes to fingerprint ({type(value).__name__})")


def fingerprint(value: Any, row: Optional[int] = None, column: str = "image") -> str:
    """A 128-bit BLAKE2b digest (32 hex chars) of an image cell's encoded bytes: the key that joins a
    reinforcement-only dataset back to a user's own copy of its source."""
    import hashlib

    return hashlib.blake2b(image_bytes(value, row, column), digest_size=16).hexdigest()


def image_column_of(dataset) -> str:
    """A dataset's one column of type ``datasets.Image``, else ``"image"``."""
    import datasets

    features = getattr(dataset, "features", None) or {}
    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    return images[0] if len(images) == 1 else "image"
