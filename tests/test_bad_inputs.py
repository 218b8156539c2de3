"""The bad-input corpus (tests/bad_inputs/cases.yaml): every bad file, config or option stops the CLI before training
with exit status 2 and one stderr line naming the file and line, the field or the option; no traceback, no partial
output (run directory, cache, predictions file)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from taskhead.cli import main

from conftest import MINILM, cli_args, run_taskhead

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = {case["id"]: case for case in yaml.safe_load((CORPUS / "cases.yaml").read_text())}

# What each shipped config needs to run the tiny BERT on local files (as the task's own tests pass it).
TASK_ARGS = {
    "imdb.yaml": [],
    "conll2003.yaml": [],
    "squad.yaml": [],
    "swag.yaml": ["--data.dataset_config", "null"],
    "xsum.yaml": ["--model.architecture", "encoder_decoder", "--data.architecture", "encoder_decoder"],
    "wmt16_en_ro.yaml": ["--model.architecture", "encoder_decoder", "--data.architecture", "encoder_decoder",
                         "--data.dataset_config", "null", "--data.source_lang", "en", "--data.target_lang", "ro"],
}


@pytest.fixture(scope="session")
def models(tiny_bert, tmp_path_factory) -> dict[str, str]:
    """The tiny BERT; two directories whose tokenizer does not fit the model (real weights, mismatched configs); a
    directory that holds no model; a path that does not exist."""
    import torch
    from transformers import BertConfig, BertModel

    from taskhead.core.pretrained import load_tokenizer

    tok = load_tokenizer(MINILM)
    out = {"tiny": tiny_bert, "missing": str(tmp_path_factory.getbasetemp() / "no-such-model")}
    out["not-a-model"] = str(tmp_path_factory.mktemp("not-a-model"))
    (Path(out["not-a-model"]) / "checkpoints").mkdir()
    for name, overrides in (("small-vocab", {"vocab_size": 1000}), ("short-positions", {"max_position_embeddings": 64})):
        torch.manual_seed(0)
        cfg = BertConfig(**{"vocab_size": tok.vocab_size, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                            "intermediate_size": 64, "max_position_embeddings": 512, **overrides})
        path = tmp_path_factory.mktemp(name)
        BertModel(cfg).save_pretrained(path)
        tok.save_pretrained(path)  # model_max_length 512 and 30,522 tokens, whatever the model says
        out[name] = str(path)
    return out


def case_args(case: dict, model: str, run: Path) -> list[str]:
    config = case.get("config", "imdb.yaml")
    files = {split: str(CORPUS / name) for split, name in case["files"].items()}
    extra = [a.replace("{here}", str(CORPUS)).replace("{run}", str(run)) for a in case.get("args", [])]
    return [case.get("command", "fit"), *cli_args(model, files, run, *TASK_ARGS[config], *extra, config=config)]


@pytest.mark.parametrize("case_id", [
    pytest.param(i, marks=pytest.mark.xfail(reason=c["xfail"], strict=True)) if c.get("xfail") else i for i, c in CASES.items()
])
def test_bad_input(case_id, models, tmp_path, capsys):
    case = CASES[case_id]
    run = tmp_path / "run"  # cache, run directory and predictions file all go under it
    with pytest.raises(SystemExit) as exc:
        main(case_args(case, models[case.get("model", "tiny")], run))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("taskhead: error: "), err
    assert re.search(case["message"], lines[0]), f"\n  expected: {case['message']}\n  got:      {lines[0]}"
    assert not run.exists(), sorted(str(p.relative_to(run)) for p in run.rglob("*"))


def test_corpus_is_complete():
    """Every file in the corpus belongs to a case, and every case says what is wrong."""
    used = {Path(n.split("[")[0]).name for c in CASES.values() for n in c["files"].values()}
    used |= {Path(a).name for c in CASES.values() for a in c.get("args", []) if a.startswith("{here}/")}
    for path in CORPUS.iterdir():
        if path.is_file() and path.name != "cases.yaml":
            stem_used = path.name in used or path.with_suffix(".en").name in used  # a .ro is read beside its .en
            assert stem_used, f"{path.name} is in the corpus but no case uses it"
    assert len(CASES) >= 25 and all(c.get("what") and c.get("message") for c in CASES.values())


def test_console_entry_point(tiny_bert, tmp_path):
    """The installed entry point in a fresh process (argv from sys.argv, real stderr): one error line, exit 2.
    Lightning's "Seed set to 42" info line may come first (LightningCLI seeds before it builds anything)."""
    case = CASES["yaml-unknown-key"]
    proc = run_taskhead(*case_args(case, tiny_bert, tmp_path / "run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    *before, last = proc.stderr.strip().splitlines()
    assert last.startswith("taskhead: error: ") and re.search(case["message"], last), proc.stderr[-2000:]
    assert all(line.startswith("Seed set to") for line in before), before
    assert not (tmp_path / "run").exists()
