"""The library as a Python user calls it: nothing of the caller's changed (sys.path, a module's mode,
an adapter's settings), an argument never dropped silently, bad arrays refused by name."""
from __future__ import annotations

import os
import re
import sys

import pytest
import torch
from conftest import make_images, make_timm_folder
from repair.errors import BadInput
from repair.methods import RepairInputs, get_method


def test_a_factory_leaves_sys_path_as_it_was(tmp_path, monkeypatch):
    (tmp_path / "facmod_path.py").write_text(
        "from torch import nn\n"
        "def net():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4), nn.ReLU(), nn.Linear(4, 3))\n")
    (tmp_path / "repair_shadow_probe.py").write_text("raise ImportError('came from the current folder')\n")
    sys.modules.pop("facmod_path", None)
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    from repair.adapters import LoadOptions, load_model
    from safetensors.torch import save_file

    sys.path.insert(0, str(tmp_path))
    import facmod_path
    sys.path.remove(str(tmp_path))
    save_file(facmod_path.net().state_dict(), str(tmp_path / "w.safetensors"))
    sys.modules.pop("facmod_path", None)
    before = list(sys.path)
    a = load_model(tmp_path / "w.safetensors", LoadOptions(factory="facmod_path:net", image_size=8,
                                                          mean=(0.5,) * 3, std=(0.5,) * 3))
    assert a.family == "torch"
    assert sys.path == before
    with pytest.raises(ModuleNotFoundError):      # a later import never finds a file of the current folder
        __import__("repair_shadow_probe")


def test_export_leaves_the_callers_module_and_adapter_as_given(tmp_path):
    import repair

    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=2)
    ad = repair.load_model(m)
    ad.model.train()
    ad.model.get_submodule(ad.head_name).eval()     # a mixed state is kept too
    ad.max_pixels = 12345678
    rep = repair.export_model(ad, tmp_path / "a.onnx", data=data, max_verify=4)
    assert rep["passed"]
    assert ad.model.training and not ad.model.get_submodule(ad.head_name).training
    assert ad.max_pixels == 12345678
    with pytest.raises(BadInput):
        repair.export_model(ad, tmp_path / "b.onnx", data=data, device="bogus")


def test_fix_never_drops_an_argument_that_contradicts_its_options(tmp_path):
    import repair
    from repair.pipeline import FixOptions

    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=4)
    with pytest.raises(BadInput) as e:
        repair.fix(m, data, tmp_path / "o", recipe="nsf", options=FixOptions(recipe="dfr"))
    assert "recipe" in str(e.value)
    with pytest.raises(BadInput) as e:
        repair.fix(m, data, tmp_path / "o", seed=5, options=FixOptions(recipe="dfr"))
    assert "seed" in str(e.value)
    assert not (tmp_path / "o").exists()


def _inputs(**kw):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, generator=g)
    base = dict(X=X, y=torch.arange(40) % 2, W=torch.randn(2, 6, generator=g), b=torch.zeros(2),
                groups=torch.arange(40) % 4)
    base.update(kw)
    return RepairInputs(**base)


@pytest.mark.parametrize("method", ["dfr", "afr", "mix", "nsf", "neurontune"])
def test_head_repairs_refuse_unusable_arrays_by_name(method):
    import numpy as np

    info = get_method(method)
    bad = {
        "numpy X": dict(X=np.zeros((40, 6), dtype=np.float32)),
        "X wider than W": dict(X=torch.randn(40, 7)),
        "a label out of range": dict(y=torch.tensor([0, 1] * 19 + [0, 5])),
        "a negative label": dict(y=torch.tensor([0, 1] * 19 + [0, -1])),
        "NaN in X": dict(X=torch.where(torch.arange(240).reshape(40, 6) == 7, float("nan"), torch.randn(40, 6))),
        "groups of another length": dict(groups=torch.arange(39) % 4),
        "a negative seed": dict(seed=-1),
    }
    for why, kw in bad.items():
        with pytest.raises(BadInput) as e:
            info(_inputs(**kw))
        assert method in str(e.value), why
    out = info(_inputs())                             # the sound inputs still repair
    assert out is not None


def test_fold_counts_and_seeds_have_one_check(tmp_path):
    import numpy as np
    from repair.pipeline import FixOptions

    with pytest.raises(BadInput) as e:
        FixOptions(selection_folds=1000)
    assert "selection_folds" in str(e.value) and "20" in str(e.value)
    assert FixOptions(seed=np.int64(3)).seed == 3 and type(FixOptions(seed=np.int64(3)).seed) is int


def test_a_plugin_that_exits_is_bad_input_not_success(tmp_path):
    from conftest import run_cli

    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=4)
    (tmp_path / "exit0.py").write_text("import sys\nsys.exit(0)\n")
    (tmp_path / "r.yaml").write_text("plugins: [exit0.py]\ncandidates: [{method: dfr}]\n")
    code, _, err = run_cli("fix", m, "--data", data, "--recipe", tmp_path / "r.yaml", "--allow-plugins",
                           "--out", tmp_path / "o", "-q")
    assert code == 2 and "SystemExit" in err and not (tmp_path / "o").exists()


def test_a_choice_no_comparison_could_make_says_so(tmp_path):
    import repair
    from repair.pipeline import FixOptions

    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=4)
    logs = []
    r = repair.fix(m, data, tmp_path / "o", options=FixOptions(recipe="auto", selection_folds=20), log=logs.append)
    assert r["selection_criterion"] is None                  # 9 fit samples: no 20 folds
    assert not any(" by " in l for l in logs if l.startswith("chosen:")), logs
    assert any("no candidate was compared" in w for w in r["warnings"])


