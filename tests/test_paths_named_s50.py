"""A refused path is named as the user gave it (session 49 left this open): a cache folder through a loop
of symbolic links was refused naming a file inside it that repair would have written."""
from __future__ import annotations

import os

from conftest import make_images, make_timm_folder, run_cli


def test_a_cache_dir_through_a_loop_of_links_is_named_as_given(tmp_path, monkeypatch):
    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=2)
    os.symlink(tmp_path / "a", tmp_path / "b")
    os.symlink(tmp_path / "b", tmp_path / "a")
    cache = tmp_path / "a" / "sub"
    code, out, err = run_cli("eval", m, "--data", data, "--cache-dir", cache, "-q")
    assert code == 2 and out == ""
    assert err.strip() == (f"error: {cache}: --cache-dir cannot be used as a path (a loop of symbolic links); "
                           "choose another --cache-dir"), err
    monkeypatch.setenv("REPAIR_CACHE_DIR", str(tmp_path / "b"))
    code, out, err = run_cli("eval", m, "--data", data, "-q")
    assert code == 2 and f"error: {tmp_path / 'b'}: the cache folder of $REPAIR_CACHE_DIR cannot be used" in err, err
    assert "entry" not in err
