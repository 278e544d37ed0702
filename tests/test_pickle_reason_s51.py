"""A pickle ``torch.load(weights_only=True)`` refuses: the one line says the unpickler's own reason, never
torch's advice to load with ``weights_only=False`` (the load that runs the file's code, which
``--allow-pickle`` exists to avoid) nor its terminal colour escapes."""
from __future__ import annotations

import pytest
import torch
from repair.errors import BadInput
from repair.io import load_state_dict_file


class Planted:
    """A class a weights-only load does not allow."""


def _files(tmp_path):
    g = tmp_path / "garbage.pt"
    g.write_bytes(b"garbage bytes \x00\x01")
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Planted()}, str(evil))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(evil.read_bytes()[:100])
    return {g: "Unsupported operand", evil: "Unsupported global: GLOBAL", cut: "failed reading zip archive"}


def test_a_refused_pickle_says_why_in_one_line_without_the_unsafe_advice(tmp_path):
    for path, reason in _files(tmp_path).items():
        before = path.read_bytes()
        with pytest.raises(BadInput) as e:
            load_state_dict_file(path, allow_pickle=True)
        msg = str(e.value)
        assert msg.startswith(f"{path}: not a loadable weights-only pickle (") and reason in msg, msg
        assert "weights_only=True: convert it to .safetensors" in msg
        assert "weights_only` set to `False" not in msg and "weights_only=False" not in msg
        assert "\x1b" not in msg and "\n" not in msg and len(msg) < 400 + len(str(path))
        assert path.read_bytes() == before
