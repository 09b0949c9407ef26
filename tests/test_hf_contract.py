"""ReinforcedTrainer as a drop-in for an existing transformers script: TRL's arguments contract, the image processor's
normalisation, the user's collator for evaluation, remove_unused_columns, and scripts/finetune.py end to end."""

import dataclasses
import importlib.util
import os
import sys

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from transformers import TrainerCallback, TrainingArguments, default_data_collator

from dr_hf import ReinforceConfig, ReinforcedTrainer, ReinforcedTrainingArguments, TeacherEnsemble
from dr_hf.augment import CenterCrop
from dr_hf.collator import EvalCollator, ReinforcedCollator
from dr_hf.inputs import InputSpec, resolve_input_spec
from dr_hf import reinforce

from conftest import REPO, make_image_dataset


@pytest.fixture(scope="module")
def plus(tmp_path_factory, teachers):
    """A small reinforced set (24 rows, 10 classes, easy preset) and one with MixUp/CutMix."""
    ds = make_image_dataset(24, seed=7)
    out = {}
    for preset in ("imagenet+rrc", "imagenet+mix"):
        folder = tmp_path_factory.mktemp(preset.replace("+", "_"))
        config = ReinforceConfig.for_teachers(teachers, preset, num_samples=2, topk=3, seed=0)
        reinforce(ds, config, teachers, str(folder), show_progress=False)
        out[preset] = str(folder)
    return ds, out


@pytest.fixture()
def vit_dir(tiny_hf_dir):
    return str(tiny_hf_dir)  # ViT with an image processor: 32 px, mean/std 0.5 (not ImageNet's)


def load(folder):
    return datasets.load_dataset(folder, split="train")


def base_args(tmp_path, cls=ReinforcedTrainingArguments, **kw):
    values = dict(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8, report_to=[],
                  use_cpu=True, save_strategy="no", dataloader_num_workers=0)
    values.update(kw)
    return cls(**values)


