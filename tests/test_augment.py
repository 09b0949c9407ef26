import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from dr_hf.augment import (
    PRESETS,
    Q16,
    AugmentPipeline,
    Context,
    HorizontalFlip,
    MixUpCutMix,
    InputSpec,
    RandAugment,
    RandomErasing,
    RandomResizedCrop,
    RANDAUGMENT_OPS,
    box_to_pixels,
    make_pipeline,
)

OUT = InputSpec(size=(24, 24), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")


def image(h=40, w=56, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8))


def sample_until(transform, predicate, ctx=Context(40, 56), tries=500):
    rng = np.random.default_rng(0)
    for _ in range(tries):
        p = transform.make_params(rng, ctx)
        if predicate(p):
            return p
    raise AssertionError("no parameters satisfied the predicate")


def test_crop_replay_is_pixel_identical_and_matches_torchvision():
    from torchvision.transforms.v2 import functional as F

    t = RandomResizedCrop()
    im = image()
    p = t.make_params(np.random.default_rng(1), Context(40, 56))
    a, b = t.apply(im, p, OUT), t.apply(im.clone(), {k: v.copy() for k, v in p.items()}, OUT)
    assert torch.equal(a, b) and a.shape == (3, 24, 24)
    top, left, h, w = box_to_pixels(p["crop"], 40, 56)
    assert torch.equal(a, F.resized_crop(im, top, left, h, w, [24, 24], antialias=True,
                                         interpolation=F.InterpolationMode.BILINEAR))
    # area within the configured scale (up to quantisation)
    assert 0.08 * 40 * 56 * 0.9 <= h * w <= 40 * 56


def test_crop_box_is_relative_so_it_replays_on_a_resized_copy():
    t = RandomResizedCrop()
    p = t.make_params(np.random.default_rng(3), Context(400, 560))
    big = box_to_pixels(p["crop"], 400, 560)
    small = box_to_pixels(p["crop"], 40, 56)
    assert all(abs(b / 10 - s) <= 1 for b, s in zip(big, small))


def test_flip_replay():
    t = HorizontalFlip()
    im = image()
    on = sample_until(t, lambda p: p["flip"] == 1)
    off = sample_until(t, lambda p: p["flip"] == 0)
    assert torch.equal(t.apply(im, on, OUT), im.flip(-1))
    assert torch.equal(t.apply(im, off, OUT), im)


@pytest.mark.parametrize("op", range(len(RANDAUGMENT_OPS)))
def test_every_randaugment_op_replays_torchvisions_op_at_ml_drs_magnitude(op):
    """Replay equals torchvision's RandAugment op at magnitude bin 9 of 31 (what ml-dr uses), on the same image."""
    from torchvision.transforms.v2 import RandAugment as TV

    t = RandAugment(num_ops=1)
    name = RANDAUGMENT_OPS[op]
    signed = TV._AUGMENTATION_SPACE[name][1]
    im = image(24, 24) // 3 + 60  # low contrast, so that autocontrast/equalize change it
    im[:, :3, :3] = 240  # and a bright corner above the solarize threshold
    p = {"ra_ops": np.array([op], np.uint8), "ra_bins": np.array([-9 if signed else 9], np.int8)}
    a, b = t.apply(im, p, OUT), t.apply(im.clone(), p, OUT)
    assert a.dtype == torch.uint8 and a.shape == im.shape and torch.equal(a, b)
    tv = TV(num_ops=1, magnitude=9)
    magnitudes = TV._AUGMENTATION_SPACE[name][0](31, 24, 24)
    magnitude = 0.0 if magnitudes is None else float(magnitudes[9]) * (-1 if signed else 1)
    expected = tv._apply_image_or_video_transform(im, name, magnitude, interpolation=tv.interpolation, fill=tv._fill)
    assert torch.equal(a, expected), name
    if name != "Identity":
        assert not torch.equal(a, im), name


def test_randaugment_constants_are_ml_drs():
    """Magnitude 9 of 31 bins: rotate 9 deg, shear 0.09, translate 0.136 of the side, enhance 0.27, posterize 7 bits,
    solarize at 178.5 (ml-dr uses torchvision's RandAugment with its defaults)."""
    m = RandAugment.magnitude_of
    assert m("Rotate", 9, 224, 224) == pytest.approx(9.0)
    assert m("ShearX", -9, 224, 224) == pytest.approx(-0.09)
    assert m("TranslateX", 9, 224, 224) / 224 == pytest.approx(0.1360, abs=1e-4)
    assert m("Brightness", 9, 224, 224) == pytest.approx(0.27)
    assert m("Posterize", 9, 224, 224) == 7
    assert m("Solarize", 9, 224, 224) * 255 == pytest.approx(178.5)
    rng = np.random.default_rng(0)
    t = RandAugment()
    draws = [t.make_params(rng, Context(10, 10)) for _ in range(3000)]
    ops = np.concatenate([d["ra_ops"] for d in draws])
    assert (ops < len(RANDAUGMENT_OPS)).all() and np.bincount(ops).min() > 300  # uniform over the 14 ops
    assert set(np.abs(np.concatenate([d["ra_bins"] for d in draws]).astype(int))) == {9}


