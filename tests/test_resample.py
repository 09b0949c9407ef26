"""Batched rendering (dr_hf/resample.py, the GPU path), run here on CPU tensors: the same code, the same numbers."""
import datasets
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from conftest import SHARED, needs_shared
from dr_hf import make_pipeline
from dr_hf.augment import Context, boxes_to_pixels
from dr_hf.inputs import InputSpec
from dr_hf.pipeline import PRESETS
from dr_hf.images import decode
from dr_hf.pipeline import empty_batch, normalise_pixels
from dr_hf import resample, script
from dr_hf.resample import crop_groups, resample_weights, resized_crop, resized_crops
from torch.utils._python_dispatch import TorchDispatchMode

MODES = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def random_boxes(rng, height, width, count):
    boxes = []
    for _ in range(count):
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        boxes.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w))
    return boxes


@pytest.mark.parametrize("interpolation", sorted(MODES))
@pytest.mark.parametrize("shape,size", [((3, 75, 100), (24, 24)), ((3, 20, 15), (32, 24)), ((1, 50, 50), (7, 9))])
def test_resampling_matrices_are_torchs_antialiased_resize(interpolation, shape, size):
    """Random boxes (downscaling and upscaling, any aspect), random flips, channels-last views: each batched crop is
    torch's antialiased float resize of that box, rounded, to within one grey level on a rare tie."""
    rng = np.random.default_rng(sum(shape) + size[0])
    hwc = torch.from_numpy(rng.integers(0, 256, (*shape[1:], shape[0]), dtype=np.uint8))
    image = hwc.permute(2, 0, 1)  # as decoded: a CHW view of HWC memory
    boxes = random_boxes(rng, shape[1], shape[2], 48)
    flips = [bool(f) for f in rng.integers(0, 2, 48)]
    got = resized_crops(image, boxes, flips, size, interpolation, chunk_bytes=1 << 16)  # several chunks
    assert got.shape == (48, shape[0], *size) and got.dtype == torch.uint8
    ties = 0.0
    for crop, box, flip in zip(got, boxes, flips):
        ref = F.resized_crop(image.float(), *box, list(size), interpolation=MODES[interpolation], antialias=True)
        ref = ref.round().clamp(0, 255).to(torch.uint8)
        ref = ref.flip(-1) if flip else ref
        diff = (crop.int() - ref.int()).abs()
        assert diff.max() <= 1, (box, flip)
        ties += float((diff > 0).float().mean()) / len(boxes)
    assert ties < 0.01  # x.5 values, rounded one way or the other by a different order of float sums
    with pytest.raises(ValueError, match="interpolation"):
        resized_crops(image, boxes[:1], [False], size, "nearest")


@pytest.mark.parametrize("interpolation", sorted(MODES))
def test_resampling_matrix_rows_are_torchs_own_weights(interpolation):
    """Each matrix is computed at each output pixel's taps only: every crop's matrix equals the weights torch's
    antialiased interpolate applies (read off by resizing one-hot rows), zero outside the crop, rows reversed when
    flipped; from 1-pixel crops (upscaling 40x) to whole 1000-pixel axes (downscaling 31x), at the axis' edges."""
    in_size = 1000
    starts = torch.tensor([0, 999, 0, 500, 3, 0, 997, 250])
    lengths = torch.tensor([1000, 1, 7, 333, 40, 1, 3, 750])
    flips = torch.tensor([0, 1, 0, 1, 0, 0, 1, 1])
    for out in (32, 40):
        got = resample_weights(starts, lengths, in_size, out, interpolation, flips=flips,
                               max_length=int(lengths.max()))
        assert got.shape == (len(starts), out, in_size)
        for s, (start, length, flip) in enumerate(zip(starts.tolist(), lengths.tolist(), flips.tolist())):
            one_hot = torch.eye(length)[:, None, None, :]  # (length, 1, 1, length): input pixel k alone
            ref = torch.nn.functional.interpolate(one_hot, size=(1, out), mode=interpolation, antialias=True,
                                                  align_corners=False)[:, 0, 0, :].T  # (out, length)
            ref = ref.flip(0) if flip else ref
            torch.testing.assert_close(got[s, :, start:start + length], ref, atol=2e-6, rtol=0)
            assert not got[s, :, :start].any() and not got[s, :, start + length:].any(), s


