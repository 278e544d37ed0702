"""A model repair on a repair set of copies of a few samples is a one-line error (session 43's model-repair
audit): every group was one sample listed several times, copies stay on one side of the split, so the
part held out for early stopping was empty and the first evaluation crashed (exit 3)."""
from __future__ import annotations

import pytest
from conftest import make_images, make_timm_folder, run_cli


@pytest.mark.parametrize("recipe", ["mixft", "clp"])
def test_copies_of_too_few_samples_are_exit_2_naming_the_data(tmp_path, recipe):
    m = make_timm_folder(tmp_path / "m")
    d = make_images(tmp_path / "d", n_per_class=2)
    lines = (d / "metadata.csv").read_text().splitlines()
    (d / "metadata.csv").write_text("\n".join([lines[0]] + [ln for ln in lines[1:] for _ in range(5)]) + "\n")
    code, out, err = run_cli("fix", m, "--data", d, "--recipe", recipe, "--budget", "2steps", "--out", tmp_path / "o")
    assert code == 2, err
    assert "metadata.csv" in err and "distinct samples" in err and "internal error" not in err
    assert not (tmp_path / "o").exists()
