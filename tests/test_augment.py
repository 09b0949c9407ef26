import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from dr_hf.augment import (Q16, Context, Draws, HorizontalFlip, MixUpCutMix, RandAugment, RandomErasing,
                           RandomResizedCrop, box_to_pixels, boxes_to_pixels, label_agreement_in_groups,
                           sorted_by_label)
from dr_hf.inputs import InputSpec
from dr_hf.pipeline import PRESETS, AugmentPipeline, make_pipeline, params_at
from dr_hf.randaugment_ops import RANDAUGMENT_OPS, RA_CONSTANTS, randaugment_runs
from dr_hf import script

OUT = InputSpec(size=(24, 24), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")


def image(h=40, w=56, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8))


def one(transform, ctx, seed=0):
    return params_at(transform.sample(Draws(seed, 0, 1), ctx), 0)


def sample_until(transform, predicate, ctx=Context(40, 56), tries=500):
    drawn = transform.sample(Draws(0, 0, tries), ctx)
    for j in range(tries):
        p = params_at(drawn, j)
        if predicate(p):
            return p
    raise AssertionError("no parameters satisfied the predicate")


def test_crop_replay_is_pixel_identical_and_matches_torchvision():
    from torchvision.transforms.v2 import functional as F

    t = RandomResizedCrop()
    im = image()
    p = one(t, Context(40, 56), seed=1)
    a, b = t.apply(im, p, OUT), t.apply(im.clone(), {k: v.copy() for k, v in p.items()}, OUT)
    assert torch.equal(a, b) and a.shape == (3, 24, 24)
    top, left, h, w = box_to_pixels(p["crop"], 40, 56)
    assert torch.equal(a, F.resized_crop(im, top, left, h, w, [24, 24], antialias=True,
                                         interpolation=F.InterpolationMode.BILINEAR))
    # area within the configured scale (up to quantisation)
    assert 0.08 * 40 * 56 * 0.9 <= h * w <= 40 * 56


