import dataclasses
import glob
import json
import os
import threading
import types

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dr_hf import DR_INDEX, DR_PARAMS, DR_TOPK_INDICES, DR_TOPK_LOGPROBS, ReinforceConfig, TeacherEnsemble, make_pipeline
from dr_hf.augment import Context
from dr_hf.pipeline import params_at
from dr_hf.format import AGREEMENT_KEY, DR_FINGERPRINT, config_from_parquet, reinforcement_features
from dr_hf.images import decode
from dr_hf.job import default_batch_size, default_prepare_threads, default_render, gpu_advice, reinforce
from dr_hf.reinforcer import Reinforcer, RowPreparer, default_render_threads, preparation_pool, teacher_block_rows
from dr_hf.shards import check_folder, shard_paths
from dr_hf.stats import reinforcement_bytes


DR = [DR_INDEX, DR_FINGERPRINT, DR_PARAMS, DR_TOPK_INDICES, DR_TOPK_LOGPROBS]


def make_config(teachers, augment="rrc+flip", n=4, k=3, seed=0, rows_per_shard=2048, teacher_batch_size=256, **kw):
    return ReinforceConfig.for_teachers(teachers, augment, num_samples=n, topk=k, seed=seed, rows_per_shard=rows_per_shard,
                                        teacher_batch_size=teacher_batch_size, **kw)


def run(ds, out, teachers, batch_size=8, **kw):
    config = make_config(teachers, **kw)
    return reinforce(ds, config, teachers, str(out), batch_size=batch_size, show_progress=False)


def dr_table(out):
    return pq.read_table(shard_paths(str(out))[0] if len(shard_paths(str(out))) == 1 else os.path.join(out, "data"),
                         columns=DR)


def test_a_config_for_teachers_records_them_the_preset_and_the_devices_defaults(teachers):
    config = ReinforceConfig.for_teachers(teachers, "imagenet+mix", crop_scale=0.35, group_size=4, seed=3,
                                          label_column=None)
    assert config.teachers == teachers.specs and config.num_classes == teachers.num_classes
    assert config.precision == teachers.precision and (config.num_samples, config.topk, config.seed) == (400, 10, 3)
    assert (config.teacher_batch_size, config.render) == (64, "per-sample")  # a CPU's, as dr-hf reinforce gives
    assert config.label_column is None and ReinforceConfig.from_dict(config.to_dict()).identity() == config.identity()
    pipeline = config.pipeline()
    assert pipeline.get("random_resized_crop").scale == (0.35, 1.0) and pipeline.group_size == 4
    with pytest.raises(ValueError, match="`teacher_batch_size` must be >= 1, got 0"):
        ReinforceConfig.for_teachers(teachers, teacher_batch_size=0)


def test_output_schema_keeps_columns_and_loads_map_style_and_streaming(tmp_path, image_dataset, teachers,
                                                                       monkeypatch):
    result = run(image_dataset, tmp_path, teachers, augment="imagenet+rare+mix", n=4, k=3)
    ds = datasets.load_dataset(str(tmp_path), split="train")
    assert ds.column_names == ["image", "label", "note"] + DR
    assert ds.features["label"] == image_dataset.features["label"]
    assert ds.features[DR_TOPK_INDICES].feature.feature.dtype == "uint16"
    assert ds.features[DR_TOPK_LOGPROBS].feature.feature.dtype == "float16"
    assert ds["note"] == image_dataset["note"] and ds[DR_INDEX] == list(range(len(image_dataset)))
    row = ds.with_format("numpy")[5]
    assert row[DR_TOPK_INDICES].shape == (4, 3) and row[DR_TOPK_LOGPROBS].shape == (4, 3)
    assert row[DR_PARAMS]["crop"].shape == (4, 4) and row[DR_PARAMS]["ra_ops"].shape == (4, 2)
    lp = np.asarray(ds.with_format("numpy")[DR_TOPK_LOGPROBS], dtype=np.float32)
    assert (np.diff(lp, axis=-1) <= 0).all() and (lp <= 0).all() and (np.exp(lp).sum(-1) <= 1.001).all()
    streamed = list(datasets.load_dataset(str(tmp_path), split="train", streaming=True))
    assert len(streamed) == len(ds)
    for a, b in zip(streamed, ds):
        assert a[DR_INDEX] == b[DR_INDEX] and a[DR_TOPK_INDICES] == b[DR_TOPK_INDICES]
        assert a[DR_TOPK_LOGPROBS] == b[DR_TOPK_LOGPROBS] and a[DR_PARAMS] == b[DR_PARAMS]
    # a shuffled stream (buffer shuffle takes rows out of sliced tables) still yields the exact rows
    by_index = {r[DR_INDEX]: r for r in ds}
    shuffled = list(datasets.load_dataset(str(tmp_path), split="train", streaming=True).shuffle(seed=0, buffer_size=5))
    assert sorted(r[DR_INDEX] for r in shuffled) == list(range(len(ds)))
    for r in shuffled:
        ref = by_index[r[DR_INDEX]]
        assert r[DR_TOPK_INDICES] == ref[DR_TOPK_INDICES] and r[DR_PARAMS] == ref[DR_PARAMS] and r["note"] == ref["note"]
    # the config travels in every file's metadata and in the card's YAML
    config = config_from_parquet(shard_paths(str(tmp_path))[0])
    assert config.augment == "imagenet+rare+mix" and config.num_samples == 4 and config.teachers == teachers.specs
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(str(tmp_path / "README.md"))
    assert card.data.reinforcement["augmentations"] == config.augmentations
    assert "dataset-reinforcement" in card.data.tags
    assert result.stats["rows"] == len(image_dataset)
    # each shard's footer holds the teachers' agreement with its labels (its unmixed samples), counted as it was
    # written, so the card's figures read footers alone: the same as counted from the columns
    from dr_hf import stats

    counted = [stats.agreement_counts(pq.read_table(p), "label", 3) for p in shard_paths(str(tmp_path))]
    footers = [json.loads(pq.read_schema(p).metadata[AGREEMENT_KEY]) for p in shard_paths(str(tmp_path))]
    assert [(f["hits"], f["samples"]) for f in footers] == counted and sum(t for _, t in counted) > 0

    def no_columns(*args, **kwargs):
        raise AssertionError("the card's figures read a shard's columns")

    monkeypatch.setattr(pq, "read_table", no_columns)
    figures = stats.summarize(str(tmp_path))
    assert figures["agreement_samples"] == sum(t for _, t in counted) == result.stats["agreement_samples"]
    assert figures["teacher_top1_agreement"] == round(sum(h for h, _ in counted) / figures["agreement_samples"], 4)