def test_erasing_is_torchvisions_black_box_before_normalisation():
    from torchvision.transforms.v2 import functional as F

    t = RandomErasing(p=1.0)
    p = sample_until(t, lambda p: p["erase_box"][2] > 0)
    x = torch.rand(3, 24, 24)
    a = t.apply(x, p, OUT)
    top, left, h, w = box_to_pixels(p["erase_box"], 24, 24)
    assert torch.equal(a, F.erase(x, top, left, h, w, torch.tensor(0.0)))
    assert (a[:, top:top + h, left:left + w] == 0).all()
    # in the pipeline the box is black in pixel space, i.e. -mean/std after normalisation
    pipe = AugmentPipeline([RandomResizedCrop(), t])
    params = {"crop": np.array([0, 0, 4096, 4096], np.uint16), "erase_box": p["erase_box"]}
    y = pipe.render(image(24, 24), params, OUT)
    assert torch.allclose(y[:, top:top + h, left:left + w], torch.tensor(-1.0))  # (0 - 0.5) / 0.5
    # sampling: p=0.25 and torchvision's area range (0.02, 0.33) of the rendered image
    rng = np.random.default_rng(1)
    boxes = [RandomErasing().make_params(rng, Context(40, 56))["erase_box"] for _ in range(4000)]
    erased = [b for b in boxes if b[2]]
    assert abs(len(erased) / len(boxes) - 0.25) < 0.03
    areas = [int(b[2]) * int(b[3]) / 4096**2 for b in erased]
    assert 0.019 <= min(areas) and max(areas) <= 0.34


def test_mixup_and_cutmix_replay():
    t = MixUpCutMix(group_size=4)
    ctx = Context(40, 56, position=1, group_rows=4, num_samples=5)
    mixup = sample_until(t, lambda p: p["mix_partner"] != 0 and p["mix_lam"] and p["mix_box"][2] == 0, ctx)
    cutmix = sample_until(t, lambda p: p["mix_partner"] != 0 and not p["mix_lam"] and p["mix_box"][2] > 0, ctx)
    both = sample_until(t, lambda p: p["mix_partner"] != 0 and p["mix_lam"] and p["mix_box"][2] > 0, ctx)
    a, b = torch.zeros(3, 24, 24), torch.ones(3, 24, 24)
    lam = int(mixup["mix_lam"]) / Q16
    assert torch.allclose(t.apply_mix(a, b, mixup), torch.full_like(a, 1 - lam))
    for p in (cutmix, both):
        mixed = t.apply_mix(a, b, p)
        assert torch.equal(mixed, t.apply_mix(a, b, p))
        assert abs((1 - mixed.mean().item()) - t.weight(p, 24, 24)) < 1e-5
    for p in (mixup, cutmix, both):
        assert 0 <= 1 + int(p["mix_partner"]) < 4 and int(p["mix_sample"]) < 5  # partner inside the group


def test_mixing_statistics_match_ml_drs_reinforcement_config():
    """ml-dr (configs/imagenet/reinforce/mixing.yaml): MixUp alpha 1 with lambda / 2, p=0.5, then CutMix alpha 1,
    p=0.5, in sequence: 25% both, 25% neither; the partner's sample index is drawn independently."""
    t = MixUpCutMix()
    rng = np.random.default_rng(0)
    draws = [t.make_params(rng, Context(224, 224, position=0, group_rows=8, num_samples=400)) for _ in range(8000)]
    mixup = np.array([bool(d["mix_lam"]) for d in draws])
    cutmix = np.array([bool(d["mix_box"][2]) for d in draws])
    assert abs(mixup.mean() - 0.5) < 0.02 and abs(cutmix.mean() - 0.5) < 0.02
    assert abs((mixup & cutmix).mean() - 0.25) < 0.02 and abs((~mixup & ~cutmix).mean() - 0.25) < 0.02
    assert all((d["mix_partner"] != 0) == (m or c) for d, m, c in zip(draws, mixup, cutmix))
    # own MixUp weight = 1 - Beta(1, 1) / 2: uniform on [0.5, 1]
    own = np.array([int(d["mix_lam"]) / Q16 for d in draws if d["mix_lam"]])
    assert own.min() >= 0.5 and abs(own.mean() - 0.75) < 0.01 and abs(np.median(own) - 0.75) < 0.015
    # CutMix box side sqrt(1 - U) before clipping: mean unclipped area fraction 1/2, so clipped area below that
    areas = np.array([int(d["mix_box"][2]) * int(d["mix_box"][3]) / 4096**2 for d in draws if d["mix_box"][2]])
    assert 0.2 < areas.mean() < 0.5
    samples = np.array([int(d["mix_sample"]) for d in draws if d["mix_partner"] != 0])
    assert samples.max() < 400 and abs(samples.mean() - 199.5) < 8  # uniform over the partner's 400 samples


