"""The Hub path (issue 5): card, preview, `dr-hf push`, `load_dataset("org/...")` map-style and streaming, reinforcement-only
repos joined to their source, an interrupted push resumed; all against the local stand-in in tests/hub_standin.py."""

import json
import os
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import pytest

from dr_hf.cli import main
from dr_hf import reinforce
from dr_hf.source import FingerprintMismatch, join_source
from dr_hf.stats import summarize
from dr_hf.verify import verify

from conftest import jpeg_bytes, source_folder
from hub_standin import HubStandIn
from test_cli import here
from test_reinforce import make_config

TOKEN = "hf_standin_SECRET_token_0123456789"


@pytest.fixture(scope="module")
def hub():
    server = HubStandIn()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    return source_folder(tmp_path_factory.mktemp("src"), 24, seed=11)


@pytest.fixture(scope="module")
def plus(tmp_path_factory, teachers, source_dir):
    out = tmp_path_factory.mktemp("plus")
    config = make_config(teachers, augment="imagenet+rare+mix", n=4, k=3, rows_per_shard=8,
                         source={"path": str(source_dir), "split": "train"})
    reinforce(datasets.load_dataset(str(source_dir), split="train"), config, teachers, str(out), show_progress=False,
              command="dr-hf reinforce src --output plus")
    return out


@pytest.fixture(scope="module")
def reinforcement_only(tmp_path_factory, teachers, source_dir):
    out = tmp_path_factory.mktemp("ronly")
    config = make_config(teachers, augment="imagenet+rare+mix", n=4, k=3, rows_per_shard=8, keep_source=False,
                         source={"path": str(source_dir), "split": "train"})
    reinforce(datasets.load_dataset(str(source_dir), split="train"), config, teachers, str(out), show_progress=False)
    return out