def test_row_groups_are_datasets_size_in_whole_mixing_groups(tmp_path, image_dataset, teachers, monkeypatch):
    """Shards are written in row groups of at most datasets.config.MAX_ROW_GROUP_SIZE, as `datasets` writes them
    (a stream holds one at a time, and can be split by them), each holding whole MixUp/CutMix groups."""
    run(image_dataset, tmp_path / "default", teachers)
    shard = shard_paths(str(tmp_path / "default"))[0]
    assert pq.read_metadata(shard).num_row_groups == 1  # 24 small rows: far under 100 MB
    monkeypatch.setattr(datasets.config, "MAX_ROW_GROUP_SIZE", pq.read_table(shard).nbytes // 2)  # ~12 rows a group
    for preset, sizes in (("rrc+flip", [12, 12]), ("imagenet+mix", [8, 8, 8])):  # (8: imagenet+mix's group size)
        out = tmp_path / preset.replace("+", "_")
        run(image_dataset, out, teachers, augment=preset)
        meta = pq.read_metadata(shard_paths(str(out))[0])
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == sizes
        stream = datasets.load_dataset(str(out), split="train", streaming=True).reshard()  # split by row group
        assert stream.n_shards == len(sizes)
        assert [r[DR_INDEX] for r in stream] == list(range(24))


def test_stored_logprobs_equal_teacher_on_replayed_params(tmp_path, image_dataset, teachers):
    """Replay: rendering the stored parameters and running the teacher reproduces the stored outputs."""
    run(image_dataset, tmp_path, teachers, augment="imagenet+rare+mix", n=3, k=4)
    ds = datasets.load_dataset(str(tmp_path), split="train").with_format("numpy")
    pipe = make_pipeline("imagenet+rare+mix")
    out = teachers.outputs()[0]
    rows = [0, 1, 2, 3, 4, 5, 6, 7]
    images = [decode(image_dataset[i]["image"]) for i in rows]
    stored = [ds[i] for i in rows]
    for j in range(3):
        for r in range(8):
            p = params_at(stored[r][DR_PARAMS], j)
            x = pipe.render(images[r], p, out)
            if p["mix_partner"]:  # by hand: the partner row's own stored sample mix_sample, rendered and mixed
                partner = r + int(p["mix_partner"])
                other = pipe.render(images[partner], params_at(stored[partner][DR_PARAMS], int(p["mix_sample"])), out)
                x = pipe.mix.apply_mix(x, other, p)
            lp = teachers.log_probs({0: x[None]})[0]
            top = torch.topk(lp, 4)
            assert top.indices.tolist() == stored[r][DR_TOPK_INDICES][j].tolist()
            assert np.allclose(top.values.numpy(), stored[r][DR_TOPK_LOGPROBS][j].astype(np.float32), atol=2e-3, rtol=2e-3)
        # and the stored parameters are exactly a fresh sampling of (seed, row, sample)
        for r in range(8):
            h, w = images[r].shape[-2:]
            fresh = params_at(pipe.sample(0, rows[r], 3, Context(h, w, position=r, group_rows=8, num_samples=3)), j)
            for name, value in params_at(stored[r][DR_PARAMS], j).items():
                assert np.array_equal(fresh[name], value), name


def test_batch_size_and_rerun_do_not_change_data(tmp_path, image_dataset, teachers):
    # 64-sample teacher batches, N=4: teacher blocks of 16 rows (two MixUp/CutMix groups), so map batches of 16 and 32
    run(image_dataset, tmp_path / "a", teachers, batch_size=8, augment="imagenet+mix", teacher_batch_size=64)
    run(image_dataset, tmp_path / "b", teachers, batch_size=24, augment="imagenet+mix", teacher_batch_size=64)
    run(image_dataset, tmp_path / "c", teachers, batch_size=3, augment="imagenet+mix", teacher_batch_size=64)
    a, b, c = (dr_table(tmp_path / x) for x in "abc")
    assert a.equals(b) and a.equals(c)


def test_teacher_batches_hold_whole_blocks_of_rows(image_dataset, teachers, monkeypatch):
    """Where N samples leave room, a teacher forward holds all samples of a block of rows (a power of two times the
    MixUp/CutMix group), not one row's: 64-sample batches of 16 rows x N=4, the last block partial. A map batch that
    starts inside a block is refused, naming the multiple to use."""
    config = make_config(teachers, augment="imagenet+mix", teacher_batch_size=64)
    assert teacher_block_rows(config) == 16
    assert teacher_block_rows(make_config(teachers, n=3, teacher_batch_size=64)) == 16  # 21 rows would fit
    assert teacher_block_rows(make_config(teachers, n=400)) == 1  # N fills batches: one row's samples in chunks
    assert teacher_block_rows(make_config(teachers, augment="imagenet+mix", n=400)) == 8
    sizes = []
    log_probs = teachers.log_probs
    monkeypatch.setattr(teachers, "log_probs",
                        lambda inputs, **kw: sizes.append(len(inputs[0])) or log_probs(inputs, **kw))
    batch = image_dataset.cast_column("image", datasets.Image(decode=False))[:]
    job = Reinforcer(config, teachers, num_rows=24)
    _, params, logps = job.compute(batch, list(range(24)))
    assert sizes == [64, 32] and all(lp.shape == (4, teachers.num_classes) for lp in logps)
    sizes.clear()  # one group at a time (as verify replays): the same samples, eight-row batches
    _, params_one, logps_one = Reinforcer(config, teachers, num_rows=24, block_rows=8).compute(batch, list(range(24)))
    assert sizes == [32, 32, 32]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(logps, logps_one))
    assert all(np.array_equal(a[f], b[f]) for a, b in zip(params, params_one) for f in a)
    done = []  # progress: rows as their teacher blocks are done
    Reinforcer(config, teachers, num_rows=24, progress=done.append)(batch, list(range(24)))
    assert done == [16, 8]
    tail = {key: values[8:] for key, values in batch.items()}
    with pytest.raises(RuntimeError, match="inside a teacher block of 16 rows: use a batch size that is a multiple of 16"):
        job.compute(tail, list(range(8, 24)))


