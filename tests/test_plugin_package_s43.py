"""A plugin package is every ``.py`` file under its folder (session 43's code-execution audit): a module
of it that is a link out of the recipe's folder ran (only the package's ``__init__.py`` was checked) and
was left out of the recorded digest, and a zoo resumed a row whose package module had changed."""
from __future__ import annotations

import json
import os

import pytest

from conftest import make_images, make_timm_folder, run_cli
from test_plugins import HEAD_PLUGIN


def _package(rec, method, helper_text=None):
    (rec / "pkg").mkdir(parents=True)
    (rec / "pkg" / "__init__.py").write_text("from . import helper\n")
    if helper_text is not None:
        (rec / "pkg" / "helper.py").write_text(helper_text)
    (rec / "r.yaml").write_text(f"name: pkg43\nplugins: [pkg]\ncandidates:\n  - method: {method}\n")
    return rec / "r.yaml"


def test_a_package_module_linked_out_of_the_recipes_folder_is_refused_before_it_runs(tmp_path):
    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=3)
    outside = tmp_path / "outside"
    outside.mkdir()
    marker = tmp_path / "ran"
    (outside / "helper.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                       + HEAD_PLUGIN.replace("balanced_lr", "balanced_lr_s43out"))
    recipe = _package(tmp_path / "rec", "balanced_lr_s43out")
    os.symlink(outside / "helper.py", tmp_path / "rec" / "pkg" / "helper.py")
    code, out, err = run_cli("fix", m, "--data", data, "--recipe", recipe, "--allow-plugins", "--out", tmp_path / "o",
                             "-q")
    assert code == 2, err
    assert "helper.py" in err and "leads out of the recipe's folder" in err
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_every_module_of_a_package_is_in_its_digest_and_its_files(tmp_path):
    from repair.recipes import load_recipe

    recipe = _package(tmp_path / "rec", "balanced_lr_s43dig", HEAD_PLUGIN.replace("balanced_lr", "balanced_lr_s43dig"))
    first = load_recipe(str(recipe), validate_only=True)
    assert (tmp_path / "rec" / "pkg" / "helper.py").resolve() in first.files
    (tmp_path / "rec" / "pkg" / "helper.py").write_text(
        HEAD_PLUGIN.replace("balanced_lr", "balanced_lr_s43dig").replace("setting(1.0", "setting(50.0"))
    assert load_recipe(str(recipe), validate_only=True).digests[1] != first.digests[1]


def test_a_zoo_runs_again_a_row_whose_plugin_package_module_changed(tmp_path):
    make_timm_folder(tmp_path / "timm")
    make_images(tmp_path / "images", n_per_class=3)
    text = HEAD_PLUGIN.replace("balanced_lr", "balanced_lr_s43zoo")
    _package(tmp_path / "rec", "balanced_lr_s43zoo", text)
    manifest = tmp_path / "zoo.yaml"
    manifest.write_text("models:\n  - {name: a, checkpoint: timm, data: images, recipe: rec/r.yaml}\n")
    code, out, err = run_cli("zoo", manifest, "--allow-plugins", "--json", "-q")
    assert code == 0, err
    code, out, err = run_cli("zoo", manifest, "--allow-plugins", "--json", "-q")
    assert code == 0 and json.loads(out)["models"][0]["resumed"], err          # nothing changed: resumed
    (tmp_path / "rec" / "pkg" / "helper.py").write_text(text.replace("setting(1.0", "setting(50.0"))
    code, out, err = run_cli("zoo", manifest, "--allow-plugins", "--json", "-q")
    assert code == 0, err
    assert not json.loads(out)["models"][0]["resumed"]


def _bert_onnx(tmp_path, onnx_path):
    """A tiny BERT folder (``tmp_path / "bert"``, returned) and its logits exported to ``onnx_path``."""
    import torch
    import transformers
    from conftest import bert_onnx, make_bert_folder

    b = make_bert_folder(tmp_path / "bert")
    m = transformers.BertForSequenceClassification.from_pretrained(str(b)).eval()
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(1, 12, dtype=torch.long)
    bert_onnx(m, onnx_path, (ids, torch.ones_like(ids), torch.zeros_like(ids)), dynamic_batch=True)
    return b


def test_a_text_onnx_models_tokenizer_file_linked_outside_is_refused_before_any_is_read(tmp_path, monkeypatch):
    """(the same audit) a file a tokenizer class reads by a name of its own (PhoBERT's ``bpe.codes``) was
    checked only after the tokenizer had read it through the link."""
    import transformers
    from conftest import WORDS
    from repair.adapters import load_model
    from repair.errors import BadInput

    folder = tmp_path / "m"
    _bert_onnx(tmp_path, folder / "model.onnx")

    (folder / "vocab.txt").write_text("".join(f"{w} 1\n" for w in WORDS[:10]))      # PhoBERT's format
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "PhobertTokenizer", "model_max_length": 12}')
    (tmp_path / "outside.codes").write_text("g o 1\n")
    os.symlink(tmp_path / "outside.codes", folder / "bpe.codes")
    calls = []
    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    try:
        load_model(folder / "model.onnx")
    except BadInput as e:
        assert "bpe.codes" in str(e) and "leads outside" in str(e)
    else:
        raise AssertionError("a link out of the model's folder was read")
    assert calls == []


