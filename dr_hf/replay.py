"""Replay on the training process's device (``ReinforcedTrainingArguments(replay_on_device=True)``).

DataLoader workers then only read rows: they pick each row's sample, check its teacher target and hand over the
image as stored (a JPEG's bytes; other images decoded) with the parameters of the views to render. The training
process decodes the batch's JPEGs on its device (TorchCodec or torchvision.io: one batched nvJPEG call on CUDA) and renders every view
at once with the reinforce job's batched renderer (:meth:`~dr_hf.pipeline.AugmentPipeline.render_samples`), so the
host's cost per image is reading its row, not decoding and cropping it. (On a CPU device the views are rendered one
at a time, as the workers would: the same pixels.)
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from .ahead import SideStream, computed_ahead
from .pipeline import AugmentPipeline
from .batch_memory import batch_empty, handed_over
from .images import EncodedJpeg, decode_jpegs, image_size
from .inputs import InputSpec
from .transfer import to_device


@dataclass
class DeviceReplay:
    """A batch's images and view parameters. The Trainer moves a batch's tensors to the device, but not this
    object's: they stay on the host, where the JPEG decoder reads encoded bytes.

    * ``data``: every image back to back, a uint8 tensor (in shared memory in a DataLoader worker, so that it
      reaches the training process without a copy): a JPEG's bytes, or decoded HWC pixels; ``spans`` (B, 4) int64:
      each image's offset, size, height, width; ``encoded`` (B,) bool: whether it is a JPEG.
    * ``params``: each field (V, ...): the parameters of the V views to render, in the stored layout with one sample
      per view; ``picks`` (B,): the view image b renders. A mixed view's partner is image ``b + mix_partner`` at view
      ``mix_sample`` (a view index here, where the stored data has a sample index).
    * ``rows``: each image's ``dr_index``, to name one that cannot be decoded; ``column``: the image column."""

    data: torch.Tensor
    spans: np.ndarray
    encoded: np.ndarray
    params: Dict[str, np.ndarray]
    picks: np.ndarray
    rows: np.ndarray
    column: str = "image"

    @classmethod
    def of(cls, sources: Sequence[Union[EncodedJpeg, torch.Tensor]], view_params: Sequence[Sequence[Dict[str, Any]]],
           rows: Sequence[int], column: str = "image") -> "DeviceReplay":
        """``sources[b]``: image b (:func:`~dr_hf.images.decode_later`); ``view_params[b]``: its view's parameters
        (one sample), then, if that view is mixed, its partner's view's."""
        views: List[Dict[str, Any]] = []
        picks = []
        for own, *partner in view_params:
            own = dict(own)
            picks.append(len(views))
            views.append(own)
            if partner:
                own["mix_sample"] = len(views)
                views.append(partner[0])
        parts = [s.data if isinstance(s, EncodedJpeg) else s.permute(1, 2, 0).contiguous().numpy() for s in sources]
        sizes = np.array([len(p) if isinstance(p, bytes) else p.nbytes for p in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        total = int(sizes.sum())
        data = batch_empty((total,))  # in a worker: in shared memory, so it reaches the trainer uncopied
        flat = data.numpy()
        for part, offset, size in zip(parts, offsets, sizes):
            flat[offset:offset + size] = np.frombuffer(part, dtype=np.uint8) if isinstance(part, bytes) else part.reshape(-1)
        data = handed_over(data)
        shapes = np.array([image_size(s) for s in sources], dtype=np.int64).reshape(-1, 2)
        names = list(views[0]) if views else []
        return cls(data=data, spans=np.concatenate([offsets[:, None], sizes[:, None], shapes], axis=1),
                   encoded=np.array([isinstance(s, EncodedJpeg) for s in sources], dtype=bool),
                   params={name: np.stack([np.asarray(v[name]) for v in views]) for name in names},
                   picks=np.asarray(picks, dtype=np.int64), rows=np.asarray(rows, dtype=np.int64), column=column)

    def __len__(self) -> int:
        return len(self.picks)

    def images(self, device) -> List[torch.Tensor]:
        """The batch's images as RGB uint8 CHW tensors on ``device``: JPEGs decoded there in one call."""
        out: List[Optional[torch.Tensor]] = [None] * len(self)
        jpegs = np.flatnonzero(self.encoded)
        decoded = decode_jpegs([self.data[self.spans[b, 0]:self.spans[b, 0] + self.spans[b, 1]] for b in jpegs], device,
                               [int(self.rows[b]) for b in jpegs], self.column)
        for b, image in zip(jpegs, decoded):
            out[b] = image
        raw = np.flatnonzero(~self.encoded)  # handed over decoded
        if len(raw):  # the batch's buffer in one copy that does not wait for the device, then a view an image
            data = to_device(self.data, device)
            for b in raw:
                offset, size, height, width = (int(v) for v in self.spans[b])
                out[b] = data[offset:offset + size].view(height, width, 3).permute(2, 0, 1)
        return out

    def render(self, pipeline: AugmentPipeline, out: InputSpec, device, batched: Optional[bool] = None) -> torch.Tensor:
        """The batch's normalised float views (B, 3, H, W) at ``out``, decoded and rendered on ``device``: on CUDA
        (``batched`` None) every stage once over the whole batch, as the reinforce job renders there; on a CPU one
        view at a time, the DataLoader workers' code and pixels (batched matrix products are slow on a CPU)."""
        images = self.images(device)
        picks = [(b, int(view)) for b, view in enumerate(self.picks)]
        return pipeline.render_samples(images, [self.params] * len(images), picks, out, batched=batched)


class RenderedAhead:
    """Batches from ``batches`` (an epoch's iterator) with their ``replay`` rendered into ``pixel_values`` by
    ``render`` on a background thread, ``ahead`` batches beyond those the training step takes
    (:func:`~dr_hf.ahead.computed_ahead`), so decoding and rendering overlap the step. On CUDA the thread works on its
    own stream (the JPEG decoder then waits for that stream alone), and the step's stream waits for each batch's
    event before using it. Batches are fetched on the caller's thread, in order; only rendering moves."""

    def __init__(self, batches: Iterator[Dict[str, Any]], render: Callable[[Dict[str, Any]], torch.Tensor], device,
                 ahead: int = 1):
        self.source = batches
        self._render = render
        self._side = SideStream(device)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dr-hf-replay")
        self._rendered = computed_ahead(batches, self._render_one, ahead, self._pool)

    def _render_one(self, batch: Dict[str, Any]):
        with self._side.queue():
            pixels = self._render(batch)
            return batch, pixels, self._side.done()

    def take(self, count: int) -> List[Dict[str, Any]]:
        """The next ``count`` batches (fewer at the end of the epoch), rendered, ``replay`` replaced by
        ``pixel_values``."""
        out = []
        for batch, pixels, event in itertools.islice(self._rendered, count):
            SideStream.hand_over(event, [pixels])
            out.append({**{k: v for k, v in batch.items() if k != "replay"}, "pixel_values": pixels})
        return out

    def close(self) -> None:
        """Stop: what is being rendered finishes, the rest is dropped with the epoch's iterator."""
        self._rendered.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.source = iter(())