def test_results_are_read_back_one_forward_late_on_a_gpu(image_dataset, teachers, monkeypatch):
    """With teachers on a GPU (``read_back_late``) a teacher batch's results are read back once the next batch's
    forward is queued, so that the GPU does not wait for the host between forwards: the same values and parameters,
    rows reported done in the same order, one forward later; a NaN batch is still named. (Asked for here, on the
    CPU.)"""
    config = make_config(teachers, teacher_batch_size=32)  # blocks of 8 rows x N=4: three forwards for 24 rows
    events = []
    log_probs = teachers.log_probs
    poisoned = {"forward": None}

    def watched(inputs, **kw):
        events.append("forward")
        out = log_probs(inputs, **kw)
        return torch.full_like(out, float("nan")) if events.count("forward") == poisoned["forward"] else out

    monkeypatch.setattr(teachers, "log_probs", watched)
    batch = image_dataset.cast_column("image", datasets.Image(decode=False))[:]
    results = {}
    for late in (False, True):
        events.clear()
        assert Reinforcer(config, teachers, num_rows=24).read_back_late is False  # the default on a CPU
        job = Reinforcer(config, teachers, num_rows=24, progress=events.append, read_back_late=late)
        results[late] = job.compute(batch, list(range(24)), topk=3)
        assert events == (["forward", "forward", 8, "forward", 8, 8] if late else ["forward", 8] * 3)
    (_, params, tops), (_, params_late, tops_late) = results[False], results[True]
    assert all(torch.equal(a, b) for row, row_late in zip(tops, tops_late) for a, b in zip(row, row_late))
    assert all(np.array_equal(a[f], b[f]) for a, b in zip(params, params_late) for f in a)
    poisoned["forward"], events[:] = 2, []
    job = Reinforcer(config, teachers, num_rows=24, read_back_late=True)
    with pytest.raises(FloatingPointError, match=r"rows 8\.\.15, sample indices 0\.\.3"):
        job.compute(batch, list(range(24)))


