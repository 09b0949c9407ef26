"""Reliability, round two (issue 15): one job per output folder, a card that is a view of its shards, and faults in
streamed sources, stored shards and pushes, each injected."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dr_hf.cli import main
from dr_hf.format import METADATA_KEY
from dr_hf.joblock import FolderNotShared, check_shared
from dr_hf.processes import Processes
from dr_hf.shards import BadShardError, check_folder, shard_paths
from dr_hf.verify import verify

from conftest import REPO, source_folder
from hub_standin import HubStandIn


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    return source_folder(tmp_path_factory.mktemp("src"), 48, seed=21)


def job(source, out, teacher, *extra, seed=0):
    return ["reinforce", str(source), "--output", str(out), "--teacher", teacher, "--num-samples", "2", "--topk", "3",
            "--rows-per-shard", "8", "--seed", str(seed), "--quiet", *map(str, extra)]


def run_cli(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "dr_hf", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})


def shard_seeds(folder):
    return {json.loads(pq.read_schema(p).metadata[METADATA_KEY])["seed"] for p in shard_paths(str(folder))}


def hold_lock(folder, seconds):
    """Another process (a stand-in for another job) holding the folder's lock."""
    code = textwrap.dedent(f"""
        import sys, time
        from dr_hf.joblock import output_lock
        from dr_hf.processes import Processes
        with output_lock({str(folder)!r}, Processes()):
            print("locked", flush=True)
            time.sleep({seconds})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# -- one job per folder -------------------------------------------------------------------------------

def test_two_jobs_started_together_on_one_folder_never_mix(tmp_path, source_dir, tiny_teacher_spec):
    out = tmp_path / "plus"
    a, b = (run_cli(job(source_dir, out, tiny_teacher_spec, seed=s)) for s in (0, 1))
    results = [(p.wait(timeout=600), p.stderr.read()) for p in (a, b)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert str(out) in refused and ("in use by another dr-hf job" in refused or "different job" in refused), refused
    seeds = shard_seeds(out)
    assert len(seeds) == 1  # one job's shards only
    report = verify(str(out), rows=4)
    assert report.ok, report.problems
    from huggingface_hub import DatasetCard

    assert DatasetCard.load(str(out / "README.md")).data.to_dict()["reinforcement"]["seed"] in seeds


def test_a_held_folder_is_refused_at_once_waited_for_and_released_by_kill_9(tmp_path, source_dir, tiny_teacher_spec,
                                                                            capsys):
    out = tmp_path / "plus"
    holder = hold_lock(out, 60)
    try:
        start = time.time()
        assert main(job(source_dir, out, tiny_teacher_spec)) == 2
        err = capsys.readouterr().err
        assert f"--output {out} is in use by another dr-hf job (pid {holder.pid}" in err and time.time() - start < 10
        assert not shard_paths(str(out))  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed job's lock goes with its process
        holder.wait()
    assert main(job(source_dir, out, tiny_teacher_spec)) == 0
    holder = hold_lock(out, 60)  # a job writing the finished folder (a rerun, say): it is not pushed meanwhile
    try:
        assert main(["push", str(out), "org/held", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"`folder` {out} is in use by another dr-hf job (pid {holder.pid}" in err and "push it once that ends" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    short = hold_lock(tmp_path / "other", 3)
    start = time.time()
    assert main(job(source_dir, tmp_path / "other", tiny_teacher_spec, "--wait")) == 0
    assert time.time() - start > 1.5 and short.wait(timeout=30) == 0
    assert shard_seeds(tmp_path / "other") == {0} and verify(str(tmp_path / "other"), rows=0).ok


class OneOfTwo(Processes):
    """Process 0 of a two-process job, the other process simulated: its barrier returns at once, and the number
    the main process draws is 7."""

    together = True  # (as under accelerate launch or torchrun)

    def __init__(self):
        super().__init__(rank=0, world=2)

    def wait(self):
        pass

    def shared_token(self):
        return 7


def test_a_job_whose_processes_do_not_share_the_folder_is_refused_at_its_start(tmp_path):
    """Processes on two machines, each writing to its own disk: the main process would wait for the other's shards
    forever at the end; the job is refused at its start, naming the process it cannot see."""
    elsewhere = tmp_path / "other-machine"  # where process 1 wrote its mark
    elsewhere.mkdir()
    (elsewhere / ".dr-hf.lock.process-1").write_text("7")
    with pytest.raises(FolderNotShared, match=r"is not shared by the job's processes: process 0/2 does not see what "
                                              r"process\(es\) \[1\] wrote there"):
        check_shared(str(tmp_path), OneOfTwo(), patience=0.2)
    (tmp_path / ".dr-hf.lock.process-1").write_text("6")  # a mark an earlier job left: not this job's
    with pytest.raises(FolderNotShared):
        check_shared(str(tmp_path), OneOfTwo(), patience=0.2)
    (tmp_path / ".dr-hf.lock.process-1").write_text("7")  # shared: both marks seen, and this process's removed
    check_shared(str(tmp_path), OneOfTwo(), patience=0.2)
    assert not (tmp_path / ".dr-hf.lock.process-0").exists()


# -- the card is a view of the shards -------------------------------------------------------------------

@pytest.fixture()
def finished(tmp_path, source_dir, tiny_teacher_spec):
    out = tmp_path / "plus"
    assert main(job(source_dir, out, tiny_teacher_spec)) == 0
    return out


def _set_seed(path, seed):
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, METADATA_KEY: json.dumps({**meta, "seed": seed})}), path)


def test_verify_and_push_refuse_a_folder_whose_card_or_shards_disagree(finished):
    from dr_hf.card import write_card
    from dr_hf.format import config_from_parquet
    from dr_hf.hub import push

    shard = shard_paths(str(finished))[3]
    name = os.path.basename(shard)
    _set_seed(shard, 1)  # one shard of another job slipped in
    report = verify(str(finished), rows=4)
    assert not report.ok and any(name in p and "configuration differs (seed)" in p for p in report.problems)
    with pytest.raises(ValueError, match=f"refusing to push .*{name}"):
        push(str(finished), "org/mixed")
    config = config_from_parquet(shard_paths(str(finished))[0])
    with pytest.raises(ValueError, match=f"not writing the card .*{name}"):
        write_card(str(finished), config, {"rows": 48, "total_bytes": 1}, features=None)
    # every shard from seed 1, the card still says seed 0: the card no longer describes them
    for path in shard_paths(str(finished)):
        _set_seed(path, 1)
    problems = check_folder(str(finished))
    assert problems and all("differs from the card's (seed)" in p for p in problems)
    assert not verify(str(finished), rows=0).ok


def test_a_shard_missing_or_with_foreign_rows_is_named(finished):
    paths = shard_paths(str(finished))
    table = pq.read_table(paths[1])
    pq.write_table(table.slice(0, 5), paths[1])  # three rows gone, not listed as skipped
    problems = check_folder(str(finished))
    assert any(os.path.basename(paths[1]) in p and "neither stored nor listed as skipped" in p for p in problems)
    os.remove(paths[2])
    assert any("missing, first" in p and os.path.basename(paths[2]) in p for p in check_folder(str(finished)))
    table = pq.read_table(paths[3])  # a row of shard 0's range in shard 3, and shard 4's first row stored twice
    index = table.column("dr_index").to_pylist()
    pq.write_table(table.set_column(table.schema.get_field_index("dr_index"), "dr_index",
                                    pa.array([0] + index[1:], type=table.schema.field("dr_index").type)), paths[3])
    table = pq.read_table(paths[4])
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), paths[4])
    problems = check_folder(str(finished))
    assert any(f"{os.path.basename(paths[3])}: rows [0] lie outside its range [{index[0]}," in p for p in problems)
    assert f"{os.path.basename(paths[4])}: duplicated rows" in problems, problems
    pq.write_table(pq.read_table(paths[0]).replace_schema_metadata(None), paths[0])  # no configuration
    assert any(p.startswith(f"{os.path.basename(paths[0])}: carries no dr-hf configuration, though its data holds the "
                            "reinforcement columns") for p in check_folder(str(finished)))


def test_a_set_datasets_wrote_again_is_said_to_be_and_trains(finished, tmp_path):
    """The folder as `datasets` writes it again (Dataset.push_to_hub, to_parquet): the columns kept, dr-hf's
    configuration and card block gone. verify and the configuration's readers say so and what to do; the trainer,
    which needs only the columns, trains on it."""
    import timm
    from huggingface_hub import DatasetCard, DatasetCardData

    from dr_hf import ReinforcedTrainer, ReinforcedTrainingArguments
    from dr_hf.source import reinforcement_config

    again = tmp_path / "again"
    datasets.load_dataset(str(finished), split="train").to_parquet(str(again / "data" / "train-00000-of-00001.parquet"))
    said = "though its data holds the reinforcement columns: written again by `datasets`"
    with pytest.raises(ValueError, match=f"train-00000-of-00001.parquet carries no dr-hf configuration, {said}"):
        reinforcement_config(str(again))
    card = DatasetCard.load(str(finished / "README.md")).data.to_dict()
    del card["reinforcement"]
    DatasetCard(f"---\n{DatasetCardData(**card).to_yaml()}\n---\n").save(str(again / "README.md"))
    with pytest.raises(ValueError, match=f"README.md has no `reinforcement:` block, {said}"):
        verify(str(again), rows=2)
    args = ReinforcedTrainingArguments(str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8, report_to=[],
                                       use_cpu=True, save_strategy="no", image_size=32, dataloader_num_workers=0)
    trainer = ReinforcedTrainer(model=timm.create_model("resnet10t", num_classes=10), args=args,
                                train_dataset=datasets.load_dataset(str(again), split="train"))
    assert trainer.train().global_step == 2
    plain = tmp_path / "plain"  # a set without the columns is still just not a reinforced dataset
    datasets.load_dataset(str(finished), split="train").select_columns(["image", "label"]).to_parquet(
        str(plain / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match="carries no dr-hf configuration: not a reinforced dataset$"):
        reinforcement_config(str(plain))


# -- damaged shards -------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_a_damaged_shard_is_named_by_verify_load_reinforced_and_the_trainer(finished, damage, tmp_path):
    from dr_hf import ReinforcedTrainer, ReinforcedTrainingArguments, load_reinforced

    path = shard_paths(str(finished))[2]
    name = os.path.basename(path)
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        for k in range(len(data) // 4, len(data) // 2, 101):
            data[k] ^= 0x04
    open(path, "wb").write(bytes(data))
    report = verify(str(finished), rows=2)
    assert not report.ok and any(name in p for p in report.problems), report.problems
    with pytest.raises(ValueError, match=name):
        load_reinforced(str(finished))
    # a stream the trainer reads: the damaged file is named, not a bare pyarrow error
    import timm

    stream = datasets.load_dataset(str(finished), split="train", streaming=True)
    args = ReinforcedTrainingArguments(str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=8, report_to=[],
                                       use_cpu=True, save_strategy="no", image_size=32, dataloader_num_workers=0)
    with pytest.raises(BadShardError, match=name):
        trainer = ReinforcedTrainer(model=timm.create_model("resnet10t", num_classes=10), args=args, train_dataset=stream)
        trainer.train()


# -- faults in a streamed source --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hub():
    server = HubStandIn()
    yield server
    server.stop()


FAST_FAILING_STREAMS = textwrap.dedent("""
    # The outage outlasts the libraries' own retries (huggingface_hub: 5 with back-off, datasets: 20 x 5 s), which
    # would take minutes to give up: make them give up at once, so dr-hf's own layer is what is tested.
    import sys
    import datasets.config
    import huggingface_hub.hf_file_system as fs
    from huggingface_hub.utils import http_backoff
    datasets.config.STREAMING_READ_MAX_RETRIES = datasets.config.STREAMING_OPEN_MAX_RETRIES = 1
    datasets.config.STREAMING_READ_RETRY_INTERVAL = datasets.config.STREAMING_OPEN_RETRY_INTERVAL = 0
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0.2  # as in conftest.py
    fs.http_backoff = lambda *a, **kw: http_backoff(*a, **{**kw, "max_retries": 0})
    from dr_hf.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_stream_that_drops_its_connection_is_reopened_and_a_stopped_job_resumes(tmp_path, hub, tiny_teacher_spec,
                                                                                   monkeypatch):
    from huggingface_hub import HfApi

    from conftest import make_image_dataset

    source = tmp_path / "src"
    (source / "data").mkdir(parents=True)
    rows = make_image_dataset(48, seed=21)
    for k in range(3):  # three files: the stream reads them one after the other
        rows.shard(3, k, contiguous=True).to_parquet(str(source / "data" / f"train-{k:05d}-of-00003.parquet"))
    env = {**os.environ, **hub.env(str(tmp_path / "home")), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    hub.point_here(monkeypatch)
    HfApi().create_repo("org/src", repo_type="dataset")
    HfApi().upload_folder(repo_id="org/src", repo_type="dataset", folder_path=str(source))
    reference = tmp_path / "reference"
    assert main(job(source, reference, tiny_teacher_spec)) == 0

    def stream_job(out):
        args = job("org/src", out, tiny_teacher_spec, "--streaming", "--num-rows", 48)
        proc = subprocess.run([sys.executable, "-c", FAST_FAILING_STREAMS, *args], env=env, capture_output=True, text=True,
                              timeout=600)
        return proc.returncode, proc.stderr

    # the connection drops while the second file (rows 16..31) is read: the stream is reopened at the row it
    # reached, and the output is the local run's
    hub.state.fail_reads_of = "train-00001-of-00003.parquet"
    hub.state.fail_reads_after, hub.state.fail_reads_count = hub.state.ranged_reads, 1
    code, err = stream_job(tmp_path / "retried")
    assert code == 0, err[-3000:]
    assert "reading the stream failed at row 16" in err and "reopening it there (retry 1/3)" in err, err[-3000:]
    # an outage that lasts: a clear error naming the row, the shards before it kept, and the rerun resumes
    hub.state.fail_reads_after, hub.state.fail_reads_count = hub.state.ranged_reads, None
    code, err = stream_job(tmp_path / "stopped")
    assert code == 2 and "reading the streamed source failed at row 16 after 3 retries" in err, err[-3000:]
    assert "rerun the same command" in err and len(shard_paths(str(tmp_path / "stopped"))) == 2
    hub.state.fail_reads_after = hub.state.fail_reads_of = None
    code, err = stream_job(tmp_path / "stopped")
    assert code == 0, err[-3000:]
    for out in ("retried", "stopped"):
        ours = shard_paths(str(tmp_path / out))
        assert len(ours) == 6
        for a, b in zip(shard_paths(str(reference)), ours):
            assert pq.read_table(a).equals(pq.read_table(b)), (out, a)


SEEK_A_STREAM = textwrap.dedent("""
    # in a fresh process (datasets reads the endpoint at import): position 40 of the stand-in's 3-file stream
    import hashlib, json, sys
    import datasets
    from dr_hf.streams import seek, source_row_counts, stream_length
    stream = datasets.load_dataset("org/blobs", split="train", streaming=True)
    rows = seek(stream, 40) if sys.argv[1] == "seek" else stream.skip(40)
    print(json.dumps({"rows": [(r["i"], hashlib.sha1(r["blob"]).hexdigest()) for r in rows],
                      "counts": source_row_counts(stream), "length": stream_length(stream, "train", "i")}))
""")


def test_a_stream_is_sought_from_its_footers_not_read_from_its_start(tmp_path, hub, monkeypatch):
    """A process whose rows start in a stream's third file reads only the footers of the two before it (where
    ``IterableDataset.skip`` downloads them whole), and gets the same rows; the length comes from the footers too."""
    from huggingface_hub import HfApi

    source = tmp_path / "src"
    (source / "data").mkdir(parents=True)
    rows = datasets.Dataset.from_dict({"i": list(range(48)), "blob": [os.urandom(100_000) for _ in range(48)]})
    for k in range(3):  # 1.6 MB files, so that a footer read (64 KiB at the end) is not the whole file
        rows.shard(3, k, contiguous=True).to_parquet(str(source / "data" / f"train-{k:05d}-of-00003.parquet"))
    sizes = {f"data/{p.name}": p.stat().st_size for p in (source / "data").iterdir()}
    hub.point_here(monkeypatch)
    HfApi().create_repo("org/blobs", repo_type="dataset")
    HfApi().upload_folder(repo_id="org/blobs", repo_type="dataset", folder_path=str(source))
    env = {**os.environ, **hub.env(str(tmp_path / "home")), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}

    def run(how):
        hub.state.reads.clear()
        proc = subprocess.run([sys.executable, "-c", SEEK_A_STREAM, how], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        data_reads = {}  # file -> the lowest byte offset read from it
        for path, rng in hub.state.reads:
            start = rng.split("=")[1].split("-")[0]
            start = int(start) if start else sizes[path]  # ("bytes=-N": the file's last N bytes)
            data_reads[path] = min(data_reads.get(path, start), start)
        return json.loads(proc.stdout.strip().splitlines()[-1]), data_reads

    sought, reads = run("seek")
    skipped, skip_reads = run("skip")
    assert [i for i, _ in sought["rows"]] == list(range(40, 48)) and sought["rows"] == skipped["rows"]
    assert sought["counts"] == [16, 16, 16] and sought["length"] == 48
    for k in (0, 1):  # the files before row 40: their footers only when sought; from their first bytes when skipped
        name = f"data/train-{k:05d}-of-00003.parquet"
        assert reads[name] >= sizes[name] - 65536, (name, reads[name], sizes[name])
        assert skip_reads[name] < sizes[name] - 65536
    assert reads["data/train-00002-of-00003.parquet"] < sizes["data/train-00002-of-00003.parquet"] - 65536


# -- a push interrupted at each of its commits ------------------------------------------------------------

def test_a_push_interrupted_at_each_commit_completes_and_never_advertises_early(hub, finished, monkeypatch, capsys):
    """One shard a commit, then the card with its preview, in a pull request, then its merge: a push failing at any
    of these steps leaves main as it was (empty here), and its rerun resumes the pull request and merges it."""
    shards = len(shard_paths(str(finished)))
    hub.point_here(monkeypatch)
    for k in range(shards + 2):
        repo_id = f"org/plus-{k}"
        hub.state.fail_commits = {hub.state.commit_attempts + k}
        capsys.readouterr()
        assert main(["push", str(finished), repo_id, "--files-per-commit", "1", "--quiet"]) == 2
        assert "500 Internal Server Error" in capsys.readouterr().err
        repo = hub.state.repos[("dataset", repo_id)]
        assert repo.commits[repo.branches["main"]] == {}  # nothing shown before all of it is there
        pulled = set(repo.commits[repo.branches["refs/pr/1"]]) if k else set()  # (the first commit opens it)
        assert len([f for f in pulled if f.startswith("data/")]) == min(k, shards)
        assert ("README.md" in pulled) == (k == shards + 1)  # the card comes last
        assert main(["push", str(finished), repo_id, "--files-per-commit", "1", "--quiet"]) == 0
        files = set(repo.commits[repo.branches["main"]])
        assert {"README.md", "preview.png"} <= files and len([f for f in files if f.startswith("data/")]) == shards
        assert list(repo.pulls) == [1] and repo.pulls[1]["status"] == "merged"
    hub.state.fail_commits = set()


def test_soak_script_runs(tmp_path):
    """scripts/soak.py at a small size: bad rows, kills, resumes; it asserts its own invariants."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "soak.py"), "--rows", "200", "--kills", "1",
                           "--work", str(tmp_path), "--out", str(tmp_path / "soak.md")], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = (tmp_path / "soak.md").read_text()
    assert "identical to the uninterrupted run: yes" in text and "each exactly once: yes" in text


def test_the_card_publishes_no_local_paths(finished, source_dir):
    card = (finished / "README.md").read_text()
    meta = pq.read_schema(shard_paths(str(finished))[0]).metadata[METADATA_KEY].decode()
    for text in (card, meta):
        assert str(source_dir) not in text and str(finished) not in text
    assert f"`{source_dir.name}` (a local folder)" in card and '"local": true' in meta
    assert "github.com" not in card and "dr-hf` package" in card
