"""A command interrupted after its outputs were committed said "nothing partial was left behind" and
nothing of what it wrote, so a user took the run as lost (and its rerun stopped at the existing output):
it names what it wrote, complete, and that a rerun needs --force; before any commit it says as before."""
from __future__ import annotations

import pytest

from conftest import run_cli


@pytest.mark.parametrize("signal_exc, code, word", [(KeyboardInterrupt, 130, "interrupted"),
                                                    ("Terminated", 143, "terminated (SIGTERM)")])
def test_an_interrupt_after_the_commit_names_what_was_written(timm_folder, image_data, tmp_path, monkeypatch,
                                                              signal_exc, code, word):
    import repair_cli.commands as C
    from repair.errors import Terminated

    exc = Terminated if signal_exc == "Terminated" else signal_exc

    def interrupted_while_printing(doc):
        raise exc()

    monkeypatch.setattr(C, "emit_json", interrupted_while_printing)
    out = tmp_path / "o"
    rc, _, err = run_cli("fix", timm_folder, "--data", image_data, "--out", out, "--recipe", "dfr", "--json")
    assert rc == code, err
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last.startswith(f"{word} after writing {out} (complete: a rerun needs --force"), last
    assert (out / "model.safetensors").exists()


def test_an_interrupt_before_any_commit_says_nothing_was_left(timm_folder, image_data, tmp_path, monkeypatch):
    import repair.pipeline as P

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "fix_model", interrupted)
    rc, _, err = run_cli("fix", timm_folder, "--data", image_data, "--out", tmp_path / "o", "--recipe", "dfr")
    assert rc == 130, err
    assert [ln for ln in err.splitlines() if ln.strip()][-1] == "interrupted; nothing partial was left behind"
    assert not (tmp_path / "o").exists()