def test_preparation_threads_and_workers_change_nothing(tmp_path, image_dataset, teachers, monkeypatch):
    """Rows decoded and sampled ahead of the teacher by 3 threads (a GPU job's default) or 2 spawned worker processes:
    the same shards byte for byte as inline, and a corrupt row is named and skipped with its MixUp/CutMix group, or
    stops the job naming it, the same way."""
    broken = image_dataset.cast_column("image", datasets.Image(decode=False)).map(
        lambda x, i: {"image": {"bytes": x["image"]["bytes"][:50] if i == 5 else x["image"]["bytes"], "path": None}},
        with_indices=True).cast_column("image", datasets.Image())
    ways = {"inline": {}, "threads": {"prepare_threads": 3}, "workers": {"prepare_workers": 2}}
    prepare, where = RowPreparer.__call__, {}
    monkeypatch.setattr(RowPreparer, "__call__", lambda self, item: where.setdefault(
        threading.current_thread().name.split("_")[0], []).append(item[1]) or prepare(self, item))
    for name, how in ways.items():
        config = make_config(teachers, augment="imagenet+mix")
        reinforce(broken, config, teachers, str(tmp_path / name), batch_size=8, show_progress=False,
                  on_bad_row="skip", **how)
        if name != "workers":  # (worker processes run their own copy of the preparer)
            assert sorted(where.pop("dr-prepare" if how else "MainThread")) == list(range(len(image_dataset)))
            assert not where
    inline = dr_table(tmp_path / "inline")
    assert len(inline) == len(image_dataset) - 8  # row 5's group of 8 left out
    assert all(inline.equals(dr_table(tmp_path / name)) for name in ("threads", "workers"))
    reports = {name: open(glob.glob(str(tmp_path / name / "errors" / "*.jsonl"))[0]).read() for name in ways}
    assert "row 5, column 'image'" in reports["inline"] and len(set(reports.values())) == 1
    done = []  # progress counts the kept rows as they are done and the skipped ones with their map batch
    Reinforcer(make_config(teachers, augment="imagenet+mix"), teachers, num_rows=24, on_bad_row="skip",
               progress=done.append)(broken.cast_column("image", datasets.Image(decode=False))[:], list(range(24)))
    assert done == [16, 8]
    for name, how in ways.items():  # and stops the job naming it, from a thread or a worker
        if how:
            with pytest.raises(ValueError, match=r"row 5, column 'image'"):
                reinforce(broken, make_config(teachers), teachers, str(tmp_path / f"fail-{name}"),
                          show_progress=False, **how)
    with pytest.raises(ValueError, match=r"`prepare_workers` 2 and `prepare_threads` 3: give one of them \(processes or threads\)"):
        reinforce(broken, make_config(teachers), teachers, str(tmp_path / "both"), show_progress=False,
                  prepare_workers=2, prepare_threads=3)


def test_the_map_function_gives_the_typed_reinforcement_columns(tmp_path, image_dataset, teachers, caplog):
    """``Dataset.map(Reinforcer(...))`` on its own: the reinforcement columns row for row, with their declared
    Features (no ``features=`` needed), holding what the job writes."""
    config = make_config(teachers)
    ds = image_dataset.cast_column("image", datasets.Image(decode=False))
    out = ds.map(Reinforcer(config, teachers, num_rows=len(ds)), batched=True, batch_size=len(ds), with_indices=True)
    expected = reinforcement_features(config.pipeline(), config.num_samples, config.topk, config.num_classes)
    assert out.column_names == list(expected) and out.features == expected
    skipping = ds.map(Reinforcer(config, teachers, num_rows=len(ds), on_bad_row="skip"), batched=True,
                      batch_size=len(ds), with_indices=True)  # which rows were skipped, only where rows may be
    assert skipping.column_names == [*expected, "_dr_skip"] and not any(skipping["_dr_skip"])
    reinforce(image_dataset, config, teachers, str(tmp_path), show_progress=False)
    assert out.select_columns(list(expected)).data.table.equals(dr_table(tmp_path).select(list(expected)))
    # a stream reinforced lazily by IterableDataset.map (Python lists in and out, once a pyarrow TypeError): the same
    # columns row for row beside the stream's own, typed with the map function's features
    job = Reinforcer(config, teachers, num_rows=len(ds))
    stream = ds.to_iterable_dataset(num_shards=2)
    lazy = stream.map(job, batched=True, with_indices=True, batch_size=job.block_rows,
                      features=datasets.Features({**stream.features, **job.features}))
    assert job.features == expected and lazy.features == datasets.Features({**ds.features, **expected})
    assert [{k: row[k] for k in expected} for row in lazy] == list(out)
    for fmt in ("numpy", "torch"):  # formatted rows (images as arrays, labels as tensors): refused, saying why
        with pytest.raises(TypeError, match=r"takes a dataset's rows unformatted, but column 'image' holds (ndarray|Tensor) "
                                            r"values, .* map over dataset.with_format\(None\)"):
            image_dataset.with_format(fmt).map(job, batched=True, with_indices=True, batch_size=job.block_rows)
    for fmt, kind in (("arrow", "Table"), ("pandas", "DataFrame")):  # (it failed with an AttributeError on .get)
        with pytest.raises(TypeError, match=rf"takes a dataset's rows unformatted, but the batch is a {kind}, .* map "
                                            r"over dataset.with_format\(None\)"):
            image_dataset.with_format(fmt).map(job, batched=True, with_indices=True, batch_size=job.block_rows)
    # the job, whose map it runs itself, reads a formatted set's rows as stored (it refused them, or failed on them):
    # the same shards; a transform of the set's own is set aside with a warning
    transformed = image_dataset.with_transform(lambda batch: {"pixel_values": [[0.0]] * len(batch["image"])})
    for name, formatted in (("numpy", image_dataset.with_format("numpy")), ("arrow", image_dataset.with_format("arrow")),
                            ("transform", transformed)):
        caplog.clear()
        reinforce(formatted, config, teachers, str(tmp_path / name), show_progress=False)
        assert dr_table(tmp_path / name).equals(dr_table(tmp_path)), name
        assert ("transform (set_transform / with_transform) is set aside" in caplog.text) == (name == "transform")
    for forgotten in ({"batched": True}, {"with_indices": True}):  # (TypeErrors about a missing argument, an int)
        with pytest.raises(TypeError, match=r"Dataset.map\(reinforcer, batched=True, with_indices=True\)"):
            ds.select(range(2)).map(Reinforcer(config, teachers, num_rows=len(ds)), **forgotten)
    # in Dataset.map's num_proc workers (copies in forked processes, where torch could hang): refused, naming the way
    with pytest.raises(RuntimeError, match="not in Dataset.map's num_proc workers: .* under accelerate launch or torchrun"):
        ds.map(Reinforcer(config, teachers, num_rows=len(ds)), batched=True, with_indices=True, batch_size=8, num_proc=2)


