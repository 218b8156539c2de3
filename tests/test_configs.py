"""Every shipped YAML parses against the code (alone, and each offline variant composed after its Hub config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from taskhead.cli import main

ROOT = Path(__file__).resolve().parents[1]
HUB = sorted((ROOT / "configs").glob("*.yaml"))


def composed(path: Path) -> list[Path]:
    offline = ROOT / "configs" / "offline" / path.name
    return [path, offline] if offline.exists() else [path]


@pytest.mark.parametrize("config", HUB, ids=lambda p: p.name)
@pytest.mark.parametrize("offline", [False, True], ids=["hub", "offline"])
def test_config_parses(config, offline, capsys):
    files = composed(config) if offline else [config]
    if offline and len(files) == 1:
        pytest.skip("no offline variant")
    args = [a for f in files for a in ("--config", str(f))]
    with pytest.raises(SystemExit) as exc:
        main(["fit", *args, "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("taskhead.tasks.")
    assert printed["data"]["class_path"].startswith("taskhead.tasks.")
    assert printed["trainer"]["use_distributed_sampler"] is False


def hub_config_of(offline: Path) -> Path | None:
    """``offline/xsum_bert2bert.yaml`` composes after ``xsum.yaml``: the longest Hub config name it starts with."""
    names = [h for h in HUB if offline.stem == h.stem or offline.stem.startswith(h.stem + "_")]
    return max(names, key=lambda h: len(h.stem)) if names else None


def test_every_offline_config_has_a_hub_config():
    for path in (ROOT / "configs" / "offline").glob("*.yaml"):
        assert hub_config_of(path) is not None, path


@pytest.mark.parametrize("offline", [p for p in sorted((ROOT / "configs" / "offline").glob("*.yaml"))
                                     if not (ROOT / "configs" / p.name).exists()], ids=lambda p: p.name)
def test_offline_variant_parses(offline, capsys):
    """Offline alternatives with their own name (xsum_bert2bert.yaml) compose after their Hub config too."""
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(hub_config_of(offline)), "--config", str(offline), "--print_config"])
    assert exc.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["model"]["class_path"].startswith("taskhead.tasks.")


def test_offline_configs_name_no_absolute_paths():
    for path in (ROOT / "configs").rglob("*.yaml"):
        text = path.read_text()
        assert "/work/" not in text and "site-packages" not in text, path
