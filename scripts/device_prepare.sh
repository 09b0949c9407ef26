#!/usr/bin/env bash
# What scripts/device_check.sh needs on a lent GPU machine (no internet there), built here: 64 imagenet-sample rows as
# parquet (.gpudata/imagenet64) and the wheels of this checkout's datasets, pyarrow, dill and multiprocess for Python
# 3.12 (.whl; the machine's own are older), and py-spy's (the eager job's GIL profile). Both folders are git-ignored
# and travel with the run as `carry` (66.0 MB together, under the 64 MiB = 67.1 MB that travels).
#
#   bash scripts/device_prepare.sh        # then: run `bash scripts/device_check.sh .gpudata/imagenet64 .whl`
#                                         #       with carry [".gpudata", ".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
rm -rf .gpudata/imagenet64 .whl
mkdir -p .gpudata .whl
"$python" - <<'PY'
import datasets
rows = datasets.load_dataset("../shared/datasets/imagenet-sample", split="train").select(range(64))
rows.to_parquet(".gpudata/imagenet64/train.parquet")
print(f"{len(rows)} rows -> .gpudata/imagenet64")
PY
versions=$("$python" -c "import datasets, pyarrow, dill, multiprocess as m
print(f'datasets=={datasets.__version__} pyarrow=={pyarrow.__version__} dill=={dill.__version__} multiprocess=={m.__version__}')")
# for the machine's Python (3.12 on the lent H100s), whatever this one is
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $versions
"$python" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_5_x86_64 -d .whl "py-spy==0.4.3"
du -sh .gpudata .whl