def cli(hub, home, *args):
    env = {**os.environ, **hub.env(str(home)), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([sys.executable, "-m", "dr_hf", *map(str, args)], capture_output=True, text=True, env=env)


def cli_here(hub, monkeypatch, capsys, *args):
    """``dr-hf ARGS`` in this process against the stand-in: (exit code, stdout, stderr)."""
    hub.point_here(monkeypatch)
    return here(capsys, *args)


def fresh_python(hub, home, code):
    """Run ``code`` in a new interpreter with an empty HF_HOME pointed at the stand-in; returns its JSON answer."""
    env = {**os.environ, **hub.env(str(home)), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_TOKEN", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_card_and_preview(plus):
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(str(plus / "README.md"))
    data = card.data.to_dict()
    assert data["reinforcement"]["num_samples"] == 4 and data["reinforcement"]["augment"] == "imagenet+rare+mix"
    assert {"dataset-reinforcement", "knowledge-distillation"} <= set(data["tags"])
    assert data["configs"][0]["data_files"][0]["path"] == "data/train-*.parquet"
    assert data["task_categories"] == ["image-classification"]
    assert [f["name"] for f in data["dataset_info"]["features"]][-5:] == \
        ["dr_index", "dr_fingerprint", "dr_params", "dr_topk_indices", "dr_topk_logprobs"]
    text = card.text
    for section in ("## Reinforcement", "## Columns", "## How it was made", "## Train with it", "## Citation"):
        assert section in text
    assert "](preview.png)" in text and "dr-hf reinforce src --output plus" in text and "faghri2023reinforce" in text
    assert "streaming=True" in text and "ReinforcedTrainer" in text
    from dr_hf.card import published_card  # as dr-hf push publishes it to a branch of a repo

    branch = published_card((plus / "README.md").read_text(), "org/x", "v1")
    assert 'load_dataset("org/x", revision="v1", split="train")' in branch and "org/name-plus" not in branch
    image = PIL.Image.open(plus / "preview.png")
    assert image.size[0] >= 4 * 176 and image.size[1] >= 4 * 176
    # the tiles are the replayed samples, not blank: real variation across the grid
    assert np.asarray(image.convert("L"), dtype=np.float32)[:176, :176].std() > 5


def test_preview_cli_captions_classes(tmp_path, plus, capsys):
    out = tmp_path / "grid.png"
    assert main(["preview", str(plus), "--out", str(out), "--rows", "2", "--samples", "3"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    im = PIL.Image.open(out)
    assert im.size == (3 * 176 + 2 * 4, 2 * (176 + 4 * 12 + 6))


def test_push_then_load_in_a_fresh_process_map_style_and_streaming(tmp_path, hub, plus, monkeypatch, capsys):
    push = cli(hub, tmp_path / "home-push", "push", plus, "org/imagenet-plus", "--token", TOKEN, "--files-per-commit", 2)
    assert push.returncode == 0, push.stderr
    assert TOKEN not in push.stdout + push.stderr  # passed through, never printed
    assert TOKEN in hub.state.tokens_seen
    # 3 shards in 2 commits, then the card and preview, in a pull request merged into main at once
    assert "5 file(s) in 3 commit(s), 0 already there, merged from pull request #1" in push.stdout
    repo = hub.state.repos[("dataset", "org/imagenet-plus")]
    assert repo.log[-2].endswith("(part 3/3)") and repo.log[-1].startswith("Merge pull request #1")
    assert repo.pulls[1]["status"] == "merged"
    assert sorted(repo.commits[repo.branches["main"]]) == sorted(
        ["README.md", "preview.png"] + [f"data/{n}" for n in os.listdir(plus / "data")])
    for path in plus.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes()
    answer = fresh_python(hub, tmp_path / "home-load", f"""
        import json
        import datasets
        from huggingface_hub import DatasetCard, HfApi
        local = datasets.load_dataset({str(plus)!r}, split="train")
        hub = datasets.load_dataset("org/imagenet-plus", split="train")
        streamed = list(datasets.load_dataset("org/imagenet-plus", split="train", streaming=True))
        same_map = hub.to_list() == local.to_list()
        same_stream = [dict(r) for r in streamed] == [dict(r) for r in local]
        card = DatasetCard.load("org/imagenet-plus", repo_type="dataset")
        card.validate(repo_type="dataset")
        files = HfApi().list_repo_files("org/imagenet-plus", repo_type="dataset")
        print(json.dumps({{"rows": len(hub), "streamed": len(streamed), "same_map": same_map, "same_stream": same_stream,
                          "columns": hub.column_names, "label": str(hub.features["label"]),
                          "reinforcement": card.data.to_dict()["reinforcement"]["topk"], "files": files,
                          "snippet": 'load_dataset("org/imagenet-plus", split="train")' in card.text}}))
    """)
    assert answer["rows"] == answer["streamed"] == 24
    assert answer["same_map"] and answer["same_stream"]
    assert answer["columns"][:3] == ["image", "label", "note"] and "ClassLabel" in answer["label"]
    assert answer["reinforcement"] == 3 and "preview.png" in answer["files"]
    assert answer["snippet"]  # the published card's code loads the repo it is in (the local one: a placeholder)
    assert '"org/name-plus"' in (plus / "README.md").read_text()
    again = cli(hub, tmp_path / "home-push", "push", plus, "org/imagenet-plus", "--token", TOKEN)
    assert again.returncode == 0 and "0 file(s) in 0 commit(s), 5 already there" in again.stdout
    # verify takes the Hub id as load_dataset does: the card and shards are downloaded to the cache, then replayed
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    code, out, err = cli_here(hub, monkeypatch, capsys, "verify", "org/imagenet-plus", "--rows", 2)
    assert code == 0 and "schema: 24 rows checked" in out and "replayed 2 row(s)" in out and out.endswith("OK\n"), err
    assert sorted(os.listdir(next((tmp_path / "hub-cache").glob("datasets--org--imagenet-plus/snapshots/*")))) == [
        "README.md", "data"]  # (not the preview)
    code, _, err = cli_here(hub, monkeypatch, capsys, "verify", plus, "--revision", "v1")
    assert code == 2 and f"--revision 'v1' names a Hub revision (branch, tag or commit), but {plus} is a local" in err
    # preview takes the Hub id too, downloading the card and the first shard alone, and writes here by default
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "preview-cache"))
    monkeypatch.chdir(tmp_path)
    code, out, err = cli_here(hub, monkeypatch, capsys, "preview", "org/imagenet-plus", "--rows", 2, "--samples", 2)
    assert code == 0 and "wrote preview.png" in out, err
    assert PIL.Image.open(tmp_path / "preview.png").size == (2 * 176 + 4, 2 * (176 + 4 * 12 + 6))
    snapshot = next((tmp_path / "preview-cache").glob("datasets--org--imagenet-plus/snapshots/*"))
    assert sorted(p.name for p in snapshot.rglob("*") if p.is_file()) == ["README.md", "train-00000-of-00003.parquet"]


def test_interrupted_push_resumes(tmp_path, hub, plus, monkeypatch, capsys):
    repo_id = "org/imagenet-plus-resume"
    hub.point_here(monkeypatch)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # no Hub there (no network):
    code, _, err = here(capsys, "push", plus, repo_id, "--quiet")  # named, not httpx2's traceback
    assert code == 2 and "dr-hf push: error: cannot reach the Hub at http://127.0.0.1:9 (ConnectError" in err, err
    hub.state.fail_lfs_put_after = len(hub.state.lfs_puts)  # the next LFS upload fails
    code, _, err = cli_here(hub, monkeypatch, capsys, "push", plus, repo_id, "--files-per-commit", 1, "--quiet")
    assert code == 2 and "dr-hf push: error:" in err and "uploading" in err
    hub.state.fail_lfs_put_after = len(hub.state.lfs_puts) + 2  # two more, then fail again
    assert cli_here(hub, monkeypatch, capsys, "push", plus, repo_id, "--files-per-commit", 1, "--quiet")[0] == 2
    repo = hub.state.repos[("dataset", repo_id)]
    assert set(repo.commits[repo.branches["main"]]) == set()  # main shows nothing until the pull request is merged
    committed = set(repo.commits[repo.branches["refs/pr/1"]])
    assert len(committed) == 2 and "README.md" not in committed  # the card comes last, only once all shards are there
    hub.state.fail_lfs_put_after = None
    puts_before = len(hub.state.lfs_puts)
    code, out, err = cli_here(hub, monkeypatch, capsys, "push", plus, repo_id, "--files-per-commit", 1, "--quiet")
    assert code == 0, err
    assert "2 already there, merged from pull request #1" in out  # the interrupted push's pull request, resumed
    assert list(repo.pulls) == [1]
    assert len(hub.state.lfs_puts) - puts_before == 2  # the last shard and the preview: nothing uploaded twice
    assert len(hub.state.lfs_puts) == len(set(hub.state.lfs_puts))
    answer = fresh_python(hub, tmp_path / "home-load", f"""
        import json, datasets
        print(json.dumps({{"same": datasets.load_dataset({repo_id!r}, split="train").to_list()
                                    == datasets.load_dataset({str(plus)!r}, split="train").to_list()}}))
    """)
    assert answer["same"]
    # --private on the repo that now exists, public: refused before anything is uploaded (create_repo leaves it public)
    commits = len(repo.commits)
    code, _, err = cli_here(hub, monkeypatch, capsys, "push", plus, repo_id, "--private", "--quiet")
    assert code == 2 and f"{repo_id} exists and is public: --private makes a new repo private, not an existing" in err
    assert len(repo.commits) == commits and not repo.private
    code, _, err = cli_here(hub, monkeypatch, capsys, "push", plus, "org/imagenet-plus-private", "--private", "--quiet")
    assert code == 0 and hub.state.repos[("dataset", "org/imagenet-plus-private")].private, err
    # to a branch (the Hub opens pull requests against main only): commits straight to it, main untouched
    code, out, err = cli_here(hub, monkeypatch, capsys, "push", plus, repo_id, "--revision", "v1", "--files-per-commit",
                              2, "--quiet")
    assert code == 0 and "(v1): 1 file(s) in 1 commit(s), 4 already there" in out, err  # (its card loads v1)
    code, out, err = cli_here(hub, monkeypatch, capsys, "push", plus, "org/imagenet-plus-branch", "--revision", "v1",
                              "--files-per-commit", 2, "--quiet")
    branched = hub.state.repos[("dataset", "org/imagenet-plus-branch")]
    assert code == 0 and "5 file(s) in 3 commit(s)" in out and "pull request" not in out, err
    assert branched.pulls == {} and branched.commits[branched.branches["main"]] == {}
    assert len(branched.commits[branched.branches["v1"]]) == 5


@pytest.fixture(scope="module")
def other(tmp_path_factory, teachers, source_dir):
    """The same rows as ``plus`` in other shards (--rows-per-shard 16: 2 of them, where ``plus`` has 3)."""
    out = tmp_path_factory.mktemp("other")
    config = make_config(teachers, augment="imagenet+rare+mix", n=4, k=3, rows_per_shard=16,
                         source={"path": str(source_dir), "split": "train"})
    reinforce(datasets.load_dataset(str(source_dir), split="train"), config, teachers, str(out), show_progress=False)
    return out


def test_a_push_over_an_earlier_one_leaves_only_this_folders_shards(tmp_path, hub, plus, other, monkeypatch, capsys,
                                                                     caplog):
    """The same repo pushed again from a folder with other shard names (another --rows-per-shard): the push's commits
    go to a pull request merged in one step, so main holds the earlier push, whole, until it holds this one, whole,
    with the earlier push's shards gone; a push that fits one commit is one commit."""
    code, out, err = cli_here(hub, monkeypatch, capsys, "push", plus, "org/repushed", "--quiet")
    assert code == 0 and "5 file(s) in 1 commit(s), 0 already there\n" in out, err
    repo = hub.state.repos[("dataset", "org/repushed")]
    earlier = dict(repo.commits[repo.branches["main"]])
    hub.state.fail_commits = {hub.state.commit_attempts + 3}  # 2 shards, the card and preview, then the merge fails
    code, out, err = cli_here(hub, monkeypatch, capsys, "push", other, "org/repushed", "--files-per-commit", "1", "--quiet")
    hub.state.fail_commits = set()
    assert code == 2 and "merging pull request #1, which holds this push, failed" in err and "main is as it was" in err
    assert repo.commits[repo.branches["main"]] == earlier  # readers still get the earlier dataset, all of it
    code, out, err = cli_here(hub, monkeypatch, capsys, "push", other, "org/repushed", "--files-per-commit", "1", "--quiet")
    assert code == 0, err
    assert "0 file(s) in 0 commit(s), 4 already there, merged from pull request #1" in out
    assert "3 file(s) of an earlier push removed" in out
    held = sorted(p for p in repo.commits[repo.branches["main"]] if p.startswith("data/"))
    assert held == [f"data/{n}" for n in sorted(os.listdir(other / "data"))] == \
        ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    # main changed by someone else between the interrupted push and its rerun: the merge is refused, main kept
    hub.state.fail_commits = {hub.state.commit_attempts + 4}  # 3 shards, the card and preview, then the merge fails
    code, out, err = cli_here(hub, monkeypatch, capsys, "push", plus, "org/repushed", "--files-per-commit", "1", "--quiet")
    hub.state.fail_commits = set()
    assert code == 2 and "merging pull request #2" in err, err
    from huggingface_hub import HfApi

    HfApi().upload_file(path_or_fileobj=b"---\nlicense: mit\n---\nedited\n", path_in_repo="README.md",
                        repo_id="org/repushed", repo_type="dataset")
    edited = dict(repo.commits[repo.branches["main"]])
    code, out, err = cli_here(hub, monkeypatch, capsys, "push", plus, "org/repushed", "--files-per-commit", "1", "--quiet")
    assert code == 2 and "merging pull request #2, which holds this push, failed" in err and "conflicts" in err, err
    assert "if main changed meanwhile, close #2 on the Hub and push again" in err
    assert repo.commits[repo.branches["main"]] == edited
    # an interrupted push's pull request left open: another job's push opens its own, and is told of the first
    hub.state.fail_commits = {hub.state.commit_attempts + 4}  # (the merge)
    assert cli_here(hub, monkeypatch, capsys, "push", plus, "org/stale", "--files-per-commit", "1", "--quiet")[0] == 2
    hub.state.fail_commits = set()
    with caplog.at_level("WARNING", logger="dr_hf.hub"):
        code, out, err = cli_here(hub, monkeypatch, capsys, "push", other, "org/stale", "--files-per-commit", "1")
    assert code == 0 and "merged from pull request #2" in out, err
    assert "pull request #1 of org/stale holds another dr-hf push, interrupted (another job's)" in caplog.text


def test_a_push_landing_while_another_runs_leaves_no_mix(hub, plus, other, monkeypatch):
    """Another job's push lands after this one listed the repo: this one's commit is refused (its parent moved), or,
    in a pull request, its merge (both changed the card); main holds the other push, whole; a rerun pushes over it."""
    import dr_hf.hub as pushing

    hub.point_here(monkeypatch)
    listed = pushing.remote_files

    def another_push_lands(api, repo_id, revision):
        found = listed(api, repo_id, revision)
        monkeypatch.setattr(pushing, "remote_files", listed)  # (once)
        assert pushing.push(str(other), repo_id).commits == 1
        return found

    def data_on_main(repo_id):
        repo = hub.state.repos[("dataset", repo_id)]
        return sorted(p for p in repo.commits[repo.branches["main"]] if p.startswith("data/"))

    theirs, ours = [sorted(f"data/{n}" for n in os.listdir(f / "data")) for f in (other, plus)]
    for repo_id, per_commit, refused in (("org/race", 50, "org/race@main changed while this push ran"),
                                         ("org/race-pr", 1, "merging pull request #1, which holds this push, failed")):
        monkeypatch.setattr(pushing, "remote_files", another_push_lands)
        with pytest.raises(RuntimeError, match=refused):
            pushing.push(str(plus), repo_id, files_per_commit=per_commit)
        assert data_on_main(repo_id) == theirs  # theirs alone, with their card
        card = hub.state.repos[("dataset", repo_id)].commits[hub.state.repos[("dataset", repo_id)].branches["main"]]
        assert b"rows_per_shard: 16" in card["README.md"].data
    assert pushing.push(str(plus), "org/race").commits == 1  # the rerun: onto what main holds now
    assert data_on_main("org/race") == ours


def test_a_hub_source_in_the_local_cache_reinforces_offline(tmp_path, hub, source_dir, tiny_teacher_spec):
    """As on a cluster's compute nodes without a network: the source, loaded once into HF_HOME's cache, reinforces
    with HF_HUB_OFFLINE=1 and nothing is asked of the Hub; online with the Hub out of reach, the refusal says how to
    read the cache instead."""
    home = tmp_path / "home"
    assert fresh_python(hub, home, f"""
        import json, datasets
        datasets.load_dataset({str(source_dir)!r}, split="train").push_to_hub("org/plain-src", token={TOKEN!r})
        print(json.dumps(len(datasets.load_dataset("org/plain-src", split="train"))))
    """) == 24
    asked = len(hub.state.requests)
    env = {**os.environ, **hub.env(str(home)), "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}

    def reinforce_cli(out):
        return subprocess.run([sys.executable, "-m", "dr_hf", "reinforce", "org/plain-src", "--output", str(out),
                               "--teacher", tiny_teacher_spec, "--num-samples", "2", "--topk", "3"],
                              capture_output=True, text=True, env=env)

    proc = reinforce_cli(tmp_path / "plus")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(hub.state.requests) == asked
    assert datasets.load_dataset(str(tmp_path / "plus"), split="train").num_rows == 24
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")  # a port nothing listens on
    proc = reinforce_cli(tmp_path / "unreachable")
    assert proc.returncode == 2 and "set HF_HUB_OFFLINE=1 to read it from there" in proc.stderr, proc.stderr[-3000:]


def test_reinforcement_only_repo_joins_its_source_and_refuses_a_tampered_row(tmp_path, hub, plus, reinforcement_only,
                                                                            source_dir, monkeypatch, capsys):
    table = pq.read_table(str(reinforcement_only / "data"))
    assert table.column_names == ["dr_index", "dr_fingerprint", "dr_params", "dr_topk_indices", "dr_topk_logprobs"]
    code, _, err = cli_here(hub, monkeypatch, capsys, "push", reinforcement_only, "org/imagenet-plus-ronly", "--quiet")
    assert code == 0, err
    card = (reinforcement_only / "README.md").read_text()
    assert "Reinforcement-only" in card
    # the teacher's agreement with the labels the shards do not hold: counted as they were written, as the full folder's
    full, only = summarize(str(plus)), summarize(str(reinforcement_only))
    assert only["agreement_samples"] == full["agreement_samples"] > 0
    assert only["teacher_top1_agreement"] == full["teacher_top1_agreement"]
    assert f"{full['teacher_top1_agreement']:.1%} of {full['agreement_samples']} unmixed samples" in card
    # a copy of the source whose row 5 differs (re-encoded), in the user's hands
    tampered = tmp_path / "tampered"
    (tampered / "data").mkdir(parents=True)
    src = datasets.load_dataset(str(source_dir), split="train").cast_column("image", datasets.Image(decode=False))
    other = jpeg_bytes(np.zeros((40, 40, 3), dtype=np.uint8))
    src.map(lambda x, i: {"image": {"bytes": other if i == 5 else x["image"]["bytes"], "path": None}}, with_indices=True) \
       .cast_column("image", datasets.Image()).to_parquet(str(tampered / "data" / "train-00000-of-00001.parquet"))
    answer = fresh_python(hub, tmp_path / "home-load", f"""
        import json, datasets
        from dr_hf import load_reinforced
        from dr_hf.source import FingerprintMismatch
        full = datasets.load_dataset({str(plus)!r}, split="train")
        joined = load_reinforced("org/imagenet-plus-ronly", source={str(source_dir)!r})
        streamed = list(load_reinforced("org/imagenet-plus-ronly", source={str(source_dir)!r}, streaming=True))
        errors = []
        for streaming in (False, True):
            try:
                ds = load_reinforced("org/imagenet-plus-ronly", source={str(tampered)!r}, streaming=streaming)
                list(ds) if streaming else None
                errors.append(None)
            except FingerprintMismatch as exc:
                errors.append(str(exc))
        print(json.dumps({{"map": joined.to_list() == full.to_list(), "stream": [dict(r) for r in streamed] == [dict(r) for r in full],
                          "columns": joined.column_names, "errors": errors}}))
    """)
    assert answer["map"] and answer["stream"]
    assert answer["columns"][:3] == ["image", "label", "note"]
    for error in answer["errors"]:
        assert error and "row 5 (dr_index 5)" in error and "dr_fingerprint" in error


def test_join_refuses_mismatched_inputs(reinforcement_only, source_dir):
    ronly = datasets.load_dataset(str(reinforcement_only), split="train")
    src = datasets.load_dataset(str(source_dir), split="train")
    joined = join_source(ronly, src)
    assert len(joined) == 24 and joined["dr_index"] == list(range(24))
    with pytest.raises(ValueError, match="index 20 is outside the source's 20 rows"):
        join_source(ronly, src.select(range(20)))
    with pytest.raises(FingerprintMismatch, match=r"row 0 \(dr_index 0\)"):
        join_source(ronly, src.select(list(range(1, 24)) + [0]))
    with pytest.raises(ValueError, match="not a reinforced dataset"):
        join_source(src, src)
    with pytest.raises(ValueError, match="no image column 'image'"):
        join_source(ronly, src.rename_column("image", "img"))


def test_the_trainer_asks_for_a_reinforcement_only_dataset_to_be_joined_first(tmp_path, reinforcement_only):
    import timm

    from dr_hf import ReinforcedTrainer, ReinforcedTrainingArguments

    args = ReinforcedTrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    ronly = datasets.load_dataset(str(reinforcement_only), split="train")
    with pytest.raises(ValueError, match=r"reinforcement-only dataset .*load_reinforced\(path, source=...\)"):
        ReinforcedTrainer(model=timm.create_model("resnet10t", num_classes=10), args=args, train_dataset=ronly)


def test_a_reinforcement_only_folder_verifies_and_previews_from_its_source(tmp_path, plus, reinforcement_only,
                                                                          source_dir, capsys):
    """verify and preview replay its rows joined to the base dataset (--source), refuse without one, naming the flag,
    and name the row whose image in the given source is not the one reinforced. A folder that holds its images is
    not joined: load_reinforced refuses a source for it, which would go unused."""
    from dr_hf import load_reinforced

    with pytest.raises(ValueError, match=r"holds its images \('image'\); `source` is for a reinforcement-only"):
        load_reinforced(str(plus), source=str(source_dir))
    for command in ("verify", "preview"):
        assert main([command, str(plus), "--source", str(source_dir)]) == 2
        assert "holds its images ('image'); --source is for a reinforcement-only" in capsys.readouterr().err
    report = verify(str(reinforcement_only), rows=3, source=str(source_dir))
    assert report.ok and report.replayed_rows == 3 and report.params_mismatches == 0, report.problems
    assert report.max_abs_diff <= 1e-3 and report.agreement == summarize(str(plus))["teacher_top1_agreement"]
    assert main(["verify", str(reinforcement_only), "--rows", "0"]) == 0  # values only: no images needed
    for command in ("verify", "preview"):
        assert main([command, str(reinforcement_only)]) == 2
        err = capsys.readouterr().err
        assert f"dr-hf {command}: error: {reinforcement_only} holds no images" in err and "pass the base dataset as --source" in err
    grids = {name: tmp_path / f"{name}.png" for name in ("joined", "full")}
    assert main(["preview", str(reinforcement_only), "--source", str(source_dir), "--out", str(grids["joined"]),
                 "--rows", "2"]) == 0
    assert main(["preview", str(plus), "--out", str(grids["full"]), "--rows", "2"]) == 0
    joined, full = (np.asarray(PIL.Image.open(grids[name])) for name in ("joined", "full"))
    assert np.array_equal(joined, full)  # the same rows, samples and captions as the folder that holds the images
    shuffled = tmp_path / "shuffled"
    (shuffled / "data").mkdir(parents=True)
    src = datasets.load_dataset(str(source_dir), split="train")
    src.select(list(range(1, 24)) + [0]).to_parquet(str(shuffled / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(FingerprintMismatch, match=r"dr_index"):
        verify(str(reinforcement_only), rows=24, source=str(shuffled))


def test_a_timm_student_pushes_to_the_hub_as_timm_loads_it(tmp_path, hub, plus, monkeypatch):
    """``trainer.push_to_hub()`` with a timm student (Trainer's model card read ``model.config``, which a timm model
    has not: it crashed) pushes timm's config.json beside the weights: ``timm.create_model("hf-hub:...")`` gives the
    trained student's outputs, with the input it was trained at and the data's class names; the card says timm,
    names the reinforced dataset and says the student was trained from scratch. The hub token is in no file pushed or
    written (Trainer pickles its arguments, hub_token included, into training_args.bin and pushes it)."""
    import timm
    import torch
    from huggingface_hub import ModelCard

    from dr_hf import ReinforcedTrainer, ReinforcedTrainingArguments

    hub.point_here(monkeypatch)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    args = ReinforcedTrainingArguments(str(tmp_path / "student"), max_steps=1, per_device_train_batch_size=8,
                                       report_to=[], use_cpu=True, image_size=40, image_mean=(0.5, 0.5, 0.5),
                                       image_std=(0.25, 0.25, 0.25), interpolation="bilinear", save_strategy="no",
                                       hub_model_id="org/student", hub_token=TOKEN, disable_tqdm=True)
    trainer = ReinforcedTrainer(model=timm.create_model("resnet10t", num_classes=10), args=args,
                                train_dataset=datasets.load_dataset(str(plus), split="train"))
    trainer.train()
    trainer.push_to_hub()
    repo = hub.state.repos[("model", "org/student")]
    assert {"config.json", "model.safetensors", "README.md"} <= set(repo.commits[repo.branches["main"]])
    pushed = timm.create_model("hf-hub:org/student", pretrained=True).eval()
    x = torch.randn(2, 3, 40, 40)
    assert torch.equal(pushed(x), trainer.model.eval()(x))
    assert timm.data.resolve_data_config({}, model=pushed) == {
        "input_size": (3, 40, 40), "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3,
        "crop_pct": 0.875, "crop_mode": "center"}
    assert pushed.pretrained_cfg["label_names"] == [f"c{i}" for i in range(10)]
    card = ModelCard.load("org/student")
    assert card.data.library_name == "timm" and {"timm", "dataset-reinforcement"} <= set(card.data.tags)
    assert card.data.datasets == [plus.name] and f"trained from scratch on the {plus.name} dataset" in card.text
    # the token reached the stand-in, and no file: Trainer pickles its arguments into training_args.bin and pushes it
    assert TOKEN in hub.state.tokens_seen and "training_args.bin" in repo.commits[repo.branches["main"]]
    assert all(TOKEN.encode() not in path.read_bytes() for path in (tmp_path / "student").rglob("*") if path.is_file())
