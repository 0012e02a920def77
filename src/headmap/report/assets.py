"""The report's static files (CSS, JavaScript) shipped in ``headmap/report/assets/``."""

from __future__ import annotations

from importlib import resources


def asset(name: str) -> str:
    """The text of ``headmap/report/assets/NAME``."""
    return resources.files("headmap.report").joinpath("assets", name).read_text(encoding="utf-8")
