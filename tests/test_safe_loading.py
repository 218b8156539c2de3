"""Loading never runs code the user did not opt into: a model's own Python files need TASKHEAD_TRUST_REMOTE_CODE=1,
a YAML config cannot construct Python objects, checkpoints load with ``weights_only=True``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from taskhead.cli import main

from conftest import cli_args, run_taskhead

MARKER = "CODE_RAN"


@pytest.fixture
def remote_code_model(tiny_bert, tmp_path):
    """The tiny BERT whose config routes AutoModel to a modeling file that leaves a marker file when imported."""
    d = tmp_path / "custom-model"
    shutil.copytree(tiny_bert, d)
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="taskhead-custom", auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                                                          "AutoModel": "modeling_custom.CustomModel"})
    (d / "config.json").write_text(json.dumps(config))
    (d / "modeling_custom.py").write_text(
        f"from pathlib import Path\nPath({str(d / MARKER)!r}).write_text('ran')\n"  # transformers runs a cached copy
        "from transformers import BertConfig, BertModel\n"
        "class CustomConfig(BertConfig):\n    model_type = 'taskhead-custom'\n"
        "class CustomModel(BertModel):\n    config_class = CustomConfig\n"
    )
    return d


def test_model_code_does_not_run_without_opt_in(remote_code_model, review_files, tmp_path, capsys):
    args = cli_args(str(remote_code_model), {"train": review_files["train"]}, tmp_path, "--trainer.max_steps", "1")
    with pytest.raises(SystemExit) as exc:
        main(["fit", *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert "custom-model' ships its own Python code" in err and "TASKHEAD_TRUST_REMOTE_CODE=1" in err
    assert not (remote_code_model / MARKER).exists()


def test_model_code_runs_with_opt_in(remote_code_model, review_files, tmp_path):
    args = cli_args(str(remote_code_model), {"train": review_files["train"]}, tmp_path, "--trainer.max_steps", "1",
                    "--model.head", "{pooling: cls}")  # the bare AutoModel: the class from the model's own file
    proc = run_taskhead("fit", *args, env={"TASKHEAD_TRUST_REMOTE_CODE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (remote_code_model / MARKER).exists()


def test_yaml_config_cannot_construct_objects(tiny_bert, review_files, tmp_path, capsys):
    marker = tmp_path / MARKER
    config = tmp_path / "evil.yaml"
    config.write_text(f"seed_everything: !!python/object/apply:os.system ['touch {marker}']\n")
    args = [*cli_args(tiny_bert, {"train": review_files["train"]}, tmp_path), "--config", str(config)]
    with pytest.raises(SystemExit) as exc:
        main(["fit", *args])
    assert exc.value.code == 2
    assert "evil.yaml" in capsys.readouterr().err
    assert not marker.exists()


def test_checkpoints_hold_only_weights_only_loadable_values(tiny_bert, review_files, tmp_path):
    args = cli_args(tiny_bert, {"train": review_files["train"]}, tmp_path, "--trainer.max_steps", "2")
    with pytest.raises(SystemExit) as exc:
        main(["fit", *args])
        raise SystemExit(0)
    assert exc.value.code == 0
    for ckpt in (tmp_path / "runs").rglob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)  # raises on any pickled object
        assert state["hyper_parameters"]["_class_path"].startswith("taskhead.")
