"""What a repair writes is what it measured and exported: a float16 checkpoint's repaired values are
the rounded ones in memory too, the state a loop restores holds BatchNorm's statistics with its
parameters, and the source's weights in another format never ship inside the repaired model."""
from __future__ import annotations

import json

import torch
from conftest import make_images, make_texts, make_timm_folder, run_cli
from repair.modelrepair.finetune import Budget, LoopConfig, train


def test_the_best_state_a_loop_restores_includes_the_running_statistics():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).train()
    bn = net[1]
    X = torch.randn(32, 4) * 3 + 5
    start = (bn.running_mean.clone(), bn.running_var.clone())
    scores = iter([0.9] + [0.1] * 20)            # the start is the best evaluation

    def step(i, gen):
        return net(X).pow(2).mean()

    def evaluate():
        return next(scores), 0.5

    cfg = LoopConfig(lr=0.1, eval_every=1, patience=0, warmup_fraction=0.0, schedule="constant", clip_norm=0)
    res = train(list(net[0].parameters()), step, evaluate, cfg, steps_per_epoch=1, budget=Budget(steps=4),
                progress=False, buffers=[bn.running_mean, bn.running_var, bn.num_batches_tracked])
    assert res.best_step == 0
    assert torch.equal(bn.running_mean, start[0]) and torch.equal(bn.running_var, start[1])
    assert int(bn.num_batches_tracked) == 0


def test_a_soup_averages_the_running_statistics_too():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).train()
    bn = net[1]
    X = torch.randn(32, 4) * 3 + 5

    def step(i, gen):
        return net(X + torch.randn(X.shape, generator=gen)).pow(2).mean()

    cfg = LoopConfig(lr=0.1, warmup_fraction=0.0, schedule="constant", clip_norm=0, members=2, keep="last")
    train(list(net[0].parameters()), step, None, cfg, steps_per_epoch=2, budget=Budget(steps=2), progress=False,
          buffers=[bn.running_mean, bn.running_var, bn.num_batches_tracked])
    assert int(bn.num_batches_tracked) == 2 and torch.isfinite(bn.running_var).all()


def test_a_float16_checkpoint_is_measured_as_written(tmp_path):
    import repair
    from safetensors.torch import load_file, save_file

    m = make_timm_folder(tmp_path / "m")
    t = load_file(str(m / "model.safetensors"))
    save_file({k: (v.half() if v.is_floating_point() else v) for k, v in t.items()}, str(m / "model.safetensors"))
    data = make_images(tmp_path / "d", n_per_class=8)
    r = repair.fix(m, data, tmp_path / "o", recipe="dfr")
    W, b = r.adapter.head_params()
    written = load_file(str(tmp_path / "o" / "model.safetensors"))
    head = r.adapter.head_name
    assert written[f"{head}.weight"].dtype == torch.float16
    assert torch.equal(W, written[f"{head}.weight"].float()) and torch.equal(b, written[f"{head}.bias"].float())


def test_the_sources_weights_in_another_format_are_not_shipped(tmp_path):
    m = make_timm_folder(tmp_path / "m")
    (m / "pytorch_model.bin").write_bytes(b"the original weights, pickled")
    (m / "model.onnx").write_bytes(b"an export of the original")
    (m / "notes.txt").write_text("kept")
    data = make_images(tmp_path / "d", n_per_class=4)
    code, out, err = run_cli("fix", m, "--data", data, "--recipe", "dfr", "--out", tmp_path / "o", "--json", "-q")
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert "pytorch_model.bin" not in names and "model.onnx" not in names and "notes.txt" in names
    assert json.loads(out)["output"]
    # the other frameworks' files a Hub folder ships beside the safetensors (a TF or Rust loader reads
    # its own and would get the unrepaired model), an OpenVINO pair, a folder holding only an export:
    # left out, and the run names them in a notice (-q keeps it); any other file is copied
    others = ["tf_model.h5", "flax_model.msgpack", "rust_model.ot", "model.gguf", "model.tflite",
              "ckpt/model.ckpt.index", "ckpt/model.ckpt.data-00000-of-00001", "vino/openvino_model.xml",
              "vino/openvino_model.bin", "onnx/model_quantized.onnx", "weights.npz"]
    for rel in others + ["docs/model.xml", "docs/card.md"]:
        (m / rel).parent.mkdir(parents=True, exist_ok=True)
        (m / rel).write_bytes(b"the original weights in another format")
    code, out, err = run_cli("fix", m, "--data", data, "--recipe", "dfr", "--out", tmp_path / "o2", "-q")
    assert code == 0, err
    o2 = tmp_path / "o2"
    kept = sorted(p.relative_to(o2).as_posix() for p in o2.rglob("*"))
    assert not any(rel in kept for rel in others) and not {"onnx", "ckpt", "vino"} & set(kept), kept
    assert {"notes.txt", "docs/model.xml", "docs/card.md", "model.safetensors"} <= set(kept), kept
    notice = [line for line in err.splitlines() if line.startswith("notice: left out of the output folder")]
    assert len(notice) == 1 and "flax_model.msgpack" in notice[0] and "the source's weights" in notice[0], err


