import itertools
import math
import threading

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dr_hf import (ReinforceConfig, ReinforcedCollator, ReinforcedTrainer, ReinforcedTrainingArguments, TeacherEnsemble,
                   make_pipeline)
from dr_hf.collator import EvalCollator, check_whole_group
from dr_hf.images import decode
from dr_hf.inputs import InputSpec
from dr_hf.loss import dense_teacher_log_probs, distillation_loss, one_hot_target
from dr_hf import reinforce
from dr_hf.reinforcer import Reinforcer
from dr_hf.shards import shard_paths
from dr_hf.trainer import refuse_skipped

from conftest import make_image_dataset, needs_cxx


@pytest.fixture(scope="module")
def sharp_teacher_dir(tmp_path_factory):
    """A random 10-class timm teacher with a scaled-up head: confident, so distillation has something to learn."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(1)
    model = timm.create_model("resnet10t", num_classes=10, pretrained_cfg_overlay=dict(
        input_size=(3, 32, 32), interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    with torch.no_grad():
        model.fc.weight.mul_(40.0)
    path = tmp_path_factory.mktemp("sharp")
    save_for_hf(model, str(path))
    return f"timm:local-dir:{path}"


@pytest.fixture(scope="module")
def reinforced(tmp_path_factory, sharp_teacher_dir):
    """Two reinforced folders of the same 32 images: easy (rrc+flip) and hard (with mixing)."""
    ens = TeacherEnsemble.from_specs([sharp_teacher_dir])
    ds = make_image_dataset(32, seed=3)
    out = {}
    for preset in ("rrc+flip", "imagenet+rare+mix"):
        folder = tmp_path_factory.mktemp(preset.replace("+", "_"))
        config = ReinforceConfig.for_teachers(ens, preset, num_samples=4, topk=5, seed=0)
        reinforce(ds, config, ens, str(folder), show_progress=False)
        out[preset] = folder
    return ds, ens, out


def args(tmp_path, **kw):
    base = dict(max_steps=12, per_device_train_batch_size=8, learning_rate=3e-3, report_to=[], logging_steps=1,
                save_strategy="no", use_cpu=True, seed=0, image_size=32, dataloader_num_workers=0)
    base.update(kw)
    return ReinforcedTrainingArguments(str(tmp_path / "run"), **base)


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def falls(values):
    k = max(2, len(values) // 4)
    return np.mean(values[-k:]) < 0.8 * np.mean(values[:k])


def held_loss(trainer, batch):
    """KD loss of the model on one fixed batch (eval mode): a noise-free view of what training achieved."""
    model = trainer.model.eval()
    with torch.no_grad():
        logits = trainer._forward(model, batch["pixel_values"])
        return distillation_loss(logits, trainer.target_log_probs(batch)).item()


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=96, num_labels=10))


def tiny_timm():
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=10)


# -- the loss ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("outside", ["uniform", "renormalize"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_loss_equals_dense_reference(outside, temperature):
    torch.manual_seed(0)
    b, c, k = 5, 12, 4
    full = torch.log_softmax(torch.randn(b, c) * 2, -1)
    lp, idx = torch.topk(full, k)
    lp = lp.half().float()  # as stored
    student = torch.randn(b, c)
    got = distillation_loss(student, dense_teacher_log_probs(idx, lp, c, outside), temperature)
    # reference, element by element
    total = 0.0
    for r in range(b):
        q = np.zeros(c)
        top = np.exp(lp[r].numpy().astype(np.float64))
        if outside == "renormalize":
            q[idx[r].numpy()] = top / top.sum()
        else:
            q[:] = (1 - top.sum()) / (c - k)
            q[idx[r].numpy()] = top
        with np.errstate(divide="ignore"):
            qt = np.where(q > 0, q ** (1 / temperature), 0.0)
        qt /= qt.sum()
        s = student[r].numpy().astype(np.float64) / temperature
        log_p = s - np.log(np.exp(s).sum())
        total += sum(qt[i] * (math.log(qt[i]) - log_p[i]) for i in range(c) if qt[i] > 0)
    assert got.item() == pytest.approx(total / b * temperature ** 2, rel=1e-4, abs=1e-6)


def test_one_hot_target_is_cross_entropy():
    student = torch.randn(4, 7)
    labels = torch.tensor([0, 6, 3, 3])
    ids, lp = one_hot_target(labels, 5, 7)
    assert all(len(set(r.tolist())) == 5 for r in ids)
    kd = distillation_loss(student, dense_teacher_log_probs(ids, lp, 7, "uniform"))
    assert kd.item() == pytest.approx(torch.nn.functional.cross_entropy(student, labels).item(), rel=1e-5)


# -- the collator -----------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["rrc+flip", "imagenet+rare+mix"])
def test_collator_tensor_equals_teacher_input_at_reinforce_time(reinforced, preset):
    ds, ens, folders = reinforced
    data = datasets.load_dataset(str(folders[preset]), split="train")
    out = ens.outputs()[0]
    collator = ReinforcedCollator(out, reinforced_prob=1.0)
    group = data[0:8]  # one mixing group, as the trainer feeds it
    torch.manual_seed(5)
    batch = collator([group])
    config = ReinforceConfig.for_teachers(ens, preset, num_samples=4, topk=5, seed=0)
    job = Reinforcer(config, ens, num_rows=len(ds))
    images = [decode(ds[i]["image"]) for i in range(8)]
    params = group["dr_params"]  # per row, the stored layout
    j = int(batch["sample_index"][0])
    assert (batch["sample_index"] == j).all()  # one sample index per group
    expected = job.render_rows(images, params, [j], out)
    assert torch.equal(batch["pixel_values"], expected)
    assert torch.equal(batch["teacher_indices"], torch.tensor(np.asarray(group["dr_topk_indices"])[:, j].astype(np.int64)))
    # and the teacher on that tensor reproduces the stored log-probs
    stored = torch.tensor(np.asarray(group["dr_topk_logprobs"], dtype=np.float32)[:, j])
    live = torch.gather(ens.log_probs({0: batch["pixel_values"]}), 1, batch["teacher_indices"])
    assert torch.allclose(live, stored, atol=2e-2, rtol=2e-3)


def test_collator_picks_fresh_samples_and_original_images():
    from dr_hf.collator import AugmentCollator, EvalCollator

    ds = make_image_dataset(8)
    out_spec = __import__("dr_hf").InputSpec(size=(16, 16))
    collator = AugmentCollator(out_spec, augment="rrc+flip")
    a, b = collator([ds[0], ds[1]]), collator([ds[0], ds[1]])
    assert a["pixel_values"].shape == (2, 3, 16, 16) and not torch.equal(a["pixel_values"], b["pixel_values"])
    ev = EvalCollator(out_spec)
    assert torch.equal(ev([ds[0]])["pixel_values"], ev([ds[0]])["pixel_values"])
    assert ev([ds[0]])["labels"].tolist() == [ds[0]["label"]]


# -- training ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("make_model", [tiny_timm, tiny_vit], ids=["timm", "transformers"])
def test_trainer_trains_and_loss_falls(tmp_path, reinforced, streaming, make_model):
    _, _, folders = reinforced
    train = datasets.load_dataset(str(folders["rrc+flip"]), split="train", streaming=streaming)
    trainer = ReinforcedTrainer(model=make_model(), args=args(tmp_path, max_steps=16), train_dataset=train)
    trainer.train()
    values = losses(trainer)
    assert len(values) == 16 and all(np.isfinite(values)) and falls(values), values


@needs_cxx
def test_trainer_trains_a_torch_compiled_student(tmp_path, reinforced):
    """TrainingArguments' torch_compile: the loss runs the compiled student, which trains on the replays."""
    from torch._dynamo.utils import counters

    _, _, folders = reinforced
    train = datasets.load_dataset(str(folders["rrc+flip"]), split="train")
    model = tiny_timm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = ReinforcedTrainer(model=model, args=args(tmp_path, max_steps=3, torch_compile=True), train_dataset=train)
    counters.clear()
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert counters["stats"]["unique_graphs"] >= 1  # the forward the loss called was the compiled one
    values = losses(trainer)
    assert len(values) == 3 and all(np.isfinite(values))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("streaming", [False, True])