def test_files_beside_a_text_onnx_model_that_its_tokenizer_does_not_read_may_be_links(tmp_path):
    """(the session's review) the check before the tokenizer reads leaves out the model file and Markdown:
    the model file itself as a link, or a README linked beside it, still load."""
    import shutil

    from repair.adapters import load_model

    store = tmp_path / "store"
    b = _bert_onnx(tmp_path, store / "model.onnx")
    f = tmp_path / "f"
    f.mkdir()
    for n in ("vocab.txt", "tokenizer_config.json", "config.json"):
        if (b / n).exists():
            shutil.copy(b / n, f / n)
    os.symlink(store / "model.onnx", f / "model.onnx")
    (tmp_path / "notes.txt").write_text("x")
    os.symlink(tmp_path / "notes.txt", f / "README.md")
    assert load_model(f / "model.onnx").modality == "text"


def test_a_packages_pycache_that_leads_out_is_refused_before_anything_runs(tmp_path):
    """(the session's second and third reviews) a package's __pycache__ linked out of the recipe's folder held
    bytecode matching its source's time and size: Python ran that bytecode, code outside the recipe's
    folder (also when a method imports the module lazily, at call time)."""
    import py_compile

    from repair.errors import BadInput
    from repair.recipes import load_recipe

    rec, out = tmp_path / "rec", tmp_path / "outside"
    (rec / "pkg").mkdir(parents=True)
    out.mkdir()
    marker = tmp_path / "ran_outside_code"
    evil = f"open({str(marker)!r}, 'w')\n"
    good = "X = 1\n"
    good = good + "#" * (len(evil) - len(good) - 1) + "\n"
    (rec / "pkg" / "__init__.py").write_text("def later():\n    from . import helper\n")      # a lazy import
    (rec / "pkg" / "helper.py").write_text(good)
    (out / "helper.py").write_text(evil)
    st = os.stat(rec / "pkg" / "helper.py")
    os.utime(out / "helper.py", ns=(st.st_atime_ns, st.st_mtime_ns))
    py_compile.compile(str(out / "helper.py"))
    os.remove(out / "helper.py")
    os.symlink(out / "__pycache__", rec / "pkg" / "__pycache__")
    (rec / "r.yaml").write_text("name: pyc43\nplugins: [pkg]\ncandidates:\n  - method: dfr\n")
    with pytest.raises(BadInput, match="__pycache__"):
        load_recipe(str(rec / "r.yaml"), allow_plugins=True)
    assert not marker.exists()


def test_every_top_level_file_a_tokenizer_may_read_is_checked_first(tmp_path, monkeypatch):
    """(the session's second review) the class a tokenizer is built as, and the files it reads, are
    transformers' to decide (config.json's tokenizer_class, a versioned fast tokenizer file): a link out
    named for any of them is refused before transformers reads anything."""
    import transformers
    from conftest import make_bert_folder
    from repair.adapters.text import load_tokenizer
    from repair.errors import BadInput

    calls = []
    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    (tmp_path / "outside.json").write_text("{}")
    for name in ("tokenizer.4.0.0.json", "bpe.codes"):
        b = make_bert_folder(tmp_path / name)
        cfg = json.loads((b / "tokenizer_config.json").read_text())
        cfg["fast_tokenizer_files"] = ["tokenizer.4.0.0.json"]
        (b / "tokenizer_config.json").write_text(json.dumps(cfg))
        os.symlink(tmp_path / "outside.json", b / name)
        try:
            load_tokenizer(b, "no tokenizer")
        except BadInput as e:
            assert name in str(e) and "leads outside" in str(e)
        else:
            raise AssertionError(f"{name}: a link out of the folder was read")
    assert calls == []