def test_model_repair_settings_that_cannot_run_are_bad_input(tmp_path):
    import pytest
    from repair.errors import BadInput
    from repair.recipes import load_recipe

    for method, params in (("mixft", {"scope": "last:abc"}), ("mixft", {"scope": "last:0"}),
                           ("clp", {"scope": "names:["}), ("finetune", {"scope": "last:-1"}),
                           ("clp", {"settle_alphas": []}), ("recompose", {"scope": "names:("}),
                           # settings another setting makes do nothing (an audit: they were recorded as if used)
                           ("mixft", {"lora_rank": 4}), ("mixft", {"n_clusters": 3}),
                           ("mixft", {"settle_alphas": [1.0], "settle": "off"}),
                           ("mixft", {"settle_strength": "average", "settle": "interpolate"}),
                           ("clp", {"meta_lr": 0.01, "meta": False}),
                           # clp's meta images and its saliency term's sample count, where they are off
                           ("clp", {"infill": "shuffle", "meta": False}), ("clp", {"factual": False, "meta": False}),
                           ("clp", {"counterfactual_weight": 3.0, "meta": False}), ("clp", {"saliency_batch": 4})):
        r = tmp_path / f"r-{method}.yaml"
        r.write_text(json.dumps({"candidates": [{"method": method, "params": params}]}))
        with pytest.raises(BadInput) as e:
            load_recipe(r)
        assert str(r) in str(e.value) and next(iter(params)) in str(e.value), (method, params, str(e.value))
    # a default restated (a recipe listing every setting, as the built-in mixft.yaml does) is not refused
    r = tmp_path / "restated.yaml"
    r.write_text(json.dumps({"candidates": [{"method": "mixft", "params": {"lora": False, "lora_rank": 8,
                                                                          "inferred": "errors", "n_clusters": 2}}]}))
    load_recipe(r)


def test_a_scope_matching_nothing_and_a_grouped_criterion_without_groups_are_exit_2(tmp_path):
    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=6)
    for params, words in (({"scope": "names:zzz_nothing"}, "matches no parameter"),
                          ({"selection": "worst_group"}, "needs group labels")):
        r = tmp_path / "r.yaml"
        r.write_text(json.dumps({"candidates": [{"method": "mixft", "params": params}]}))
        code, _, err = run_cli("fix", m, "--data", data, "--recipe", r, "--budget", "2steps",
                               "--out", tmp_path / "o", "-q")
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and words in errors[0], err
        assert not (tmp_path / "o").exists()


def test_a_training_batch_is_bounded(tmp_path):
    import pytest
    from repair.errors import BadInput
    from repair.recipes import load_recipe

    for method, key in (("mixft", "batch_size"), ("clp", "meta_batch_size")):
        r = tmp_path / f"{method}.yaml"
        r.write_text(json.dumps({"candidates": [{"method": method, "params": {key: 100_000}}]}))
        with pytest.raises(BadInput) as e:
            load_recipe(r)
        assert key in str(e.value)


