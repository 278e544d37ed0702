"""A zoo journal that is a symbolic link is refused (its target, outside the paths given, is never
created or appended to), and the zoo report's Δ WGA tells a small change from none."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from conftest import make_images, make_timm_folder, one_line_naming, run_cli


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo_link")
    make_timm_folder(root / "m0")
    make_images(root / "val", n_per_class=6)
    return root


def eval_manifest(inputs: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "zoo.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"recipe": "dfr", "group_by": "place"},
                                    "models": [{"name": "a", "checkpoint": str(inputs / "m0"),
                                                "data": str(inputs / "val"), "gate": 0}]}, sort_keys=False))
    return path


# ------------------------------------------------------------------ defect 1: the journal through a link
def test_dangling_journal_link_is_refused_and_its_target_never_created(inputs, tmp_path):
    z = tmp_path / "z"
    path = eval_manifest(inputs, z)
    (z / "elsewhere").mkdir()
    link = z / "j.jsonl"
    link.symlink_to(Path("elsewhere") / "victim.jsonl")
    code, _, err = run_cli("zoo", path, "--mode", "eval", "--journal", link, "--out-dir", z / "r")
    one_line_naming(code, err, link, "symbolic link")
    assert not (z / "elsewhere" / "victim.jsonl").exists()
    assert link.is_symlink() and os.readlink(link) == os.path.join("elsewhere", "victim.jsonl")
    assert not (z / "r" / "zoo-report.json").exists()          # refused before any row ran


def test_journal_link_to_an_existing_file_is_refused_and_the_file_untouched(inputs, tmp_path):
    z = tmp_path / "z"
    path = eval_manifest(inputs, z)
    (z / "elsewhere").mkdir()
    victim = z / "elsewhere" / "victim.jsonl"
    victim.write_bytes(b"")
    link = z / "j.jsonl"
    link.symlink_to(victim)
    code, _, err = run_cli("zoo", path, "--mode", "eval", "--journal", link, "--out-dir", z / "r")
    one_line_naming(code, err, link, "symbolic link")
    assert victim.read_bytes() == b"" and link.is_symlink()


def test_default_journal_in_the_report_folder_that_is_a_link_is_refused(inputs, tmp_path):
    z = tmp_path / "z"
    path = eval_manifest(inputs, z)
    (z / "elsewhere").mkdir()
    (z / "r").mkdir()
    link = z / "r" / "journal.jsonl"
    link.symlink_to(z / "elsewhere" / "victim.jsonl")
    code, _, err = run_cli("zoo", path, "--mode", "eval", "--out-dir", z / "r")
    one_line_naming(code, err, link, "symbolic link")
    assert not (z / "elsewhere" / "victim.jsonl").exists() and link.is_symlink()


def test_journal_append_never_follows_a_link_made_after_the_check(tmp_path):
    """A link put at the journal's path after the checks (while the zoo works) is not followed by
    the append: refused naming the journal, the link's target never created."""
    from repair.errors import BadInput
    from repair.zoo import Journal

    journal = Journal(tmp_path / "j.jsonl")
    journal.check()                                        # nothing there yet: fine
    (tmp_path / "j.jsonl").symlink_to(tmp_path / "victim.jsonl")
    with pytest.raises(BadInput, match="symbolic link") as e:
        journal.append({"name": "a", "mode": "eval"})
    assert str(tmp_path / "j.jsonl") in str(e.value)
    assert not (tmp_path / "victim.jsonl").exists() and (tmp_path / "j.jsonl").is_symlink()


# ------------------------------------------------------------------ defect 2: the report's Δ WGA
def _figures(w: float) -> dict:
    return {"n": 2500, "accuracy": w, "worst_class_accuracy": w, "worst_group_accuracy": w, "worst_group": "g",
            "per_group": [], "per_class": [], "per_inferred_group": None, "absent_groups": []}


def _delta_cell(before: float, after: float) -> tuple[str, str]:
    from repair.report import summary_table

    html = summary_table([{"name": "m", "status": "done", "gate": None,
                           "result": {"candidate": "dfr", "before": _figures(before), "after": _figures(after)}}],
                         "fix")
    cells = re.findall(r'<td class="num ?([a-z]*)" data-v="[^"]*">([^<]*)</td>', html)
    assert len(cells) == 2, html                     # Δ WGA, then the mean accuracy
    return cells[0]


@pytest.mark.parametrize("before, after, shown, cls", [
    (2499 / 2500, 1.0, "+0.04", "up"),               # 99.96% -> 100.0%: never +0.0
    (0.5004, 0.5, "-0.04", "down"),                   # never -0.0
    (0.75, 0.75, "0.0", ""),                          # no change: unsigned, no arrow style
    (0.5, 0.625, "+12.5", "up"),                      # a change one decimal tells: one decimal
    (0.5, 0.4, "-10.0", "down"),
])
def test_delta_wga_tells_a_small_change_from_none(before, after, shown, cls):
    assert _delta_cell(before, after) == (cls, shown)


def test_points_delta_is_displays_rule():
    from repair.display import points_delta

    assert points_delta(2499 / 2500, 1.0) == "+0.04"
    assert points_delta(0.3, 0.3) == "0.0" and points_delta(None, 0.3) == "-"
    assert points_delta(0.5, 0.5 + 1e-7) == "+0.00001"
