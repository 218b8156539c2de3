"""What a checkpoint and its run directory say about a trained model, as one plain dict (``run_facts``): the input of
the model card (core/card.py). The only part of the card that reads files; nothing is guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from taskhead.core.pretrained import hub_offline

# ---- reading a run --------------------------------------------------------------------------------------------------


def run_dir_of(ckpt_path: str | Path) -> Path | None:
    """``<run>`` for ``<run>/checkpoints/x.ckpt``; None for a checkpoint that lives anywhere else."""
    parent = Path(ckpt_path).resolve().parent
    return parent.parent if parent.name == "checkpoints" else None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def validation_facts(ckpt: dict, ckpt_name: str) -> dict | None:
    """The monitored metric from the ModelCheckpoint state saved in the checkpoint. ``own`` says whether the value
    belongs to this very checkpoint (it is one of the run's top-k files) or is the run's best at the time of saving
    (e.g. ``last.ckpt``, whose own score Lightning does not record)."""
    own_state = ckpt.get("taskhead") or {}
    monitor = own_state.get("monitor")
    if "callbacks" not in ckpt and monitor and monitor in (own_state.get("val_metrics") or {}):
        # a weights-only best checkpoint: saved right after its validation, whose scores it carries itself
        return {"monitor": monitor, "value": float(own_state["val_metrics"][monitor]), "own": True, "best": ckpt_name,
                "mode": own_state.get("monitor_mode") or "max"}
    for key, state in ckpt.get("callbacks", {}).items():
        if not key.startswith("ModelCheckpoint") or not state.get("monitor") or state.get("best_model_score") is None:
            continue
        scores = {Path(p).name: float(v) for p, v in (state.get("best_k_models") or {}).items()}  # tensors → floats
        own = ckpt_name in scores
        return {"monitor": state["monitor"], "value": scores[ckpt_name] if own else float(state["best_model_score"]),
                "own": own, "best": Path(state.get("best_model_path") or "").name,
                "mode": "min" if "'mode': 'min'" in key else "max"}  # the state has no mode; the callback's key does
    return None


def _tested_checkpoint(run: Path) -> Path | None:
    """The ``--ckpt_path`` a run's manifest records (None when it names none, or only ``last``/``best``). ``taskhead
    test`` on a checkpoint inside a run writes ``manifest-test.json`` beside the fit's ``manifest.json``."""
    manifest = _read_json(run / "manifest-test.json") or _read_json(run / "manifest.json") or {}
    config = manifest.get("config")
    if isinstance(config, str):
        try:
            config = yaml.safe_load(config)
        except yaml.YAMLError:
            return None
    path = (config or {}).get("ckpt_path") if isinstance(config, dict) else None
    return Path(path).resolve() if path and path not in ("last", "best") else None


def find_test_metrics(ckpt_path: Path, run: Path | None) -> tuple[dict[str, float], Path | None]:
    """``test/*`` metrics of this checkpoint and the file they came from.

    First the run's own ``metrics.json`` (unless its manifest says another checkpoint was tested), then the runs
    beside it whose manifest names this checkpoint as ``--ckpt_path`` (``taskhead test`` with the default logger
    writes a new version directory). A metrics file older than the checkpoint scored an earlier state of the file
    (``last.ckpt`` is overwritten), so it does not count. The newest match wins.
    """
    if run is None:
        return {}, None
    ckpt = ckpt_path.resolve()
    found: list[tuple[float, Path, dict]] = []
    for d in [run, *sorted(p for p in run.parent.iterdir() if p.is_dir() and p != run)]:
        metrics_file = d / "metrics.json"
        if not metrics_file.is_file() or metrics_file.stat().st_mtime < ckpt.stat().st_mtime:
            continue
        tested = _tested_checkpoint(d)
        if tested != ckpt and not (d == run and tested is None):
            continue
        metrics = {k: v for k, v in (_read_json(metrics_file) or {}).items() if k.startswith("test/")}
        if metrics:
            found.append((metrics_file.stat().st_mtime, metrics_file, metrics))
    if not found:
        return {}, None
    _, path, metrics = max(found, key=lambda t: t[0])
    return metrics, path


def base_card_metadata(source: str) -> dict[str, Any]:
    """License fields of the base model's own card: a local/packaged directory's README.md, else the Hub card from
    the local cache, else (online only) the Hub. Empty when none of them says: the card then names no license."""
    from huggingface_hub import ModelCard, try_to_load_from_cache
    from huggingface_hub.utils import validate_repo_id

    from taskhead.core.pretrained import resolve_model_path
    from taskhead.errors import TaskheadError

    readme: str | Path | None = None
    try:
        local = Path(resolve_model_path(source)) if source.startswith("pkg:") else Path(source).expanduser()
    except TaskheadError:  # the package is gone: the export works from the checkpoint alone
        return {}
    if local.is_dir():
        readme = local / "README.md"
    try:
        if readme is None:
            validate_repo_id(source)
            cached = try_to_load_from_cache(source, "README.md")
            readme = cached if isinstance(cached, str) else None
            if readme is None and not hub_offline():
                readme = source  # ModelCard.load fetches a repo id's card
        if readme is None or (isinstance(readme, Path) and not readme.is_file()):
            return {}
        data = ModelCard.load(readme).data.to_dict()
    except Exception:  # no card, no network, malformed front matter: say nothing rather than guess
        return {}
    return {k: data[k] for k in ("license", "license_name", "license_link") if data.get(k)}


def is_hub_id(source: str) -> bool:
    """A Hub repo id (not a local directory or ``pkg:``): only those are valid ``base_model`` values."""
    from huggingface_hub.utils import validate_repo_id

    if source.startswith(("pkg:", ".", "/", "~")) or Path(source).exists() or source.endswith(".gguf"):
        return False
    try:
        validate_repo_id(source)
    except Exception:
        return False
    return True


def run_facts(ckpt_path: str | Path, ckpt: dict) -> dict[str, Any]:
    """Everything the card says, as plain values, from a loaded checkpoint and the files of its run (if any)."""
    import taskhead

    ckpt_path = Path(ckpt_path)
    run = run_dir_of(ckpt_path)
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if k != "_class_path"}
    data = {k: v for k, v in (ckpt.get("datamodule_hyper_parameters") or {}).items() if not k.startswith("_")}
    metrics, metrics_file = find_test_metrics(ckpt_path, run)
    config_file = run / "config.yaml" if run else None
    source = hparams.get("model_name_or_path", "")
    return {
        "task": ckpt.get("hyper_parameters", {}).get("_class_path", ""),
        "source": source,
        "base_model": source if source and is_hub_id(source) else None,  # as transformers' Trainer: never a local path
        "base": base_card_metadata(source) if source else {},
        "hparams": hparams,
        "data": data,
        "checkpoint": {"name": ckpt_path.name, "epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step")},
        "manifest": _read_json(run / "manifest.json") if run else None,
        "config_yaml": config_file.read_text() if config_file and config_file.is_file() else None,
        "validation": validation_facts(ckpt, ckpt_path.name),
        "test_metrics": metrics,
        "test_metrics_file": str(metrics_file) if metrics_file else None,
        "taskhead_version": getattr(taskhead, "__version__", None),
    }
