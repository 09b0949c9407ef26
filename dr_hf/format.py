"""The reinforced-dataset format: column names, typed ``Features``, and the configuration that travels with the data.

Columns added to every row (all original columns are kept):

* ``dr_index`` (int64): the row's index in the source split; the join key, and what seeds derive from.
* ``dr_fingerprint`` (string): BLAKE2b-128 of the row's encoded image bytes; joins a reinforcement-only
  dataset (``--no-images``) back to a user's copy of the source, and refuses rows that differ.
* ``dr_params`` (struct): the N samples' augmentation parameters, one fixed-width field per quantity,
  each of shape (N, ...): see :func:`params_features` and the README (The format).
* ``dr_topk_indices`` (N x K uint16, uint32 for >= 65536 classes): the teacher's top-K class ids per sample.
* ``dr_topk_logprobs`` (N x K float16): their log-probabilities, sorted descending, so ``1 - sum(exp)`` is
  the probability mass outside the top K.

The configuration (:class:`ReinforceConfig`: augmentations with all their constants, teachers, N, K, seed,
dr-hf version) is stored in every parquet file's schema metadata (key ``dr_hf``) and in the dataset card's
YAML (``reinforcement:``). Replaying needs only the columns: the ``dr_params`` fields say which transforms ran.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence

from datasets import Features, List as ListFeature, Value

from .pipeline import AugmentPipeline
from .errors import require_at_least

if TYPE_CHECKING:
    from .teacher import TeacherEnsemble

DR_INDEX = "dr_index"
DR_FINGERPRINT = "dr_fingerprint"
DR_PARAMS = "dr_params"
DR_TOPK_INDICES = "dr_topk_indices"
DR_TOPK_LOGPROBS = "dr_topk_logprobs"
DR_COLUMNS = (DR_INDEX, DR_PARAMS, DR_TOPK_INDICES, DR_TOPK_LOGPROBS)
PAPER_TOPK = 10  # teacher classes kept per sample by default (fewer teachers' classes: all of them)
# 2: torchvision RandAugment bins, ml-dr erasing and mixing (mix_sample); 3: parameters drawn per row (augment.Draws:
# one generator per transform and row, not per sample), so a fresh draw of format-2 data differs (verify skips it)
FORMAT_VERSION = 3
METADATA_KEY = b"dr_hf"
AGREEMENT_KEY = b"dr_hf_agreement"
"""Schema metadata of a shard written without its source's label column (``--no-images``): the teacher's top-1
hits on the labels and the unmixed samples counted, as JSON ``{"hits": h, "samples": n}``, so that its card still
reports the agreement."""


def index_dtype(num_classes: int) -> str:
    return "uint16" if num_classes < 65536 else "uint32"


def params_features(pipeline: AugmentPipeline, num_samples: int) -> Dict[str, Any]:
    """The ``dr_params`` struct: each field a fixed-length list of N per-sample values (or fixed-width vectors)."""
    out: Dict[str, Any] = {}
    for name, (shape, dtype) in pipeline.param_fields().items():
        inner: Any = Value(dtype)
        for dim in reversed(shape):
            inner = ListFeature(inner, length=dim)
        out[name] = ListFeature(inner)  # N: see reinforcement_features
    return out


def reinforcement_features(pipeline: AugmentPipeline, num_samples: int, topk: int, num_classes: int) -> Features:
    """The typed ``Features`` of the four reinforcement columns.

    The per-sample width is fixed (``List(..., length=K)``); the outer N dimension is a plain list (every row holds
    exactly N, which ``dr-hf verify`` checks) because pyarrow's ``take`` mishandles sliced fixed-size lists of
    fixed-size lists, and ``IterableDataset.shuffle`` relies on it (tests/test_format.py keeps this honest).
    """
    return Features(
        {
            DR_INDEX: Value("int64"),
            DR_FINGERPRINT: Value("string"),
            DR_PARAMS: params_features(pipeline, num_samples),
            DR_TOPK_INDICES: ListFeature(ListFeature(Value(index_dtype(num_classes)), length=topk)),
            DR_TOPK_LOGPROBS: ListFeature(ListFeature(Value("float16"), length=topk)),
        }
    )


# How the job renders teacher inputs. "per-sample": torch's crop+resize kernel per sample (exact uint8 on the CPU).
# "batched": each image's samples at once by resampling matrices (dr_hf.resample; the GPU path), torch's float weights.
# The two differ by about 0.2 grey levels on average (results/bench_gpu.md), so the choice is part of the identity.
RENDER_MODES = ("per-sample", "batched")


@dataclass
class ReinforceConfig:
    """Everything that defines a reinforcement; together with a row it determines that row's reinforcement."""

    augment: str
    augmentations: List[Dict[str, Any]]
    teachers: List[str]
    num_samples: int
    topk: int
    seed: int
    num_classes: int
    image_column: str = "image"
    label_column: Optional[str] = "label"
    source: Dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # the teachers' precision (fp32, tf32, bf16)
    teacher_batch_size: int = 256  # samples per teacher forward; the CLI gives 64 for CPU teachers (default_teacher_batch_size)
    rows_per_shard: int = 2048
    keep_source: bool = True  # False (``--no-images``): only the dr_* columns are written
    render: str = "per-sample"  # how teacher inputs were rendered (RENDER_MODES); verify renders the same way
    format_version: int = FORMAT_VERSION
    dr_hf_version: str = ""

    def __post_init__(self):
        if not self.dr_hf_version:
            from . import __version__

            self.dr_hf_version = __version__
        if self.num_samples < 1 or self.num_samples > 65535:
            raise ValueError(f"`num_samples` must be in [1, 65535], got {self.num_samples}")
        require_at_least(1, topk=self.topk, teacher_batch_size=self.teacher_batch_size, rows_per_shard=self.rows_per_shard)
        require_at_least(0, seed=self.seed)  # (numpy's seeds are non-negative)
        if self.render not in RENDER_MODES:
            raise ValueError(f"`render` must be one of {RENDER_MODES}, got {self.render!r}")
        if self.num_classes and self.topk > self.num_classes:
            raise ValueError(f"`topk` {self.topk} exceeds the teacher's {self.num_classes} classes")

        if self.source.get("path") and "local" not in self.source:
            self.source = {**self.source, **public_source(self.source["path"], self.source.get("revision"))}

    @classmethod
    def for_teachers(cls, teachers: "TeacherEnsemble", augment: str = "imagenet+rrc", *, num_samples: int = 400,
                     topk: Optional[int] = None, seed: int = 0, crop_scale: Optional[float] = None,
                     group_size: Optional[int] = None, teacher_batch_size: Optional[int] = None,
                     render: Optional[str] = None, **fields) -> "ReinforceConfig":
        """The configuration of a job with ``teachers`` (a :class:`~dr_hf.teacher.TeacherEnsemble`) and the preset
        ``augment`` (``crop_scale``, ``group_size``: as :func:`~dr_hf.pipeline.make_pipeline` takes them), the
        paper's N=400 and top-10 by default (``topk``: every class of teachers with fewer): the preset's transforms with all their constants, the teachers' specs,
        class count and precision are recorded, and ``teacher_batch_size`` and ``render`` default to what the
        teachers' device wants (as ``dr-hf reinforce``: 64 samples and per-sample rendering on a CPU, 256 and batched
        on a GPU). Other fields (``source``, ``image_column``, ``label_column``, ``rows_per_shard``, ...) as given."""
        from .job import default_render, default_teacher_batch_size
        from .pipeline import make_pipeline

        pipeline = make_pipeline(augment, crop_scale=crop_scale, group_size=group_size)
        return cls(augment=augment, augmentations=pipeline.config(), teachers=teachers.specs, num_samples=num_samples,
                   topk=min(PAPER_TOPK, teachers.num_classes) if topk is None else topk, seed=seed,
                   num_classes=teachers.num_classes, precision=teachers.precision,
                   teacher_batch_size=default_teacher_batch_size(teachers) if teacher_batch_size is None
                   else teacher_batch_size, render=default_render(teachers)[1] if render is None else render, **fields)

    def pipeline(self) -> AugmentPipeline:
        return AugmentPipeline.from_config(self.augmentations)

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types only (tuples become lists), so YAML and JSON round trips are exact."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def identity(self) -> Dict[str, Any]:
        """The part that must match for two runs to write the same data (resume, verify)."""
        d = self.to_dict()
        d.pop("dr_hf_version")
        d.get("source", {}).pop("command", None)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ReinforceConfig":
        version = int(data.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise NewerFormatError(
                f"this reinforced dataset uses format version {version}, written by dr-hf {data.get('dr_hf_version', '?')}; "
                f"this dr-hf ({_version()}) reads up to version {FORMAT_VERSION}: upgrade dr-hf"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class NewerFormatError(ValueError):
    """Data written by a newer dr-hf, in a format this one cannot read."""


def public_source(path: str, revision: Optional[str] = None) -> Dict[str, Any]:
    """How a reinforcement names its source in public (config, shards, card): a Hub id as it is; a local folder by
    its name only, marked ``local`` (an absolute path would publish the user's directory layout), with the license
    its card declares."""
    import os

    local = os.path.exists(path)
    if not local:
        return {"path": path, "local": False, "revision": revision}
    from .card import source_license

    return {"path": os.path.basename(os.path.normpath(os.path.abspath(path))), "local": True, "revision": revision,
            "license": source_license(path)}


def _version() -> str:
    from . import __version__

    return __version__


def check_classes(label_column: str, labels: Sequence[str], num_classes: int, names: Optional[Sequence[str]],
                  whose: str, remedy: str, where: str = "column") -> None:
    """Refuse a ``ClassLabel``'s ``labels`` that are not the classes a model predicts (``num_classes`` of them,
    named ``names`` where the model names them): another count, saying ``remedy``, or the same names in another
    order (:func:`check_class_order`). ``whose`` names the model, ``where`` the column's place."""
    if len(labels) != num_classes:
        raise ValueError(f"label space mismatch: {where} {label_column!r} has {len(labels)} classes, against "
                         f"{num_classes} from {whose}: {remedy}")
    check_class_order(label_column, labels, names, whose)


def class_label_names(features, label_column: Optional[str], num_classes: int) -> Optional[List[str]]:
    """The names of the label column's ``ClassLabel`` where it names ``num_classes`` classes, else ``None``."""
    from datasets import ClassLabel

    feature = features.get(label_column) if label_column and features is not None else None
    return list(feature.names) if isinstance(feature, ClassLabel) and feature.num_classes == num_classes else None


def check_class_ids(label_column: str, feature, remedy: str) -> None:
    """Refuse a label column of strings (class names), floats or lists (several labels a row): labels are class ids,
    a ``ClassLabel`` or integers."""
    import datasets

    if isinstance(feature, (datasets.List, datasets.LargeList, list)):
        raise ValueError(f"column {label_column!r} holds lists of labels (several a row), not one class id a row: the "
                         f"teachers' and the student's targets are one class distribution an image, so {remedy}")
    if str(getattr(feature, "dtype", "")).startswith("float"):
        raise ValueError(f"column {label_column!r} holds floats, not class ids: cast whole-number ids first, "
                         f"dataset.cast_column({label_column!r}, datasets.Value('int64')) (or a ClassLabel), or "
                         f"{remedy}")
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        raise ValueError(f"column {label_column!r} holds strings, not class ids: encode them first, "
                         f"dataset.class_encode_column({label_column!r}) (then dataset.align_labels_with_mapping("
                         f"label2id, {label_column!r}) for a model's class order), or {remedy}")


def outside_classes(labels, num_classes: int):
    """Where class ids (an int or a numpy array) fall outside ``[-1, num_classes)`` (-1: a row without a label)."""
    return (labels < -1) | (labels >= num_classes)


def outside_classes_message(row: str, column: str, label, num_classes: Optional[int], whose: str) -> str:
    """What a label outside ``whose``'s classes is told: ``row`` names the row (e.g. "row 3")."""
    outside = "is not a class id" if num_classes is None else f"is outside {whose} {num_classes} classes"
    return f"{row}, column {column!r}: label {label!r} {outside} (use -1 for unlabelled rows)"


def class_ids(dataset, column: str):
    """A map-style ``dataset``'s (or a shard's) ``column`` of class ids as a numpy array, read as Arrow, -1 where a
    row has none."""
    return dataset.select_columns([column]).with_format("arrow")[column].fill_null(-1).to_numpy()


def reordered_class(a: Optional[Sequence[str]], b: Optional[Sequence[str]]) -> Optional[int]:
    """The first class id at which two lists of class names that name the same classes (compared lowercased, as
    ``datasets``' ``align_labels_with_mapping`` compares them) in another order differ; ``None`` when they are in the
    same order, name other classes, or either is missing."""
    if not a or not b or list(a) == list(b) or sorted(map(str.lower, a)) != sorted(map(str.lower, b)):
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x.lower() != y.lower()), None)


