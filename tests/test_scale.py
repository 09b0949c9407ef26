"""Reinforcing at scale: several processes, a real crash and resume, streamed sources (issue 3)."""

import os
import socket
import subprocess
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dr_hf.cli import main
from dr_hf.format import DR_COLUMNS, DR_FINGERPRINT
from dr_hf.processes import Processes
from dr_hf import reinforce
from dr_hf.shards import shard_paths

from conftest import make_image_dataset, source_folder
from test_reinforce import make_config

DR = [DR_COLUMNS[0], DR_FINGERPRINT, *DR_COLUMNS[1:]]


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """48 rows in a Hub-layout folder of 4 files of 12 rows: 6 job shards of 8 rows, so that a process's share of a
    stream starts inside a file (sought from the footers, :mod:`dr_hf.streams`)."""
    return source_folder(tmp_path_factory.mktemp("source48"), 48, seed=3, files=4)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reinforce_args(source, out, teacher, *extra, quiet=True):
    return ["reinforce", str(source), "--output", str(out), "--teacher", teacher, "--augment", "imagenet+rare+mix",
            "--num-samples", "6", "--topk", "3", "--seed", "7", "--rows-per-shard", "8", *extra] + (["--quiet"] if quiet else [])


def run_cli(args, launcher=(), env=None, **kw):
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *launcher, "-m", "dr_hf", *args], capture_output=True, text=True, env=env, **kw)


def table(out, columns=None):
    return pq.read_table(os.path.join(out, "data"), columns=columns)


UNSHARED = """
import os, sys, datasets
from dr_hf import ReinforceConfig, TeacherEnsemble, joblock, reinforce
from dr_hf.processes import finish
joblock.SHARE_PATIENCE_S = 1.0
source, out, teacher = sys.argv[1:4]
teachers = TeacherEnsemble.from_specs([teacher], device="cpu")
config = ReinforceConfig.for_teachers(teachers, "rrc+flip", num_samples=2, topk=3)
try:  # each process its own folder, as on two machines writing to their own disks
    reinforce(datasets.load_dataset(source, split="train"), config, teachers,
              os.path.join(out, "machine" + os.environ["RANK"]), show_progress=False)
except joblock.FolderNotShared as exc:
    print("refused:", exc, flush=True)
    finish()
    sys.exit(3)
"""


def test_processes_that_do_not_share_the_output_folder_are_refused_at_the_start(tmp_path, source_dir,
                                                                              tiny_teacher_spec):
    script = tmp_path / "unshared.py"
    script.write_text(UNSHARED)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           str(source_dir), str(tmp_path), tiny_teacher_spec], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0
    for rank, other in ((0, 1), (1, 0)):
        assert f"machine{rank} is not shared by the job's processes: process {rank}/2 does not see what " \
               f"process(es) [{other}] wrote there" in proc.stdout, proc.stdout + proc.stderr[-3000:]
        assert not shard_paths(str(tmp_path / f"machine{rank}"))  # refused before any work


