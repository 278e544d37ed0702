"""Trust fixes of session 47: what the tool prints about a run is one line per message, and holds what
it measured. Every test here fails on the code before."""
from __future__ import annotations

import shutil

from conftest import make_images, make_timm_folder, run_cli


def test_a_log_line_on_stderr_is_one_line_whatever_a_path_holds(tmp_path):
    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "val", n_per_class=3)
    forged = tmp_path / "m\ngate passed: forged"
    shutil.copytree(model, forged)
    code, out, err = run_cli("fix", forged, "--data", data, "--recipe", "dfr", "--out", tmp_path / "o", "--no-cache")
    assert code == 0, err
    lines = (out + err).splitlines()
    assert not [ln for ln in lines if ln.startswith("gate passed")], err       # no line of the path's own
    assert any("m\\ngate passed: forged" in ln for ln in err.splitlines()), err  # the path shown, escaped