@pytest.mark.parametrize("h,w", [(40, 56), (10, 60)])  # the second falls back to the central crop about 1/3 of the time
def test_crop_sampling_has_torchvisions_distribution(h, w):
    """The vectorised sampler draws RandomResizedCrop's boxes as torchvision's does: the same distribution of
    (top, left, height, width), and the same central fallback, as often."""
    from torchvision.transforms import v2

    n = 4000
    torch.manual_seed(0)
    tv, im = v2.RandomResizedCrop(24), torch.zeros(3, h, w, dtype=torch.uint8)
    theirs = np.array([[p["top"], p["left"], p["height"], p["width"]] for p in (tv.make_params([im]) for _ in range(n))])
    ours = np.array([box_to_pixels(b, h, w) for b in RandomResizedCrop().sample(Draws(0, 0, n), Context(h, w))["crop"]])
    for a, b in ((ours, theirs), (ours[:, 2] * ours[:, 3], theirs[:, 2] * theirs[:, 3])):
        a, b = a.reshape(n, -1).astype(float), b.reshape(n, -1).astype(float)
        assert (np.abs(a.mean(0) - b.mean(0)) < 4 * np.sqrt((a.var(0) + b.var(0)) / n) + 1e-9).all()
        assert (np.abs(a.std(0) - b.std(0)) < 0.06 * b.std(0) + 1e-9).all()
    if h == 10:  # the fallback, at torchvision's rate: the full height at the widest allowed aspect, centred
        central = np.array([0, (w - 13) // 2, 10, 13])
        rate = lambda boxes: (boxes == central).all(axis=1).mean()  # noqa: E731
        assert rate(theirs) > 0.2 and abs(rate(ours) - rate(theirs)) < 0.04


def test_crop_box_is_relative_so_it_replays_on_a_resized_copy():
    t = RandomResizedCrop()
    p = one(t, Context(400, 560), seed=3)
    big = box_to_pixels(p["crop"], 400, 560)
    small = box_to_pixels(p["crop"], 40, 56)
    assert all(abs(b / 10 - s) <= 1 for b, s in zip(big, small))


def test_box_conversions_agree():
    """The vectorised box conversion (batched crops) and the per-sample one give the same pixels for any stored box
    and image size, edges and degenerate boxes included."""
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.integers(0, 4097, (3000, 4)), [[0, 0, 0, 0], [4096, 4096, 4096, 4096], [4095, 0, 1, 1]]])
    for height, width in [(1, 1), (3, 7), (375, 500), (1999, 17), *rng.integers(1, 3000, (20, 2)).tolist()]:
        vectorised = boxes_to_pixels(boxes.astype(np.uint16), height, width)
        assert [box_to_pixels(b, height, width) for b in boxes.astype(np.uint16)] == [tuple(v) for v in vectorised.tolist()]
        assert (vectorised[:, 2:] >= 1).all() and (vectorised[:, 0] + vectorised[:, 2] <= height).all()


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
    from torchvision.transforms.v2 import RandAugment as TV

    """Magnitude 9 of 31 bins: rotate 9 deg, shear 0.09, translate 0.136 of the side, enhance 0.27, posterize 7 bits,
    solarize at 178.5 (ml-dr uses torchvision's RandAugment with its defaults)."""
    m = RandAugment.magnitude_of
    assert m("Rotate", 9, 224, 224) == pytest.approx(9.0)
    assert m("ShearX", -9, 224, 224) == pytest.approx(-0.09)
    assert m("TranslateX", 9, 224, 224) / 224 == pytest.approx(0.1360, abs=1e-4)
    assert m("Brightness", 9, 224, 224) == pytest.approx(0.27)
    assert m("Posterize", 9, 224, 224) == 7
    assert m("Solarize", 9, 224, 224) * 255 == pytest.approx(178.5)
    drawn = RandAugment().sample(Draws(0, 0, 3000), Context(10, 10))
    ops = drawn["ra_ops"].ravel()
    assert (ops < len(RANDAUGMENT_OPS)).all() and np.bincount(ops).min() > 300  # uniform over the 14 ops
    assert set(np.abs(drawn["ra_bins"].ravel().astype(int))) == {9}
    signed = np.array([TV._AUGMENTATION_SPACE[RANDAUGMENT_OPS[o]][1] for o in ops])
    assert (drawn["ra_bins"].ravel()[~signed] == 9).all()  # ops without a sign keep it positive
    assert abs((drawn["ra_bins"].ravel()[signed] < 0).mean() - 0.5) < 0.03  # the others get a random sign
    skipped = RandAugment(p=0.3).sample(Draws(0, 0, 2000), Context(10, 10))
    off = (skipped["ra_ops"] == 255).all(axis=1)
    assert abs(off.mean() - 0.7) < 0.03 and (skipped["ra_bins"][off] == 0).all()


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
    boxes = RandomErasing().sample(Draws(1, 0, 4000), Context(40, 56))["erase_box"].astype(int)
    erased = boxes[boxes[:, 2] > 0]
    assert abs(len(erased) / len(boxes) - 0.25) < 0.03
    areas = erased[:, 2] * erased[:, 3] / 4096**2
    assert 0.019 <= areas.min() and areas.max() <= 0.34
    assert (erased[:, 0] + erased[:, 2] <= 4096).all() and (erased[:, 1] + erased[:, 3] <= 4096).all()


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
    d = t.sample(Draws(0, 0, 8000), Context(224, 224, position=0, group_rows=8, num_samples=400))
    mixup, cutmix = d["mix_lam"] > 0, d["mix_box"][:, 2] > 0
    assert abs(mixup.mean() - 0.5) < 0.02 and abs(cutmix.mean() - 0.5) < 0.02
    assert abs((mixup & cutmix).mean() - 0.25) < 0.02 and abs((~mixup & ~cutmix).mean() - 0.25) < 0.02
    assert ((d["mix_partner"] != 0) == (mixup | cutmix)).all()
    assert np.bincount(d["mix_partner"][d["mix_partner"] != 0])[1:].min() > 800  # partners 1..7 rows on, uniformly
    # own MixUp weight = 1 - Beta(1, 1) / 2: uniform on [0.5, 1]
    own = d["mix_lam"][mixup] / Q16
    assert own.min() >= 0.5 and abs(own.mean() - 0.75) < 0.01 and abs(np.median(own) - 0.75) < 0.015
    # CutMix box side sqrt(1 - U) before clipping: mean unclipped area fraction 1/2, so clipped area below that
    box = d["mix_box"][cutmix].astype(int)
    areas = box[:, 2] * box[:, 3] / 4096**2
    assert 0.2 < areas.mean() < 0.5
    samples = d["mix_sample"][d["mix_partner"] != 0]
    assert samples.max() < 400 and abs(samples.mean() - 199.5) < 8  # uniform over the partner's 400 samples
    assert not d["mix_sample"][d["mix_partner"] == 0].any() and not d["mix_box"][d["mix_partner"] == 0].any()


