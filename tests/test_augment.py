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
    Output,
    RandAugment,
    RandomErasing,
    RandomResizedCrop,
    RANDAUGMENT_OPS,
    box_to_pixels,
    make_pipeline,
)

OUT = Output(size=(24, 24), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")


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
def test_every_randaugment_op_replays_identically(op):
    t = RandAugment(num_ops=1)
    im = image(24, 24) // 3 + 60  # low contrast, so that autocontrast/equalize change it
    p = {"ra_op": np.array([op], np.uint8), "ra_magnitude": np.array([-90 if RANDAUGMENT_OPS[op][1] else 90], np.int8)}
    a, b = t.apply(im, p, OUT), t.apply(im.clone(), p, OUT)
    assert a.dtype == torch.uint8 and a.shape == im.shape and torch.equal(a, b)
    if RANDAUGMENT_OPS[op][0] != "identity":
        assert not torch.equal(a, im), RANDAUGMENT_OPS[op][0]


def test_randaugment_params_in_range():
    t = RandAugment()
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = t.make_params(rng, Context(10, 10))
        assert p["ra_op"].shape == (2,) and (p["ra_op"] < len(RANDAUGMENT_OPS)).all()
        assert (np.abs(p["ra_magnitude"].astype(int)) <= 100).all()


def test_erasing_replay_and_noise_is_a_function_of_the_box():
    t = RandomErasing(p=1.0)
    p = sample_until(t, lambda p: p["erase"][2] > 0)
    x = torch.zeros(3, 24, 24)
    a, b = t.apply(x, p, OUT), t.apply(x, p, OUT)
    assert torch.equal(a, b)
    top, left, h, w = box_to_pixels(p["erase"], 24, 24)
    assert (a[:, top:top + h, left:left + w] != 0).float().mean() > 0.99
    outside = a.clone()
    outside[:, top:top + h, left:left + w] = 0
    assert torch.equal(outside, x)
    none = sample_until(RandomErasing(p=0.0), lambda p: True)
    assert torch.equal(t.apply(x, none, OUT), x)


def test_mixup_and_cutmix_replay():
    t = MixUpCutMix(group_size=4)
    ctx = Context(40, 56, position=1, group_rows=4)
    mixup = sample_until(t, lambda p: p["mix_partner"] != 0 and p["mix_box"][2] == 0, ctx)
    cutmix = sample_until(t, lambda p: p["mix_partner"] != 0 and p["mix_box"][2] > 0, ctx)
    a, b = torch.zeros(3, 24, 24), torch.ones(3, 24, 24)
    lam = int(mixup["mix_lam"]) / Q16
    assert torch.allclose(t.apply_mix(a, b, mixup), torch.full_like(a, 1 - lam))
    mixed = t.apply_mix(a, b, cutmix)
    assert torch.equal(mixed, t.apply_mix(a, b, cutmix))
    assert abs((1 - mixed.mean().item()) - t.weight(cutmix, 24, 24)) < 1e-6
    for p in (mixup, cutmix):
        assert 0 <= 1 + int(p["mix_partner"]) < 4  # partner inside the group


def test_mix_partner_never_leaves_a_partial_group():
    t = MixUpCutMix(group_size=8)
    rng = np.random.default_rng(0)
    for _ in range(300):
        p = t.make_params(rng, Context(8, 8, position=1, group_rows=3))
        assert 0 <= 1 + int(p["mix_partner"]) < 3


def test_determinism_pure_function_of_seed_index_sample():
    pipe = make_pipeline("rrc+flip+ra+re+mix")
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
    with pytest.raises(ValueError, match="newer dr-hf"):
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
    y = pipe.render_mixed(x1, x1 * 0.5, params)
    assert torch.isfinite(y).all()
