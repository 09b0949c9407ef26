import io
import os
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

# datasets sleeps 5 s each time an iterator over streamed parquet shards closes (an Arrow thread-shutdown workaround),
# so every epoch of a tiny streamed set costs 5 s: 30 s for one 16-step test. The suite's processes live on after
# their iterators close, so a short pause does. (Imported here: datasets reads the settings above at import.)
import datasets.config  # noqa: E402

datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0.2

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
CLASSES = ["c%d" % i for i in range(10)]


def pytest_sessionstart(session):
    if os.environ.get("CI") and not SHARED.is_dir():
        pytest.exit(f"CI needs the real data in {SHARED}, which is absent", returncode=3)


def needs_shared(name):
    return pytest.mark.skipif(not (SHARED / name).is_dir(), reason=f"{SHARED / name} is absent (real data lives in ../shared)")


# torch.compile on the CPU (inductor) builds C++: the tests that compile for real need a compiler, as users do
needs_cxx = pytest.mark.skipif(not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")),
                               reason="torch.compile on the CPU needs a C++ compiler (none found)")


def jpeg_bytes(array, mode="RGB", fmt="JPEG"):
    buf = io.BytesIO()
    PIL.Image.fromarray(array).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def random_image(rng, height, width):
    """A smooth random image (noise compresses badly and looks nothing like a photo)."""
    small = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return np.asarray(PIL.Image.fromarray(small).resize((width, height), PIL.Image.BILINEAR))


def make_image_dataset(n=24, seed=0, sizes=((48, 64), (64, 48), (40, 40), (33, 71))):
    """A small labelled image dataset of varied sizes, with a ClassLabel of 10 classes."""
    import datasets

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        images.append({"bytes": jpeg_bytes(random_image(rng, h, w)), "path": None})
        labels.append(int(rng.integers(0, 10)))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES),
                                  "note": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "label": labels, "note": [f"row{i}" for i in range(n)]},
                                      features=features)


@pytest.fixture(scope="session")
def tiny_timm_dir(tmp_path_factory):
    """A random 10-class timm resnet10t with a 32x32 pretrained_cfg, saved as timm's Hub folder layout."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10,
                              pretrained_cfg_overlay=dict(input_size=(3, 32, 32), interpolation="bilinear",
                                                          mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    path = tmp_path_factory.mktemp("tiny_timm")
    save_for_hf(model, str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_teacher_spec(tiny_timm_dir):
    return f"timm:local-dir:{tiny_timm_dir}"


@pytest.fixture(scope="session")
def teachers(tiny_teacher_spec):
    """The tiny teacher, loaded once."""
    from dr_hf import TeacherEnsemble

    return TeacherEnsemble.from_specs([tiny_teacher_spec])


def source_folder(path, n, seed, files=1):
    """``make_image_dataset(n, seed)`` saved as a Hub-layout folder that load_dataset reads, in ``files`` parquet files."""
    (path / "data").mkdir(parents=True, exist_ok=True)
    rows = make_image_dataset(n, seed=seed)
    for k in range(files):
        rows.shard(files, k, contiguous=True).to_parquet(str(path / "data" / f"train-{k:05d}-of-{files:05d}.parquet"))
    return path


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A random 10-class transformers ViT (from a config) with its image processor, saved locally."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=10, id2label={i: c for i, c in enumerate(CLASSES)},
                       label2id={c: i for i, c in enumerate(CLASSES)})
    model = ViTForImageClassification(config).eval()
    path = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def image_dataset():
    return make_image_dataset()


@pytest.fixture(scope="session")
def image_dataset_dir(tmp_path_factory, image_dataset):
    """The small dataset saved as a Hub-layout folder that load_dataset reads."""
    path = tmp_path_factory.mktemp("source")
    (path / "data").mkdir()
    image_dataset.to_parquet(str(path / "data" / "train-00000-of-00001.parquet"))
    return path