def test_crops_of_many_images_in_one_call_are_each_images_own_crops(monkeypatch):
    """A teacher batch's crops come from several rows' images of different sizes in one call (padded to the largest
    image): exactly the crops of each image alone, written into a given (channels-last) batch; memory the call
    allocates without filling (poisoned here: NaN, 255) never reaches a crop."""
    rng = np.random.default_rng(3)
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in ((40, 30), (25, 61), (52, 52))]
    owners = [0] * 5 + [2] * 4 + [1] * 6 + [0] * 2  # runs, one image twice
    boxes = [random_boxes(rng, *images[o].shape[-2:], 1)[0] for o in owners]
    flips = rng.integers(0, 2, len(owners))
    into = torch.empty((len(owners), 16, 16, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else 255)

    monkeypatch.setattr(script, "ENABLED", False)  # op by op from Python, where the poison reaches every empty
    monkeypatch.setattr(torch, "empty", poisoned)
    got = resized_crops(images, boxes, flips, (16, 16), "bicubic", owners=owners, into=into)
    monkeypatch.undo()
    assert got is into
    for k, o in enumerate(owners):
        alone = resized_crops(images[o], boxes[k:k + 1], flips[k:k + 1], (16, 16), "bicubic")[0]
        assert torch.equal(got[k], alone), k


def test_scripted_crops_are_the_eager_crops_bit_for_bit_and_run_without_python(monkeypatch):
    """The crops' tensor work runs as one TorchScript call: the same ops as op by op from Python, so the same pixels
    bit for bit (square and oblong outputs, both filters, several placing passes), and no op of it goes back through
    Python (a Python-level torch.bmm is never called), which is what lets it run without the GIL."""
    rng = np.random.default_rng(8)
    images = [torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).permute(2, 0, 1)
              for h, w in ((37, 50), (64, 29), (20, 20))]
    owners = rng.integers(0, 3, 90)
    boxes = np.array([random_boxes(rng, *images[o].shape[-2:], 1)[0] for o in owners])
    flips = rng.integers(0, 2, len(boxes))
    monkeypatch.setattr(script, "_COMPILED", {})  # compiled here, on first use, while torch.bmm is torch's
    resized_crops(images[0], boxes[:1], flips[:1], (8, 8))
    assert isinstance(script._COMPILED[resample.crop_windows], torch.jit.ScriptFunction)
    bmm, calls = torch.bmm, []
    monkeypatch.setattr(torch, "bmm", lambda *a, **kw: (calls.append(1), bmm(*a, **kw))[1])
    for size, interpolation, chunk in (((16, 16), "bicubic", 256 << 20), ((12, 20), "bilinear", 1 << 14),
                                       ((24, 24), "bilinear", 6 * 3 * 24 * 24 * 4)):
        crops = {}
        for scripted in (False, True):
            monkeypatch.setattr(script, "ENABLED", scripted)
            del calls[:]
            crops[scripted] = resized_crops(images, boxes, flips, size, interpolation, owners=owners,
                                            group_size=8, chunk_bytes=chunk)
            assert bool(calls) != scripted, (scripted, len(calls))
        assert torch.equal(crops[True], crops[False]), (size, interpolation)
    # a torch that cannot script it: a warning that says so, then the same crops from Python
    monkeypatch.setattr(script, "_COMPILED", {})
    monkeypatch.setattr(torch.jit, "script", lambda fn: (_ for _ in ()).throw(RuntimeError("no TorchScript here")))
    with pytest.warns(RuntimeWarning, match="no TorchScript here"):
        fallback = resized_crops(images, boxes, flips, (24, 24), "bilinear", owners=owners, group_size=8,
                                 chunk_bytes=6 * 3 * 24 * 24 * 4)
    assert torch.equal(fallback, crops[True]) and script._COMPILED[resample.crop_windows] is resample.crop_windows


