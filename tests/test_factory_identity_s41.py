"""The embedding cache key of a ``--factory`` model follows the code that builds and runs its network
(found by an audit):

- a factory importing its network inside the function (``def build(): from netdef import Net``): the
  modules the network's own module reaches (``from acts import act``) are in the key;
- a network class from an installed package: the package's distribution and version are in the key (a
  module under a ``site-packages`` folder no distribution names: its content);
- a factory module (or a module it reaches) edited after this process imported it: the next load runs
  the new code, under the new code's key -- never the old code's embeddings stored under the new key.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, make_images
from repair.adapters import LoadOptions, load_model
from repair.api import RuntimeOptions, prepare
from repair.data import load_data
from repair.embeddings import cache_key

PRE = dict(class_names=CLASSES, image_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

NET = (
    "import torch\nfrom torch import nn\n{imports}\n"
    "class Net(nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))\n"
    "        self.head = nn.Linear(6, 3)\n"
    "    def forward(self, x):\n"
    "        return self.head({act}(self.body(x)))\n")
BUILD = "def build():\n    return Net()\n"


@pytest.fixture
def own_modules(tmp_path):
    """Pops, after the test, every module imported from ``tmp_path`` (none leaks into another test);
    called, pops them now: the next import is a new process's."""
    root = str(tmp_path.resolve())

    def pop():
        for name, mod in list(sys.modules.items()):
            f = getattr(mod, "__file__", None) or ""
            if f and str(Path(f).resolve()).startswith(root):
                sys.modules.pop(name, None)

    yield pop
    pop()


def _weights(tmp_path: Path, factory: str) -> Path:
    import importlib

    from safetensors.torch import save_file

    mod, fn = factory.split(":")
    torch.manual_seed(0)
    save_file(getattr(importlib.import_module(mod), fn)().state_dict(), str(tmp_path / "w.safetensors"))
    return tmp_path / "w.safetensors"


def _key(w: Path, data: Path, factory: str) -> str:
    return cache_key(load_model(w, LoadOptions(factory=factory, **PRE)), load_data(data))


def test_a_helper_of_a_network_the_factory_imports_when_called_is_in_the_key(tmp_path, monkeypatch, own_modules):
    (tmp_path / "acts_s41.py").write_text("import torch\ndef act(h):\n    return torch.relu(h)\n")
    (tmp_path / "netdef_s41.py").write_text(NET.format(imports="from acts_s41 import act", act="act"))
    (tmp_path / "lazyfac_s41.py").write_text(
        "def build():\n    from netdef_s41 import Net      # imported when called\n    return Net()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    own_modules()
    w = _weights(tmp_path, "lazyfac_s41:build")
    data = make_images(tmp_path / "d", n_per_class=2, size=8)
    own_modules()
    k0 = _key(w, data, "lazyfac_s41:build")
    own_modules()
    assert _key(w, data, "lazyfac_s41:build") == k0                   # deterministic
    (tmp_path / "acts_s41.py").write_text("import torch\ndef act(h):\n    return torch.relu(-h)\n")
    own_modules()                                                     # a new process
    assert _key(w, data, "lazyfac_s41:build") != k0


def _site_packages(tmp_path: Path, version: str, act: str, dist: bool) -> Path:
    """``mymodels_s41`` under a folder named site-packages (``pip install mymodels_s41==version``), with
    its ``.dist-info`` when ``dist``."""
    import shutil

    sp = tmp_path / "sp" / "site-packages"
    shutil.rmtree(sp, ignore_errors=True)
    (sp / "mymodels_s41").mkdir(parents=True)
    (sp / "mymodels_s41" / "__init__.py").write_text(f"__version__ = {version!r}\nfrom .net import Net\n")
    (sp / "mymodels_s41" / "net.py").write_text(NET.format(imports="", act=act))
    if dist:
        info = sp / f"mymodels_s41-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: mymodels_s41\nVersion: {version}\n")
        (info / "top_level.txt").write_text("mymodels_s41\n")
        (info / "RECORD").write_text("mymodels_s41/__init__.py,,\nmymodels_s41/net.py,,\n")
    return sp


@pytest.mark.parametrize("dist", [True, False], ids=["distribution", "bare-folder"])
def test_a_network_class_from_an_installed_package_keys_its_version(tmp_path, monkeypatch, own_modules, dist):
    sp = _site_packages(tmp_path, "1.0", "torch.relu", dist)
    work = tmp_path / "work"
    work.mkdir()
    (work / "wrap_s41.py").write_text("from mymodels_s41 import Net\ndef build():\n    return Net()\n")
    monkeypatch.syspath_prepend(str(sp))
    monkeypatch.syspath_prepend(str(work))
    own_modules()
    w = _weights(work, "wrap_s41:build")
    data = make_images(tmp_path / "d", n_per_class=2, size=8)
    own_modules()
    k1 = _key(w, data, "wrap_s41:build")
    a = load_model(w, LoadOptions(factory="wrap_s41:build", **PRE))
    if dist:
        assert a.build.get("packages") == ["mymodels_s41==1.0"]
    _site_packages(tmp_path, "2.0", "torch.tanh", dist)               # pip install mymodels_s41==2.0
    own_modules()
    assert _key(w, data, "wrap_s41:build") != k1
    b = load_model(w, LoadOptions(factory="wrap_s41:build", **PRE))
    assert "torch" not in str(b.build.get("packages"))                # torch's version: in the key already