def test_the_top_level_api_refuses_what_is_not_a_path_and_takes_a_loaded_model(tmp_path):
    import numpy as np
    import repair
    from repair.methods import list_methods
    from repair.recipes import load_recipe

    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=2)
    for bad in (None, 123, np.zeros(3)):
        with pytest.raises(BadInput):
            repair.evaluate(bad, data)
        with pytest.raises(BadInput):
            repair.evaluate(m, bad)
    by_path = repair.evaluate(m, data)
    by_adapter = repair.evaluate(repair.load_model(m), data)
    assert by_adapter["accuracy"] == by_path["accuracy"]
    with pytest.raises(BadInput):
        repair.probe(m, data, top_k=0)
    with pytest.raises(BadInput):
        list_methods("bogus")
    r = tmp_path / "r.yaml"
    r.write_text("candidates: [{method: mixft, params: {epochs: 1e-9}}]\n")
    with pytest.raises(BadInput) as e:
        load_recipe(r)
    assert "decimal point" in str(e.value)
    r.write_text("candidates: [{method: mixft, params: {settle: off}}]\n")       # YAML 1.1: off is false
    with pytest.raises(BadInput) as e:
        load_recipe(r)
    assert "got False" in str(e.value) and "quote the word" in str(e.value) and str(r) in str(e.value)
    r.write_text("candidates: [{method: mixft, params: {settle: 'off'}}]\n")
    assert load_recipe(r).candidates[0].config().settle == "off"


def test_the_library_refuses_what_is_not_an_argument_of_its_kind_by_name(tmp_path):
    """Found by an audit: a dict for options, a number for a path, None for a reference gave
    AttributeError / TypeError; a model loaded from a relative path broke after os.chdir."""
    import repair
    from repair.errors import BadInput

    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=4)
    cases = [(lambda: repair.fix(None, data, tmp_path / "o"), "the model must be a path"),
             (lambda: repair.fix(repair.load_model(m), data, tmp_path / "o"), "a model already loaded cannot"),
             (lambda: repair.fix(m, data, out=5), "the output (--out) must be a path"),
             (lambda: repair.fix(m, data, tmp_path / "o", options={"recipe": "dfr"}), "options must be a FixOptions"),
             (lambda: repair.evaluate(m, data, load_options={"image_size": 32}), "load_options must be a LoadOptions"),
             (lambda: repair.evaluate(m, data, runtime="cpu"), "runtime must be a RuntimeOptions"),
             (lambda: repair.export_model(m, 5, data=data), "the output (--out) must be a path"),
             (lambda: repair.verify_model(None, m, data), "the ONNX model must be a path"),
             (lambda: repair.export_model(m, tmp_path / "x.onnx", data=data, max_verify=0), "--max-verify")]
    for call, words in cases:
        with pytest.raises(BadInput, match=re.escape(words)):
            call()
    assert not (tmp_path / "o").exists() and not (tmp_path / "x.onnx").exists()
    here = os.getcwd()
    try:
        os.chdir(tmp_path)
        a = repair.load_model("m")
        os.chdir(data)
        assert repair.evaluate(a, data)["n"] == 12
    finally:
        os.chdir(here)


def test_probe_lists_only_spurious_neurons_and_a_recipes_criterion_says_whether_labels_were_given(tmp_path):
    import repair
    from conftest import run_cli

    from repair.probing import probe

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(90, 8, generator=g), torch.arange(90) % 3
    rep = probe(X, y, torch.randn(3, 8, generator=g), torch.zeros(3), ["a", "b", "c"], top_k=100000)
    top = rep["top_spurious_neurons"]
    assert top and all(t["delta"] > 0 for t in top) and len(top) < 24         # some neurons are not spurious
    assert len(top) == sum(c["spurious_neurons"] for c in rep["per_class"])
    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=8)
    (tmp_path / "wc.yaml").write_text("selection: worst_class\ncandidates:\n  - method: dfr\n  - method: afr\n")
    code, out, err = run_cli("fix", m, "--data", data, "--group-by", "place", "--recipe", tmp_path / "wc.yaml",
                             "--out", tmp_path / "o", "--json", "-q")
    assert code == 0, err
    import json
    crit = json.loads(out)["selection_criterion"]
    assert "group labels given, not used to select" in crit and "no group labels" not in crit, crit


def test_a_transformers_folder_naming_its_own_code_is_refused_even_when_stdin_says_yes(tmp_path):
    """Found by an audit: a folder whose config.json has an ``auto_map`` (classes from a Python file in
    the folder) made transformers ask on stdout "Do you wish to run the custom code? [y/N]"; `yes |
    repair eval` ran that file (and used its model). Now exit 2 naming config.json before transformers
    reads the folder, whatever stdin says, and nothing of the folder's code runs; the same for a
    tokenizer_config.json with one."""
    import json
    import subprocess
    import sys

    from conftest import make_bert_folder, make_texts

    marker = tmp_path / "ran"
    for name in ("config.json", "tokenizer_config.json"):
        folder = make_bert_folder(tmp_path / f"m-{name}")
        (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                          "from transformers import BertConfig\n"
                                          "class CustomConfig(BertConfig):\n    model_type = 'custom-x'\n")
        path = folder / name
        cfg = json.loads(path.read_text()) if path.exists() else {}
        cfg["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoTokenizer": ["custom.CustomConfig", None]}
        if name == "config.json":
            cfg["model_type"] = "custom-x"
        path.write_text(json.dumps(cfg))
        data = make_texts(tmp_path / "t.csv", n=12)
        r = subprocess.run([sys.executable, "-m", "repair_cli.main", "eval", str(folder), "--data", str(data), "--json"],
                           input="y\n" * 50, capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert r.returncode == 2 and "auto_map" in r.stderr and str(path) in r.stderr, (name, r.stdout, r.stderr)
        assert r.stdout == "" and not marker.exists(), (name, r.stdout)