def test_boxes_are_cropped_in_groups_of_similar_size_through_windows_that_hold_them():
    """Groups partition the boxes, ordered by their longer side; each group's window is its largest height by its
    largest width; a group ends at group_size boxes or at the value budget (a box too large for it goes alone). Crops
    of a mix of tiny and whole-image boxes from two images, cut through such windows (at the padded images' far
    edges too), are each box's crop alone."""
    rng = np.random.default_rng(11)
    boxes = np.array([(0, 0, 60, 90), (2, 3, 4, 5), (59, 89, 1, 1), (10, 0, 50, 7), (0, 80, 9, 10)] * 7)
    order, groups = crop_groups(boxes, 4, 2000, 16)
    assert sorted(order.tolist()) == list(range(len(boxes)))
    longer = np.maximum(boxes[order, 2], boxes[order, 3])
    assert (np.diff(longer) >= 0).all()
    assert [a for a, _, _, _ in groups] == [0] + [b for _, b, _, _ in groups[:-1]] and groups[-1][1] == len(boxes)
    for a, b, tall, wide in groups:
        assert 1 <= b - a <= 4
        assert (tall, wide) == (boxes[order[a:b], 2].max(), boxes[order[a:b], 3].max())
        assert b - a == 1 or (b - a) * tall * max(wide, 16) <= 2000
    assert any(b - a == 1 for a, b, _, _ in groups) and any(b - a == 4 for a, b, _, _ in groups)
    for (a, b, tall, wide), _ in zip(groups, groups[1:]):  # each group is as large as it may be: the next box breaks it
        t, w = max(tall, boxes[order[b], 2]), max(wide, boxes[order[b], 3])
        assert b - a == 4 or (b - a + 1) * t * max(w, 16) > 2000, (a, b)

    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in ((60, 90), (64, 20))]
    owners = np.array([0] * len(boxes) + [1] * 6)
    boxes = np.concatenate([boxes, [(0, 0, 64, 20), (63, 19, 1, 1), (40, 10, 24, 10), (0, 0, 3, 20), (5, 5, 5, 5),
                                    (60, 0, 4, 20)]])
    flips = rng.integers(0, 2, len(boxes))
    for group_size, chunk in ((4, 1 << 14), (32, 256 << 20)):
        got = resized_crops(images, boxes, flips, (16, 16), "bilinear", owners=owners, group_size=group_size,
                            chunk_bytes=chunk)
        for k, (o, box, flip) in enumerate(zip(owners, boxes, flips)):
            ref = F.resized_crop(images[o].float(), *box.tolist(), [16, 16], antialias=True)
            ref = ref.round().clamp(0, 255).to(torch.uint8)
            ref = ref.flip(-1) if flip else ref
            assert (got[k].int() - ref.int()).abs().max() <= 1, (k, group_size)


