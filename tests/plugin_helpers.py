"""Packages "installed" after import, for the plugin tests: a distribution's metadata and entry points, and modules."""

from __future__ import annotations

import importlib
from pathlib import Path


def install(site: Path, name: str, entry_points: dict[str, dict[str, str]]) -> None:
    """A minimal installed distribution in ``site``: METADATA and entry_points.txt."""
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in points.items()) + "\n"
        for group, points in entry_points.items()
    ))


def installed_package(tmp_path: Path, monkeypatch, name: str, entry_points: dict[str, dict[str, str]],
                      modules: dict[str, str]) -> Path:
    """``tmp_path/site-packages`` on ``sys.path`` (undone by ``monkeypatch``), holding the distribution ``name`` with
    ``entry_points`` and the modules ``{module name: source}``; returns the folder."""
    site = tmp_path / "site-packages"
    site.mkdir(exist_ok=True)
    install(site, name, entry_points)
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return site
