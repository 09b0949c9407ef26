"""Bad and odd inputs (issue 7): each is handled correctly or refused with an error naming the row and column;
with ``on_bad_row="skip"`` bad rows are listed, never silently dropped. docs/robustness.md lists the behaviours."""

import io
import json
import os

import datasets
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dr_hf import TeacherEnsemble
from dr_hf.collator import ReinforcedCollator
from dr_hf.inputs import InputSpec
from dr_hf.format import DR_INDEX, DR_TOPK_INDICES, DR_TOPK_LOGPROBS, METADATA_KEY, config_from_parquet
from dr_hf.images import BadImageError, _jpeg_decoder, decode
from dr_hf import reinforce
from dr_hf.shards import shard_paths
from dr_hf.verify import verify

from conftest import SHARED, jpeg_bytes, make_image_dataset, needs_shared
from test_reinforce import make_config

BAD = {5: "truncated", 12: "zero-byte", 17: "label"}
BAD_MIX = {3: "label", 5: "truncated", 21: "zero-byte"}  # groups 0 and 2 of 8 rows; group 1 is clean


def corrupt(ds, bad=BAD):
    """``ds`` with row 5 truncated, row 12 zero bytes, row 17 labelled outside the 10 classes."""
    raw = ds.cast_column("image", datasets.Image(decode=False)).cast_column("label", datasets.Value("int64"))

    def change(x, i):
        image = x["image"]["bytes"]
        if bad.get(i) == "truncated":
            image = image[:60]
        elif bad.get(i) == "zero-byte":
            image = b""
        return {"image": {"bytes": image, "path": None}, "label": 10 if bad.get(i) == "label" else x["label"]}

    return raw.map(change, with_indices=True).cast_column("image", datasets.Image())


def rows_by_index(folder):
    table = pq.read_table(os.path.join(folder, "data"))
    return {r[DR_INDEX]: r for r in table.to_pylist()}


@pytest.mark.parametrize("augment", ["rrc+flip", "imagenet+rare+mix"])
def test_skip_policy_lists_every_bad_row_and_keeps_the_rest_exact(tmp_path, teachers, augment):
    clean = make_image_dataset(24, seed=21)
    bad = BAD if augment == "rrc+flip" else BAD_MIX
    config = make_config(teachers, augment=augment, n=3, k=2, rows_per_shard=8)
    reinforce(clean.cast_column("label", datasets.Value("int64")), config, teachers, str(tmp_path / "clean"), show_progress=False)
    with pytest.raises(ValueError, match=r"row (3|5), column '(image|label)'.*; `on_bad_row` skip leaves such rows out"):
        reinforce(corrupt(clean, bad), config, teachers, str(tmp_path / "fail"), show_progress=False)
    result = reinforce(corrupt(clean, bad), config, teachers, str(tmp_path / "skip"), show_progress=False, on_bad_row="skip")
    reports = sorted((tmp_path / "skip" / "errors").glob("*.jsonl"))
    listed = [json.loads(line) for p in reports for line in p.read_text().splitlines()]
    kept = rows_by_index(tmp_path / "skip")
    listed_idx = [r[DR_INDEX] for r in listed]
    # no row lost: every source row is either in the output or in the error report, never both
    assert sorted(listed_idx + list(kept)) == list(range(24)) and not set(listed_idx) & set(kept)
    by = {r[DR_INDEX]: r for r in listed}
    kinds = {"truncated": ("image", "cannot decode"), "zero-byte": ("image", "empty"), "label": ("label", "label 10 is outside")}
    for index, kind in bad.items():
        column, text = kinds[kind]
        assert by[index]["column"] == column and text in by[index]["error"] and f"row {index}" in by[index]["error"]
    if augment == "rrc+flip":
        assert sorted(listed_idx) == [5, 12, 17]
    else:  # the MixUp/CutMix groups of the bad rows go with them (their samples may mix with a bad row), listed
        assert sorted(listed_idx) == list(range(0, 8)) + list(range(16, 24))
        assert sorted(kept) == list(range(8, 16))
        assert "its MixUp/CutMix group, which holds bad row 3" in by[6]["error"]
    # the rows that were kept are exactly those of a clean run: rows do not depend on their neighbours' fate
    reference = rows_by_index(tmp_path / "clean")
    for index, row in kept.items():
        assert row == reference[index]
    assert result.stats["skipped_rows"] == len(listed) and result.stats["source_rows"] == 24
    card = (tmp_path / "skip" / "README.md").read_text()
    assert f"{len(listed)} of 24 source rows skipped as bad input" in card


