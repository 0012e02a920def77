"""The first five minutes: `make demo` writes the report and says where it is; the README's first screen
shows the two commands and a picture of the report."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _recipe(target: str) -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"{target}\s*:", line))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_make_demo_writes_the_report_and_names_it():
    recipe = _recipe("demo")
    scans = [line for line in recipe if "headmap scan" in line]
    assert len(scans) == 1 and "--report" in scans[0].split() and "--out runs/demo" in scans[0], recipe
    said = [line for line in recipe if line.startswith("@echo ")]
    assert said and "runs/demo/report.html" in said[0] and "$(CURDIR)" in said[0], said  # a path to open
    assert len(said) >= 2 and "head" in said[-1]  # and one line on what the page shows


def test_readme_first_screen_is_two_commands_and_the_picture():
    lines = (ROOT / "README.md").read_text().splitlines()
    first_section = next(i for i, line in enumerate(lines) if line.startswith("## "))
    top = "\n".join(lines[:first_section])
    commands = top.index("make demo"), top.index("make test")
    image = re.search(r"!\[[^\]]+\]\((docs/img/[^)]+\.png)\)", top)
    assert image, "no picture of the report before the first section"
    assert max(commands) < image.start(), "the picture comes under the two commands"
    assert (ROOT / image.group(1)).is_file()
    assert "runs/demo/report.html" in top
    assert lines.index("```") < 3 and image.start() < top.index("headmap measures")  # first screen: no prose first
