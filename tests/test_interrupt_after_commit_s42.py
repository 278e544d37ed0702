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


def test_an_interrupted_demo_names_no_temporary_folder(tmp_path, monkeypatch):
    """The demo's parts are committed inside its own staging folder: an interrupt before the demo's commit
    named that folder, deleted by then, as "complete"."""
    import repair.api as A

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "evaluate_model", interrupted)
    rc, _, err = run_cli("demo", "--out", tmp_path / "d", "--size", "tiny")
    assert rc == 130, err
    assert [ln for ln in err.splitlines() if ln.strip()][-1] == "interrupted; nothing partial was left behind", err
    assert not (tmp_path / "d").exists()


def test_an_interrupted_zoo_does_not_ask_for_force(tmp_path, monkeypatch):
    """A zoo's rows are committed through staging folders and its journal says what finished (a rerun
    resumes): its last line named the staging folder and asked for --force."""
    import repair.zoo as Z
    from conftest import make_zoo_parts

    parts = make_zoo_parts(tmp_path / "parts")
    real, calls = Z.run_model, []

    def second_interrupted(task):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(Z, "run_model", second_interrupted)
    (tmp_path / "out").mkdir()
    man = tmp_path / "z.csv"
    man.write_text(f"# output_dir: {tmp_path / 'out'}\n# recipe: dfr\nname,checkpoint,data\n"
                   f"a,{parts / 'm0'},{parts / 'val'}\nb,{parts / 'm1'},{parts / 'val'}\n")
    rc, _, err = run_cli("zoo", man)
    assert rc == 130, err
    assert "--force" not in err and "zoo-staging" not in err, err
    assert (tmp_path / "out" / "a").exists()
