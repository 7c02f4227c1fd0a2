"""docs/ is generated from the code and from recorded results: check it is up to date and complete."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
RESULTS = DOCS.parent / "benchmarks" / "results"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_{name}", DOCS / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_up_to_date():
    assert (DOCS / "configuration.md").read_text() == _script("configuration").render(), (
        "docs/configuration.md is stale: run python docs/scripts/configuration.py")


def test_configuration_reference_names_every_engine_argument():
    import dataclasses

    from jaxllm.engine_args import EngineArgs

    text = (DOCS / "configuration.md").read_text()
    assert all(f"`--{f.name.replace('_', '-')}`" in text for f in dataclasses.fields(EngineArgs))


def test_benchmarks_page_is_up_to_date():
    assert (DOCS / "benchmarks.md").read_text() == _script("benchmark_plots").render(), (
        "docs/benchmarks.md is stale: run python docs/scripts/benchmark_plots.py")


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_linked_images_exist(page):
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text()):
        assert (DOCS / target).is_file(), f"{page.name} shows {target}, which is missing"


def test_every_picture_comes_from_a_script():
    scripts = "".join(p.read_text() for p in (DOCS / "scripts").glob("*.py"))
    for image in (DOCS / "images").glob("*.png"):
        if image.name.startswith("bench_"):  # one per recorded JSON file (benchmark_plots.py)
            stem = image.stem.removeprefix("bench_")
            assert (RESULTS / f"{stem}.json").is_file() or (RESULTS / f"{stem}_cpu.json").is_file(), image.name
        else:
            assert image.name in scripts, f"no script in docs/scripts draws {image.name}"


def test_architecture_diagram_script_runs(tmp_path):
    out = tmp_path / "architecture.png"
    _script("architecture_diagram").main(["--output", str(out)])
    assert out.stat().st_size > 10_000
