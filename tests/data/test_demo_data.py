"""The vendored open demos (tests/data) are the released files, byte for byte."""
from __future__ import annotations

import hashlib

import pytest

from helpers.paths import DEMO_DATA


def _listed(folder):
    for line in (folder / "SHA256SUMS.txt").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        yield digest, name.strip()


@pytest.mark.parametrize("demo,min_files", [("mimic3_demo", 9), ("mimic4_demo", 9)])
def test_every_vendored_file_matches_its_release_checksum(demo, min_files):
    folder = DEMO_DATA / demo
    kept = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    checked = 0
    for digest, name in _listed(folder):
        if name in kept:
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, f"{demo}/{name} changed"
            checked += 1
    assert checked >= min_files, f"{demo}: only {checked} files checked"
    # every data file kept is one the release lists (nothing added that the checksums do not cover)
    unlisted = kept - {n for _, n in _listed(folder)} - {"SHA256SUMS.txt", "README.md", "NOTICE.md", "LICENSE.txt"}
    assert not unlisted, unlisted