def test_trainer_replays_mixing_groups(tmp_path, reinforced, streaming):
    _, _, folders = reinforced
    train = datasets.load_dataset(str(folders["imagenet+rare+mix"]), split="train", streaming=streaming)
    trainer = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, max_steps=16, per_device_train_batch_size=8,
                                                              ce_weight=0.3, shuffle_buffer_size=16), train_dataset=train)
    torch.manual_seed(0)
    batch = trainer.train_collator([datasets.load_dataset(str(folders["imagenet+rare+mix"]), split="train")[8:16]])
    assert batch["pixel_values"].shape[0] == 8 and "mix_lam" in batch  # one group of 8 rows per example
    assert next(iter(trainer.get_train_dataloader()))["pixel_values"].shape[0] == 8
    if streaming:  # a streamed group is one Arrow table, only its replayed samples converted; it collates as Python rows
        import pyarrow as pa

        group = next(iter(trainer.train_dataset))
        assert isinstance(group, pa.Table) and group.num_rows == 1
        plain = datasets.load_dataset(str(folders["imagenet+rare+mix"]), split="train")
        plain = plain.cast_column("image", datasets.Image(decode=False))
        python_rows = [plain[i] for i in group.column("dr_index")[0].as_py()]
        assert len(python_rows) == 8
        collated = []
        for example in (group, python_rows):
            torch.manual_seed(1)
            collated.append(trainer.train_collator([example]))
        assert collated[0].keys() == collated[1].keys()
        for key, value in collated[0].items():
            assert torch.equal(value, collated[1][key]), key
    before = held_loss(trainer, batch)
    trainer.train()
    values = losses(trainer)
    assert len(values) == 16 and all(np.isfinite(values))
    assert held_loss(trainer, batch) < 0.8 * before


def test_evaluation_with_compute_metrics_on_a_plain_dataset(tmp_path, reinforced):
    ds, _, folders = reinforced

    def accuracy(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    trainer = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, max_steps=2), compute_metrics=accuracy,
                                train_dataset=datasets.load_dataset(str(folders["rrc+flip"]), split="train"),
                                eval_dataset=ds.select(range(16)))
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and np.isfinite(metrics["eval_loss"])
    # trained from images in 'img', evaluated on a set that keeps them in 'image': the same figures
    renamed = datasets.load_dataset(str(folders["rrc+flip"]), split="train").rename_column("image", "img")
    trainer = ReinforcedTrainer(model=trainer.model, args=args(tmp_path, max_steps=2), compute_metrics=accuracy,
                                train_dataset=renamed, eval_dataset=ds.select(range(16)))
    again = trainer.evaluate()
    assert trainer.image_column == "img"
    assert (again["eval_loss"], again["eval_accuracy"]) == (metrics["eval_loss"], metrics["eval_accuracy"])
    # trained without labels (label_column=''), evaluated on a labelled set: its labels are read (they were all -1, the
    # loss 0), also from its one ClassLabel column under another name
    val = ds.select(range(16))
    names = [f"k{i}" for i in range(10)]
    fine = val.cast_column("label", datasets.ClassLabel(names=names)).rename_column("label", "fine")
    unlabelled = ReinforcedTrainer(model=trainer.model, args=args(tmp_path, label_column=""), compute_metrics=accuracy,
                                   train_dataset=renamed.remove_columns("label"))
    for eval_set in (val, fine):
        assert unlabelled.predict(eval_set).label_ids.tolist() == val["label"]
    # several evaluation sets at once (the paper's ImageNet val, V2 and R), each under its name, as Trainer does
    both = ReinforcedTrainer(model=trainer.model, args=args(tmp_path, max_steps=2), compute_metrics=accuracy,
                             train_dataset=renamed, eval_dataset={"val": val, "fine": fine}).evaluate()
    for name in ("val", "fine"):
        assert (both[f"eval_{name}_loss"], both[f"eval_{name}_accuracy"]) == pytest.approx(
            (metrics["eval_loss"], metrics["eval_accuracy"]))
    assert unlabelled.evaluate(fine)["eval_loss"] == pytest.approx(metrics["eval_loss"])
    # an unlabelled test set: predictions alone, no loss or accuracy (they were 0.0 from labels -1), for a timm student
    test = val.remove_columns("label")
    predicted = trainer.predict(test)
    assert predicted.label_ids is None and np.allclose(predicted.predictions, trainer.predict(val).predictions)
    assert not {"eval_loss", "eval_accuracy"} & set(trainer.evaluate(test))
    # metrics that ask for the inputs get the pixels (Trainer looked for a timm student's input_ids: KeyError)
    inputs = ReinforcedTrainer(model=trainer.model, args=args(tmp_path, include_for_metrics=["inputs"]),
                               compute_metrics=lambda p: {"pixels": float(np.abs(p.inputs).sum())}, train_dataset=renamed)
    assert inputs.evaluate(val)["eval_pixels"] == pytest.approx(
        float(EvalCollator(trainer.student_output)(list(val))["pixel_values"].abs().sum()), rel=1e-5)
    with pytest.raises(ValueError, match="the evaluation set's column 'label' has 11 classes, against 10 from the student: its accuracy"):
        unlabelled.evaluate(fine.cast_column("fine", datasets.ClassLabel(names=names + ["k10"])))
    with pytest.raises(ValueError, match=r"the evaluation set has no image column 'img' and no datasets.Image column "
                                         r"\(columns: \['note', 'label'\]\)"):  # (a bare KeyError before)
        unlabelled.predict(val.remove_columns("image").select_columns(["note", "label"]))


