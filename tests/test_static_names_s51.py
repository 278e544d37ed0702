"""Names a code path uses must exist: the GPU script's ``--model-rows`` check called a module it never imported
(a NameError, found by pyflakes, on the one script that runs when a device is lent)."""
import pytest


def test_gpu_script_refuses_an_unknown_model_row(capsys):
    from bench.gpu import main
    with pytest.raises(SystemExit) as e:
        main(["--model-rows", "mixft", "no-such-row", "--dry-run"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no-such-row" in err


def test_no_undefined_names_in_the_shipped_code():
    """pyflakes' undefined-name check over everything that ships or benchmarks (annotation-only imports sit
    under ``TYPE_CHECKING``, so a hit is a name some path would look up and not find)."""
    pytest.importorskip("pyflakes")
    from pathlib import Path

    from pyflakes import api, messages, reporter

    class Collect(reporter.Reporter):
        def __init__(self):
            self.found = []

        def unexpectedError(self, filename, msg):
            self.found.append(f"{filename}: {msg}")

        def syntaxError(self, filename, msg, lineno, offset, text):
            self.found.append(f"{filename}:{lineno}: {msg}")

        def flake(self, message):
            if isinstance(message, (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport)):
                self.found.append(str(message))

    root = Path(__file__).resolve().parents[1]
    rep = Collect()
    files = [p for d in ("repair", "cli", "recipes", "bench") for p in sorted((root / d).rglob("*.py"))]
    assert len(files) > 50
    for p in files:
        api.checkPath(str(p), rep)
    assert rep.found == []