def test_cifar_preset_is_resize_pad_crop():
    """ResizeRandomCrop at the reference size equals resize + zero padding 16 + a crop at the stored offset."""
    from torchvision.transforms.v2 import functional as F

    t = make_pipeline("cifar100+").get("resize_random_crop")
    out = InputSpec(size=(224, 224), interpolation="bilinear")
    im = image(32, 32)
    drawn = t.sample(Draws(0, 0, 200), Context(32, 32))
    offsets = []
    for j in range(200):
        p = params_at(drawn, j)
        top, left = (int(round(int(v) * 224 / 4096)) + 16 for v in p["pad_crop"])
        offsets.append((top, left))
        ref = F.pad(F.resize(im, [224], interpolation=F.InterpolationMode.BILINEAR, antialias=True), [16] * 4)
        assert torch.equal(t.apply(im, p, out), ref[:, top:top + 224, left:left + 224])
    flat = np.array(offsets)
    assert flat.min() == 0 and flat.max() == 32  # offsets span [0, 2 * padding]


def test_mix_partner_never_leaves_a_partial_group():
    t = MixUpCutMix(group_size=8)
    drawn = t.sample(Draws(0, 0, 300), Context(8, 8, position=1, group_rows=3, num_samples=4))
    partners = 1 + drawn["mix_partner"].astype(int)
    assert set(partners) == {0, 1, 2}  # both other rows of the partial group, and unmixed samples