def test_a_budget_of_one_unit_twice_is_its_smaller_limit():
    assert Budget.parse("5steps,10steps").steps == 5
    assert Budget.parse("10min,90s").seconds == 90


def test_provenance_says_what_shaped_the_model_and_nothing_that_did_not(tmp_path):
    from repair.io import load_safetensors

    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=6)
    code, out, err = run_cli("fix", m, "--data", data, "--recipe", "dfr", "--budget", "5s",
                             "--out", tmp_path / "h", "--json", "-q")
    assert code == 0, err
    _, meta = load_safetensors(tmp_path / "h" / "model.safetensors")
    assert json.loads(meta["repair.model_change"])["budget"] is None        # a head trained nothing
    # the data by content, never by path; the code by its sources (its version string never changes)
    settings, code_ = json.loads(meta["repair.settings"]), json.loads(meta["repair.code"])
    assert settings == json.loads(out)["settings"] and code_ == json.loads(out)["code"]
    assert settings["data"]["n"] == 18 and settings["data"]["group_by"] is None and settings["eval"] is None
    assert len(code_["sources_sha256"]) == 64 and code_["torch"]
    # a head's last digits depend on the thread count too (BLAS splits the fits' sums): recorded
    assert settings["device"] == "cpu" and settings["threads"] == torch.get_num_threads()
    assert settings["batch_size"] == 64             # and the embeddings' last bits on the batch size
    assert str(data) not in meta["repair.settings"]
    import shutil

    shutil.copytree(data, tmp_path / "d2")
    code, out2, err = run_cli("fix", m, "--data", tmp_path / "d2", "--recipe", "dfr", "--group-by", "place",
                              "--eval", data, "--out", tmp_path / "h2", "--json", "-q")
    assert code == 2, err            # --eval is a copy of the repair data: refused, as ever
    code, out2, err = run_cli("fix", m, "--data", tmp_path / "d2", "--recipe", "dfr", "--out", tmp_path / "h2",
                              "--batch-size", "5", "--json", "-q")
    assert code == 0, err
    assert json.loads(out2)["settings"]["data"] == settings["data"]        # another folder, the same data
    assert json.loads(out2)["settings"]["batch_size"] == 5
    code, out3, err = run_cli("fix", m, "--data", tmp_path / "d2", "--recipe", "dfr", "--group-by", "place",
                              "--out", tmp_path / "h3", "--json", "-q")
    assert code == 0, err
    d3 = json.loads(out3)["settings"]["data"]
    assert d3["group_by"] == "place" and d3["content_sha256"] != settings["data"]["content_sha256"]  # groups in it
    train = make_images(tmp_path / "t", n_per_class=4, seed=3)
    code, out, err = run_cli("fix", m, "--data", data, "--train", train, "--recipe", "clp", "--budget", "2steps",
                             "--out", tmp_path / "c", "--json", "-q")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["kind"] == "model"
    _, meta = load_safetensors(tmp_path / "c" / "model.safetensors")
    mc = json.loads(meta["repair.model_change"])
    assert mc["train"] == str(train) and "settle" in mc and mc["budget"]["steps"] == 2
    settings = json.loads(meta["repair.settings"])       # a trained network: where, and on how many threads
    assert settings["device"] == "cpu" and isinstance(settings["threads"], int) and settings["threads"] >= 1


def test_a_float16_checkpoint_head_repair_exports_and_verifies(tmp_path):
    from safetensors.torch import load_file, save_file

    m = make_timm_folder(tmp_path / "m", arch="resnet18")      # 512 features: rounding shows in the logits
    t = load_file(str(m / "model.safetensors"))
    save_file({k: (v.half() if v.is_floating_point() else v) for k, v in t.items()}, str(m / "model.safetensors"))
    data = make_images(tmp_path / "d", n_per_class=8)
    code, out, err = run_cli("fix", m, "--data", data, "--recipe", "dfr", "--export", "onnx",
                             "--out", tmp_path / "o", "--json", "-q")
    assert code == 0, err
    code, _, err = run_cli("verify", tmp_path / "o" / "model.onnx", "--reference", tmp_path / "o", "--data", data, "-q")
    assert code == 0, err


