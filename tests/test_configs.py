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


def test_every_offline_config_has_a_hub_config():
    for path in (ROOT / "configs" / "offline").glob("*.yaml"):
        assert (ROOT / "configs" / path.name).exists(), path


def test_offline_configs_name_no_absolute_paths():
    for path in (ROOT / "configs").rglob("*.yaml"):
        text = path.read_text()
        assert "/work/" not in text and "site-packages" not in text, path