def test_plain_and_online_kd_use_the_same_trainer(tmp_path, reinforced, sharp_teacher_dir):
    ds, ens, _ = reinforced
    plain = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, max_steps=3, augment="rrc+flip"), train_dataset=ds)
    plain.train()
    online = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, max_steps=3, augment="rrc+flip",
                                                             online_teachers=[sharp_teacher_dir]),
                               train_dataset=ds)
    batch = next(iter(online.get_train_dataloader()))
    target = online.target_log_probs(batch)
    assert torch.allclose(target, ens.log_probs({0: batch["teacher_pixel_values_0"]}), atol=1e-5)
    online.train()
    assert all(np.isfinite(losses(online)))


@pytest.mark.parametrize("streaming", [False, True])
def test_the_image_column_is_found_by_its_type(tmp_path, reinforced, streaming):
    """Images in a column named otherwise ('img', as in some Hub copies of CIFAR) replay with the default arguments,
    the same batches as under 'image'; an image_column given is used as given."""
    _, _, folders = reinforced
    batches = {}
    for name in ("image", "img"):
        train = datasets.load_dataset(str(folders["rrc+flip"]), split="train", streaming=streaming)
        if name != "image":  # (a streamed rename re-encodes decoded JPEGs, lossily: renamed as bytes)
            train = train.cast_column("image", datasets.Image(decode=False)).rename_column("image", name)
        trainer = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path), train_dataset=train)
        assert trainer.image_column == name
        batches[name] = next(iter(trainer.get_train_dataloader()))
    assert torch.equal(batches["image"]["pixel_values"], batches["img"]["pixel_values"])
    with pytest.raises(ValueError, match="train_dataset has no image column 'picture'"):
        ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, image_column="picture"),
                          train_dataset=datasets.load_dataset(str(folders["rrc+flip"]), split="train"))


