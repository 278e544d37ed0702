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
    X, y = torch.randn(300, 8, generator=g), torch.arange(300) % 3
    W = torch.randn(3, 8, generator=g)
    W[:, 5] = 0                                         # neuron 5 does not move the predictions...
    wrong = (X @ W.T).argmax(1) != y
    X[wrong, 5] += 3.0                                  # ...but sits high in every misclassified sample
    rep = probe(X, y, W, torch.zeros(3), ["a", "b", "c"], top_k=100000)
    top = rep["top_spurious_neurons"]
    assert top and all(t["delta"] > 0 for t in top) and len(top) < 24         # some neurons are not spurious
    assert {t["neuron"] for t in top} >= {5}
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


def test_a_yes_no_option_is_true_or_false_never_any_truthy_value(tmp_path):
    """Found by an audit: ``FixOptions(allow_plugins="no")`` ran a recipe's plugin code and ``force="no"``
    replaced an output (a string is truthy). Every yes/no option and argument has one check."""
    import repair
    from repair.adapters import LoadOptions
    from repair.data import DataOptions
    from repair.pipeline import FixOptions
    from repair.runtime import RuntimeOptions

    makers = [(lambda v: FixOptions(allow_plugins=v), "--allow-plugins"), (lambda v: FixOptions(force=v), "--force"),
              (lambda v: FixOptions(allow_finetune=v), "--allow-finetune"),
              (lambda v: LoadOptions(allow_pickle=v), "--allow-pickle"),
              (lambda v: RuntimeOptions(use_cache=v), "use_cache"), (lambda v: RuntimeOptions(progress=v), "progress"),
              (lambda v: DataOptions(allow_outside_paths=v), "--allow-outside-paths")]
    for make, flag in makers:
        for bad in ("no", "false", 0, 1, None):
            with pytest.raises(BadInput, match=re.escape(flag) + r".* must be true or false, got " + re.escape(repr(bad))):
                make(bad)
        make(True), make(False)
    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=4)
    (tmp_path / "mark.py").write_text("from pathlib import Path\nPath(__file__).with_name('RAN').write_text('x')\n")
    (tmp_path / "r.yaml").write_text("plugins: [mark.py]\ncandidates:\n  - method: dfr\n")
    with pytest.raises(BadInput, match="--allow-plugins must be true or false"):
        repair.fix(m, data, tmp_path / "o", options=FixOptions(recipe=str(tmp_path / "r.yaml"), allow_plugins="no"))
    assert not (tmp_path / "RAN").exists() and not (tmp_path / "o").exists()
    (tmp_path / "x.onnx").write_bytes(b"theirs")
    with pytest.raises(BadInput, match="--force must be true or false"):
        repair.export_model(m, tmp_path / "x.onnx", data=data, force="no")
    a = repair.load_model(m)
    with pytest.raises(BadInput, match="--force must be true or false"):
        repair.export_onnx(a, tmp_path / "x.onnx", metadata={}, verify_items=[data / "cat" / "000.png"], force="no")
    assert (tmp_path / "x.onnx").read_bytes() == b"theirs"


def test_export_onnx_never_replaces_the_model_it_exports(tmp_path):
    """Found by an audit: ``repair.export_onnx(adapter, its own file, force=True)`` overwrote its input model
    (the CLI refuses it: the Protected rule of export_model); a path for the model was an AttributeError."""
    import hashlib

    import repair
    from conftest import make_deployed_onnx
    from repair.adapters import LoadOptions
    from repair.data import DataOptions, load_data

    p, _ = make_deployed_onnx(tmp_path / "dep.onnx")
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    a = repair.load_model(p, LoadOptions(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3))
    items = load_data(make_images(tmp_path / "d", n_per_class=2), DataOptions()).items[:4]
    W, b = a.head_params()
    a.set_head(W * 0, b)                                   # a change in memory: the export would differ
    with pytest.raises(BadInput, match="would overwrite the input model"):
        repair.export_onnx(a, p, metadata={}, verify_items=items, force=True)
    assert hashlib.sha256(p.read_bytes()).hexdigest() == digest
    m = make_timm_folder(tmp_path / "m")
    with pytest.raises(BadInput, match="inside the input model"):
        repair.export_onnx(repair.load_model(m), m / "x.onnx", metadata={}, verify_items=items, force=True)
    assert not (m / "x.onnx").exists()
    with pytest.raises(BadInput, match=re.escape("a model already loaded (repair.load_model(path))")):
        repair.export_onnx(str(p), tmp_path / "y.onnx", metadata={}, verify_items=items)
    rep = repair.export_onnx(a, tmp_path / "y.onnx", metadata={}, verify_items=items)
    assert rep["passed"]


