"""``set-rope --in-place`` through a symlink, the way the Hugging Face hub cache lays out files
(``snapshots/<rev>/model.gguf -> ../../blobs/<sha>``): the target is rewritten, the link is kept, and the report
says so.  It used to replace the link by a regular file and leave the target (the blob) unchanged.
"""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from helpers.tiny_gguf import write_tiny_gguf

from edgerope.cli import cli
from edgerope.gguf.reader import open_gguf
from edgerope.gguf.set_rope import set_rope


@pytest.fixture
def hub_layout(tmp_path):
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    blob = write_tiny_gguf(blobs / "sha256-0123")
    link = snap / "model.gguf"
    link.symlink_to(os.path.relpath(blob, snap))
    return link, blob


def test_in_place_through_a_symlink_rewrites_the_target(hub_layout):
    link, blob = hub_layout
    report = set_rope(link, rope_type="yarn", factor=4.0, in_place=True)
    assert link.is_symlink() and link.resolve() == blob.resolve()
    with open_gguf(blob) as f:
        assert f.get("llama.rope.scaling.type") == "yarn" and f.get("llama.context_length") == 1024
    assert report.output == str(blob.resolve())
    assert any("symlink" in n and str(blob.resolve()) in n for n in report.notes), report.notes
    assert sorted(p.name for p in blob.parent.iterdir()) == [blob.name]  # no temp left beside the target
    assert sorted(p.name for p in link.parent.iterdir()) == [link.name]


def test_the_cli_says_it_wrote_through_the_link(hub_layout):
    link, blob = hub_layout
    res = CliRunner().invoke(cli, ["set-rope", str(link), "--in-place", "--type", "linear", "--factor", "2", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["output"] == str(blob.resolve()) and any("symlink" in n for n in report["notes"])
    assert link.is_symlink()
    with open_gguf(link) as f:
        assert f.get("llama.rope.scaling.type") == "linear"


def test_a_dangling_link_is_a_clean_error(tmp_path):
    link = tmp_path / "model.gguf"
    link.symlink_to(tmp_path / "gone.gguf")
    res = CliRunner().invoke(cli, ["set-rope", str(link), "--in-place", "--type", "linear", "--factor", "2"])
    assert res.exit_code == 2 and "no such file" in res.output and "Traceback" not in res.output