def test_odd_and_hostile_images(monkeypatch):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    with pytest.raises(BadImageError, match=r"row 3, column 'img': the image is empty"):
        decode(b"", row=3, column="img")
    with pytest.raises(BadImageError, match=r"row 4, column 'img': cannot decode"):
        decode(b"GIF89a not really", row=4, column="img")
    png_as_jpeg = io.BytesIO()
    PIL.Image.fromarray(arr).save(png_as_jpeg, format="PNG")  # a PNG in a file called .jpg: decoded by content
    assert decode({"bytes": png_as_jpeg.getvalue(), "path": "x.jpg"}).shape == (3, 30, 20)
    # a decompression bomb: more pixels than PIL's limit is refused, not decoded into memory
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadImageError, match=r"row 9, column 'image'.*DecompressionBomb"):
        decode(jpeg_bytes(np.zeros((64, 64, 3), dtype=np.uint8)), row=9)


@pytest.mark.parametrize("torchvision_decodes", [True, False])
def test_a_torchcodec_that_cannot_load_is_said_once_and_another_decoder_decodes(monkeypatch, caplog,
                                                                              torchvision_decodes):
    """TorchCodec installed but built for another torch (its import raises OSError, as a CUDA 13 build does beside a
    CUDA 12 torch): one warning naming torch's version and the fix, then torchvision.io decodes the JPEG (the lent
    H100s' torch 2.11 has no TorchCodec with image decoding, but torchvision's nvJPEG), or, where torchvision cannot
    either, PIL: the same pixels each time."""
    import sys
    import types

    import dr_hf.images as images

    class Broken(types.ModuleType):
        def __getattr__(self, name):
            raise OSError("libnvrtc.so.13: cannot open shared object file: No such file or directory")

    data = jpeg_bytes(np.random.default_rng(3).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    want = decode(data, row=0)  # this environment's decoder
    images._jpeg_decoder.cache_clear()
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", Broken("torchcodec.decoders"))
    if not torchvision_decodes:
        monkeypatch.setattr(images, "_torchvision_jpeg_decoder", lambda: None)
    try:
        with caplog.at_level("WARNING", logger="dr_hf.images"):
            got = [decode(data, row=0) for _ in range(3)]
            assert images.jpeg_decoder_name() == ("torchvision.io" if torchvision_decodes else None)
            later = images.decode_later(data)  # left encoded for the device only where a decoder there can decode it
            assert isinstance(later, images.EncodedJpeg) == torchvision_decodes
    finally:
        images._jpeg_decoder.cache_clear()
    warnings = [r.getMessage() for r in caplog.records if "TorchCodec" in r.getMessage()]
    assert len(warnings) == 1 and torch.__version__ in warnings[0] and "libnvrtc.so.13" in warnings[0]
    assert ("decoded by torchvision.io" if torchvision_decodes else "decoded by PIL") in warnings[0]
    assert "made for your torch" in warnings[0]
    assert all(torch.equal(g, want) for g in got)


@needs_shared("imagenet-sample")
@pytest.mark.parametrize("library", ["TorchCodec", "torchvision.io"])
def test_jpeg_fast_path_gives_pils_pixels(tmp_path, monkeypatch, library):
    """JPEGs are decoded by TorchCodec's decoder (torchvision.io's where TorchCodec cannot load): on real ImageNet
    files (RGB and grayscale, baseline and progressive) the pixels equal PIL's, other modes (CMYK) and formats keep
    PIL's path, and a truncated file is still refused naming the row."""
    import dr_hf.images as images

    ds = datasets.load_dataset(str(SHARED / "imagenet-sample"), split="train").cast_column(
        "image", datasets.Image(decode=False))
    cells = [ds[i]["image"] for i in range(0, 1000, 9)]
    assert _jpeg_decoder() is not None, "torchcodec is a dependency: the release made for this torch must load"
    if library == "torchvision.io":
        monkeypatch.setattr(images, "_jpeg_decoder", images._torchvision_jpeg_decoder)
    assert images.jpeg_decoder_name() == library
    modes = set()
    for cell in cells:
        pil = PIL.Image.open(io.BytesIO(cell["bytes"]))
        modes.add(pil.mode)
        expected = np.asarray(pil.convert("RGB"))
        got = decode(cell)
        assert got.dtype == torch.uint8 and got.stride()[0] == 1  # a CHW view of HWC memory
        assert np.array_equal(got.permute(1, 2, 0).numpy(), expected)
    assert modes == {"RGB", "L"}
    rgb = np.asarray(PIL.Image.open(io.BytesIO(cells[0]["bytes"])).convert("RGB"))
    for kind in ("progressive", "CMYK"):
        buf = io.BytesIO()
        PIL.Image.fromarray(rgb).convert("CMYK" if kind == "CMYK" else "RGB").save(
            buf, format="JPEG", quality=90, progressive=kind == "progressive")
        expected = np.asarray(PIL.Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        assert np.array_equal(decode(buf.getvalue()).permute(1, 2, 0).numpy(), expected), kind
    path = tmp_path / "x.jpg"
    path.write_bytes(cells[1]["bytes"])
    assert torch.equal(decode({"path": str(path), "bytes": None}), decode(cells[1]))
    with pytest.raises(BadImageError, match=r"row 7, column 'image': cannot decode.*truncated"):
        decode(cells[0]["bytes"][: len(cells[0]["bytes"]) // 2], row=7)


@pytest.mark.parametrize("decoder", ["TorchCodec", "torchvision.io", "PIL"])
def test_exif_orientation_is_applied_as_datasets_does(monkeypatch, decoder):
    """A photo's EXIF orientation is applied on every decoding path, as datasets' Image feature (what load_dataset
    shows) and TorchCodec apply it: all eight orientations of an RGB, a grayscale and a CMYK JPEG and of a PNG
    decode to datasets' pixels, with TorchCodec, with torchvision.io and with neither (PIL decodes all), and
    decode_later (replay on the device) decodes a turned photo at once (torchvision's CUDA decoder ignores the
    orientation, and TorchCodec's takes none) and leaves only upright JPEGs encoded. Before, PIL's path left turned photos as stored,
    so a job and a training run on machines with and without TorchCodec, or a CMYK photo, saw them differently."""
    import dr_hf.images as images

    library = decoder != "PIL"  # a JPEG library decodes
    if decoder == "PIL":
        monkeypatch.setattr(images, "_jpeg_decoder", lambda: None)
    elif decoder == "torchvision.io":
        monkeypatch.setattr(images, "_jpeg_decoder", images._torchvision_jpeg_decoder)
    stored = np.asarray(PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 8, 3), dtype=np.uint8))
                        .resize((64, 40)))
    feature = datasets.Image()
    for orientation in range(1, 9):
        exif = PIL.Image.Exif()
        exif[PIL.Image.ExifTags.Base.Orientation] = orientation
        for mode, fmt in (("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG")):
            buf = io.BytesIO()
            PIL.Image.fromarray(stored).convert(mode).save(buf, format=fmt, exif=exif.tobytes())
            shown = np.asarray(feature.decode_example({"bytes": buf.getvalue(), "path": None}).convert("RGB"))
            assert shown.shape[:2] == ((64, 40) if orientation >= 5 else (40, 64))
            got = decode(buf.getvalue(), row=orientation)
            assert np.array_equal(got.permute(1, 2, 0).numpy(), shown), (orientation, mode, fmt)
            later = images.decode_later(buf.getvalue())
            # left encoded for the device only upright: on CUDA, torchvision's nvJPEG path ignores the orientation
            assert isinstance(later, images.EncodedJpeg) == \
                (library and (mode, fmt) in (("RGB", "JPEG"), ("L", "JPEG")) and orientation == 1)
            if isinstance(later, images.EncodedJpeg):
                assert (later.height, later.width) == shown.shape[:2]
                assert torch.equal(images.decode_jpegs([later.data], "cpu", [orientation])[0], got)
                with monkeypatch.context() as without:  # bytes handed to a process without a JPEG library
                    without.setattr(images, "_jpeg_decoder", lambda: None)
                    assert torch.equal(images.decode_jpegs([later.data], "cpu", [orientation])[0], got)
            else:
                assert torch.equal(later, got)


@pytest.mark.parametrize("refused", ["every JPEG", "one odd JPEG", "none"])
def test_a_device_torchcodec_cannot_decode_on_is_left_after_a_batch_it_refuses(monkeypatch, caplog, refused):
    """replay_on_device hands JPEG bytes to TorchCodec on the training device. A TorchCodec without that device's
    support refuses every JPEG there: a batch whose every JPEG it refuses there and the host decodes marks the
    device, with one warning, and from then on the JPEGs are decoded on the host and copied over (no failing call
    per batch and per image). One odd JPEG the device refuses is decoded on the host alone and marks nothing, and a
    corrupt JPEG is named by its row. ("meta" stands for the GPU: a device without pixels; the host path's pixels are
    checked by the other tests.)"""
    import dr_hf.images as images

    codec = _jpeg_decoder()
    if codec is None:
        pytest.skip("TorchCodec does not load here")
    rng = np.random.default_rng(0)
    jpegs = [jpeg_bytes(rng.integers(0, 256, (20 + k, 30, 3), dtype=np.uint8)) for k in range(3)]
    odd = {"every JPEG": set(map(len, jpegs)), "one odd JPEG": {len(jpegs[1])}, "none": set()}[refused]
    device_calls = []

    def decoder(data, mode="RGB", device="cpu"):
        if torch.device(device).type == "cpu":
            return codec(data, mode=mode)
        device_calls.append(len(data) if isinstance(data, list) else 1)
        if any(len(d) in odd for d in (data if isinstance(data, list) else [data])):
            raise RuntimeError("Unsupported device: meta\n(a second line)")
        out = codec(data, mode=mode)
        return [o.to(device) for o in out] if isinstance(data, list) else out.to(device)

    monkeypatch.setattr(images, "_jpeg_decoder", lambda: decoder)
    monkeypatch.setattr(images, "_NO_DEVICE_DECODING", {})
    with caplog.at_level("WARNING", logger="dr_hf.images"):
        for attempt in range(3):
            got = images.decode_jpegs(jpegs, "meta", [10, 11, 12])
            assert [tuple(g.shape) for g in got] == [(3, 20 + k, 30) for k in range(3)]
            assert all(g.device.type == "meta" for g in got)
    # every JPEG refused: the batch and each JPEG once, then never again; one refused: so in every batch; none: a call
    assert device_calls == {"every JPEG": [3, 1, 1, 1], "one odd JPEG": [3, 1, 1, 1] * 3, "none": [3] * 3}[refused]
    warned = [r.getMessage() for r in caplog.records if "cannot decode JPEGs on meta" in r.getMessage()]
    assert warned == (["TorchCodec cannot decode JPEGs on meta (RuntimeError: Unsupported device: meta); decoding "
                       "them on the host instead"] if refused == "every JPEG" else [])
    monkeypatch.setattr(images, "_NO_DEVICE_DECODING", {})
    with pytest.raises(BadImageError, match=r"row 12, column 'image': cannot decode"):
        images.decode_jpegs(jpegs[:2] + [jpegs[2][: len(jpegs[2]) // 3]], "meta", [10, 11, 12])
    assert images._NO_DEVICE_DECODING == {}


def test_nan_teacher_is_refused_naming_rows(tmp_path, tiny_timm_dir):
    from safetensors.torch import load_file, save_file

    nan_dir = tmp_path / "nan_teacher"
    nan_dir.mkdir()
    for name in os.listdir(tiny_timm_dir):
        (nan_dir / name).write_bytes((tiny_timm_dir / name).read_bytes())
    weights = load_file(str(nan_dir / "model.safetensors"))
    weights["fc.weight"] = torch.full_like(weights["fc.weight"], float("nan"))
    save_file(weights, str(nan_dir / "model.safetensors"))
    teachers = TeacherEnsemble.from_specs([f"timm:local-dir:{nan_dir}"])
    with pytest.raises(FloatingPointError, match=r"NaN/inf outputs for rows 0\.\.3, sample indices 0\.\.1"):
        reinforce(make_image_dataset(4), make_config(teachers, n=2, k=2), teachers, str(tmp_path / "out"), show_progress=False)


def test_output_folder_of_another_kind_is_refused(tmp_path, teachers):
    (tmp_path / "data").mkdir()
    make_image_dataset(4).to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))  # a plain dataset
    with pytest.raises(ValueError, match="already holds data of a different job"):
        reinforce(make_image_dataset(8), make_config(teachers), teachers, str(tmp_path), show_progress=False)
    (tmp_path / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(ValueError, match="not readable as a reinforced shard"):
        reinforce(make_image_dataset(8), make_config(teachers), teachers, str(tmp_path), show_progress=False)
    # a folder of the user's own, whose README.md the card would replace: refused, the README and folder untouched
    project = tmp_path / "project"
    project.mkdir()
    for text in ("# my notes\n", "---\nlicense: mit\n---\n# a dataset card, not a reinforced one\n"):
        (project / "README.md").write_text(text)
        with pytest.raises(ValueError, match="holds a README.md that is not a dr-hf card"):
            reinforce(make_image_dataset(8), make_config(teachers), teachers, str(project), show_progress=False)
        assert (project / "README.md").read_text() == text and not (project / "data").exists()


def _rewrite(path, table, meta=None):
    schema = table.schema
    if meta is not None:
        schema = schema.with_metadata({**(schema.metadata or {}), METADATA_KEY: json.dumps(meta).encode()})
    pq.write_table(table.cast(schema), path)


@pytest.fixture()
def reinforced(tmp_path, teachers):
    out = tmp_path / "plus"
    reinforce(make_image_dataset(8), make_config(teachers, n=3, k=2), teachers, str(out), show_progress=False)
    return out


def test_newer_format_is_refused(reinforced):
    path = shard_paths(str(reinforced))[0]
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    _rewrite(path, table, {**meta, "format_version": 99, "dr_hf_version": "9.0"})
    with pytest.raises(ValueError, match="format version 99, written by dr-hf 9.0.*upgrade dr-hf"):
        config_from_parquet(path)
    with pytest.raises(ValueError, match="upgrade dr-hf"):
        verify(str(reinforced), rows=2)


@pytest.mark.parametrize("tamper, message", [
    ("index", r"dr_topk_indices: class id >= 10 in 1 row\(s\), first at row 3"),
    ("positive", r"dr_topk_logprobs: log-probability > 0 in 1 row\(s\), first at row 3"),
    ("nan", r"dr_topk_logprobs: NaN/inf in 1 row\(s\), first at row 3"),
    ("shape", r"expected 8 x 3 x 2 entries"),
])
def test_tampered_columns_are_caught_by_verify_and_the_collator(reinforced, tamper, message):
    path = shard_paths(str(reinforced))[0]
    table = pq.read_table(path)
    rows = table.to_pylist()
    row = rows[3]
    if tamper == "index":
        row[DR_TOPK_INDICES][1][0] = 12
    elif tamper == "positive":
        row[DR_TOPK_LOGPROBS][1][0] = 0.5
    elif tamper == "nan":
        row[DR_TOPK_LOGPROBS][1][0] = float("nan")
    elif tamper == "shape":
        row[DR_TOPK_INDICES] = row[DR_TOPK_INDICES][:2]
        row[DR_TOPK_LOGPROBS] = row[DR_TOPK_LOGPROBS][:2]
    _rewrite(path, pa.Table.from_pylist(rows, schema=table.schema))
    report = verify(str(reinforced), rows=8)
    assert not report.ok and any(__import__("re").search(message, p) for p in report.problems), report.problems
    # the collator refuses the same row when training reaches it, naming it
    example = datasets.load_dataset(str(reinforced), split="train")[3]
    collator = ReinforcedCollator(InputSpec((16, 16)), num_classes=10)
    for epoch in range(20):  # the pick is a function of (seed, epoch, row); sample 1 is the tampered one
        collator.epoch = epoch
        try:
            batch = collator([example])
        except ValueError as exc:
            assert "row 3, sample" in str(exc) and "column" in str(exc)
            break
        assert int(batch["sample_index"][0]) != 1 or tamper == "shape"
    else:
        pytest.fail("the collator never refused the tampered row")


def test_trainer_and_join_refuse_a_non_reinforced_dataset(tmp_path):
    from dr_hf.source import join_source
    from dr_hf.format import require_reinforced

    plain = make_image_dataset(4)
    with pytest.raises(ValueError, match=r"not a reinforced dataset: column\(s\) \['dr_index'"):
        require_reinforced(plain.column_names)
    with pytest.raises(ValueError, match="not a reinforced dataset"):
        join_source(plain, plain)


def test_push_refuses_what_is_not_a_finished_reinforced_folder(tmp_path, reinforced):
    from dr_hf.hub import push

    with pytest.raises(FileNotFoundError, match="not a reinforced folder"):
        push(str(tmp_path / "nothing"), "org/x")
    with pytest.raises(ValueError, match="use the form org/name"):
        push(str(reinforced), "x")
    (reinforced / "data" / "train-00001-of-00002.parquet.tmp").write_bytes(b"half")
    with pytest.raises(ValueError, match=r"half-written shards \(\*\.tmp\)"):
        push(str(reinforced), "org/x")


def test_verify_replays_stored_parameters_and_redraws_them_separately(reinforced):
    """verify renders what a row stores: a tampered crop is caught twice, as parameters that are not a fresh draw and
    as teacher outputs the stored crop does not give. Data drawn by dr-hf 0.1's per-sample sampler (format 2) cannot be
    re-drawn; its stored parameters are still replayed through the teacher."""
    path = shard_paths(str(reinforced))[0]
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    clean = verify(str(reinforced), rows=8)
    assert clean.ok and clean.replayed_rows == 8 and clean.params_mismatches == 0 and clean.params_redrawn
    rows = table.to_pylist()
    rows[3]["dr_params"]["crop"][1] = [0, 0, 4096, 4096] if rows[3]["dr_params"]["crop"][1][2] < 3000 else [0, 0, 1024, 1024]
    _rewrite(path, pa.Table.from_pylist(rows, schema=table.schema), meta)
    report = verify(str(reinforced), rows=8)
    assert report.params_mismatches == 1 and report.params_redrawn
    assert any(p.startswith("row 3, sample 1: recomputed log-probs differ") for p in report.problems), report.problems
    card = reinforced / "README.md"
    assert "format_version: 3" in card.read_text()
    card.write_text(card.read_text().replace("format_version: 3", "format_version: 2"))
    _rewrite(path, pa.Table.from_pylist(rows, schema=table.schema), {**meta, "format_version": 2})
    old = verify(str(reinforced), rows=8)
    assert not old.params_redrawn and old.params_mismatches == 0 and old.replayed_rows == 8
    assert [p.split(":")[0] for p in old.problems] == ["row 3, sample 1"]