def test_clear_errors(tmp_path, reinforced, caplog, tiny_hf_dir):
    ds, _, folders = reinforced
    with pytest.raises(ValueError, match="not a reinforced dataset"):
        ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, augment=None), train_dataset=ds)
    with pytest.raises(ValueError, match=r"train_dataset holds the splits \['train'\] \(a DatasetDict\): pass one"):
        ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path), train_dataset=datasets.load_dataset(str(folders["rrc+flip"])))
    import timm

    with pytest.raises(ValueError, match="column 'label' has 10 classes, against 7 from the student: load it for these classes .*num_labels=10"):
        ReinforcedTrainer(model=timm.create_model("resnet10t", num_classes=7), args=args(tmp_path),
                          train_dataset=datasets.load_dataset(str(folders["rrc+flip"]), split="train"))
    # labels of other classes than the teachers' (reinforced with --label-column ''): the teachers' targets alone train
    other = datasets.load_dataset(str(folders["rrc+flip"]), split="train").cast_column(
        "label", datasets.ClassLabel(names=[f"k{i}" for i in range(11)]))
    with pytest.raises(ValueError, match=r"has 11 classes, against 10 .*the teachers' targets alone \(label_column=''"):
        ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path), train_dataset=other)
    ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, max_steps=1, label_column=""), train_dataset=other).train()
    unlabelled = datasets.load_dataset(str(folders["rrc+flip"]), split="train").remove_columns("label")
    trainer = ReinforcedTrainer(model=timm.create_model("resnet10t", num_classes=7), args=args(tmp_path, max_steps=1),
                                train_dataset=unlabelled)
    with pytest.raises(ValueError, match="the student's 7 classes"):
        trainer.train()
    plus = datasets.load_dataset(str(folders["rrc+flip"]), split="train")
    with pytest.raises(ValueError, match=r"column 'label' holds strings, not class ids: .* or train without labels"):
        ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path),
                          train_dataset=plus.cast_column("label", datasets.Value("string")))
    with pytest.raises(ValueError, match=r"column 'label' holds lists of labels .* so train without labels"):
        ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path), train_dataset=plus.map(lambda x: {"label": [x["label"]]}))
    # an integer label past the student's classes: named (it raised torch's "index 12 is out of bounds" in evaluation,
    # and an original-image example's one-hot target wrapped it round to class 2)
    far = plus.select(range(8)).cast_column("label", datasets.Value("int64")).map(
        lambda x, i: {"label": 12 if i == 3 else x["label"]}, with_indices=True)
    with pytest.raises(ValueError, match=r"row 3 \(dr_index\), column 'label': label 12 is outside the student's 10"):
        ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path), train_dataset=plus).evaluate(far)
    with pytest.raises(ValueError, match=r"label 12 is outside the student's 10 classes"):
        ReinforcedCollator(InputSpec((16, 16)), reinforced_prob=0.0, num_classes=10)(list(far))
    with pytest.raises(ValueError, match=r"train_dataset's row 3, column 'label': label 12 is outside the student's 10"):
        ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path), train_dataset=far)  # before training: all rows read
    for given, said in ((dict(augment="rrc+flip", crop_scale=0.5), "augment, crop_scale"),
                        (dict(augment="rrc+flip", online_teachers=["efficientnet-lite0"]), "augment, online_teachers")):
        # unused with reinforced data (one set of arguments may serve plain and reinforced runs): said, and the online
        # teachers (1000 classes, where the student has 10) are not loaded
        caplog.clear()
        with caplog.at_level("WARNING", logger="dr_hf.trainer"):
            trainer = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, **given), train_dataset=plus)
        assert trainer.teachers is None and isinstance(trainer.train_collator, ReinforcedCollator)
        assert [r.getMessage() for r in caplog.records] == [
            f"train_dataset is reinforced: it replays its stored samples and teacher outputs, so {said}, which apply to "
            "a plain dataset (fresh augmentations, online teachers), are not used; to train plainly on its images, pass "
            f"train_dataset.remove_columns({[c for c in plus.column_names if c.startswith('dr_')]})"]
    student = tiny_vit()  # a transformers classifier whose id2label names the data's classes in another order
    student.config.id2label = dict(enumerate(plus.features["label"].names[::-1]))
    with pytest.raises(ValueError, match=r"column 'label' and the student name the same 10 classes in another order "
                                         r"\(class 0 is 'c0' in the dataset, 'c9' for the student\)"):
        ReinforcedTrainer(model=student, args=args(tmp_path), train_dataset=plus)
    with pytest.raises(ValueError, match=r"column 'label' and the student name the same 10 classes in another order"):
        ReinforcedTrainer(model=student, args=args(tmp_path, augment="rrc+flip"), train_dataset=ds)  # plain data too
    with pytest.raises(ValueError, match=r"the online teachers name the student's 10 classes in another order \(class 0 "
                                         r"is 'c9' for the student, 'c0' for the teachers\)"):  # (no labels to check)
        ReinforcedTrainer(model=student, args=args(tmp_path, augment="rrc+flip", label_column="",
                                                   online_teachers=[f"hf:{tiny_hf_dir}"]), train_dataset=ds)
    ordered = ReinforcedTrainer(model=tiny_vit(), args=args(tmp_path), train_dataset=plus)  # (id2label: LABEL_0, ...)
    ordered.model.config.id2label = student.config.id2label  # and evaluated on the data's own order
    with pytest.raises(ValueError, match="column 'label' and the student name the same 10 classes in another order"):
        ordered.evaluate(ds.select(range(8)))
    with pytest.raises(ValueError, match="another dr-hf version"):
        bad = datasets.load_dataset(str(folders["rrc+flip"]), split="train")
        bad = bad.map(lambda r: {"dr_params": {**r["dr_params"], "warp": [0, 0, 0, 0]}})
        ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path), train_dataset=bad)
    stream = datasets.load_dataset(str(folders["rrc+flip"]), split="train", streaming=True)
    with pytest.raises(ValueError, match=r"features are unknown.*dataset\.map\(fn, features=dataset\.features\)"):
        ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path), train_dataset=stream.map(lambda r: r))
    with pytest.raises(ValueError, match=r"train_dataset is a TensorDataset, which names no columns: pass a reinforced"):
        ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path), train_dataset=torch.utils.data.TensorDataset(torch.zeros(4)))
    kept = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path),
                             train_dataset=stream.map(lambda r: r, features=stream.features))
    assert next(iter(kept.get_train_dataloader()))["teacher_indices"].shape == (8, 5)


def test_mixing_rows_out_of_their_groups_are_refused(tmp_path, reinforced):
    """MixUp/CutMix partners are rows of one stored group of 8: rows shuffled, filtered or selected out of their groups
    are refused, map-style when the trainer is made, streamed at their first batch, naming a row and the remedy."""
    _, _, folders = reinforced
    mix = datasets.load_dataset(str(folders["imagenet+rare+mix"]), split="train")  # 32 rows: 4 groups
    remedy = r"pass its rows in stored order and whole groups"
    for broken, said in ((mix.shuffle(seed=0), r"row \d+ \(dr_index \d+\) is out of its MixUp/CutMix group"),
                         (mix.filter(lambda i: i != 3, input_columns="dr_index"), r"row 3 \(dr_index 4\) is out"),
                         (mix.select(range(13)), r"last 5 rows are part of a MixUp/CutMix group whose other rows are "
                                                 r"missing \(row (8|9|1[0-2]), dr_index \1, sample \d, mixes with dr_index")):
        with pytest.raises(ValueError, match=f"train_dataset's {said}.*{remedy}"):
            ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path), train_dataset=broken)
    held_out = mix.filter(lambda i: i // 8 % 2 != 0, input_columns="dr_index")  # whole groups held out: the advice
    trainer = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path), train_dataset=held_out)
    assert len(trainer.train_dataset) == 2 and next(iter(trainer.get_train_dataloader()))["pixel_values"].shape[0] == 8
    stream = datasets.load_dataset(str(folders["imagenet+rare+mix"]), split="train", streaming=True)
    trainer = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path), train_dataset=stream.shuffle(seed=0, buffer_size=32))
    with pytest.raises(ValueError, match=rf"a training example's rows \(dr_index \[.*\]\) are not one MixUp/CutMix group.*{remedy}"):
        next(iter(trainer.get_train_dataloader()))
    trainer = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path), train_dataset=stream.take(13))  # 1 group + 5 rows
    with pytest.raises(ValueError, match=r"row (8|9|1[0-2]), sample \d: its MixUp/CutMix partner row 1[3-5] is not among the "
                                         r"training example's rows \(dr_index \[8, 9, 10, 11, 12\], of a group of 8; a "
                                         rf"stream cut within a group, by take\(n\).*{remedy}"):
        list(trainer.get_train_dataloader())
    with pytest.raises(ValueError, match=r"rows \(dr_index \[0, 1, 2, 2\]\) are not one MixUp/CutMix group"):
        check_whole_group(make_pipeline("imagenet+mix"), [0, 1, 2, 2], [{}] * 4, sample=0)  # a row read twice