def check_class_order(label_column: str, labels: Sequence[str], names: Optional[Sequence[str]], whose: str) -> None:
    """Refuse a ``ClassLabel``'s ``labels`` and a model's class ``names`` (``whose``: "the teachers", "the student")
    that name the same classes in another order (compared lowercased, as ``datasets``' ``align_labels_with_mapping``
    compares them): the class ids would silently not be the labels'."""
    k = reordered_class(labels, names)
    if k is None:
        return
    raise ValueError(f"column {label_column!r} and {whose} name the same {len(names)} classes in another order (class "
                     f"{k} is {labels[k]!r} in the dataset, {names[k]!r} for {whose}): the class ids would not be the "
                     f"labels'; align them first, dataset.align_labels_with_mapping(label2id, {label_column!r}) with "
                     f"the label2id of {whose}")


def missing_columns(column_names) -> List[str]:
    return [c for c in DR_COLUMNS if c not in column_names]


def require_reinforced(column_names, what: str = "the dataset") -> None:
    """Raise a clear error if ``column_names`` lacks any reinforcement column."""
    missing = missing_columns(column_names)
    if missing:
        raise ValueError(
            f"{what} is not a reinforced dataset: column(s) {missing} missing (has {sorted(column_names)}). "
            "Create one with `dr-hf reinforce`."
        )


