"""Security (issue 7, SECURITY.md): nothing in the data path unpickles or runs code from a dataset, weights or a repo;
remote code stays off; tokens are never printed or written; the card escapes user-provided text."""

import ast
import json
import pathlib
import pickle
import re

import datasets
import pyarrow.parquet as pq
import pytest

from dr_hf import TeacherEnsemble, load_teacher
from dr_hf.format import METADATA_KEY, ReinforceConfig, config_from_parquet
from dr_hf import reinforce
from dr_hf.shards import shard_paths

from conftest import make_image_dataset
from test_reinforce import make_config

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dr_hf"


class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def test_the_package_never_unpickles_or_trusts_remote_code():
    """A static guard over dr_hf/: no pickle/marshal/eval/exec, every torch.load passes weights_only=True,
    trust_remote_code is never True."""
    problems = []
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if {"pickle", "dill", "marshal", "cloudpickle", "joblib"} & set(n.split(".")[0] for n in names if n):
                    problems.append(f"{path.name}:{node.lineno} imports {names}")
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                if func in ("eval", "exec"):
                    problems.append(f"{path.name}:{node.lineno} calls {func}")
                if func.endswith("torch.load"):
                    kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    if kw.get("weights_only") != "True":
                        problems.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
                for k in node.keywords:
                    if k.arg == "trust_remote_code" and ast.unparse(k.value) != "False":
                        problems.append(f"{path.name}:{node.lineno} trust_remote_code={ast.unparse(k.value)}")
    assert not problems, problems


def test_pickled_weights_are_refused_and_run_nothing(tmp_path):
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"fc.weight": Payload(str(sentinel))}, f)
    with pytest.raises(Exception, match="(?i)weights only|weights_only|unpickl"):
        load_teacher(f"timm:resnet10t@{evil}")
    assert not sentinel.exists()


def test_a_training_checkpoint_loads_only_as_plain_data(tmp_path):
    """timm's train.py checkpoints (state_dict beside its arguments as an argparse.Namespace) load with
    weights_only=True; one holding another Python object is refused, naming it, and how to save the weights alone."""
    import argparse
    import datetime

    import timm
    import torch

    torch.manual_seed(0)
    weights = timm.create_model("resnet10t", num_classes=10).state_dict()
    checkpoint = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "arch": "resnet10t", "state_dict": weights, "args": argparse.Namespace(lr=0.1)}, checkpoint)
    teacher = load_teacher(f"timm:resnet10t@{checkpoint}")
    assert teacher.num_classes == 10
    assert all(torch.equal(v, weights[k]) for k, v in teacher.model.state_dict().items())
    dated = tmp_path / "dated.pth"
    torch.save({"state_dict": weights, "saved": datetime.datetime(2026, 1, 1)}, dated)
    with pytest.raises(ValueError, match=r"teacher weights '.*dated.pth': it holds a datetime.datetime object, which "
                                         r"dr-hf does not unpickle \(torch.load with weights_only=True\): save the "
                                         r"state_dict alone"):
        load_teacher(f"timm:resnet10t@{dated}")


def test_remote_code_in_a_teacher_folder_is_not_run(tmp_path):
    sentinel = tmp_path / "pwned"
    repo = tmp_path / "custom"
    repo.mkdir()
    (repo / "config.json").write_text(json.dumps({
        "model_type": "dr-hf-evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForImageClassification": "modeling_evil.EvilModel"}}))
    code = f"open({str(sentinel)!r}, 'w').write('ran')\n"
    (repo / "configuration_evil.py").write_text(code)
    (repo / "modeling_evil.py").write_text(code)
    with pytest.raises(Exception, match="(?i)trust_remote_code|does not recognize|unrecognized|model type"):
        load_teacher(f"hf:{repo}")
    assert not sentinel.exists()


def test_a_strangers_reinforced_dataset_runs_nothing(tmp_path, tiny_teacher_spec):
    """Hostile metadata in a reinforced shard: unknown transforms and keys are refused or ignored, never executed."""
    teachers = TeacherEnsemble.from_specs([tiny_teacher_spec])
    reinforce(make_image_dataset(8), make_config(teachers, n=2, k=2), teachers, str(tmp_path), show_progress=False)
    path = shard_paths(str(tmp_path))[0]
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    sentinel = tmp_path / "pwned"
    meta["augmentations"][0]["name"] = f"__import__('os').system('touch {sentinel}')"
    meta["__reduce__"] = "os.system"
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, METADATA_KEY: json.dumps(meta).encode()}), path)
    config = config_from_parquet(path)  # unknown keys are ignored
    assert isinstance(config, ReinforceConfig) and not hasattr(config, "__reduce__payload")
    with pytest.raises(ValueError, match="unknown augmentation"):
        config.pipeline()
    ds = datasets.load_dataset(str(tmp_path), split="train")  # plain parquet: reading it runs nothing
    assert len(ds) == 8
    assert not sentinel.exists()


def test_the_card_escapes_user_provided_text(tmp_path, tiny_teacher_spec):
    from huggingface_hub import DatasetCard

    teachers = TeacherEnsemble.from_specs([tiny_teacher_spec])
    hostile = "evil`</code><script>alert(1)</script>\n```\n# injected | cell {{ 7*7 }}"
    config = make_config(teachers, n=2, k=2, source={"path": hostile, "split": "train"})
    reinforce(make_image_dataset(8), config, teachers, str(tmp_path), show_progress=False,
              command=f"dr-hf reinforce '{hostile}' --output x")
    card = DatasetCard.load(str(tmp_path / "README.md"))
    assert card.data.to_dict()["reinforcement"]["source"]["path"] == hostile  # the YAML holds it exactly
    body = card.text
    outside = re.sub(r"(?ms)^(`{3,})[^\n]*\n.*?^\1\s*$", "", body)  # drop fenced blocks (closed by their own fence)
    prose = re.sub(r"(`+)(.+?)\1", "", outside)  # and inline code spans
    assert "<script>" in body and "<script>" not in prose  # the text is there, only ever as code
    assert not [line for line in outside.splitlines() if line.startswith("# injected")]  # no heading injected
    assert "{{ 7*7 }}" in body and "49" not in prose  # user text is data, never template
    # the command block's fence is longer than any backtick run inside it, so the block cannot be closed early
    block = body.split("## How it was made")[1].split("## Train with it")[0].strip()
    assert block.startswith("````bash") and block.endswith("````") and "```\n# injected" in block


@pytest.mark.parametrize("text", ["Bob's photos & more", "<b>#1</b> *set* _a_ ~~s~~ | `x` [l](u) \\ {{ 7*7 }}",
                                  "&amp; &#x27; &lt;script&gt; written out"])
def test_card_text_renders_as_written(text):
    """A name in the card's prose (its title, the agreement line) renders as the text itself, quotes, ampersands and
    entity-like text included (an apostrophe rendered as `&#x27;` before), with no markup of its own."""
    import html

    from markdown_it import MarkdownIt

    from dr_hf.card import md_text

    rendered = MarkdownIt().render(md_text(text)).strip()
    assert rendered.startswith("<p>") and rendered.endswith("</p>")
    inner = rendered[3:-4]
    assert "<" not in inner and html.unescape(inner) == text


def test_tokens_are_not_written_by_reinforce(tmp_path, tiny_teacher_spec, monkeypatch):
    token = "hf_never_write_me_0123456789abcdef"
    monkeypatch.setenv("HF_TOKEN", token)
    teachers = TeacherEnsemble.from_specs([tiny_teacher_spec])
    reinforce(make_image_dataset(8), make_config(teachers, n=2, k=2), teachers, str(tmp_path), show_progress=False)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