def test_rows_of_reinforcements_with_other_transforms_combined_are_refused(tmp_path, reinforced):
    """concatenate_datasets of an rrc+flip and an imagenet+rare+mix reinforcement gives the rrc rows nulls for the
    fields they never recorded (RandAugment's, erasing's, mixing's): map-style it is refused when the trainer is made,
    naming the first such row and field (it stopped at the first draw with "IndexError: sample 1 of 0"); rows of one
    reinforcement selected out of the combination train. Streamed (the combined set, or streams combined), at the first
    such row, or where rows of both reinforcements are read as one Arrow table (a MixUp/CutMix group), there."""
    _, _, folders = reinforced
    plain, mix = (datasets.load_dataset(str(folders[p]), split="train") for p in ("rrc+flip", "imagenet+rare+mix"))
    both = datasets.concatenate_datasets([mix, plain])  # 64 rows: the mixed groups first, then the rrc rows
    said = r"no field '(ra_ops|ra_bins|erase_box|mix_\w+)', which other rows hold: rows of reinforcements with other transforms"
    with pytest.raises(ValueError, match=rf"train_dataset's row 32 \(dr_index 0\), column 'dr_params': {said}"):
        ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path), train_dataset=both)
    trainer = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, max_steps=2), train_dataset=both.select(range(32)))
    trainer.train()
    assert trainer.state.global_step == 2
    streamed = {p: datasets.load_dataset(str(folders[p]), split="train", streaming=True) for p in folders}
    combined_streams = datasets.concatenate_datasets([streamed["imagenet+rare+mix"], streamed["rrc+flip"]])
    differ = r"train_dataset streams rows whose columns differ \(pyarrow: Schema at index \d+ was different\): rows of"
    for stream, buffer, message in ((both.to_iterable_dataset(), 1000, "column 'dr_params': " + said),
                                    (combined_streams, 1, "column 'dr_params': " + said),
                                    (datasets.concatenate_datasets([streamed["rrc+flip"].take(4),  # a group of 8
                                                                    streamed["imagenet+rare+mix"]]), 1, differ)):
        trainer = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, max_steps=8, shuffle_buffer_size=buffer),
                                    train_dataset=stream)
        with pytest.raises(ValueError, match=message):
            trainer.train()


def test_streaming_ddp_processes_get_distinct_rows(tmp_path, reinforced, monkeypatch, caplog):
    """Two CPU processes (torchrun, gloo): each streams its own rows, as many as the other, none repeated within
    the epoch, though the stream's 3 files do not split in two (accelerate would give one process 2 of them, the
    other 1, which it would then read twice in the same steps): the trainer splits them by row group."""
    import json
    import subprocess
    import sys

    ds, ens, _ = reinforced
    folder = tmp_path / "three"
    monkeypatch.setattr(datasets.config, "MAX_ROW_GROUP_SIZE", 1)  # row groups of one row
    reinforce(ds, ReinforceConfig.for_teachers(ens, "rrc+flip", num_samples=2, topk=5, rows_per_shard=11), ens,
              str(folder), show_progress=False)
    assert [pq.read_metadata(p).num_row_groups for p in shard_paths(str(folder))] == [11, 11, 10]
    steps = 8  # 2 processes x 8 steps x 2 rows = the 32 rows, once
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(__import__("pathlib").Path(__file__).with_name("ddp_stream_worker.py")),
                           str(folder), str(tmp_path), str(steps)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert all(len(r) == steps * 2 for r in ranks)
    assert all(len(set(r)) == len(r) for r in ranks)  # no repeats within one process's epoch
    assert not set(ranks[0]) & set(ranks[1])  # distinct data per process
    assert set(ranks[0]) | set(ranks[1]) == set(range(32))
    # in one process, 2 DataLoader workers share the 3 files (each row is read once an epoch), and 4 would leave one
    # idle: they share the row groups
    stream = datasets.load_dataset(str(folder), split="train", streaming=True)
    for workers, shards in ((2, 3), (4, 32)):
        trainer = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, dataloader_num_workers=workers),
                                    train_dataset=stream)
        assert trainer.train_dataset.n_shards == shards
    # files of one row group each cannot be split: two processes would read 1 and 2 of them, which is said
    monkeypatch.undo()
    whole = tmp_path / "whole"
    reinforce(ds, ReinforceConfig.for_teachers(ens, "rrc+flip", num_samples=2, topk=5, rows_per_shard=11), ens,
              str(whole), show_progress=False)
    stream = datasets.load_dataset(str(whole), split="train", streaming=True)
    with caplog.at_level("WARNING", logger="dr_hf.trainer"):
        kept = trainer._even_shares(stream, __import__("types").SimpleNamespace(world_size=2, dataloader_num_workers=0))
    assert kept.n_shards == 3
    assert "streams 3 shards to 2 processes, 1 or 2 each: within an epoch the rows of those with 1 are seen up to " \
           "100% more often" in caplog.text


def on_replay(trainer, record):
    """Call ``record(epoch, position in the batch, row)`` for each row the trainer's collator replays (in DataLoader
    workers too, where ``record`` runs in the worker)."""
    group = trainer.train_collator.group

    def recording(rows, base, into=None):
        for r, row in enumerate(rows):
            record(trainer.train_collator.epoch, base + r, row)
        return group(rows, base, into)

    trainer.train_collator.group = recording