def test_a_given_truncation_length_travels_with_the_written_model(tmp_path, bert_folder, text_data):
    """Found by an audit: `fix --max-length 4` measured its figures on texts cut to 4 tokens, but nothing
    recorded the length and the written folder's tokenizer kept its own, so the model a user reloads
    (plain transformers, a later `repair eval`, its ONNX export) read longer texts than the figures'.
    Now the provenance says how the model read the data, the written tokenizer truncates as measured,
    and an ONNX export carries the length for a later load; the source folder is untouched."""
    import hashlib

    import onnx
    from transformers import AutoTokenizer

    from repair.adapters import load_model

    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in bert_folder.iterdir() if p.is_file()}
    out = tmp_path / "o"
    code, so, err = run_cli("fix", bert_folder, "--data", text_data, "--recipe", "dfr", "--max-length", "4",
                            "--out", out, "--export", "onnx", "--json", "-q", "--no-cache")
    assert code == 0, err
    rep = json.loads(so)
    assert rep["settings"]["preprocess"]["max_length"] == 4
    assert AutoTokenizer.from_pretrained(out).model_max_length == 4
    assert load_model(out).max_length == 4
    onnx_file = next(out.glob("*.onnx"))
    assert {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}["max_length"] == "4"
    assert load_model(onnx_file).max_length == 4
    other = make_texts(tmp_path / "other.csv", n=30, seed=12)     # not the repair set (that is refused)
    code, so2, err = run_cli("eval", out, "--data", other, "--json", "-q", "--no-cache")
    code4, so4, err4 = run_cli("eval", out, "--data", other, "--max-length", "4", "--json", "-q", "--no-cache")
    assert code == code4 == 0 and json.loads(so2)["per_class"] == json.loads(so4)["per_class"], err + err4
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in bert_folder.iterdir() if p.is_file()}
    # without --max-length the written tokenizer still truncates as the figures were measured: this
    # tokenizer has no limit of its own (read at the model's 64 positions), so the length is written
    # (found by an audit: plain transformers read longer texts than the figures, or failed past the
    # positions); every other setting of the file is the source's
    out2 = tmp_path / "o2"
    code, out, err = run_cli("fix", bert_folder, "--data", text_data, "--recipe", "dfr", "--out", out2, "-q",
                             "--no-cache", "--json")
    assert code == 0, err
    used = json.loads(out)["settings"]["preprocess"]["max_length"]
    src_cfg = json.loads((bert_folder / "tokenizer_config.json").read_text())
    assert src_cfg.get("model_max_length", 10 ** 30) > used == 64
    written = json.loads((out2 / "tokenizer_config.json").read_text())
    assert written == {**src_cfg, "model_max_length": used}
    assert AutoTokenizer.from_pretrained(out2).model_max_length == used == load_model(out2).max_length
    # the same tokenizer read at the same length: evaluating the repaired folder reuses the source's
    # cached embeddings (the body is the same too)
    assert load_model(out2).preprocess_id() == load_model(bert_folder).preprocess_id()


