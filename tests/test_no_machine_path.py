"""No machine path in an output but ``--train``'s as given (README, provenance): the same inputs in
another folder give byte-identical files. Found by an audit: clp recorded ``--masks`` as given (an
absolute path in the model's metadata), recompose's ``repair-artifacts/manifest.json`` named every
source, background and mask image by its absolute path."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import make_timm_folder, run_cli
from test_recompose import make_scene


@pytest.mark.parametrize("recipe", ["clp", "recompose"])
def test_the_same_inputs_in_another_folder_give_the_same_files(tmp_path, monkeypatch, recipe):
    one = tmp_path / "one"
    make_scene(one / "scene", one / "masks")
    make_timm_folder(one / "m", classes=["cat", "dog"])
    two = tmp_path / "two" / "deeper"
    shutil.copytree(one, two)
    for where in (one, two):
        monkeypatch.chdir(where)
        code, _, err = run_cli("fix", where / "m", "--data", where / "scene", "--group-by", "place", "--recipe", recipe,
                               "--masks", where / "masks", "--budget", "2steps", "--out", where / "out", "-q")
        assert code == 0, err
    files = sorted(p.relative_to(one / "out") for p in (one / "out").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two / "out") for p in (two / "out").rglob("*") if p.is_file())
    assert any(f.name == "model.safetensors" for f in files)
    assert recipe != "recompose" or Path("repair-artifacts/manifest.json") in files
    for f in files:
        a, b = (one / "out" / f).read_bytes(), (two / "out" / f).read_bytes()
        assert a == b, f
        assert str(tmp_path).encode() not in a, f


def test_a_reports_time_is_source_date_epoch_when_set(monkeypatch):
    from repair.report import now

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "86400")
    assert now() == "1970-01-02T00:00:00+00:00"
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert now().startswith("20")


def test_a_zoo_journals_finished_time_is_the_clock_whatever_source_date_epoch_says(monkeypatch):
    from repair.report import clock

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "86400")
    assert clock().startswith("20")