def test_float_crops_placed_in_several_passes_are_the_crops_placed_at_once():
    """The groups' float crops are rounded and placed together once ``chunk_bytes`` of them gather: a budget that
    holds 5 crops of 16 x 16 (so a pass every group of 4 or so) gives the same groups and, bit for bit, the same
    crops as one pass for all 40, into a channels-last batch too."""
    rng = np.random.default_rng(5)
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in ((30, 20), (17, 33))]
    owners = rng.integers(0, 2, 40)
    boxes = np.array([random_boxes(rng, *images[o].shape[-2:], 1)[0] for o in owners])
    boxes[:, 2:] = np.minimum(boxes[:, 2:], 8)  # windows small enough that the budget does not split groups
    flips = rng.integers(0, 2, len(owners))
    small, large = 5 * 3 * 16 * 16 * 4, 256 << 20
    assert crop_groups(boxes, 4, small // 12, 16)[1] == crop_groups(boxes, 4, large // 12, 16)[1]
    once = resized_crops(images, boxes, flips, (16, 16), "bicubic", owners=owners, group_size=4, chunk_bytes=large)
    into = torch.empty((40, 16, 16, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    passes = resized_crops(images, boxes, flips, (16, 16), "bicubic", owners=owners, group_size=4, chunk_bytes=small,
                           into=into)
    assert passes is into and torch.equal(passes, once)


@needs_shared("imagenet-sample")
@pytest.mark.parametrize("interpolation", sorted(MODES))
def test_channels_last_crop_is_torchvisions_crop_and_normalises_alike(interpolation):
    """The per-sample CPU crop (torch's uint8 kernel on channels-last memory) gives exactly torchvision's
    ``resized_crop`` pixels for any box of a real photo, in either input layout, and comes back channels-last; a
    channels-last batch normalises to exactly the floats of a contiguous one."""
    rows = datasets.load_dataset(str(SHARED / "imagenet-sample"), split="train").select(range(3))
    spec = InputSpec(size=(224, 224), interpolation=interpolation)
    rng = np.random.default_rng(7)
    crops = []
    for row in rows:
        image = decode(row["image"])  # a CHW view of HWC memory
        height, width = image.shape[-2:]
        boxes = random_boxes(rng, height, width, 6) + [(0, 0, height, width), (height - 1, width - 1, 1, 1)]
        for box in boxes:
            want = F.resized_crop(image, *box, [224, 224], interpolation=MODES[interpolation], antialias=True)
            for layout in (image, image.contiguous()):
                got = resized_crop(layout, *box, (224, 224), interpolation)
                assert torch.equal(got, want), box
            assert got.permute(1, 2, 0).is_contiguous()  # channels-last
            crops.append(resized_crop(image, *box, (224, 224), interpolation))
    pipe = make_pipeline("imagenet+rrc")
    pixels = empty_batch(len(crops), (224, 224), torch.uint8)
    for slot, crop in zip(pixels, crops):
        slot.copy_(crop)
    assert pixels.permute(0, 2, 3, 1).is_contiguous()
    floats = normalise_pixels(pixels, spec, pipe)
    reference = normalise_pixels(pixels.contiguous(), spec, pipe)
    assert reference.is_contiguous() and torch.equal(floats, reference)
    textbook = F.normalize(pixels.float() / 255, list(spec.mean), list(spec.std))
    assert torch.allclose(floats, textbook, atol=1e-5)


def render_both(pipe, images, spec, num_samples=12):
    """Every sample of every row, per-sample and batched, group by group as the job renders them."""
    g = pipe.group_size
    params = [pipe.sample(0, i, num_samples, Context(im.shape[-2], im.shape[-1], i % g, g, num_samples))
              for i, im in enumerate(images)]
    out = {False: [], True: []}
    for start in range(0, len(images), g):
        group = images[start:start + g]
        picks = [(r, j) for r in range(len(group)) for j in range(num_samples)]
        for batched in out:
            out[batched].append(pipe.render_samples(group, params[start:start + g], picks, spec, batched=batched))
    return torch.cat(out[False]), torch.cat(out[True])


@needs_shared("imagenet-sample")
@pytest.mark.parametrize("interpolation", sorted(MODES))
def test_batched_render_is_per_sample_render_within_stated_tolerance(interpolation):
    """On real ImageNet photos, every preset: batched renders (torch's float weights) are the per-sample CPU renders
    (torch's uint8 kernel) to about 0.2 grey levels on average; RandomResizedCrop+flip, bilinear, never more than 1
    (the tolerance results/bench_gpu.md and the README state). Pipelines the batched crop cannot do render per sample."""
    ds = datasets.load_dataset(str(SHARED / "imagenet-sample"), split="train").select(range(8))
    images = [decode(v) for v in ds.cast_column("image", datasets.Image(decode=False))["image"]]
    spec = InputSpec(size=(64, 64), interpolation=interpolation)
    levels = torch.tensor(spec.std)[:, None, None] * 255
    for preset in sorted(PRESETS):
        pipe = make_pipeline(preset)
        per_sample, batched = render_both(pipe, images, spec)
        diff = ((per_sample - batched) * levels).abs()
        if not pipe.crops_in_batches(spec):
            assert torch.equal(per_sample, batched), preset
            continue
        assert diff.mean() < 0.3, (preset, float(diff.mean()))
        if pipe.get("rand_augment") is None:  # geometry only: rounding differences alone
            assert (diff > 1.01).float().mean() < (1e-3 if interpolation == "bicubic" else 1e-9), preset
        else:  # RandAugment's thresholds (solarize, posterize) can turn one grey level into many, rarely
            assert (diff > 1.01).float().mean() < 0.06, preset
    # uint8 out, no normalisation: the same pixels as the per-sample uint8 render, to one level
    pipe = make_pipeline("imagenet+rrc")
    picks = [(0, j) for j in range(12)]
    params = pipe.sample(0, 0, 12, Context(*images[0].shape[-2:], num_samples=12))
    a = pipe.render_samples(images[:1], [params], picks, spec, normalise=False, batched=False)
    b = pipe.render_samples(images[:1], [params], picks, spec, normalise=False, batched=True)
    assert a.dtype == b.dtype == torch.uint8 and (a.int() - b.int()).abs().max() <= (1 if interpolation == "bilinear" else 255)


class HostToDevice(TorchDispatchMode):
    """Records host-to-device copies (to the meta device, which runs ops without data): each copy's shape, and those
    that block."""

    def __init__(self):
        super().__init__()
        self.copies, self.blocking = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" \
                and torch.device(kwargs.get("device") or "cpu").type == "meta":
            self.copies.append(tuple(args[0].shape))
            self.blocking += [] if kwargs.get("non_blocking") else [tuple(args[0].shape)]
        return func(*args, **kwargs)


def test_a_teacher_batch_renders_without_waiting_for_the_device():
    """Every host-to-device copy the batched render makes is queued without blocking: a blocking copy to a GPU waits
    for all work queued before it (a reinforce job's teacher forward) before the host may queue more. Checked on the
    meta device, where the render runs op by op without data: also no op needs a value back on the host. Every preset
    the batched crop renders (RandAugment's ops by key, erasing and mixing masks, mixing weights, picks of views),
    normalised and uint8. RandAugment's ops run in TorchScript, where this mode also sees tensors made on the device
    from Python lists (from Python they copy below it): torchvision's geometric ops and sharpness make their
    constants so, a blocking copy each, hence ``randaugment_ops.randaugment_constants``, one copy a slot that does not wait
    (torchvision's normalize did so too, hence ``pipeline.normalize``)."""
    spec = InputSpec(size=(8, 8), interpolation="bicubic")
    rendered = 0
    for preset in sorted(PRESETS):
        pipe = make_pipeline(preset)
        if not pipe.crops_in_batches(spec):
            continue
        g = pipe.group_size
        rows, per_row = (4, 16) if g == 1 else (2 * g, 8)
        images = [torch.zeros((3, 24 + r, 32), dtype=torch.uint8, device="meta") for r in range(rows)]
        params = [pipe.sample(0, r, per_row, Context(24 + r, 32, r % g, g, per_row)) for r in range(rows)]
        picks = [(r, j) for r in range(rows) for j in range(per_row)]
        for normalise in (True, False) if pipe.renders_uint8 else (True,):
            with HostToDevice() as copies:
                batch = pipe.render_samples(images, params, picks, spec, normalise=normalise, batched=True)
            assert batch.shape == (len(picks), 3, 8, 8) and batch.device.type == "meta"
            assert copies.blocking == [], (preset, normalise, copies.blocking)
            rendered += 1
    assert rendered >= 5


def test_replayed_decoded_images_reach_the_device_in_one_copy_that_does_not_wait():
    """replay_on_device: images handed over decoded (without TorchCodec, or not JPEGs) go to the device in one copy
    of the batch's buffer, queued without blocking (not one blocking copy an image), each its own pixels there."""
    from dr_hf.replay import DeviceReplay

    rng = np.random.default_rng(5)
    images = [torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).permute(2, 0, 1)
              for h, w in ((20, 30), (31, 17), (8, 8))]
    params = make_pipeline("rrc+flip").sample(0, 0, 1, Context(20, 30, num_samples=1))
    replay = DeviceReplay.of(images, [[{name: value[0] for name, value in params.items()}]] * 3, rows=[0, 1, 2])
    with HostToDevice() as copies:
        on_meta = replay.images("meta")
    assert copies.blocking == [] and copies.copies == [(replay.data.numel(),)]
    assert [t.shape for t in on_meta] == [im.shape for im in images] and on_meta[0].device.type == "meta"
    for got, image in zip(replay.images("cpu"), images):
        assert torch.equal(got, image)


def test_copies_to_a_gpu_go_through_pinned_memory(monkeypatch, image_dataset, teachers):
    """A non-blocking copy to a GPU from pageable memory can still make the host wait for the device (CUDA stages it
    through its own pinned buffers), so ``to_device`` copies to a GPU from a pinned copy of the data, which the caller
    may then change. No GPU here: torch's ``pin_memory`` and ``to`` are watched, and a "cuda" copy stays on the CPU;
    replay's decoded images take that way, one pinned copy of the batch's buffer. A GPU job's preparing threads pin
    each decoded image where they decode it, so the thread that queues the GPU's work copies it without pinning."""
    import threading

    from dr_hf.reinforcer import Reinforcer, preparation_pool
    from dr_hf.replay import DeviceReplay
    from dr_hf.transfer import to_device
    from test_reinforce import make_config

    calls, pinned_by, real_to = [], [], torch.Tensor.to

    def pin_memory(self):
        if getattr(self, "pinned", False):
            return self  # as torch does
        calls.append("pin")
        pinned_by.append(threading.current_thread().name)
        pinned = self.clone()
        pinned.pinned = True
        return pinned

    def to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cuda":
            calls.append(("copy", getattr(self, "pinned", False), kwargs.get("non_blocking", False)))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    array = np.arange(6)
    sent = to_device(array, "cuda")
    array[:] = 0  # the caller's array may change at once: the copy reads the pinned one
    assert calls == ["pin", ("copy", True, True)] and sent.tolist() == list(range(6))
    calls.clear()
    assert to_device(np.arange(3), "cpu").tolist() == [0, 1, 2] and to_device(np.arange(3), "meta").is_meta
    assert calls == []  # only copies to a GPU are pinned

    images = [torch.from_numpy(np.full((h, w, 3), k, dtype=np.uint8)).permute(2, 0, 1)
              for k, (h, w) in enumerate(((5, 7), (6, 4)))]
    params = make_pipeline("rrc+flip").sample(0, 0, 1, Context(5, 7, num_samples=1))
    replay = DeviceReplay.of(images, [[{name: value[0] for name, value in params.items()}]] * 2, rows=[0, 1])
    got = replay.images("cuda")
    assert calls == ["pin", ("copy", True, True)]
    assert all(torch.equal(g, im) for g, im in zip(got, images))

    calls.clear(), pinned_by.clear()
    batch = image_dataset.cast_column("image", datasets.Image(decode=False))[:8]
    monkeypatch.setattr("dr_hf.reinforcer.usable_device", lambda device, parameter: torch.device(device))  # (no GPU)
    job = Reinforcer(make_config(teachers), teachers, num_rows=8, render_device="cuda",
                     pool=preparation_pool(threads=2))
    rows = list(job._prepared(batch, list(range(8))))
    assert calls == ["pin"] * 8 and all(name.startswith("dr-prepare") for name in pinned_by), pinned_by
    cpu_rows = list(Reinforcer(make_config(teachers), teachers, num_rows=8)._prepared(batch, list(range(8))))
    assert all(r.image.pinned and torch.equal(r.image, c.image) and r.image.stride() == c.image.stride()
               for r, c in zip(rows, cpu_rows))
    calls.clear()
    to_device(rows[0].image, "cuda")
    assert calls == [("copy", True, True)]  # pinned already: copied as it is


def test_batched_job_is_recorded_and_verifies(tmp_path, capsys, image_dataset, image_dataset_dir, teachers, tiny_teacher_spec):
    """`dr-hf reinforce --render batched` records the mode (config, card); verify replays it the same way (and passes);
    its teacher targets are the per-sample job's to within the rounding of a grey level; resuming with the other mode is
    refused."""
    from test_reinforce import run

    from dr_hf import cli
    from dr_hf.format import config_from_parquet
    from dr_hf.shards import shard_paths
    from dr_hf.verify import verify

    assert cli.main(["reinforce", str(image_dataset_dir), "--output", str(tmp_path / "batched"), "--teacher",
                     tiny_teacher_spec, "--augment", "imagenet+mix", "--num-samples", "4", "--topk", "3",
                     "--render", "batched", "--quiet"]) == 0
    run(image_dataset, tmp_path / "per-sample", teachers, augment="imagenet+mix", n=4, k=3)
    assert config_from_parquet(shard_paths(str(tmp_path / "batched"))[0]).render == "batched"
    assert "| teacher inputs rendered | each image's samples at once" in (tmp_path / "batched" / "README.md").read_text()
    report = verify(str(tmp_path / "batched"), rows=8)
    assert report.ok and report.replayed_rows == 8 and report.max_abs_diff < 1e-3, report.problems
    a, b = (datasets.load_dataset(str(tmp_path / x), split="train").with_format("numpy") for x in ("batched", "per-sample"))
    (ia, la), (ib, lb) = ((np.asarray(d["dr_topk_indices"]), np.asarray(d["dr_topk_logprobs"], np.float32)) for d in (a, b))
    assert np.array_equal(ia[:, :, 0], ib[:, :, 0])  # the same top-1 everywhere
    assert np.abs(la[:, :, 0] - lb[:, :, 0]).max() < 0.05
    assert cli.main(["reinforce", str(image_dataset_dir), "--output", str(tmp_path / "batched"), "--teacher",
                     tiny_teacher_spec, "--augment", "imagenet+mix", "--num-samples", "4", "--topk", "3",
                     "--quiet"]) == 2  # per-sample into a batched folder
    assert "different job" in capsys.readouterr().err
    with pytest.raises(ValueError, match="`render` must be one of"):
        run(image_dataset, tmp_path / "x", teachers, render="gpu")


@needs_shared("imagenet-sample")
def test_batched_crops_follow_the_tf32_flag_within_the_tolerance_of_what_training_replays(monkeypatch):
    """The batched crops write no flag (a render thread runs beside a teacher or a training step) and follow torch's
    TF32 flag for float32 products. TF32 tensor cores are emulated here as an H100 gives them (each factor rounded to
    10 mantissa bits: this reproduces bench_resample's H100 row, 2.44% of pixels one level off). On real photos
    TF32 moves 1-3% of pixels by one level, and the crops stay as far from the per-sample crops training replays on
    the CPU as float32's: 0.17 grey levels on average, the same few pixels over one level (bicubic's uint8 kernel)."""
    def tf32(x):
        return ((x.contiguous().view(torch.int32) + 0x1000) & -8192).view(torch.float32)

    bmm, setter, writes = torch.bmm, torch.set_float32_matmul_precision, []
    monkeypatch.setattr(script, "ENABLED", False)  # the products from Python, where the emulation reaches them
    monkeypatch.setattr(torch, "bmm", lambda a, b, **kw: bmm(a, b, **kw) if torch.get_float32_matmul_precision()
                        == "highest" else bmm(tf32(a), tf32(b), **kw))
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda p: (writes.append(p), setter(p)))
    rows = datasets.load_dataset(str(SHARED / "imagenet-sample"), split="train").select(range(4))
    images = [decode(v) for v in rows.cast_column("image", datasets.Image(decode=False))["image"]]
    pipe = make_pipeline("imagenet+rrc")
    crops, replayed = {"highest": [], "high": []}, []
    for i, image in enumerate(images):
        params = pipe.sample(0, i, 64, Context(image.shape[-2], image.shape[-1], 0, 1, 64))
        boxes, flips = boxes_to_pixels(params["crop"], *image.shape[-2:]), np.asarray(params["flip"])
        for precision, got in crops.items():
            setter(precision)
            try:
                got.append(resized_crops(image, boxes, flips, (224, 224), "bicubic"))
            finally:
                setter("highest")
        replayed += [resized_crop(image, *map(int, box), (224, 224), "bicubic").flip(-1) if flip else
                     resized_crop(image, *map(int, box), (224, 224), "bicubic") for box, flip in zip(boxes, flips)]
    assert writes == []
    fp32, tf = torch.cat(crops["highest"]), torch.cat(crops["high"])
    moved = (tf.int() - fp32.int()).abs()
    assert moved.max() == 1 and 0.01 < float((moved > 0).float().mean()) < 0.03
    replayed = torch.stack(replayed)
    off = {name: (got.int() - replayed.int()).abs().float() for name, got in (("fp32", fp32), ("tf32", tf))}
    assert 0.1 < float(off["fp32"].mean()) < 0.2 and abs(float(off["tf32"].mean() - off["fp32"].mean())) < 0.01
    assert float((off["tf32"] > 1).float().mean()) < 1e-4 and float((off["fp32"] > 1).float().mean()) < 1e-4