def vit(path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(path), AutoImageProcessor.from_pretrained(path)


# -- arguments ----------------------------------------------------------------------------------------

def test_accepts_none_plain_training_arguments_and_its_own(tmp_path, plus, vit_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # args=None writes to ./reinforced-trainer, as Trainer's to ./tmp_trainer
    _, folders = plus
    model, processor = vit(vit_dir)
    plain = base_args(tmp_path, TrainingArguments, learning_rate=1e-3, seed=3, hub_token="secret-token")
    trainer = ReinforcedTrainer(model=model, args=plain, train_dataset=load(folders["imagenet+rrc"]),
                                processing_class=processor)
    assert isinstance(trainer.args, ReinforcedTrainingArguments)
    assert trainer.args.learning_rate == 1e-3 and trainer.args.seed == 3 and trainer.args.max_steps == 2
    assert trainer.args.hub_token == "secret-token" and trainer.args.reinforced_prob == 0.99
    assert ReinforcedTrainer(model=model, args=None, processing_class=processor).args.output_dir.endswith("reinforced-trainer")
    with pytest.raises(TypeError, match="TrainingArguments"):
        ReinforcedTrainer(model=model, args={"lr": 1})
    with pytest.raises(ValueError, match="`compute_loss_func`: ReinforcedTrainer's loss is distillation"):
        ReinforcedTrainer(model=model, args=plain, processing_class=processor, compute_loss_func=lambda *a, **k: 0.0)


def test_a_student_from_model_init_as_trainer_takes_it(tmp_path, plus, vit_dir):
    """`model_init` instead of `model` (what `hyperparameter_search` needs): each `train()` starts from a fresh
    student, which trains as a student passed as `model` does (the input size was unknown before: no model)."""
    _, folders = plus
    processor = vit(vit_dir)[1]
    made = []

    def model_init(trial=None):
        made.append(trial)
        return vit(vit_dir)[0]

    train = load(folders["imagenet+rrc"])
    fresh = ReinforcedTrainer(model_init=model_init, args=base_args(tmp_path, learning_rate=1e-2), train_dataset=train,
                              processing_class=processor)
    fresh.train()
    assert len(made) == 2 and fresh.model_init is model_init  # one to read the student's input, one for train()
    given = ReinforcedTrainer(model=model_init(), args=base_args(tmp_path, learning_rate=1e-2), train_dataset=train,
                              processing_class=processor)
    given.train()
    for (name, a), b in zip(fresh.model.state_dict().items(), given.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(fresh.model.state_dict()["classifier.weight"], vit(vit_dir)[0].state_dict()["classifier.weight"])


def test_a_hyperparameter_search_trains_each_trial_at_its_batch_size(tmp_path, plus, vit_dir):
    """`hyperparameter_search` (optuna) over the batch size on MixUp/CutMix data, whose DataLoader takes groups of 8
    rows: each trial trains at its own `per_device_train_batch_size` images, as `state.train_batch_size` records them
    (Trainer sets its batch size in images at each trial, read as groups: the set's 24 rows in both trials); a
    trial's size that is no multiple of the group is refused, naming it."""
    ds, folders = plus
    processor = vit(vit_dir)[1]
    seen = []

    class Batches(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append((args.per_device_train_batch_size, state.train_batch_size))

    trainer = ReinforcedTrainer(model_init=lambda trial=None: vit(vit_dir)[0], args=base_args(tmp_path, max_steps=1),
                                train_dataset=load(folders["imagenet+mix"]), eval_dataset=ds.select(range(8)),
                                processing_class=processor, callbacks=[Batches()])
    images = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        if model.training:
            images.append(len(inputs["labels"]))
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    sizes = iter([16, 8])
    trainer.hyperparameter_search(hp_space=lambda trial: {"per_device_train_batch_size": next(sizes)},
                                  backend="optuna", n_trials=2, direction="minimize",
                                  compute_objective=lambda metrics: 0.0)
    assert images == [16, 8] and seen == [(16, 16), (8, 8)]
    with pytest.raises(ValueError, match="per_device_train_batch_size=12 must be a multiple of the MixUp/CutMix group"):
        trainer.hyperparameter_search(hp_space=lambda trial: {"per_device_train_batch_size": 12}, backend="optuna",
                                      n_trials=1, direction="minimize", compute_objective=lambda metrics: 0.0)


@pytest.mark.parametrize("bad, message", [
    (dict(ce_weight=2.0), "ce_weight must be in \\[0, 1\\)"),
    (dict(ce_weight=1.0), "would drop the distillation term"),
    (dict(outside_topk="renorm"), "outside_topk must be one of"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(reinforced_prob=1.5), "reinforced_prob must be in"),
    (dict(augment="rrc+zoom"), "augment must be one of"),
    (dict(online_teachers=["efficientnet-lite0"]), "online_teachers needs augment"),
    (dict(interpolation="lanczos"), "interpolation must be one of"),
    (dict(image_mean=[0.5, 0.5]), "image_mean must have 3 values"),
    # (Trainer then took every batch for an unlabelled one: "forward() got an unexpected keyword argument")
    (dict(label_names=["label"]), r"label_names must be \['labels'\] \(or unset\).*label_column \('label'\)"),
])
def test_fields_are_validated_in_post_init(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        base_args(tmp_path, **bad)


def test_every_field_has_help_text():
    own = [f for f in dataclasses.fields(ReinforcedTrainingArguments)
           if f.name not in {g.name for g in dataclasses.fields(TrainingArguments)}]
    assert len(own) >= 14
    assert all(f.metadata.get("help") for f in own), [f.name for f in own if not f.metadata.get("help")]


# -- the input spec -----------------------------------------------------------------------------------

def test_student_sees_its_image_processors_normalisation(tmp_path, plus, vit_dir):
    _, folders = plus
    model, processor = vit(vit_dir)
    trainer = ReinforcedTrainer(model=model, args=base_args(tmp_path, uint8_pixels=True), processing_class=processor,
                                train_dataset=load(folders["imagenet+rrc"]))
    assert trainer.student_output == InputSpec(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear",
                                               crop_pct=1.0, crop_mode="squash")  # a ViT's processor squashes, crops nothing
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["pixel_values"].dtype == torch.uint8  # uint8_pixels (as on a GPU): normalised by the trainer
    pixels = trainer.pixel_values(batch)
    assert pixels.shape == (8, 3, 32, 32) and pixels.min() >= -1.0 - 1e-6 and pixels.max() <= 1.0 + 1e-6
    assert pixels.min() < -0.5 and pixels.max() > 0.5  # the whole range, not ImageNet's [-2.12, 2.64]


def assert_same_view(processor, spec):
    """dr-hf's evaluation view under `spec` is the processor's own (up to resampling), and another crop is not."""
    yy, xx = np.mgrid[0:300, 0:400]
    probe = np.stack([np.sin(xx / 23.0), np.cos(yy / 17.0), np.sin((xx + yy) / 31.0)], -1) * 127.5 + 127.5
    theirs = processor(images=PIL.Image.fromarray(probe.astype(np.uint8)), return_tensors="pt")["pixel_values"][0]
    image = torch.from_numpy(probe.astype(np.uint8)).permute(2, 0, 1)
    mean, std = torch.tensor(spec.mean)[:, None, None], torch.tensor(spec.std)[:, None, None]

    def gap(view, crop_pct):
        ours = (CenterCrop(crop_pct).apply(image, {}, view).float() / 255 - mean) / std
        return (ours - theirs).abs().mean().item()

    other = dataclasses.replace(spec, crop_mode="center" if spec.crop_mode == "squash" else "squash")
    right = gap(spec, spec.crop_pct)
    wrong = min(gap(spec, 1.0 if spec.crop_pct < 1 else 0.875), gap(other, spec.crop_pct))
    assert right < 0.1 and right < wrong / 4, (type(processor).__name__, right, wrong)


def test_one_resolver_for_models_processors_and_arguments(tmp_path):
    import timm
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    resnet = ResNetForImageClassification(ResNetConfig(num_labels=10))  # its config has no image size
    with pytest.raises(ValueError, match="pass image_size"):
        resolve_input_spec(resnet)
    processor = ConvNextImageProcessor(size={"shortest_edge": 48}, crop_pct=0.9, image_mean=[0.1, 0.2, 0.3],
                                       image_std=[0.4, 0.5, 0.6])
    spec = resolve_input_spec(resnet, processor)
    assert spec.size == (48, 48) and spec.mean == (0.1, 0.2, 0.3) and spec.crop_pct == 0.9
    assert resolve_input_spec(resnet, processor, size=24, mean=(0, 0, 0)).size == (24, 24)
    # the evaluation view is the processor's own: resized to `size`, center-cropped to `crop_size` when it crops;
    # a height and width squash the image, a shortest edge keeps its aspect; LeViT's processor resizes to 256/224
    # of its `shortest_edge`, ConvNeXt's squashes without cropping from 384 px on: each spec is held against the
    # processor's own output, and so are its pixel values: EfficientNet's divides by its std twice (include_top), or
    # rescales to [-1, 1] (rescale_offset), whatever its mean and std attributes say
    from transformers import (CLIPImageProcessor, DeiTImageProcessor, EfficientNetImageProcessor, LevitImageProcessor,
                              ViTImageProcessor)

    for processor, crop_pct, crop_mode in (
            (DeiTImageProcessor(size={"height": 256, "width": 256}), 224 / 256, "squash"),
            (CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 48, "width": 48}), 0.75, "center"),
            (ViTImageProcessor(size={"height": 48, "width": 48}), 1.0, "squash"),
            (LevitImageProcessor(), 224 / 256, "center"),
            (ConvNextImageProcessor(size={"shortest_edge": 224}), 0.875, "center"),
            (ConvNextImageProcessor(size={"shortest_edge": 384}), 1.0, "squash"),
            (EfficientNetImageProcessor(size={"height": 48, "width": 48}), 1.0, "squash"),
            (EfficientNetImageProcessor(size={"height": 48, "width": 48}, rescale_factor=1 / 127.5, rescale_offset=True,
                                        do_normalize=False, include_top=False), 1.0, "squash")):
        spec = resolve_input_spec(resnet, processor)
        assert (spec.crop_pct, spec.crop_mode) == (pytest.approx(crop_pct), crop_mode), type(processor).__name__
        assert_same_view(processor, spec)
    assert resolve_input_spec(resnet, EfficientNetImageProcessor()).std == (0.25,) * 3  # (its std 0.5, twice)
    cfg = timm.create_model("resnet10t", num_classes=10, pretrained_cfg_overlay=dict(
        input_size=(3, 40, 40), mean=(0.2, 0.2, 0.2), std=(0.3, 0.3, 0.3), interpolation="bilinear", crop_pct=0.95))
    assert resolve_input_spec(cfg) == InputSpec((40, 40), (0.2,) * 3, (0.3,) * 3, "bilinear", 0.95)
    squash = timm.create_model("resnet10t", num_classes=10, pretrained_cfg_overlay=dict(crop_mode="squash"))
    assert resolve_input_spec(squash).crop_mode == "squash"  # timm's own crop mode, as 137 of its pretrained models
    # a model torch.compile'd already says what the model does (timm's resolver stopped on it: "does not support
    # len()"); a ViT built for another size (create_model(..., img_size=32), which its pretrained_cfg and timm's own
    # data config do not follow: 224) takes that size alone; with dynamic_img_size, any: its pretrained_cfg's
    assert resolve_input_spec(torch.compile(cfg)) == resolve_input_spec(cfg)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32)
    assert resolve_input_spec(vit).size == (32, 32) and timm.data.resolve_model_data_config(vit)["input_size"][1] == 224
    assert resolve_input_spec(timm.create_model("vit_tiny_patch16_224", img_size=32, dynamic_img_size=True)).size == (224, 224)
    trainer = ReinforcedTrainer(model=torch.compile(vit), args=base_args(tmp_path))
    assert trainer.student_output.size == (32, 32) and trainer.num_classes == 10
    # a timm model as transformers loads it (AutoModelForImageClassification.from_pretrained("timm/...")): its
    # TimmWrapper model and processor say the same as the timm model, and the processor's view is held against it too
    wrapper, processor = timm_wrapper()
    spec = resolve_input_spec(wrapper)
    assert spec == resolve_input_spec(wrapper, processor) == InputSpec((42, 42), (0.2,) * 3, (0.3,) * 3, "bilinear", 0.875)
    assert_same_view(processor, spec)
    wrapper.save_pretrained(tmp_path / "wrapper")  # as a teacher (hf:FOLDER), which the same resolver reads
    assert TeacherEnsemble.from_specs([f"hf:{tmp_path / 'wrapper'}"]).outputs() == [spec]


def timm_wrapper():
    """A transformers TimmWrapper resnet10t (10 classes, 42 px: timm resizes to 48, then crops, mean 0.2, std 0.3) and
    its image processor."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification, TimmWrapperImageProcessor

    cfg = dict(input_size=[3, 42, 42], mean=[0.2] * 3, std=[0.3] * 3, interpolation="bilinear", crop_pct=0.875,
               crop_mode="center")
    torch.manual_seed(0)
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet10t", num_labels=10,
                                                                pretrained_cfg=cfg))
    return model, TimmWrapperImageProcessor(pretrained_cfg=cfg)


def test_students_train_at_their_processors_input(tmp_path, plus):
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    _, folders = plus
    model = ResNetForImageClassification(ResNetConfig(num_labels=10, embedding_size=8, hidden_sizes=[8, 8, 8, 8],
                                                      depths=[1, 1, 1, 1]))
    processor = ConvNextImageProcessor(size={"shortest_edge": 32})
    trainer = ReinforcedTrainer(model=model, args=base_args(tmp_path), train_dataset=load(folders["imagenet+rrc"]),
                                processing_class=processor)
    trainer.train()
    assert trainer.student_output.size == (32, 32) and trainer.state.global_step == 2
    # a transformers TimmWrapper student trains at its own input and saves a model that reloads
    from transformers import AutoModelForImageClassification

    model, processor = timm_wrapper()
    trainer = ReinforcedTrainer(model=model, args=base_args(tmp_path), train_dataset=load(folders["imagenet+rrc"]),
                                processing_class=processor)
    trainer.train()
    assert trainer.student_output.size == (42, 42) and trainer.state.global_step == 2
    trainer.save_model()
    x = torch.randn(2, 3, 42, 42)
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "run").eval()
    assert torch.equal(again(x).logits, trainer.model.eval()(x).logits)


# -- collators and columns ----------------------------------------------------------------------------

def test_user_collator_serves_evaluation_and_training_stays_reinforced(tmp_path, plus, vit_dir):
    ds, folders = plus
    model, processor = vit(vit_dir)
    seen = []

    def collate_fn(examples):
        seen.append(len(examples))
        return {"pixel_values": torch.zeros(len(examples), 3, 32, 32), "labels": torch.tensor([e["label"] for e in examples])}

    trainer = ReinforcedTrainer(model=model, args=base_args(tmp_path, remove_unused_columns=True),
                                train_dataset=load(folders["imagenet+rrc"]), eval_dataset=ds.select(range(8)),
                                processing_class=processor, data_collator=collate_fn)
    assert isinstance(trainer.train_collator, ReinforcedCollator)
    trainer.train()  # remove_unused_columns=True keeps the columns the reinforced collator needs
    assert trainer.state.global_step == 2 and not seen
    trainer.evaluate()
    assert sum(seen) == 8


def test_splits_with_their_own_transforms_as_the_transformers_script_sets_them(tmp_path, plus, vit_dir, caplog):
    """transformers' image-classification script gives both splits a transform (`set_transform`) and a collator;
    without the collator, `Trainer` batches the transform's outputs with `default_data_collator`, and so does
    `ReinforcedTrainer` for evaluation. Training replays the stored samples: the train split's transform is set aside
    with a warning (it crashed, given the encoded images the collator reads)."""
    ds, folders = plus
    model, processor = vit(vit_dir)
    calls = []

    def transform(batch):
        calls.append(len(batch["image"]))
        pixels = processor(images=[im.convert("RGB") for im in batch["image"]], return_tensors="pt")["pixel_values"]
        return {"pixel_values": list(pixels), "labels": batch["label"]}

    train, val = load(folders["imagenet+rrc"]), ds.select(range(8))
    trainer = ReinforcedTrainer(model=model, args=base_args(tmp_path), processing_class=processor,
                                train_dataset=train.with_transform(transform), eval_dataset=val.with_transform(transform))
    assert "train_dataset has a transform of its own" in caplog.text and "its stored sample" in caplog.text
    trainer.train()
    assert not calls  # training rendered the stored samples
    with_transform = trainer.evaluate()
    assert sum(calls) == 8
    stacked = ReinforcedTrainer(model=model, args=base_args(tmp_path), processing_class=processor, train_dataset=train,
                                eval_dataset=val.with_transform(transform), data_collator=default_data_collator)
    assert with_transform["eval_loss"] == pytest.approx(stacked.evaluate()["eval_loss"])
    # (the processor's own view is what the default evaluation renders, so the plain split scores alike)
    assert with_transform["eval_loss"] == pytest.approx(trainer.evaluate(val)["eval_loss"], abs=1e-3)


def test_evaluation_on_a_reinforced_split_is_a_deterministic_center_crop(plus):
    _, folders = plus
    rows = load(folders["imagenet+rrc"]).select(range(4))
    collator = EvalCollator(InputSpec((16, 16)))
    a, b = collator(list(rows)), collator(list(rows))
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["labels"].tolist() == rows["label"]
    assert "teacher_indices" not in a


def test_a_plain_dataset_needs_plain_training_asked_for(tmp_path, plus, vit_dir):
    ds, _ = plus
    model, processor = vit(vit_dir)
    with pytest.raises(ValueError, match="not a reinforced dataset.*dr_params"):
        ReinforcedTrainer(model=model, args=base_args(tmp_path), train_dataset=ds, processing_class=processor)
    trainer = ReinforcedTrainer(model=model, args=base_args(tmp_path, augment="rrc+flip"), train_dataset=ds,
                                processing_class=processor)
    trainer.train()
    assert trainer.state.global_step == 2


def test_mixing_batches_count_images(tmp_path, plus, vit_dir):
    _, folders = plus
    model, processor = vit(vit_dir)
    trainer = ReinforcedTrainer(model=model, args=base_args(tmp_path, per_device_train_batch_size=16),
                                train_dataset=load(folders["imagenet+mix"]), processing_class=processor)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["pixel_values"].shape[0] == 16 and "mix_lam" in batch
    # transformers' throughput counts images too: by steps (max_steps) and by epochs (the set's 24 rows, 3 groups)
    for kw in (dict(max_steps=2), dict(max_steps=-1, num_train_epochs=1)):
        trainer = ReinforcedTrainer(model=model, args=base_args(tmp_path, per_device_train_batch_size=16, **kw),
                                    train_dataset=load(folders["imagenet+mix"]), processing_class=processor)
        metrics = trainer.train().metrics
        images = metrics["train_samples_per_second"] * metrics["train_runtime"]
        assert images == pytest.approx(32 if "num_train_epochs" not in kw else 24, rel=0.02), (kw, metrics)
    with pytest.raises(ValueError, match="multiple of the MixUp/CutMix group size 8"):
        ReinforcedTrainer(model=model, args=base_args(tmp_path, per_device_train_batch_size=12),
                          train_dataset=load(folders["imagenet+mix"]), processing_class=processor)


# -- scripts/finetune.py ------------------------------------------------------------------------------

def finetune_module():
    spec = importlib.util.spec_from_file_location("finetune", REPO / "scripts" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["finetune"] = module  # dataclasses resolve string annotations through it
    spec.loader.exec_module(module)
    return module


def test_finetune_script_trains_evaluates_saves_resumes_and_names_the_dataset(tmp_path, plus, vit_dir):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    ds, folders = plus
    finetune = finetune_module()
    common = ["--model_name_or_path", vit_dir, "--dataset_name", folders["imagenet+rrc"], "--do_train", "--do_eval",
              "--max_steps", "4", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--save_steps", "2",
              "--eval_strategy", "steps", "--eval_steps", "2", "--report_to", "none", "--use_cpu", "--seed", "0",
              "--dataloader_num_workers", "0"]
    run = tmp_path / "run"
    trainer = finetune.main(common + ["--output_dir", str(run)])
    assert trainer.student_output.mean == (0.5, 0.5, 0.5)  # the checkpoint's processor, not ImageNet's statistics
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    assert len(evals) >= 2 and all(0 <= h["eval_accuracy"] <= 1 for h in evals)
    # a model and processor that reload for inference
    model = AutoModelForImageClassification.from_pretrained(run).eval()
    processor = AutoImageProcessor.from_pretrained(run)
    inputs = processor(images=[ds[0]["image"].convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        assert model(**inputs).logits.shape == (1, 10)
    card = (run / "README.md").read_text()
    assert folders["imagenet+rrc"] in card and "dataset-reinforcement" in card
    # resume from the step-2 checkpoint in a fresh run: the same final weights
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(run / "checkpoint-2", resumed / "checkpoint-2")
    finetune.main(common + ["--output_dir", str(resumed), "--resume_from_checkpoint", str(resumed / "checkpoint-2")])
    again = AutoModelForImageClassification.from_pretrained(resumed)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    # streamed (a set that does not fit on disk), evaluated on a set given by name; a stream holds no rows out
    streamed = finetune.main(common + ["--output_dir", str(tmp_path / "streamed"), "--streaming", "--eval_dataset_name",
                                       folders["imagenet+rrc"], "--max_train_samples", "16"])
    assert isinstance(streamed.train_dataset, datasets.IterableDataset) and streamed.state.global_step == 4
    assert len(streamed.eval_dataset) == 24 and any("eval_accuracy" in h for h in streamed.state.log_history)
    with pytest.raises(SystemExit):
        finetune.main(common + ["--output_dir", str(tmp_path / "streamed"), "--streaming"])
    # a timm checkpoint as transformers loads it (TimmWrapper): trained at, and evaluated by, its own processor
    wrapper, _ = timm_wrapper()
    wrapper.save_pretrained(tmp_path / "timm")
    common[common.index("--model_name_or_path") + 1] = str(tmp_path / "timm")
    trainer = finetune.main(common + ["--output_dir", str(tmp_path / "timm-run"), "--max_steps", "2"])
    assert trainer.student_output.size == (42, 42) and any("eval_accuracy" in h for h in trainer.state.log_history)


def test_the_other_1_percent_is_the_original_image_through_the_training_augmentation(plus):
    """reinforced_prob < 1: the original image, freshly augmented by the dataset's own transforms (not a center crop),
    with its label and no teacher target; like every choice, a pure function of (seed, epoch, row)."""
    _, folders = plus
    rows = list(load(folders["imagenet+rrc"]).select(range(4)))
    collator = ReinforcedCollator(InputSpec((16, 16)), reinforced_prob=0.0)
    a = collator(rows)
    assert "teacher_indices" not in a and "sample_index" not in a  # no stored sample: the label is the target
    assert a["labels"].tolist() == [r["label"] for r in rows]
    center = EvalCollator(InputSpec((16, 16)))(rows)["pixel_values"]
    assert not torch.equal(a["pixel_values"], center)  # augmented, not the evaluation view
    assert torch.equal(collator(rows)["pixel_values"], a["pixel_values"])  # same epoch: same views
    collator.epoch = 1
    assert not torch.equal(collator(rows)["pixel_values"], a["pixel_values"])  # next epoch: fresh ones
    # a row without a label has no target but its stored ones: it replays a stored sample (unlabelled training
    # crashed at its first original-image draw, 1% of examples, on "an original-image example has no label")
    rows[1]["label"] = None
    mixed = collator(rows)
    assert mixed["teacher_indices"][1, 0] >= 0 and (mixed["teacher_indices"][[0, 2, 3], 0] < 0).all()
    unlabelled = ReinforcedCollator(InputSpec((16, 16)), reinforced_prob=0.0, label_column=None)(rows)
    assert (unlabelled["teacher_indices"] >= 0).all() and (unlabelled["labels"] == -1).all()


def test_ml_dr_recipe_arguments_train_a_timm_student(tmp_path, plus):
    """The README's recipe (SGD + Nesterov, cosine, warm-up ratio, label smoothing) on a timm model, which has no
    `config` for the Trainer's own label smoother to read."""
    import timm

    _, folders = plus
    args = base_args(tmp_path, optim="sgd", optim_args="momentum=0.9,nesterov=True", learning_rate=0.05,
                     weight_decay=1e-4, lr_scheduler_type="cosine", warmup_steps=0.5, label_smoothing_factor=0.1,
                     reinforced_prob=0.5, image_size=32, logging_steps=1)
    trainer = ReinforcedTrainer(model=timm.create_model("resnet10t", num_classes=10), args=args,
                                train_dataset=load(folders["imagenet+rrc"]))
    trainer.train()
    assert trainer.args.label_smoothing_factor == 0.1 and trainer.state.global_step == 2
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]
    values = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(values) == 2 and all(np.isfinite(values))


def test_a_peft_student_trains_its_adapters_and_saves_them_as_peft_does(tmp_path, plus, vit_dir):
    """LoRA on a transformers ViT (given as TRL's trainers take it, `peft_config`) and on a timm CNN (wrapped by
    peft.get_peft_model): the student's classes and outputs are its base model's (its number of classes was unknown
    to the trainer before, and the wrapped ViT's output was taken for logits); only the adapters and the saved head
    train, and the folder holds what PEFT saves, which PeftModel.from_pretrained loads back to the same outputs."""
    import timm
    from peft import LoraConfig, PeftModel, get_peft_model

    _, folders = plus
    train = load(folders["imagenet+rrc"])
    batch = EvalCollator(InputSpec((32, 32)))(list(train.select(range(4))))["pixel_values"]
    students = {"vit": (lambda: vit(vit_dir)[0], ["q_proj", "v_proj"], "classifier"),
                "timm": (lambda: timm.create_model("resnet10t", num_classes=10), ["conv1.0", "conv1.3"], "fc")}
    for name, (make, targets, head) in students.items():
        torch.manual_seed(0)
        base = make()
        frozen = {k: v.detach().clone() for k, v in base.named_parameters()}
        lora = LoraConfig(r=4, target_modules=targets, modules_to_save=[head])
        given = dict(model=base, peft_config=lora) if name == "vit" else dict(model=get_peft_model(base, lora))
        trainer = ReinforcedTrainer(**given, args=base_args(tmp_path / name, learning_rate=1e-2, image_size=32),
                                    train_dataset=train, eval_dataset=train.select(range(8)))
        model = trainer.model
        assert isinstance(model, PeftModel) and trainer.num_classes == 10
        trainer.train()
        assert np.isfinite(trainer.evaluate()["eval_loss"])
        changed = {k for k, v in model.get_base_model().named_parameters() if k in frozen and not torch.equal(v, frozen[k])}
        assert not changed, (name, sorted(changed)[:3])  # the base weights, as they were
        assert all(v.abs().sum() > 0 for k, v in model.state_dict().items() if "lora_B" in k)  # (zero at first)
        trainer.save_model()
        saved = sorted(os.listdir(tmp_path / name / "run"))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(saved) and "config.json" not in saved, saved
        torch.manual_seed(0)
        loaded = PeftModel.from_pretrained(make(), str(tmp_path / name / "run")).eval()
        trained = model.state_dict()
        adapters = {k: v for k, v in loaded.state_dict().items() if "lora_" in k or "modules_to_save" in k}
        assert adapters and all(torch.equal(v, trained[k]) for k, v in adapters.items()), name
        if name == "vit":  # (a CNN's batch-norm statistics, updated in training, are no adapter's: PEFT saves none)
            model.eval()
            with torch.no_grad():
                assert torch.allclose(trainer._forward(loaded, batch), trainer._forward(model, batch), atol=1e-5)
    # a fresh student from model_init is wrapped as a given one is
    fresh = ReinforcedTrainer(model_init=lambda trial=None: vit(vit_dir)[0], args=base_args(tmp_path / "init"),
                              peft_config=LoraConfig(r=4, target_modules=["q_proj"]), train_dataset=train)
    fresh.train()
    assert isinstance(fresh.model, PeftModel) and fresh.state.global_step == 2


def test_activation_checkpointing_checkpoints_a_timm_student(tmp_path, plus, monkeypatch):
    """`activation_checkpointing=True` (and its older name `gradient_checkpointing`): Trainer calls the model's
    `activation_checkpointing_enable`, which a timm student has not (training stopped with an AttributeError); timm's
    own checkpointing (set_grad_checkpointing) now runs, recomputing blocks in the backward pass to the same losses.
    Options timm cannot apply are refused, naming them."""
    import timm
    import torch.utils.checkpoint

    _, folders = plus
    train = load(folders["imagenet+rrc"])
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    runs = {}
    for name, kw in (("plain", {}), ("activation", dict(activation_checkpointing=True)),
                     ("gradient", dict(gradient_checkpointing=True))):
        torch.manual_seed(0)
        student = timm.create_model("resnet10t", num_classes=10)
        calls.clear()
        trainer = ReinforcedTrainer(model=student, args=base_args(tmp_path / name, image_size=32, logging_steps=1,
                                                                  seed=0, **kw), train_dataset=train)
        trainer.train()
        assert student.grad_checkpointing == bool(kw) and bool(calls) == bool(kw), name
        runs[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(runs["plain"]) == 2
    assert np.allclose(runs["activation"], runs["plain"], rtol=1e-4) and runs["gradient"] == runs["activation"]
    refused = ReinforcedTrainer(model=timm.create_model("resnet10t", num_classes=10), train_dataset=train,
                                args=base_args(tmp_path / "offload", image_size=32, activation_checkpointing=True,
                                               activation_checkpointing_kwargs={"offload": True}))
    with pytest.raises(ValueError, match=r"activation_checkpointing_kwargs \{'offload': True\}.*timm"):
        refused.train()


def test_bf16_full_eval_evaluates_a_timm_student_in_bf16(tmp_path, plus):
    """`bf16_full_eval=True`: Trainer casts the student to bf16 for evaluation; a timm student was handed float32 pixels
    and stopped ("Input type (torch.FloatTensor) and weight type (CPUBFloat16Type) should be the same"), where a
    transformers model casts its input itself. It now evaluates in bf16, to the float32 loss within bf16's rounding."""
    import timm

    ds, _ = plus
    results = {}
    for name, kw in (("fp32", {}), ("bf16", dict(bf16_full_eval=True))):
        torch.manual_seed(0)
        trainer = ReinforcedTrainer(model=timm.create_model("resnet10t", num_classes=10), eval_dataset=ds,
                                    args=base_args(tmp_path / name, image_size=32, **kw))
        results[name] = trainer.evaluate()["eval_loss"], trainer.predict(ds).predictions
        assert next(trainer.model.parameters()).dtype == (torch.bfloat16 if kw else torch.float32)
    (loss, logits), (bf16_loss, bf16_logits) = results["fp32"], results["bf16"]
    assert abs(bf16_loss - loss) < 0.02 and np.abs(bf16_logits - logits).max() < 0.1, (loss, bf16_loss)
    assert not np.array_equal(bf16_logits, logits)  # (evaluated in bf16 indeed)


def test_sets_in_any_format_of_datasets_are_read_as_their_rows(tmp_path, plus):
    """An evaluation set, or a plain training set, given `with_format("arrow")` stopped inside datasets ("Index must
    either be string or integer"); numpy, torch and pandas formats worked by chance. The collators render each row
    themselves, so the set's format is set aside: the same predictions in every format, map-style or streamed, and
    the same training losses."""
    import timm

    ds, _ = plus
    torch.manual_seed(0)
    trainer = ReinforcedTrainer(model=timm.create_model("resnet10t", num_classes=10), eval_dataset=ds,
                                args=base_args(tmp_path, image_size=32))
    rows = trainer.predict(ds).predictions
    for kind in ("arrow", "numpy", "torch", "pandas"):
        for evaluation in (ds.with_format(kind), ds.to_iterable_dataset().with_format(kind if kind != "pandas" else None)):
            assert np.array_equal(trainer.predict(evaluation).predictions, rows), kind
    assert trainer.evaluate(ds.with_format("arrow"))["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"])
    losses = []
    for train in (ds, ds.with_format("arrow")):
        torch.manual_seed(0)
        plain = ReinforcedTrainer(model=timm.create_model("resnet10t", num_classes=10), train_dataset=train,
                                  args=base_args(tmp_path, image_size=32, augment="rrc+flip", logging_steps=1, seed=0))
        plain.train()
        losses.append([h["loss"] for h in plain.state.log_history if "loss" in h])
    assert len(losses[0]) == 2 and losses[1] == losses[0]