@pytest.mark.parametrize("classes", [2, 10, 1000])
def test_rows_sorted_by_label_are_told_from_a_random_order(classes):
    """MixUp/CutMix partners are rows of one group of 8 consecutive rows: a source stored sorted by label (an image
    folder, this CIFAR-10 copy) would mix each image with its own class. Sorted labels are told from any random order,
    and a random order never looks sorted (1000 draws, balanced or 95/5 labels)."""
    rng = np.random.default_rng(0)
    n = max(512, 16 * classes)  # ImageNet's classes have about 1300 images each
    agreement, chance, groups = label_agreement_in_groups(np.sort(rng.integers(0, classes, n)), 8)
    assert agreement > 0.8 and chance < 0.6 and groups == n // 8 and sorted_by_label(agreement, chance, groups)
    few = label_agreement_in_groups(np.arange(512) // 4, 8)  # 4 images a class: 3 of a row's 7 partners its own class
    assert few[0] == pytest.approx(3 / 7) and sorted_by_label(*few)
    for p in (None, [0.95] + [0.05 / (classes - 1)] * (classes - 1)):
        for _ in range(1000 if classes == 2 else 50):
            labels = rng.choice(classes, 256, p=p)
            assert not sorted_by_label(*label_agreement_in_groups(labels, 8))
    assert label_agreement_in_groups(np.arange(512) // 256, 8)[:2] == (1.0, 0.5)  # two classes, sorted: every pair
    assert label_agreement_in_groups(np.arange(512) // 256 * 10**12, 8)[:2] == (1.0, 0.5)  # any ids, no table of them
    assert not sorted_by_label(*label_agreement_in_groups(np.zeros(512), 8))  # one class: nothing to tell
    assert label_agreement_in_groups(np.full(512, -1), 8) == (0.0, 0.0, 0)  # unlabelled rows are left out
    assert not sorted_by_label(*label_agreement_in_groups(np.arange(31 * 8) // 8, 8))  # under 32 groups: too few


def test_determinism_pure_function_of_seed_index_sample():
    """Sample j of row i depends on (seed, i, j) and the image size only: not on call order, on how many samples are
    drawn with it, or on the other transforms of the pipeline."""
    pipe = make_pipeline("imagenet+rare+mix")
    ctx = Context(40, 56, position=2, group_rows=8, num_samples=16)

    def params(seed, i, j, n=16):
        return params_at(pipe.sample(seed, i, n, ctx), j)

    def same(a, b):
        return all(np.array_equal(a[k], b[k]) for k in a)

    a = params(0, 10, 3)
    [params(0, i, j) for i in range(5) for j in range(5)]  # other calls in between do not change it
    assert same(a, params(0, 10, 3)) and same(a, params(0, 10, 3, n=4)) and same(a, params(0, 10, 3, n=400))
    assert not same(a, params(1, 10, 3)) and not same(a, params(0, 11, 3)) and not same(a, params(0, 10, 4))
    drawn = pipe.sample(0, 10, 16, ctx)
    assert len({drawn["crop"][j].tobytes() for j in range(16)}) == 16  # samples are not copies of each other
    # each transform draws from its own stream: the crops and flips of imagenet+rrc are those of imagenet+rare+mix
    light = make_pipeline("imagenet+rrc").sample(0, 10, 16, ctx)
    assert np.array_equal(light["crop"], drawn["crop"]) and np.array_equal(light["flip"], drawn["flip"])


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
    drawn = pipe.sample(seed, index, 2, ctx)
    for name, (shape, dtype) in pipe.param_fields().items():
        assert drawn[name].shape == (2, *shape) and drawn[name].dtype == np.dtype(dtype)
    params = params_at(drawn, 0)
    im = image(h, w, seed % 1000)
    x1 = pipe.render(im, params, OUT)
    x2 = pipe.render(im.clone(), params_at(pipe.sample(seed, index, 1, ctx), 0), OUT)
    assert x1.shape == (3, 24, 24) and torch.isfinite(x1).all() and torch.equal(x1, x2)
    rows = [drawn if r == index % 8 else pipe.sample(seed, r, 1, Context(h, w, r, 8)) for r in range(8)]
    y = pipe.render_samples([im, image(h, w, 1)] * 4, rows, [(index % 8, 0)], OUT)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_decoded_layout_does_not_change_a_render(preset):
    """Decoded images are CHW views with channels-last strides (no copy); every preset renders them exactly as it
    renders a contiguous copy."""
    pipe = make_pipeline(preset)
    hwc = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    view, contiguous = hwc.permute(2, 0, 1), hwc.permute(2, 0, 1).contiguous()
    assert not view.is_contiguous()
    drawn = pipe.sample(3, 11, 12, Context(37, 53, num_samples=12))
    for j in range(12):
        p = params_at(drawn, j)
        assert torch.equal(pipe.render(view, p, OUT), pipe.render(contiguous, p, OUT)), (preset, j)


@pytest.mark.parametrize("name", ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Sharpness"])
def test_ops_with_constants_are_torchvisions_at_every_magnitude(name):
    """The ops whose constants dr-hf computes on the host (affine matrices and grid scales, the sharpening kernel,
    the rotation's path) give torchvision's pixels at every signed bin, on square and oblong images, uint8 and float,
    run from Python and in one TorchScript call."""
    from torchvision.transforms.v2 import RandAugment as TV

    from dr_hf.randaugment_ops import randaugment_constants, randaugment_op, rotation_path

    tv = TV(num_ops=1)
    for h, w in ((16, 16), (13, 22)):
        im = image(h, w, seed=h)
        for x in (im, im.float() / 255):
            runs, expected = [], []
            for signed_bin in range(-30, 31):
                magnitude = RandAugment.magnitude_of(name, signed_bin, h, w)
                constants = torch.tensor(randaugment_constants(name, magnitude, h, w))
                path = rotation_path(name, magnitude, h, w)
                want = tv._apply_image_or_video_transform(x, name, magnitude, interpolation=tv.interpolation,
                                                          fill=tv._fill)
                assert torch.equal(randaugment_op(x, name, magnitude, constants, path), want), (name, h, w, signed_bin)
                runs.append((len(runs), len(runs) + 1, name, magnitude, path))
                expected.append(want)
            table = torch.tensor([randaugment_constants(name, m, h, w) for _, _, _, m, _ in runs])
            batch = x[None].repeat(len(runs), 1, 1, 1)
            assert torch.equal(script.call(randaugment_runs, batch, runs, table), torch.stack(expected)), (name, h, w)


def test_autocontrast_is_torchvisions_on_flat_and_float_images():
    """RandAugment's AutoContrast is written out (torchvision's fills become selections, which run in TorchScript
    without a copy to the device): torchvision's own floats, for uint8 and float batches, flat images included."""
    from torchvision.transforms.v2 import functional as F

    from dr_hf.randaugment_ops import _autocontrast

    g = torch.Generator().manual_seed(0)
    im = torch.randint(60, 140, (40, 3, 9, 7), generator=g, dtype=torch.uint8)
    im[:5] = 77  # flat: no contrast to stretch
    for x in (im, im.float() / 255):
        assert torch.equal(_autocontrast(x.clone()), F.autocontrast(x.clone()))
        runs = [(0, 40, "AutoContrast", 0.0, 0)]
        assert torch.equal(script.call(randaugment_runs, x.clone(), runs, torch.zeros(1, RA_CONSTANTS)), F.autocontrast(x))


def test_batched_stages_equal_one_sample_at_a_time():
    """RandAugment, RandomErasing and MixUp/CutMix on a batch (the GPU path) give exactly what they give one sample at
    a time, for drawn parameters: every RandAugment op, skipped ones, channels-last input, unmixed samples."""
    rng = np.random.default_rng(0)
    hwc = torch.from_numpy(rng.integers(0, 256, (300, 20, 24, 3), dtype=np.uint8))
    x = hwc.permute(0, 3, 1, 2)  # channels-last, as crops come
    x[:100] = x[:100] // 3 + 60  # low contrast, so that autocontrast and equalize act
    ra = RandAugment(p=0.9)
    params = ra.sample(Draws(0, 0, 300), Context(20, 24))
    assert set(params["ra_ops"].ravel()) == set(range(len(RANDAUGMENT_OPS))) | {255}
    one = torch.stack([ra.apply(x[k], params_at(params, k), OUT) for k in range(300)])  # (from Python)
    assert torch.equal(ra.apply_batch(x, params), one)  # (one TorchScript call an op slot)
    assert isinstance(script._COMPILED[randaugment_runs], torch.jit.ScriptFunction)
    params["ra_ops"][7, 1] = 99
    with pytest.raises(ValueError, match="ra_ops holds 99"):
        ra.apply_batch(x, params)

    erase = RandomErasing(p=0.5)
    boxes = erase.sample(Draws(1, 0, 300), Context(20, 24))
    floats = torch.rand(300, 3, 20, 24)
    assert torch.equal(erase.apply_batch(floats, boxes),
                       torch.stack([erase.apply(floats[k], params_at(boxes, k), OUT) for k in range(300)]))
    assert torch.equal(erase.apply_batch(x, boxes), torch.stack([erase.apply(x[k], params_at(boxes, k), OUT) for k in range(300)]))

    mix = MixUpCutMix()
    mixing = mix.sample(Draws(2, 0, 300), Context(20, 24, position=3, group_rows=8, num_samples=4))
    own, partner = torch.randn(300, 3, 20, 24), torch.randn(300, 3, 20, 24)
    expected = torch.stack([mix.apply_mix(own[k], partner[k], p) if mix.is_mixed(p) else own[k]
                            for k, p in ((k, params_at(mixing, k)) for k in range(300))])
    assert torch.equal(mix.apply_mix_batch(own, partner, mixing), expected)


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - {"cifar100+"}))  # (cifar100+'s crop is not batched)
def test_batched_render_is_the_per_sample_render_where_the_crop_is_exact(preset):
    """Boxes covering whole images at their own size, where both crop paths copy the image: the batched path (crop,
    RandAugment, erasing, normalisation, MixUp/CutMix with partners across the group) is the per-sample path, bit
    for bit, in uint8 and float."""
    pipe = make_pipeline(preset)
    g = pipe.group_size
    images = [image(24, 24, seed) for seed in range(8)]
    rows = [pipe.sample(5, r, 6, Context(24, 24, r % g, g, 6)) for r in range(8)]
    for p in rows:
        p["crop"][:] = [0, 0, 4096, 4096]
    picks = [(r, j) for r in range(8) for j in range(6)][5:]  # not starting at a row's first sample
    out = InputSpec(size=(24, 24), mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4), interpolation="bilinear")
    per_sample = pipe.render_samples(images, rows, picks, out, batched=False)
    assert torch.equal(pipe.render_samples(images, rows, picks, out, batched=True), per_sample)
    if pipe.renders_uint8:
        assert torch.equal(pipe.render_samples(images, rows, picks, out, normalise=False, batched=True),
                           pipe.render_samples(images, rows, picks, out, normalise=False, batched=False))
    if pipe.mix is not None:
        assert any(pipe.mix.is_mixed(params_at(rows[r], j)) for r, j in picks)
        with pytest.raises(ValueError, match="not in the group"):
            pipe.render_samples(images[:3], rows[:3], picks[:12], out, batched=True)