def test_a_model_repair_that_kept_the_original_body_says_so(tmp_path):
    """Found by an audit: a model repair whose training found nothing better than its start, or whose
    settling chose the original body, was reported as a fine-tuned network ("training ended by
    budget:epochs", kind model) although only the head changed. Now `model_change.body_changed` is
    false, a warning says so, and the table says so. And `auto-ft` does not compare such a run with the
    heads as a model repair: a head refitted on the original body with its strength chosen on the same
    out-of-fold predictions is a head repair scored with an edge the heads are not given -- skipped."""
    from conftest import make_bert_folder, make_texts

    model = make_bert_folder(tmp_path / "bert", seed=3)
    data = make_texts(tmp_path / "val.csv", n=64, seed=1)
    recipe = tmp_path / "orig.yaml"
    recipe.write_text("name: orig\ncandidates:\n  - method: mixft\n    params: {epochs: 1, batch_size: 8, "
                      "settle: refit, settle_alphas: [0.0]}\n")
    code, out, err = run_cli("fix", model, "--data", data, "--recipe", recipe, "--out", tmp_path / "o", "--seed", "0",
                             "--json", "--no-cache")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["model_change"]["body_changed"] is False and rep["diagnostics"]["settle"]["body"] == "original"
    assert any("kept the original body" in w for w in rep["warnings"]) and "kept the original body" in err
    code, out, err = run_cli("fix", model, "--data", data, "--recipe", recipe, "--out", tmp_path / "o2", "--seed", "0",
                             "-q", "--no-cache")
    assert code == 0 and "only the head changed" in out, out + err
    # a moved body is said to be one
    moved = tmp_path / "moved.yaml"
    moved.write_text("name: moved\ncandidates:\n  - method: mixft\n    params: {epochs: 1, batch_size: 8, "
                     "settle: refit, settle_alphas: [1.0], patience: 0, keep: last}\n")
    code, out, err = run_cli("fix", model, "--data", data, "--recipe", moved, "--out", tmp_path / "o3", "--seed", "0",
                             "--json", "-q", "--no-cache")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["model_change"]["body_changed"] is True and rep["diagnostics"]["settle"]["body"] == "moved"
    assert not any("kept the original body" in w for w in rep["warnings"])
    # auto-ft's escalation: the cross-fitted run that kept the original body is skipped, the head stays
    aft = tmp_path / "aft.yaml"
    aft.write_text("name: aft\nselection: auto\nfolds: 2\nrepeats: 1\ncandidates:\n  - method: dfr\n"
                   "  - method: mixft\n    params: {epochs: 1, batch_size: 8, cross_fit: 2, patience: 0, "
                   "settle: refit, settle_alphas: [0.0]}\n")
    code, out, err = run_cli("fix", model, "--data", data, "--recipe", aft, "--out", tmp_path / "o4", "--seed", "0",
                             "--json", "-q", "--no-cache")
    assert code == 0, err
    rep = json.loads(out)
    rows = [r for r in rep["candidates"] if str(r.get("candidate", "")).startswith("mixft")]
    assert rep["method"] == "dfr" and rows and all("kept the original body" in r.get("skipped", "") for r in rows), rows


def test_provenance_says_where_the_recipe_came_from_and_a_files_bytes(tmp_path):
    """A recipe is recorded beside its name as built-in or as a file with the sha256 of its bytes (its
    candidates, folds and repeats are that file's) and its plugin files' -- never by path: the same
    recipe in another folder gives the same record, another candidate another digest."""
    import hashlib

    from repair.io import load_safetensors
    from repair.recipes import load_recipe

    m = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=6)
    text = ("name: mine\nselection: worst_class\nfolds: 2\n"
            "candidates:\n  - method: dfr\n    params: {c_grid: [1.0]}\n  - method: dfr\n    params: {c_grid: [0.1]}\n")
    sources = {}
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "mine.yaml").write_text(text)
        code, out, err = run_cli("fix", m, "--data", data, "--recipe", tmp_path / where / "mine.yaml",
                                 "--out", tmp_path / f"h{where}", "--json", "-q")
        assert code == 0, err
        _, meta = load_safetensors(tmp_path / f"h{where}" / "model.safetensors")
        settings = json.loads(meta["repair.settings"])
        assert settings["recipe"] == "mine" and str(tmp_path) not in meta["repair.settings"]
        sources[where] = settings["recipe_source"]
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert sources["a"] == sources["b"] == {"kind": "file", "sha256": digest}
    from repair.provenance import recipe_identity

    (tmp_path / "a" / "mine.yaml").write_text(text.replace("0.1", "0.01"))
    assert recipe_identity(load_recipe(tmp_path / "a" / "mine.yaml"))["sha256"] != digest
    assert recipe_identity(load_recipe("auto")) == recipe_identity(load_recipe("dfr")) == {"kind": "built-in"}
    (tmp_path / "a" / "plug.py").write_text("# registers nothing\n")
    (tmp_path / "a" / "p.yaml").write_text("plugins: [plug.py]\ncandidates: [{method: dfr}]\n")
    ident = recipe_identity(load_recipe(tmp_path / "a" / "p.yaml", validate_only=True))
    assert ident["plugins"] == [{"entry": "plug.py",
                                 "sha256": hashlib.sha256(b"# registers nothing\n").hexdigest()}]