def test_cifar_preset_is_resize_pad_crop():
    """ResizeRandomCrop at the reference size equals resize + zero padding 16 + a crop at the stored offset."""
    from torchvision.transforms.v2 import functional as F

    t = make_pipeline("cifar100+").get("resize_random_crop")
    out = InputSpec(size=(224, 224), interpolation="bilinear")
    im = image(32, 32)
    rng = np.random.default_rng(0)
    offsets = []
    for _ in range(200):
        p = t.make_params(rng, Context(32, 32))
        top, left = (int(round(int(v) * 224 / 4096)) + 16 for v in p["pad_crop"])
        offsets.append((top, left))
        ref = F.pad(F.resize(im, [224], interpolation=F.InterpolationMode.BILINEAR, antialias=True), [16] * 4)
        assert torch.equal(t.apply(im, p, out), ref[:, top:top + 224, left:left + 224])
    flat = np.array(offsets)
    assert flat.min() == 0 and flat.max() == 32  # offsets span [0, 2 * padding]


def test_mix_partner_never_leaves_a_partial_group():
    t = MixUpCutMix(group_size=8)
    rng = np.random.default_rng(0)
    for _ in range(300):
        p = t.make_params(rng, Context(8, 8, position=1, group_rows=3, num_samples=4))
        assert 0 <= 1 + int(p["mix_partner"]) < 3


def test_determinism_pure_function_of_seed_index_sample():
    pipe = make_pipeline("imagenet+rare+mix")
    ctx = Context(40, 56, position=2, group_rows=8)

    def params(seed, i, j):
        return pipe.make_params(seed, i, j, ctx)

    a = params(0, 10, 3)
    # other calls in between (different order) do not change it
    [params(0, i, j) for i in range(5) for j in range(5)]
    b = params(0, 10, 3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], params(1, 10, 3)[k]) for k in a)
    assert any(not np.array_equal(a[k], params(0, 11, 3)[k]) for k in a)
    assert any(not np.array_equal(a[k], params(0, 10, 4)[k]) for k in a)


def test_pipeline_config_round_trip_and_from_fields():
    for name in PRESETS:
        pipe = make_pipeline(name)
        again = AugmentPipeline.from_config(pipe.config())
        assert again.config() == pipe.config()
        assert [t.name for t in AugmentPipeline.from_fields(list(pipe.param_fields())).transforms] == [t.name for t in pipe.transforms]
    with pytest.raises(ValueError, match="another dr-hf version"):
        AugmentPipeline.from_fields(["crop", "flip", "warp"])
    with pytest.raises(ValueError, match="not a preset"):
        make_pipeline("rrc+zoom")


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 80), w=st.integers(1, 80), seed=st.integers(0, 2**31), index=st.integers(0, 10**9),
       preset=st.sampled_from(sorted(PRESETS)))
def test_property_any_size_renders_finite_and_replays_exactly(h, w, seed, index, preset):
    pipe = make_pipeline(preset)
    ctx = Context(h, w, position=index % 8, group_rows=8)
    params = pipe.make_params(seed, index, 0, ctx)
    for name, (shape, dtype) in pipe.param_fields().items():
        assert np.asarray(params[name]).shape == shape and np.asarray(params[name]).dtype == np.dtype(dtype)
    im = image(h, w, seed % 1000)
    x1 = pipe.render(im, params, OUT)
    x2 = pipe.render(im.clone(), pipe.make_params(seed, index, 0, ctx), OUT)
    assert x1.shape == (3, 24, 24) and torch.isfinite(x1).all() and torch.equal(x1, x2)
    y = pipe.render_samples([im, image(h, w, 1)] * 4, lambda r, j: pipe.make_params(seed, index, 0, ctx) if r == index % 8
                            else pipe.make_params(seed, r, j, Context(h, w, r, 8)), [(index % 8, 0)], OUT)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_decoded_layout_does_not_change_a_render(preset):
    """Decoded images are CHW views with channels-last strides (no copy); every preset renders them exactly as it
    renders a contiguous copy."""
    pipe = make_pipeline(preset)
    hwc = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    view, contiguous = hwc.permute(2, 0, 1), hwc.permute(2, 0, 1).contiguous()
    assert not view.is_contiguous()
    for j in range(12):
        p = pipe.make_params(3, 11, j, Context(37, 53, num_samples=12))
        assert torch.equal(pipe.render(view, p, OUT), pipe.render(contiguous, p, OUT)), (preset, j)
