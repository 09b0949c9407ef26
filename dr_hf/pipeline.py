"""The augmentation pipeline: replayable transforms in stage order, the presets (the paper's ImageNet+ and CIFAR-100+
variants with ml-dr's constants), and the one render path, per sample (:meth:`AugmentPipeline.render`) and batched
on any device (:meth:`AugmentPipeline.render_samples`), that the reinforce job, training replay and the preview use."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from .augment import (STAGES, TRANSFORMS, CenterCrop, Context, Draws, HorizontalFlip, MixUpCutMix, RandAugment,
                      RandomErasing, RandomResizedCrop, ReplayableTransform, ResizeRandomCrop, boxes_to_pixels,
                      whole_groups_advice)
from .inputs import InputSpec
from .resample import FILTERS, resized_crops, runs
from .transfer import to_device

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
        (:class:`~dr_hf.augment.Draws`); mixing also looks at whether the drawn partner exists, so only rows of a split's last,
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

    def _check_partners(self, rows: np.ndarray, partners: np.ndarray, samples: np.ndarray, count: int) -> None:
        outside = np.flatnonzero((partners < 0) | (partners >= count))
        if outside.size:
            k = outside[0]
            raise ValueError(f"sample {samples[k]} of row {rows[k]} of the group is mixed with row {partners[k]}, which "
                             f"is not in the group; {whole_groups_advice(self.group_size)}")

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