def test_the_recipe_is_recorded_as_it_was_read_and_a_plugin_method_by_its_files_content(tmp_path):
    """Found by a review: the recipe file was hashed when the run ended (an edit during a long run was
    recorded as what ran; a file deleted meanwhile lost the run to an internal error), and a plugin's
    method used by name was recorded by a module name made from the plugin's path."""
    import hashlib

    from repair import provenance
    from repair.methods import METHODS
    from repair.recipes import load_recipe

    f = tmp_path / "mine.yaml"
    f.write_text("name: mine\ncandidates:\n  - method: dfr\n  - method: afr\n")
    read = hashlib.sha256(f.read_bytes()).hexdigest()
    recipe = load_recipe(str(f))
    f.write_text("name: mine\ncandidates:\n  - method: afr\n")
    assert provenance.recipe_identity(recipe) == {"kind": "file", "sha256": read}
    f.unlink()
    assert provenance.recipe_identity(recipe)["sha256"] == read
    plug = tmp_path / "p" / "plug_rec_xyz.py"
    plug.parent.mkdir()
    plug.write_text("from dataclasses import dataclass\nfrom repair.methods import register_method\n\n\n@dataclass\n"
                    "class C:\n    pass\n\n\n@register_method('plug_rec_xyz', summary='same head', config=C, groups='never')\n"
                    "def m(inputs, config):\n    return inputs.W, inputs.b\n")
    (tmp_path / "p" / "r.yaml").write_text("plugins: [plug_rec_xyz.py]\ncandidates:\n  - method: plug_rec_xyz\n")
    ran = hashlib.sha256(plug.read_bytes()).hexdigest()
    pkg = tmp_path / "p" / "pkg_rec_xyz"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import methods\n")
    (pkg / "methods.py").write_text(plug.read_text().replace("plug_rec_xyz", "pkg_rec_xyz"))
    (tmp_path / "p" / "q.yaml").write_text("plugins: [pkg_rec_xyz]\ncandidates:\n  - method: pkg_rec_xyz\n")
    try:
        first = load_recipe(str(tmp_path / "p" / "r.yaml"), allow_plugins=True)
        by_name = load_recipe("plug_rec_xyz")
        assert provenance.recipe_identity(by_name) == {"kind": "plugin", "sha256": ran}
        assert provenance.recipe_identity(first)["plugins"] == [{"entry": "plug_rec_xyz.py", "sha256": ran}]
        plug.write_text(plug.read_text() + "# edited after it was imported: imported again, as it is now\n")
        second = load_recipe(str(tmp_path / "p" / "r.yaml"), allow_plugins=True)
        edited = hashlib.sha256(plug.read_bytes()).hexdigest()     # (session 47: the edited code runs)
        assert provenance.recipe_identity(second)["plugins"] == [{"entry": "plug_rec_xyz.py", "sha256": edited}]
        assert provenance.recipe_identity(load_recipe("plug_rec_xyz")) == {"kind": "plugin", "sha256": edited}
        load_recipe(str(tmp_path / "p" / "q.yaml"), allow_plugins=True)
        assert provenance.recipe_identity(load_recipe("pkg_rec_xyz"))["kind"] == "plugin"
    finally:
        for name in ("plug_rec_xyz", "pkg_rec_xyz"):
            if name in METHODS:
                METHODS.unregister(name)


def test_the_library_versions_are_recorded_without_importing_an_unused_library():
    """A timm model's ``repair fix`` recorded transformers' version by importing transformers (a quarter
    of a second of every run): the installed version is read from its metadata, for a library the run
    imported too (the same record whichever modules a run imported first)."""
    import subprocess
    import sys

    code = ("import sys, json, importlib.metadata as md; import timm; from repair.provenance import code_identity; "
            "c = code_identity(); print(json.dumps([c.get('transformers'), md.version('transformers'), "
            "c.get('timm') == timm.__version__, 'transformers' in sys.modules]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    recorded, installed, timm_ok, imported = json.loads(r.stdout)
    assert recorded == installed and timm_ok and not imported