def record_replays(trainer, batch_size=8):
    """Record the rows the trainer's collator replays (no DataLoader workers); the returned function gives their
    (epoch, dr_index) batch by batch, each batch in its own order (a batch's rows are rendered on several threads, in
    any order)."""
    seen = []
    on_replay(trainer, lambda epoch, position, row: seen.append((epoch, position, int(row["dr_index"]))))
    return lambda: [(epoch, index) for k in range(0, len(seen), batch_size)
                    for epoch, _, index in sorted(seen[k:k + batch_size])]


def test_every_epoch_of_a_stream_or_a_resumed_run_replays_its_own_samples(tmp_path, reinforced):
    """The replayed samples are chosen by (seed, epoch, row) with the Trainer's own epoch: each pass over a stream picks
    afresh (a stream's state.epoch, a fraction of max_steps, gave its first two passes the same samples), as over a
    map-style set, and a run resumed mid-epoch replays what the uninterrupted run did."""
    _, _, folders = reinforced
    stream = datasets.load_dataset(str(folders["rrc+flip"]), split="train", streaming=True)  # 32 rows: 4 steps a pass
    mapped = datasets.load_dataset(str(folders["rrc+flip"]), split="train")
    for train in (stream, mapped):
        trainer = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path), train_dataset=train)
        replayed = record_replays(trainer)
        trainer.train()
        seen = replayed()
        assert [epoch for epoch, _ in seen] == [0] * 32 + [1] * 32 + [2] * 32
        assert [sorted(i for _, i in seen[32 * p:32 * (p + 1)]) for p in range(3)] == [list(range(32))] * 3
    full = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, save_strategy="steps", save_steps=6),
                             train_dataset=mapped)
    replayed = record_replays(full)
    full.train()
    resumed = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path), train_dataset=mapped)
    replayed_again = record_replays(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))  # mid-epoch 1
    assert replayed_again() == replayed()[6 * 8:] and replayed_again()[0][0] == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_drops_its_trained_batches_unrendered(tmp_path, reinforced, workers):
    """A stream is resumed in the pass its checkpoint was made in (Trainer took a stream's epoch as max_steps long:
    it resumed every stream in its first pass, and past it restarted at the second), and the batches of that pass
    already trained are dropped: the collator counts them out unrendered (DataLoader workers too), and the run goes on
    with the uninterrupted run's batches, loss for loss."""
    _, _, folders = reinforced
    stream = datasets.load_dataset(str(folders["rrc+flip"]), split="train", streaming=True)  # 32 rows: 4 steps a pass
    rendered = torch.zeros(3, dtype=torch.int64).share_memory_()  # rows rendered by pass, here and in the workers

    def trainer(**kw):
        made = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, max_steps=12, dataloader_num_workers=workers,
                                                              **kw), train_dataset=stream)
        on_replay(made, lambda epoch, *_: rendered[epoch].add_(1))
        return made

    full = trainer(save_strategy="steps", save_steps=3)
    full.train()
    assert rendered.tolist() == [32, 32, 32]
    for step, (passes, batches) in ((3, (0, 3)), (6, (1, 2)), (9, (2, 1))):  # in the first, second and third pass
        rendered.zero_()
        resumed = trainer()
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{step}"))
        assert rendered.tolist() == [0] * passes + [32 - 8 * batches] + [32] * (2 - passes), step
        assert losses(resumed) == losses(full)  # (the first ones read from the checkpoint)
        assert resumed.state.epoch == full.state.epoch
    rendered.zero_()  # ignore_data_skip: the checkpoint's pass from its start
    trainer(ignore_data_skip=True).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert rendered[:2].tolist() == [0, 32] and rendered[2] >= 16
    collator = resumed.train_collator  # a skipped batch is a mark, refused should one ever reach training
    collator.epoch, collator.skip_batches = 0, 1
    examples = list(itertools.islice(resumed.train_dataset, 8))
    skipped = collator(examples)
    assert list(skipped) == ["skipped_batch"] and skipped["skipped_batch"].shape == (8,)
    assert collator(examples)["pixel_values"].shape == (8, 3, 32, 32)  # the next is rendered
    with pytest.raises(RuntimeError, match="counted among a resumed run's skipped batches reached training"):
        refuse_skipped(skipped)


def test_a_timm_student_whose_arguments_json_cannot_hold_still_saves(tmp_path, reinforced, caplog):
    """timm's config.json needs the student's arguments as JSON; one that is not (act_layer=nn.SiLU) leaves it out
    with a warning naming the argument, and the weights are saved: a checkpoint never fails on it."""
    import timm

    _, _, folders = reinforced
    student = timm.create_model("resnet10t", num_classes=10, act_layer=torch.nn.SiLU)
    trainer = ReinforcedTrainer(model=student, args=args(tmp_path, max_steps=1),
                                train_dataset=datasets.load_dataset(str(folders["rrc+flip"]), split="train"))
    trainer.train()
    with caplog.at_level("WARNING", logger="dr_hf.trainer"):
        trainer.save_model()
    assert "config.json was not written (Model argument 'act_layer' is not serializable" in caplog.text
    assert (tmp_path / "run" / "model.safetensors").is_file() and not (tmp_path / "run" / "config.json").exists()


def test_decoding_and_replay_run_in_dataloader_workers(tmp_path, reinforced):
    _, _, folders = reinforced
    train = datasets.load_dataset(str(folders["rrc+flip"]), split="train")
    trainer = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, dataloader_num_workers=2), train_dataset=train)
    loader = trainer.get_train_dataloader()
    assert loader.num_workers == 2
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and (batch["sample_index"] >= 0).all()
    # a worker renders straight into shared memory (no copy to cross into this process): the in-process batch
    rows = trainer.train_dataset
    worker = torch.utils.data.DataLoader(rows, batch_size=8, num_workers=1, collate_fn=SharedFlag(trainer.train_collator))
    for k, batch in enumerate(worker):
        assert batch.pop("allocated_shared")
        here = trainer.train_collator(rows.__getitems__(list(range(8 * k, 8 * k + 8))))
        assert batch.keys() == here.keys() and all(torch.equal(batch[key], here[key]) for key in here)
    # training from the workers' recycled blocks (dr_hf.batch_memory), two batches held at once for each step: the
    # losses of batches rendered in this process, loss for loss
    # (2 epochs of 4 batches; persistent workers, started once, replay the second epoch's samples too)
    runs = [ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, max_steps=4, dataloader_num_workers=w,
                                                           dataloader_persistent_workers=persistent,
                                                           gradient_accumulation_steps=2), train_dataset=train)
            for w, persistent in ((2, False), (0, False), (2, True))]
    for run in runs:
        run.train()
    assert len(losses(runs[0])) == 4 and all(np.isfinite(losses(runs[0])))
    assert losses(runs[0]) == losses(runs[1]) == losses(runs[2])