def test_job_defaults_follow_the_teachers_device(teachers):
    """With teachers on a GPU a job renders there, batched, with threads preparing rows ahead; on the CPU it renders
    per sample there, inline. A given mode picks the device (as verify replays it), a given device the mode. (The
    GPU job itself runs in scripts/bench_gpu.py where a device is lent.)"""
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 1))
    assert default_render(on_gpu) == ("cuda:1", "batched") and 1 <= default_prepare_threads(on_gpu) <= 4
    assert default_render(teachers) == ("cpu", "per-sample") and default_prepare_threads(teachers) == 0
    heavy, light = make_pipeline("imagenet+rare"), make_pipeline("imagenet+rrc")
    assert (default_render_threads(on_gpu, heavy), default_render_threads(on_gpu, light)) == (2, 1)
    assert default_render_threads(teachers, heavy) == default_render_threads(teachers, light) == 0
    fp32, eager = (gpu_advice(types.SimpleNamespace(device=torch.device("cuda", 0), precision=p, compile_mode=c))
                   for p, c in (("fp32", "reduce-overhead"), ("bf16", None)))
    assert len(fp32) == 1 and "--precision bf16" in fp32[0]
    assert len(eager) == 1 and "--compile reduce-overhead" in eager[0]
    assert gpu_advice(types.SimpleNamespace(device=torch.device("cuda", 0), precision="bf16", compile_mode="trace")) == []
    assert gpu_advice(teachers) == []  # (fp32 and eager, on the CPU)
    assert default_render(on_gpu, render="per-sample") == ("cpu", "per-sample")
    assert default_render(on_gpu, render_device="cpu") == ("cpu", "per-sample")
    assert default_render(teachers, render="batched") == ("cpu", "batched")
    assert default_render(teachers, render_device="cuda:0") == ("cuda:0", "batched")