def without_configuration(what: str, column_names) -> str:
    """The error for ``what`` (a card, a shard) without dr-hf's configuration: not a reinforced dataset, or, where its
    data holds the reinforcement columns, one that ``datasets`` wrote again (``Dataset.push_to_hub``, ``to_parquet``),
    which keeps the columns and drops the configuration."""
    if missing_columns(column_names):
        return f"{what}: not a reinforced dataset"
    return (f"{what}, though its data holds the reinforcement columns: written again by `datasets` "
            "(Dataset.push_to_hub or to_parquet keep the columns, not dr-hf's configuration and card)? ReinforcedTrainer "
            "trains on it as it is; verify and preview need the folder `dr-hf reinforce` wrote, pushed with `dr-hf push`")


def card_columns(card_data: Dict[str, Any]) -> List[str]:
    """The column names a dataset card's ``dataset_info`` declares (of each config, where it lists several)."""
    info = card_data.get("dataset_info") or []
    return [f.get("name") for i in (info if isinstance(info, list) else [info]) for f in i.get("features") or []
            if isinstance(f, dict)]


def config_from_parquet(path_or_file) -> Optional[ReinforceConfig]:
    """The configuration stored in a reinforced parquet file's schema metadata (``None`` if absent)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path_or_file).metadata or {}
    if METADATA_KEY not in meta:
        return None
    return ReinforceConfig.from_dict(json.loads(meta[METADATA_KEY]))