class SharedFlag:
    """A collator that also says whether its pixel batch was allocated in shared memory where it ran."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        pixels = batch["replay"].data if "replay" in batch else batch["pixel_values"]
        return {**batch, "allocated_shared": pixels.is_shared()}


@pytest.mark.parametrize("preset", ["rrc+flip", "imagenet+rare+mix"])
def test_replay_rows_convert_only_what_is_replayed(tmp_path, reinforced, preset):
    """The trainer reads a map-style reinforced set as Arrow with lazy reinforcement columns: every sample of every
    column equals what datasets' Python rows hold, groups are whole mixing groups, and the collated batch is the same
    tensor-for-tensor as from Python rows."""
    from dr_hf.format import DR_PARAMS, DR_TOPK_INDICES, DR_TOPK_LOGPROBS
    from dr_hf.rows import ReplayRows

    _, _, folders = reinforced
    plain = datasets.load_dataset(str(folders[preset]), split="train")
    if "mix" not in preset:  # an indices mapping too (mixing groups are consecutive rows: not shuffled row-wise)
        plain = plain.shuffle(seed=1)
    plain = plain.cast_column("image", datasets.Image(decode=False))  # as the trainer reads it: encoded
    trainer = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path), train_dataset=plain)
    rows = trainer.train_dataset
    assert isinstance(rows, ReplayRows) and len(rows) == len(plain) // trainer.group_size
    groups = rows.__getitems__([1, 0])
    for g, group in zip([1, 0], groups):
        assert len(group) == trainer.group_size
        for r, row in enumerate(group):
            expected = plain[g * trainer.group_size + r]
            assert set(row) == set(expected)
            for name, value in row.items():
                if name in (DR_TOPK_INDICES, DR_TOPK_LOGPROBS):
                    assert len(value) == len(expected[name]) == 4 and [value[s] for s in range(4)] == expected[name]
                elif name == DR_PARAMS:
                    assert {f: [v[s] for s in range(len(v))] for f, v in value.items()} == expected[name]
                else:
                    assert value == expected[name]
    with pytest.raises(IndexError):
        rows[len(rows)]
    collator = trainer.train_collator
    collator.epoch = 3
    lazy = collator(groups)
    eager = collator([plain[g * trainer.group_size:(g + 1) * trainer.group_size] for g in (1, 0)])
    assert lazy.keys() == eager.keys()
    for key in lazy:
        assert torch.equal(lazy[key], eager[key]), key


@pytest.mark.parametrize("preset", ["rrc+flip", "imagenet+rare"])
def test_uint8_pixels_normalise_to_the_float_batch(tmp_path, reinforced, preset):
    """With uint8_pixels (the default on an accelerator) replayed batches carry uint8 pixels (a quarter of the bytes
    through worker queues and to the GPU); the trainer's normalisation on the device gives the float collator's batch
    bit for bit, erasing and original-image examples included. Mixing data, uint8_pixels=False and the default on a
    CPU stay float."""
    ds, ens, folders = reinforced
    if preset not in folders:
        folder = tmp_path / "rare"
        config = ReinforceConfig.for_teachers(ens, preset, num_samples=3, topk=5, seed=0)
        reinforce(ds.select(range(16)), config, ens, str(folder), show_progress=False)
        folders = {**folders, preset: folder}
    train = datasets.load_dataset(str(folders[preset]), split="train")
    trainer = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, reinforced_prob=0.6, uint8_pixels=True),
                                train_dataset=train)
    assert trainer.train_collator.uint8_pixels
    groups = trainer.train_dataset.__getitems__(list(range(16)))
    exact = ReinforcedCollator(output=trainer.student_output, reinforced_prob=0.6, seed=0, num_classes=10)
    for epoch in (0, 1):
        trainer.train_collator.epoch = exact.epoch = epoch
        small, full = trainer.train_collator(groups), exact(groups)
        assert small["pixel_values"].dtype == torch.uint8 and full["pixel_values"].dtype == torch.float32
        assert torch.equal(trainer.pixel_values(small), full["pixel_values"])
        assert torch.equal(small["sample_index"], full["sample_index"]) and (small["sample_index"] < 0).any()
    if preset == "imagenet+rare":
        assert (small["pixel_values"] == 0).all(dim=1).any()  # an erased box is in the batch
    loss = trainer.compute_loss(trainer.model.train(), small)
    assert torch.isfinite(loss)
    mixing = datasets.load_dataset(str(folders["imagenet+rare+mix"]), split="train")
    assert not ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, uint8_pixels=True),
                                 train_dataset=mixing).train_collator.uint8_pixels
    for choice in (False, None):  # None: uint8 only on an accelerator, and this is a CPU run
        assert not ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, uint8_pixels=choice),
                                     train_dataset=train).train_collator.uint8_pixels


@pytest.mark.parametrize("preset", ["rrc+flip", "imagenet+rare+mix"])
def test_replay_on_device_renders_what_the_workers_would(tmp_path, reinforced, preset):
    """replay_on_device: the collator hands over each image as stored (JPEG bytes, other images decoded) and its
    views' parameters, not pixels; the trainer decodes and renders the batch on the labels' device. Labels, samples,
    mixing and teacher targets equal the workers' own batch, original-image examples included. On a CPU the trainer
    renders one view at a time: the workers' pixels exactly; the batched renderer that CUDA runs (here on CPU
    tensors) is within one grey level (rrc+flip: every pixel; RandAugment can amplify a level at a few pixels: on
    average). It reaches the trainer through a DataLoader worker (its bytes in shared memory, like pixel batches)
    and trains loss for loss as the workers' rendering does, each batch rendered a batch ahead by a background thread
    (with gradient accumulation, into a second epoch), from a map-style and a streamed dataset; a PNG is decoded in
    the worker, to the same batch; a truncated JPEG is named by its row."""
    import io

    import PIL.Image
    from dr_hf.images import BadImageError
    from dr_hf.replay import DeviceReplay

    _, _, folders = reinforced
    train = datasets.load_dataset(str(folders[preset]), split="train")
    kw = dict(reinforced_prob=0.6, max_steps=2)
    host = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, **kw), train_dataset=train)
    device = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, replay_on_device=True, **kw), train_dataset=train)
    groups = device.train_dataset.__getitems__(list(range(len(device.train_dataset) if "mix" in preset else 16)))
    for epoch in (0, 1):
        host.train_collator.epoch = device.train_collator.epoch = epoch
        rendered, handed = host.train_collator(groups), device.train_collator(groups)
        assert "pixel_values" not in handed and isinstance(handed["replay"], DeviceReplay)
        assert handed.keys() - {"replay"} == rendered.keys() - {"pixel_values"}
        for key in rendered.keys() - {"pixel_values"}:
            torch.testing.assert_close(handed[key], rendered[key], rtol=0, atol=0, equal_nan=True)
        assert (handed["sample_index"] < 0).any() and (handed["sample_index"] >= 0).any()
        replay = handed["replay"]
        assert replay.encoded.all() and replay.data.nbytes == sum(len(row["image"]["bytes"]) for g in groups for row in g)
        assert torch.equal(device.pixel_values(handed), rendered["pixel_values"])
        pixels = replay.render(device.replay_pipeline, device.student_output, "cpu", batched=True)
        levels = (pixels - rendered["pixel_values"]).abs() * torch.tensor(device.student_output.std)[:, None, None] * 255
        assert pixels.shape == rendered["pixel_values"].shape and 0 < levels.mean() < 0.5
        if preset == "rrc+flip":
            assert levels.max() < 1.0 + 1e-3
        else:
            assert "mix_lam" in handed and (handed["mix_lam"] < 1).any()
    row = groups[0][0]
    png = io.BytesIO()
    PIL.Image.fromarray(decode(row["image"]).permute(1, 2, 0).numpy()).save(png, format="PNG")
    odd = [[{**row, "image": {"bytes": png.getvalue(), "path": None}}, *groups[0][1:]], *groups[1:]]
    decoded_here = device.train_collator(odd)
    assert not decoded_here["replay"].encoded[0] and decoded_here["replay"].encoded[1:].all()
    assert torch.equal(device.pixel_values(decoded_here), rendered["pixel_values"])
    jpeg = row["image"]["bytes"]
    truncated = [[{**row, "image": {"bytes": jpeg[:jpeg.index(b"\xff\xda") + 40], "path": None}}, *groups[0][1:]],
                 *groups[1:]]
    with pytest.raises(BadImageError, match=rf"row {row['dr_index']}, column 'image': cannot decode.*truncated"):
        device.pixel_values(device.train_collator(truncated))
    if "mix" in preset:  # through a DataLoader worker, its bytes in shared memory already, and a few training steps
        worker = torch.utils.data.DataLoader(device.train_dataset, batch_size=1, num_workers=1,
                                             collate_fn=SharedFlag(device.train_collator))
        batch = next(iter(worker))
        assert batch.pop("allocated_shared") and isinstance(batch["replay"], DeviceReplay) and len(batch["replay"]) == 8
        device.args.dataloader_num_workers = 1
        threads = []
        render = device._render_replay
        device._render_replay = lambda batch: threads.append(threading.current_thread().name) or render(batch)
        for trainer in (host, device):  # 3 steps of 2 batches: into a second epoch of 4 batches
            trainer.args.max_steps, trainer.args.gradient_accumulation_steps = 3, 2
            trainer.train()
        assert len(losses(device)) == 3 and losses(device) == losses(host)  # the same pixels, loss for loss
        assert len(threads) >= 6 and set(threads) == {"dr-hf-replay_0"}  # rendered a batch ahead, off this thread
        assert device._rendered_ahead is None  # the rendering thread stops with train()
    stream = datasets.load_dataset(str(folders[preset]), split="train", streaming=True)  # streamed rows, and groups
    streamed = [ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path, max_steps=2, replay_on_device=on),
                                  train_dataset=stream) for on in (False, True)]
    for trainer in streamed:
        trainer.train()
    assert len(losses(streamed[1])) == 2 and losses(streamed[1]) == losses(streamed[0])
    with pytest.raises(ValueError, match="uint8_pixels=True .* replay_on_device=True"):
        args(tmp_path, replay_on_device=True, uint8_pixels=True)
    with pytest.raises(ValueError, match="replay_on_device replays reinforced datasets"):
        args(tmp_path, replay_on_device=True, augment="rrc+flip")


def test_a_stream_of_replayed_rows_is_read_as_arrow(tmp_path, reinforced):
    """A streamed reinforced set (no mixing) reaches the collator as one-row Arrow tables, converted sample by sample
    like ReplayRows: the batch equals the one from the same row as datasets' Python dict."""
    import pyarrow as pa

    _, _, folders = reinforced
    stream = datasets.load_dataset(str(folders["rrc+flip"]), split="train", streaming=True)
    trainer = ReinforcedTrainer(model=tiny_timm(), args=args(tmp_path), train_dataset=stream)
    first = next(iter(trainer.train_dataset))
    assert isinstance(first, pa.Table) and first.num_rows == 1
    plain = datasets.load_dataset(str(folders["rrc+flip"]), split="train").cast_column("image", datasets.Image(decode=False))
    lazy, eager = trainer.train_collator([first]), trainer.train_collator([plain[first["dr_index"][0].as_py()]])
    assert lazy.keys() == eager.keys() and all(torch.equal(lazy[k], eager[k]) for k in lazy)
