"""dr-hf: Dataset Reinforcement (Faghri et al., ICCV 2023) for the Hugging Face ecosystem."""

__version__ = "0.2.0.dev0"

from .inputs import InputSpec  # noqa: E402
from .pipeline import AugmentPipeline, make_pipeline, PRESETS  # noqa: E402
from .format import (  # noqa: E402
    DR_INDEX,
    DR_PARAMS,
    DR_TOPK_INDICES,
    DR_TOPK_LOGPROBS,
    ReinforceConfig,
    reinforcement_features,
)
from .job import reinforce  # noqa: E402
from .reinforcer import Reinforcer  # noqa: E402
from .source import join_source, load_reinforced  # noqa: E402
from .teacher import Teacher, TeacherEnsemble, load_teacher, register_teacher  # noqa: E402

__all__ = [
    "__version__",
    "AugmentPipeline",
    "InputSpec",
    "make_pipeline",
    "PRESETS",
    "DR_INDEX",
    "DR_PARAMS",
    "DR_TOPK_INDICES",
    "DR_TOPK_LOGPROBS",
    "ReinforceConfig",
    "reinforcement_features",
    "Teacher",
    "TeacherEnsemble",
    "load_teacher",
    "register_teacher",
    "reinforce",
    "Reinforcer",
    "join_source",
    "load_reinforced",
    "ReinforcedTrainer",
    "ReinforcedTrainingArguments",
    "ReinforcedCollator",
]


def __getattr__(name):
    # The trainer pulls in transformers' Trainer: import it on first use only.
    if name in ("ReinforcedTrainer", "ReinforcedTrainingArguments", "ReinforcedCollator"):
        from . import collator, trainer

        return getattr(trainer, name, None) or getattr(collator, name)
    raise AttributeError(f"module 'dr_hf' has no attribute {name!r}")
