"""A warning the repair library raises while a command runs (a plugin that failed to load) is one
``warning:`` line on stderr, its message on one line; another library's warning is left to Python's own
display (found by the session's line coverage: no in-process test reached the CLI's warning hook)."""
from __future__ import annotations

import json
import warnings

from conftest import run_cli


def test_a_library_warning_is_one_warning_line_and_others_keep_their_own_display(monkeypatch):
    import repair.methods as M
    from repair.registry import PluginWarning

    real = M.list_methods

    def warned(*a, **k):
        warnings.warn("plugin 'x' failed to load:\n  ModuleNotFoundError: no module 'x'", PluginWarning)
        warnings.warn("a warning of another library", DeprecationWarning)
        return real(*a, **k)

    monkeypatch.setattr(M, "list_methods", warned)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        code, stdout, err = run_cli("methods", "--json")
    assert code == 0, err
    assert "dfr" in [m["name"] for m in json.loads(stdout)["methods"]]
    lines = err.splitlines()
    assert "warning: plugin 'x' failed to load: ModuleNotFoundError: no module 'x'" in lines, err
    assert not any(ln.startswith("warning: a warning of another library") for ln in lines), err
    assert "a warning of another library" not in err
    assert {str(w.message) for w in shown} == {"a warning of another library"}   # Python's display had it