def test_a_safetensors_export_names_the_weights_it_leaves_out_without_a_log(tmp_path, capsys):
    """Found by an audit: ``export_model(format="safetensors")`` of a folder holding another format's weights
    (a Hub folder's tf_model.h5) was a TypeError with the default ``log=None``; the notice goes to stderr."""
    import repair

    m = make_timm_folder(tmp_path / "m")
    (m / "tf_model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    capsys.readouterr()
    rep = repair.export_model(m, tmp_path / "out", format="safetensors")
    assert rep["passed"] and not (tmp_path / "out" / "tf_model.h5").exists()
    assert "tf_model.h5" in capsys.readouterr().err


def test_fix_takes_eval_data_already_read(tmp_path):
    """Found by an audit: ``fix(eval_data=<RepairData>)`` was "data not found" with the whole repr (the
    argument was made a str); a clash with ``options.eval_data`` is one short line."""
    import repair
    from repair.data import DataOptions, load_data
    from repair.pipeline import FixOptions
    from repair.runtime import RuntimeOptions

    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=8, seed=1)
    held = load_data(make_images(tmp_path / "t", n_per_class=4, seed=2), DataOptions(group_by="place"))
    quiet = RuntimeOptions(progress=False)
    res = repair.fix(m, data, tmp_path / "o", recipe="dfr", group_by="place", eval_data=held, runtime=quiet)
    assert res["after"]["n"] == len(held.items) == 12
    res = repair.fix(m, data, tmp_path / "o2", eval_data=held, runtime=quiet,
                     options=FixOptions(recipe="dfr", eval_data=held))            # the same data: no clash
    assert res["after"]["n"] == 12
    with pytest.raises(BadInput) as e:
        repair.fix(m, data, tmp_path / "o3", eval_data=held, options=FixOptions(recipe="dfr", eval_data=str(data)))
    assert "eval_data" in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 400
    assert not (tmp_path / "o3").exists()


def test_a_group_by_argument_never_silently_overrides_data_options(tmp_path):
    """Found by an audit: ``group_by`` silently overrode ``data_options.group_by`` in evaluate and fix
    while fix refused such a clash of recipe / seed / eval_data (one rule now)."""
    import repair
    from repair.data import DataOptions
    from repair.runtime import RuntimeOptions

    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=8, seed=1)
    quiet = RuntimeOptions(progress=False)
    for verb, call in (("repair.evaluate", lambda **kw: repair.evaluate(m, data, runtime=quiet, **kw)),
                       ("repair.fix", lambda **kw: repair.fix(m, data, tmp_path / "o4", recipe="dfr", runtime=quiet,
                                                              **kw))):
        for opts in (DataOptions(group_by="y"), DataOptions(label_col="y")):
            with pytest.raises(BadInput, match=re.escape(f"{verb}: group_by given both as an argument and in "
                                                         "data_options (DataOptions)")):
                call(group_by="place", data_options=opts)
    assert not (tmp_path / "o4").exists()
    r = repair.evaluate(m, data, group_by="place", data_options=DataOptions(group_by="place"), runtime=quiet)
    assert r["data"]["group_by"] == "place"
    assert repair.evaluate(m, data, data_options=DataOptions(group_by="place"), runtime=quiet)["data"]["group_by"] == "place"


def test_loading_a_text_model_leaves_the_callers_environment_and_reaches_no_network(tmp_path):
    """Found by an audit: a library load_model of a transformers folder left HF_HUB_OFFLINE=1 /
    TRANSFORMERS_OFFLINE=1 in os.environ for the rest of the caller's process. Reading stays offline
    (every from_pretrained is local_files_only, checked here with the sockets refused); the command line
    sets the variables for its own process."""
    import subprocess

    from conftest import make_bert_folder

    bert = make_bert_folder(tmp_path / "bert")
    script = (
        "import os, socket, json\n"
        "tried = []\n"
        "def refuse(*a, **k):\n"
        "    tried.append(repr(a)[:80]); raise OSError('no network in this test')\n"
        "socket.socket.connect = socket.getaddrinfo = socket.create_connection = refuse\n"
        "before = dict(os.environ)\n"
        "import repair\n"
        f"a = repair.load_model({str(bert)!r})\n"
        "print(json.dumps({'family': a.family, 'changed': sorted(k for k in set(before) | set(os.environ)\n"
        "                  if before.get(k) != os.environ.get(k)), 'tried': tried}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    import json

    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"family": "transformers", "changed": [], "tried": []}, got


def test_the_command_line_process_is_offline(monkeypatch):
    from repair_cli import main as cli_main

    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(sys, "argv", ["repair", "--help"])
    with pytest.raises(SystemExit):
        cli_main.main()
    assert os.environ.get("HF_HUB_OFFLINE") == "1" and os.environ.get("TRANSFORMERS_OFFLINE") == "1"