def test_two_accelerate_processes_write_what_one_process_writes(tmp_path, source_dir, tiny_teacher_spec):
    assert main(reinforce_args(source_dir, tmp_path / "one", tiny_teacher_spec, "--shuffle")) == 0
    # accelerate's `--cpu` flag starts one process; `--multi_gpu` is its torchrun launcher, which on a machine
    # without GPUs starts CPU processes (dr-hf then asks accelerate for MULTI_CPU with the gloo backend).
    launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    two = run_cli(reinforce_args(source_dir, tmp_path / "two", tiny_teacher_spec, "--shuffle", "--device", "cpu",
                                 quiet=False), launcher=launcher,
                  env={"CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    # both processes took part, each its own contiguous shards, and each logged its throughput
    assert "process 0/2: shard" in two.stderr and "process 1/2: shard" in two.stderr, two.stderr[-3000:]
    assert "shard 1/6" in two.stderr and "shard 6/6" in two.stderr and "images/s" in two.stderr
    first = [line for line in two.stderr.splitlines() if "shard 1/6" in line]
    last = [line for line in two.stderr.splitlines() if "shard 6/6" in line]
    assert "process 0/2: shard" in first[0] and "process 1/2: shard" in last[0]
    assert "; 16 images left here, about " in first[0] and "left here" not in last[0]  # each process's own estimate
    assert "all 2 processes: 48 images" in two.stderr
    assert not [line for line in two.stderr.splitlines() if line.count("process ") > 1]  # each line names it once
    assert "in 6 shard(s) (3 written by this process of 2, 0 already complete)" in two.stdout  # the main one's own
    assert [os.path.basename(p) for p in shard_paths(str(tmp_path / "one"))] == \
           [os.path.basename(p) for p in shard_paths(str(tmp_path / "two"))]
    a, b = table(tmp_path / "one"), table(tmp_path / "two")
    assert a.num_rows == b.num_rows == 48
    assert a.equals(b)  # every column, every value, in the order of --shuffle (each process shuffles alike)
    assert a.column("dr_index").to_pylist() == list(range(48))
    import datasets

    shuffled = datasets.load_dataset(str(source_dir), split="train").shuffle(seed=7)
    assert b.column("note").to_pylist() == shuffled["note"] != [f"row{i}" for i in range(48)]
    assert not list((tmp_path / "two").glob(".dr-hf.lock.process-*"))  # the processes' marks (they share it) are gone
    for folder in ("one", "two"):
        assert (tmp_path / folder / "README.md").is_file()


def test_streamed_source_equals_map_style_also_split_across_processes(tmp_path, source_dir, teachers):
    config = make_config(teachers, augment="imagenet+mix", n=3, k=2, rows_per_shard=8)
    mapped = datasets.load_dataset(str(source_dir), split="train")
    reinforce(mapped, config, teachers, str(tmp_path / "map"), show_progress=False)
    stream = datasets.load_dataset(str(source_dir), split="train", streaming=True)
    reinforce(stream, config, teachers, str(tmp_path / "stream"), show_progress=False)
    assert table(tmp_path / "map").equals(table(tmp_path / "stream"))
    # three "processes" in turn, each its own contiguous share of a stream; the main one goes last and writes the card
    for rank in (2, 1, 0):
        result = reinforce(datasets.load_dataset(str(source_dir), split="train", streaming=True), config, teachers,
                           str(tmp_path / "ranks"), show_progress=False, processes=Processes(rank=rank, world=3))
        assert result.shards_written == 2
    assert table(tmp_path / "map").equals(table(tmp_path / "ranks"))
    # a stream whose length is given wrongly is refused, not truncated or padded
    with pytest.raises(ValueError, match="the stream ended after 48 rows, but 50 were expected"):
        reinforce(datasets.load_dataset(str(source_dir), split="train", streaming=True), config, teachers,
                  str(tmp_path / "short"), show_progress=False, num_rows=50)
    with pytest.raises(ValueError, match="more than the 40 rows expected"):
        reinforce(datasets.load_dataset(str(source_dir), split="train", streaming=True), config, teachers,
                  str(tmp_path / "long"), show_progress=False, num_rows=40)


def test_a_stream_is_sought_where_its_parquet_footers_say_else_skipped(tmp_path, source_dir):
    from datasets.distributed import split_dataset_by_node

    from dr_hf.streams import seek, source_row_counts, stream_length

    def load():
        return datasets.load_dataset(str(source_dir), split="train", streaming=True)

    def notes(rows):
        return [r["note"] for r in rows]

    stream = load()
    assert source_row_counts(stream) == [12, 12, 12, 12]
    everything = notes(stream)
    for start in (0, 11, 12, 13, 47, 48, 60):
        assert notes(seek(stream, start)) == everything[start:] == notes(stream.skip(start)), start
    # streams whose positions the footers do not give are skipped as datasets skips them
    others = {"taken": load().take(40), "filtered": load().filter(lambda r: r["label"] != 1),
              "shuffled": load().shuffle(seed=0), "node": split_dataset_by_node(load(), 1, 2),
              "generated": datasets.IterableDataset.from_generator(lambda: ({"note": f"g{i}"} for i in range(20)))}
    for name, other in others.items():
        assert source_row_counts(other) is None, name
        assert notes(seek(other, 13)) == notes(other.skip(13)) != [], name
    assert stream_length(others["generated"], "train", "note") == 20  # counted, having no metadata nor footers
    # a stream split by row group (IterableDataset.reshard): sought to the row group that holds the row
    (tmp_path / "groups" / "data").mkdir(parents=True)
    for k in range(2):
        pq.write_table(pa.table({"i": list(range(50 * k, 50 * k + 50))}),
                       str(tmp_path / "groups" / "data" / f"train-{k:05d}-of-00002.parquet"), row_group_size=7)
    groups = datasets.load_dataset(str(tmp_path / "groups"), split="train", streaming=True).reshard()
    assert groups.num_shards == 16 and source_row_counts(groups) == ([7] * 7 + [1]) * 2
    for start in (6, 7, 50, 55, 99):
        assert [r["i"] for r in seek(groups, start)] == list(range(start, 100)), start


def test_a_streams_next_shard_is_read_while_the_current_one_is_computed():
    """``read_ahead`` (the job's reading of a streamed source): item k+1 is read while item k is in use, in order,
    and no further (two shards of rows held); an error while reading is raised at the item it was reading, after the
    items before it; a consumer that stops early stops the reading."""
    import threading

    from dr_hf.ahead import read_ahead

    second_read, log = threading.Event(), []

    def shards(fail_at=None):
        for k in range(4):
            if k == fail_at:
                raise OSError(f"connection dropped in shard {k}")
            log.append(k)
            if k == 1:
                second_read.set()
            yield k

    got = []
    for k in read_ahead(shards()):
        if k == 0:  # shard 1 is read while shard 0 is in use, and shard 2 is not
            assert second_read.wait(timeout=60), "the next shard was not read ahead"
            threading.Event().wait(0.3)
            assert log == [0, 1]
        got.append(k)
    assert got == [0, 1, 2, 3] == log
    got = []
    with pytest.raises(OSError, match="connection dropped in shard 2"):
        for k in read_ahead(shards(fail_at=2)):
            got.append(k)
    assert got == [0, 1]
    log.clear()
    reader = read_ahead(shards())
    assert next(reader) == 0
    reader.close()
    for _ in range(600):  # the reading thread ends, having read at most the one item beyond the one taken
        if not [t for t in threading.enumerate() if t.name == "dr-read"]:
            break
        threading.Event().wait(0.1)
    assert not [t for t in threading.enumerate() if t.name == "dr-read"] and log in ([0], [0, 1])


def test_streaming_cli_with_limit(tmp_path, source_dir, tiny_teacher_spec):
    assert main(reinforce_args(source_dir, tmp_path / "a", tiny_teacher_spec, "--limit", "20")) == 0
    assert main(reinforce_args(source_dir, tmp_path / "b", tiny_teacher_spec, "--limit", "20", "--streaming")) == 0
    assert table(tmp_path / "a", DR).equals(table(tmp_path / "b", DR))
    assert table(tmp_path / "a").num_rows == 20


def test_render_threads_change_nothing(tmp_path, teachers):
    ds = make_image_dataset(16, seed=5)
    config = make_config(teachers, augment="imagenet+rare+mix", n=5, k=3, teacher_batch_size=8)
    for threads in (0, 1, 3):
        reinforce(ds, config, teachers, str(tmp_path / str(threads)), show_progress=False, render_threads=threads)
    t0 = table(tmp_path / "0")
    assert t0.equals(table(tmp_path / "1")) and t0.equals(table(tmp_path / "3"))
