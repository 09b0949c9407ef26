"""Fault injection (issue 7): the reinforce job killed at random points, a disk that fills up while a shard is
written. Interrupted pushes are in tests/test_hub.py. Every case ends with output identical to an uninterrupted run."""

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from dr_hf import reinforce
from dr_hf.shards import shard_paths

from conftest import make_image_dataset, source_folder
from test_reinforce import make_config
from test_scale import reinforce_args, run_cli, table


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    return source_folder(tmp_path_factory.mktemp("source40"), 40, seed=8)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, source_dir, tiny_teacher_spec):
    out = tmp_path_factory.mktemp("reference")
    proc = run_cli(reinforce_args(source_dir, out, tiny_teacher_spec))
    assert proc.returncode == 0, proc.stderr
    return table(out)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_a_random_moment_then_rerun(tmp_path, source_dir, tiny_teacher_spec, reference, seed):
    """SIGKILL after a random delay (startup, mid-shard, mid-write: wherever it lands), then rerun to completion."""
    rng = random.Random(seed)
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dr_hf", *reinforce_args(source_dir, out, tiny_teacher_spec)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    # wait until a random number of shards (0-3) is complete, then kill at a random moment of the next one
    wait_for = rng.randint(0, 3)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            (out / "data").is_dir() and len(shard_paths(str(out))) >= wait_for):
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job ended before the kill"
    before = len(shard_paths(str(out)))
    assert not (out / "README.md").exists()  # the card is written last
    rerun = run_cli(reinforce_args(source_dir, out, tiny_teacher_spec))
    assert rerun.returncode == 0, rerun.stderr
    assert f"in 5 shard(s) ({5 - before} written, {before} already complete)" in rerun.stdout  # resumed, not redone
    assert not [n for n in os.listdir(out / "data") if n.endswith(".tmp")]
    result = table(out)
    assert result.num_rows == reference.num_rows == 40  # no row lost, none duplicated
    assert result.equals(reference)
    assert sorted(result.column("dr_index").to_pylist()) == list(range(40))
    assert not [n for n in os.listdir(out / "data") if n.endswith(".tmp")]
    print(f"seed {seed}: killed with {before} of 5 shards complete")


def test_full_disk_while_writing_a_shard_leaves_no_visible_half_shard(tmp_path, monkeypatch, teachers):
    ds = make_image_dataset(24, seed=4)
    config = make_config(teachers, n=3, k=2, rows_per_shard=8)
    reinforce(ds, config, teachers, str(tmp_path / "ref"), show_progress=False)

    import pyarrow.parquet as pq_module

    real = pq_module.write_table
    calls = {"n": 0, "threads": set()}

    def full_disk(table, where, **kwargs):
        calls["n"] += 1
        calls["threads"].add(threading.current_thread().name)
        if calls["n"] == 2:  # the second shard: half of it reaches the disk, then ENOSPC
            with open(where, "wb") as f:
                f.write(b"PAR1" + b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device", where)
        return real(table, where, **kwargs)

    monkeypatch.setattr(pq_module, "write_table", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        reinforce(ds, config, teachers, str(tmp_path / "out"), show_progress=False)
    visible = [os.path.basename(p) for p in shard_paths(str(tmp_path / "out"))]
    assert visible == ["train-00000-of-00003.parquet"]  # the half-written second shard is not visible as a shard
    assert not (tmp_path / "out" / "data" / "train-00001-of-00003.parquet.tmp").exists()  # nor kept: space back
    assert not (tmp_path / "out" / "README.md").exists()
    # shards are written by a thread while the next one is computed; its error still stops the job
    assert calls["n"] == 2 and {t.split("_")[0] for t in calls["threads"]} == {"dr-write"}
    monkeypatch.setattr(pq_module, "write_table", real)
    result = reinforce(ds, config, teachers, str(tmp_path / "out"), show_progress=False)  # space again: resume
    assert (result.shards_written, result.shards_skipped) == (2, 1)
    assert pq.read_table(str(tmp_path / "out" / "data")).equals(pq.read_table(str(tmp_path / "ref" / "data")))