def test_a_factory_edited_after_this_process_imported_it_runs_its_new_code(tmp_path, monkeypatch, own_modules):
    """A Python session loads a factory model, the factory's file is edited, the model is loaded again:
    the new code runs under the new key (it was the old code, its embeddings stored under the new
    code's key, served later to a new process)."""
    (tmp_path / "mynet_s41.py").write_text(NET.format(imports="", act="torch.relu") + BUILD)
    monkeypatch.syspath_prepend(str(tmp_path))
    own_modules()
    w = _weights(tmp_path, "mynet_s41:build")
    own_modules()
    data = make_images(tmp_path / "d", n_per_class=2, size=8)
    load = LoadOptions(factory="mynet_s41:build", **PRE)
    rt = RuntimeOptions(cache_dir=str(tmp_path / "c"), progress=False)
    before = prepare(w, data, load, runtime=rt)
    assert not before.emb.from_cache
    src = (tmp_path / "mynet_s41.py").read_text().replace("torch.relu(", "torch.tanh(")
    (tmp_path / "mynet_s41.py").write_text(src)                       # no new process: the module stays
    after = prepare(w, data, load, runtime=rt)
    assert not after.emb.from_cache
    own_modules()
    truth = prepare(w, data, load, runtime=RuntimeOptions(use_cache=False, progress=False))
    assert not torch.allclose(truth.emb.X, before.emb.X)
    assert torch.equal(after.emb.X, truth.emb.X)
    own_modules()
    again = prepare(w, data, load, runtime=rt)                         # a new process, from the cache
    assert again.emb.from_cache and torch.equal(again.emb.X, truth.emb.X)


def test_a_helper_edited_after_this_process_imported_it_runs_its_new_code(tmp_path, monkeypatch, own_modules):
    """The same for a helper the network's module imports, that network imported when the factory is
    called: the first load's modules are followed, not only the factory's."""
    (tmp_path / "acts2_s41.py").write_text("import torch\ndef act(h):\n    return torch.relu(h)\n")
    (tmp_path / "netdef2_s41.py").write_text(NET.format(imports="from acts2_s41 import act", act="act"))
    (tmp_path / "lazyfac2_s41.py").write_text("def build():\n    from netdef2_s41 import Net\n    return Net()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    own_modules()
    w = _weights(tmp_path, "lazyfac2_s41:build")
    own_modules()
    x = torch.rand(4, 3, 8, 8)
    load = LoadOptions(factory="lazyfac2_s41:build", **PRE)
    a = load_model(w, load)
    (tmp_path / "acts2_s41.py").write_text("import torch\ndef act(h):\n    return torch.tanh(h) * 3\n")
    b = load_model(w, load)
    own_modules()
    truth = load_model(w, load)
    with torch.no_grad():
        assert not torch.allclose(a.model(x), truth.model(x))
        assert torch.equal(b.model(x), truth.model(x))
    assert b.network_id() == truth.network_id() != a.network_id()


def test_a_changed_file_that_cannot_be_imported_again_is_refused_naming_it(tmp_path, monkeypatch, own_modules):
    """Its new code no longer imports: exit 2 naming the module, never the old code under a new key."""
    from repair.errors import BadInput

    (tmp_path / "broken_s41.py").write_text(NET.format(imports="", act="torch.relu") + BUILD)
    monkeypatch.syspath_prepend(str(tmp_path))
    own_modules()
    w = _weights(tmp_path, "broken_s41:build")
    own_modules()
    load = LoadOptions(factory="broken_s41:build", **PRE)
    load_model(w, load)
    (tmp_path / "broken_s41.py").write_text("this is not python\n")
    with pytest.raises(BadInput, match="broken_s41"):
        load_model(w, load)


def test_a_helper_another_factory_imported_before_its_edit_is_imported_again(tmp_path, monkeypatch, own_modules):
    """A helper imported by one factory's load, then edited, then imported by another factory's module
    (Python hands it the old module): the new code runs, under its key."""
    (tmp_path / "acts3_s41.py").write_text("import torch\ndef act(h):\n    return torch.relu(h)\n")
    for name in ("fac3a_s41", "fac3b_s41"):
        (tmp_path / f"{name}.py").write_text(NET.format(imports="from acts3_s41 import act", act="act") + BUILD)
    monkeypatch.syspath_prepend(str(tmp_path))
    own_modules()
    w = _weights(tmp_path, "fac3a_s41:build")
    own_modules()
    x = torch.rand(4, 3, 8, 8)
    a = load_model(w, LoadOptions(factory="fac3a_s41:build", **PRE))
    (tmp_path / "acts3_s41.py").write_text("import torch\ndef act(h):\n    return torch.tanh(h) * 3\n")
    b = load_model(w, LoadOptions(factory="fac3b_s41:build", **PRE))
    own_modules()
    truth = load_model(w, LoadOptions(factory="fac3b_s41:build", **PRE))
    with torch.no_grad():
        assert not torch.allclose(a.model(x), truth.model(x))
        assert torch.equal(b.model(x), truth.model(x))
    assert b.network_id() == truth.network_id()
