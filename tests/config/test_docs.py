"""The documentation: the configuration reference is not stale, the generator reads every field's
docstring from the source, the README stays a five-minute read, its links and the site's hold."""
from __future__ import annotations

import difflib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from ckd_ehr.config.base import Section
from ckd_ehr.config.reference import DOC_PATH, REGENERATE, configuration_reference, field_docstring, sections

from helpers.paths import REPO
README_MAX_LINES = 200


def test_configuration_page_is_not_stale():
    page = REPO / DOC_PATH
    expected = configuration_reference()
    actual = page.read_text() if page.exists() else ""
    if actual != expected:
        diff = "".join(list(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True),
                                                 str(DOC_PATH), "generated"))[:40])
        pytest.fail(f"{DOC_PATH} is stale: regenerate it with `{REGENERATE}` (or `make docs`) and commit it\n{diff}")


def test_every_config_field_has_a_docstring_and_a_place_on_the_page():
    from ckd_ehr.config import PipelineConfig

    page = configuration_reference()
    missing = []
    for cls, paths in sections(PipelineConfig):
        prefix = paths[0] + "." if paths[0] else ""
        for name in cls.model_fields:
            if not field_docstring(cls, name):
                missing.append(f"{cls.__name__}.{name}")
            assert f"**`{prefix}{name}`**" in page
    assert not missing, f"config fields without a docstring (a string literal right after the field): {missing}"


class _Inner(Section):
    depth: int = Field(3, ge=1, le=9)
    """How deep.

    A second paragraph, wrapped
    over two lines."""


class _Base(Section):
    mode: str = "a"
    """The base's mode."""
    inner: _Inner = _Inner()
    """A nested section."""


class _Derived(_Base):
    mode: str = "b"
    """The derived class's own words win."""
    names: list[str] = ["x", "y"]
    size: float | None = None
    """Optional: None = automatic."""


def test_generator_reads_docstrings_from_the_source_and_renders_each_field():
    assert field_docstring(_Derived, "mode") == "The derived class's own words win."
    assert field_docstring(_Derived, "inner") == "A nested section."          # inherited
    assert field_docstring(_Derived, "names") == ""                           # none given
    assert field_docstring(_Inner, "depth") == "How deep.\n\nA second paragraph, wrapped\nover two lines."
    assert [(cls, paths) for cls, paths in sections(_Derived)] == [(_Derived, [""]), (_Inner, ["inner"])]
    page = configuration_reference(_Derived)
    assert "- **`mode`** (`str`; default `\"b\"`): The derived class's own words win." in page
    assert "- **`size`** (`float | None`; default `null`): Optional: None = automatic." in page
    assert "- **`names`** (`list[str]`; default `[\"x\", \"y\"]`): (no docstring)" in page
    assert ("- **`inner.depth`** (`int`, >= 1, <= 9; default `3`): How deep. A second paragraph, wrapped "
            "over two lines.") in page
    assert "- **`inner`**: a section, see [`inner`](#inner)." in page and "\n## `inner`\n" in page


def test_readme_is_a_five_minute_read():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): "
                                            "move the detail to a page under docs/")


def _slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) and GitHub give a heading."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[-\s]+", "-", text)


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+?)\s*$", text, re.M)}


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+://", t)]


@pytest.mark.parametrize("doc", ["README.md", "CHANGELOG.md", *sorted(
    str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))])
def test_links_stay_inside_the_repository_and_resolve(doc):
    """Every relative link of the README, the changelog and the docs pages names a file of the
    repository (a clone has nothing beside it), and an anchor a heading of that file."""
    source = REPO / doc
    for target in _links(source):
        file, _, anchor = target.partition("#")
        resolved = (source.parent / file).resolve() if file else source
        assert resolved.is_relative_to(REPO), f"{doc}: link {target} leaves the repository"
        assert resolved.exists(), f"{doc}: link {target} names no file"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{doc}: link {target}: no heading with that anchor"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs is not installed (pip install -e '.[docs]', or make docs)")
def test_site_builds_strict(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