def test_map_batches_hold_65536_samples_by_default_between_256_and_1024_rows(image_dataset, teachers, monkeypatch,
                                                                          tmp_path):
    """The pipeline drains between map batches, so by default one holds 65,536 samples' worth of rows (1024 at N=64,
    where the H100 ran 1.05-1.11x faster than with 256), never under 256 rows (the paper's N=400) nor over 1024; a
    job given no batch size maps in those: 300 rows at N=2 in one map batch."""
    assert [default_batch_size(n) for n in (1, 64, 100, 128, 256, 400, 4096)] == [1024, 1024, 656, 512, 256, 256, 256]
    calls = []
    call = Reinforcer.__call__
    monkeypatch.setattr(Reinforcer, "__call__", lambda self, batch, indices: (calls.append(len(indices)),
                                                                           call(self, batch, indices))[1])
    rows = datasets.concatenate_datasets([image_dataset] * -(-300 // len(image_dataset))).select(range(300))
    config = make_config(teachers, n=2, k=2, teacher_batch_size=64)
    reinforce(rows, config, teachers, str(tmp_path), show_progress=False)
    assert calls == [300]


def test_tf32_flags_are_set_once_a_map_batch_not_written_per_forward(image_dataset, teachers, monkeypatch, tmp_path):
    """The job sets torch's TF32 flags once for a map batch, from the teachers' precision (fp32 here: off), so no
    thread writes them while forwards and batched renders run side by side (on torch >= 2.9 a reader between the
    halves of a legacy write raises). Started with TF32 on, as a user's process may be: one write to turn it off, one
    to turn it back on, for 12 forwards (each forward wrote both before)."""
    setter, writes, forwards = torch.set_float32_matmul_precision, [], []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda p: (writes.append(p), setter(p)))
    log_probs = type(teachers).log_probs
    monkeypatch.setattr(type(teachers), "log_probs", lambda self, *a, **kw: (forwards.append(1),
                                                                            log_probs(self, *a, **kw))[1])
    setter("high")
    try:
        run(image_dataset.select(range(24)), tmp_path / "a", teachers, batch_size=None, teacher_batch_size=8,
            render="batched")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        setter("highest")
    assert len(forwards) == 12 and writes == ["highest", "high"]


def test_samples_that_fill_several_batches_split_into_equal_ranges(image_dataset, teachers, monkeypatch):
    """Where one row's N samples (or a group's) need several forwards, they are split into equal sample ranges, not
    full batches and a short remainder: N=10 in 8-sample batches is 5 + 5 (a compiled teacher pads a short batch
    to its largest, so 8 + 2 would cost 16); 8-row MixUp/CutMix groups in 64-sample batches, 40 + 40."""
    sizes = []
    log_probs = teachers.log_probs
    monkeypatch.setattr(teachers, "log_probs",
                        lambda inputs, **kw: sizes.append(len(inputs[0])) or log_probs(inputs, **kw))
    batch = image_dataset.cast_column("image", datasets.Image(decode=False))[:]
    _, _, logps = Reinforcer(make_config(teachers, n=10, teacher_batch_size=8), teachers, num_rows=24).compute(
        {k: v[:2] for k, v in batch.items()}, [0, 1])
    assert sizes == [5, 5, 5, 5] and all(lp.shape == (10, teachers.num_classes) for lp in logps)
    sizes.clear()
    config = make_config(teachers, augment="imagenet+mix", n=10, teacher_batch_size=64)
    Reinforcer(config, teachers, num_rows=24).compute({k: v[:8] for k, v in batch.items()}, list(range(8)))
    assert sizes == [40, 40]


def test_preparation_stays_two_teacher_blocks_ahead(image_dataset, teachers, monkeypatch):
    """Preparing threads decode at most two teacher blocks beyond the one the teacher runs, whatever the map batch
    size, so memory holds a few decoded images, not a batch's worth."""
    config = make_config(teachers, teacher_batch_size=8)  # N=4: blocks of 2 rows
    block = teacher_block_rows(config)
    started, seen = [], []
    prepare, log_probs = RowPreparer.__call__, teachers.log_probs
    monkeypatch.setattr(RowPreparer, "__call__", lambda self, item: started.append(item[1]) or prepare(self, item))
    monkeypatch.setattr(teachers, "log_probs",
                        lambda inputs, **kw: seen.append(len(started)) or log_probs(inputs, **kw))
    batch = image_dataset.cast_column("image", datasets.Image(decode=False))[:]
    Reinforcer(config, teachers, num_rows=24, pool=preparation_pool(threads=3)).compute(batch, list(range(24)))
    assert block == 2 and len(seen) == 12 and sorted(started) == list(range(24))
    assert all(count <= (b + 1) * block + 2 * block for b, count in enumerate(seen)), seen


def test_world_order_independence_via_shards(tmp_path, image_dataset, teachers):
    """Shards are processed independently: a sharded layout of whole teacher blocks (8 rows x N=4 per 32-sample
    batch) holds exactly the single-shard rows."""
    run(image_dataset, tmp_path / "one", teachers, teacher_batch_size=32)
    run(image_dataset, tmp_path / "many", teachers, rows_per_shard=8, teacher_batch_size=32)
    assert len(shard_paths(str(tmp_path / "many"))) == 3
    one = datasets.load_dataset(str(tmp_path / "one"), split="train").select_columns(DR)
    many = datasets.load_dataset(str(tmp_path / "many"), split="train").select_columns(DR)
    assert one.data.table.equals(many.data.table)


def test_resume_skips_complete_shards_and_refuses_other_settings(tmp_path, image_dataset, teachers):
    run(image_dataset, tmp_path, teachers, rows_per_shard=8)
    paths = shard_paths(str(tmp_path))
    before = {p: open(p, "rb").read() for p in paths}
    os.remove(paths[1])
    with open(paths[2] + ".tmp", "wb") as f:
        f.write(b"half a shard")
    result = run(image_dataset, tmp_path, teachers, rows_per_shard=8)
    assert (result.shards_written, result.shards_skipped) == (1, 2)
    assert not glob.glob(str(tmp_path / "data" / "*.tmp"))
    after = {p: open(p, "rb").read() for p in shard_paths(str(tmp_path))}
    assert pq.read_table(paths[1]).equals(pq.read_table(__import__("io").BytesIO(before[paths[1]])))
    assert after[paths[0]] == before[paths[0]]
    with pytest.raises(ValueError, match=r"different job \(train-00000-of-00003.parquet: seed 0 there, 1 here\)"):
        run(image_dataset, tmp_path, teachers, rows_per_shard=8, seed=1)
    with pytest.raises(ValueError, match=r"different job \(train-00000-of-00003.parquet: rows_per_shard 8 there, 16 "):
        run(image_dataset, tmp_path, teachers, rows_per_shard=16)
    with pytest.raises(ValueError, match=r"different job \(train-00000-of-00003.parquet: source.split null there, "
                                         r"\"train\" here\)"):  # a nested setting is named, not its whole block
        run(image_dataset, tmp_path, teachers, rows_per_shard=8, source={"split": "train"})
    validation = tmp_path / "validation"
    reinforce(image_dataset, make_config(teachers, rows_per_shard=8), teachers, str(validation), split="validation",
              batch_size=8, show_progress=False)
    with pytest.raises(ValueError, match=r"already holds the 'validation' split .* reinforce 'train' into another `output_dir`"):
        run(image_dataset, validation, teachers, rows_per_shard=8)


def test_odd_images_are_handled(tmp_path, teachers):
    """Grayscale, CMYK, RGBA, palette, 16-bit, float and 1x1 images all reinforce; the result matches their RGB view."""
    import io

    import PIL.Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    cells = []
    for mode, fmt in [("L", "PNG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("RGB", "PNG")]:
        im = PIL.Image.fromarray(arr)
        im = PIL.Image.fromarray((np.asarray(im.convert("L")).astype(np.uint16) * 257)) if mode == "I;16" else im.convert(mode)
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        cells.append({"bytes": buf.getvalue(), "path": None})
    tiny = io.BytesIO()
    PIL.Image.fromarray(arr[:1, :1]).save(tiny, format="PNG")
    cells.append({"bytes": tiny.getvalue(), "path": None})
    gray = np.asarray(PIL.Image.fromarray(arr).convert("L"))
    for scale in (1 / 255, 1.0):  # float pixels (mode F, TIFF) in [0, 1] (rendered black before) and in [0, 255]
        buf = io.BytesIO()
        PIL.Image.fromarray(gray.astype(np.float32) * np.float32(scale)).save(buf, format="TIFF")
        cells.append({"bytes": buf.getvalue(), "path": None})
    ds = datasets.Dataset.from_dict({"image": cells, "label": [0] * len(cells)},
                                    features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    run(ds, tmp_path, teachers)
    out = datasets.load_dataset(str(tmp_path), split="train")
    assert len(out) == len(cells)
    gray16 = decode(cells[4])
    assert gray16.dtype == torch.uint8 and gray16.shape == (3, 20, 30)
    assert torch.equal(gray16[0], decode(cells[0])[0])  # 16-bit scaled to the same 8-bit gray
    assert decode(cells[6]).shape == (3, 1, 1)
    for cell in cells[7:]:
        assert torch.equal(decode(cell), decode(cells[0]))  # the same 8-bit gray as the L image


def test_bad_inputs_give_clear_errors(tmp_path, image_dataset, teachers, tiny_hf_dir):
    broken = image_dataset.cast_column("image", datasets.Image(decode=False)).map(
        lambda x, i: {"image": {"bytes": x["image"]["bytes"][:50] if i == 5 else x["image"]["bytes"], "path": None}},
        with_indices=True).cast_column("image", datasets.Image())
    with pytest.raises(ValueError, match=r"row 5, column 'image'"):
        run(broken, tmp_path / "broken", teachers)
    with pytest.raises(ValueError, match="`image_column` 'image' is not a column"):
        run(image_dataset.rename_column("image", "img"), tmp_path / "col", teachers)
    with pytest.raises(ValueError, match="`label_column` 'label' is not a column"):
        run(image_dataset.remove_columns("label"), tmp_path / "nolabel", teachers)
    with pytest.raises(ValueError, match=r"holds the splits \['train'\] \(a DatasetDict\): reinforce one"):
        run(datasets.DatasetDict(train=image_dataset), tmp_path / "dict", teachers)
    pixels = datasets.Dataset.from_dict({"image": [np.zeros((4, 4, 3), np.uint8)] * 8, "label": [0] * 8}, features=
                                        datasets.Features({"image": datasets.Array3D((4, 4, 3), "uint8"),
                                                           "label": datasets.Value("int64")}))
    with pytest.raises(ValueError, match=r"`image_column` 'image' holds arrays, not images: cast it first"):
        run(pixels, tmp_path / "pixels", teachers)  # (row 0 was "expected an image, got list")
    assert run(pixels.cast_column("image", datasets.Image()), tmp_path / "pixels", teachers).stats["rows"] == 8
    paths = datasets.Dataset.from_dict({"image": ["a.jpg"] * 8, "label": [0] * 8})
    with pytest.raises(ValueError, match=r"`image_column` 'image' holds strings, not images \(file paths\?\): cast"):
        run(paths, tmp_path / "paths", teachers)
    eleven = image_dataset.cast_column("label", datasets.ClassLabel(names=[f"k{i}" for i in range(11)]))
    with pytest.raises(ValueError, match="label space mismatch: column 'label' has 11 classes, .*: use teachers trained on these classes"):
        run(eleven, tmp_path / "mismatch", teachers)
    # a teacher (transformers, id2label c0..c9) naming the dataset's classes in another order; aligned, it reinforces
    hf = TeacherEnsemble.from_specs([f"hf:{tiny_hf_dir}"])
    names = list(image_dataset.features["label"].names)
    reordered = image_dataset.cast_column("label", datasets.ClassLabel(names=names[::-1]))
    with pytest.raises(ValueError, match=r"column 'label' and the teachers name the same 10 classes in another order "
                                         r"\(class 0 is 'c9' in the dataset, 'c0' for the teachers\): the class ids "
                                         r"would not be the labels'; align them first, "
                                         r"dataset.align_labels_with_mapping\(label2id, 'label'\)"):
        run(reordered, tmp_path / "order", hf)
    aligned = reordered.align_labels_with_mapping({n: i for i, n in enumerate(names)}, "label")
    assert run(aligned.select(range(8)), tmp_path / "aligned", hf).stats["rows"] == 8
    far = image_dataset.cast_column("label", datasets.Value("int64")).map(lambda x, i: {"label": 12 if i == 7 else x["label"]}, with_indices=True)
    with pytest.raises(ValueError, match=r"row 7, column 'label': label 12 is outside"):
        run(far, tmp_path / "far", teachers)
    named = image_dataset.cast_column("label", datasets.Value("string"))  # class names where ids belong
    with pytest.raises(ValueError, match=r"column 'label' holds strings, not class ids: encode them first, "
                                         r"dataset.class_encode_column\('label'\)"):
        run(named, tmp_path / "named", teachers)
    several = image_dataset.map(lambda x: {"label": [x["label"]]}).cast_column(  # multi-label: once "label [3] is outside"
        "label", datasets.Sequence(datasets.ClassLabel(num_classes=10)))
    with pytest.raises(ValueError, match=r"column 'label' holds lists of labels .* pass `label_column` '' to reinforce"):
        run(several, tmp_path / "several", teachers)
    floats = image_dataset.cast_column("label", datasets.Value("float32"))  # once "label 0.0 is outside the ... classes"
    with pytest.raises(ValueError, match=r"column 'label' holds floats, not class ids: cast .*Value\('int64'\)"):
        run(floats, tmp_path / "floats", teachers)
    with pytest.raises(ValueError, match="`topk` 11 exceeds"):
        make_config(teachers, k=11)
    with pytest.raises(ValueError, match=r"`num_samples` must be in \[1, 65535\], got 0"):
        make_config(teachers, n=0)
    # a config that records other teachers than the ones that run: the data would name the wrong ones
    for change, said in (({"teachers": ["efficientnet-lite0"]}, r"the teachers are \['timm:local-dir:.*'\], the config "
                          r"records \['efficientnet-lite0'\]"), ({"precision": "bf16"}, "the config says 'bf16'"),
                         ({"num_classes": 11}, "the config says 11")):
        with pytest.raises(ValueError, match=said):
            Reinforcer(dataclasses.replace(make_config(teachers), **change), teachers, num_rows=8)


def test_unlabelled_data(tmp_path, image_dataset, teachers):
    config = make_config(teachers, label_column=None)
    result = reinforce(image_dataset.remove_columns("label"), config, teachers, str(tmp_path), show_progress=False)
    assert "teacher_top1_agreement" not in result.stats and result.stats["rows"] == len(image_dataset)


def test_a_library_job_records_its_row_count_so_a_lost_row_is_found(tmp_path, image_dataset, teachers):
    """reinforce() given a config without the source's row count (as a library caller builds one) records it, so
    that verify checks each shard's row range and names a row lost from a shard; a config that records another count
    is refused before any work."""
    run(image_dataset, tmp_path / "out", teachers)
    path, n = shard_paths(str(tmp_path / "out"))[0], len(image_dataset)
    assert config_from_parquet(path).source["num_rows"] == n
    table = pq.read_table(path)
    pq.write_table(table.slice(0, n - 1), path)  # (the schema's metadata, the configuration, is kept)
    assert check_folder(str(tmp_path / "out")) == [f"{os.path.basename(path)}: 1 row(s) of its range neither stored "
                                                   f"nor listed as skipped, first {n - 1}"]
    with pytest.raises(ValueError, match=f"`config` records 99 source rows .*, but the dataset holds {n}"):
        run(image_dataset, tmp_path / "other", teachers, source={"num_rows": 99})
    with pytest.raises(ValueError, match=f"`num_rows` 99 is for a streamed dataset; this one holds {n} rows"):
        reinforce(image_dataset, make_config(teachers), teachers, str(tmp_path / "other"), num_rows=99)
    assert not (tmp_path / "other").exists()


def test_bytes_per_sample_is_measured_from_the_parquet_footer(tmp_path, image_dataset, teachers):
    result = run(image_dataset, tmp_path, teachers, n=16, k=10)
    paths = shard_paths(str(tmp_path))
    meta = pq.ParquetFile(paths[0]).metadata
    total = sum(meta.row_group(g).column(c).total_compressed_size
                for g in range(meta.num_row_groups) for c in range(meta.row_group(g).num_columns)
                if meta.row_group(g).column(c).path_in_schema.startswith("dr_"))
    assert total == reinforcement_bytes(paths)["dr_columns"]
    assert result.stats["bytes_per_sample"] == round(total / (len(image_dataset) * 16), 2)
    # raw uint16 + float16 top-10 alone would be 40 bytes; compression keeps the whole reinforcement below that
    assert result.stats["bytes_per_sample"] < 40


def test_verify_covers_a_different_intra_op_thread_count(tmp_path, image_dataset, teachers):
    """Data made with 2 intra-op threads verifies from 1 thread: verify's tolerance covers float16 steps."""
    from dr_hf.verify import verify

    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run(image_dataset, tmp_path, teachers, augment="imagenet+rare", n=3, k=4)
        torch.set_num_threads(1)
        report = verify(str(tmp_path), rows=8)
    finally:
        torch.set_num_threads(saved)
    assert report.ok and report.replayed_rows == 8 and report.params_mismatches == 0, report.problems
