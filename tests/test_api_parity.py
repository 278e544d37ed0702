"""The library as the command line is: the same checks (the cache never in an input), honest identity
of a model changed in memory, progress as asked, and a report that says what ended training."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_images, make_timm_folder, run_cli

import repair
from repair.errors import BadInput
from repair.runtime import RuntimeOptions


def _tree(p: Path) -> dict:
    return {str(f.relative_to(p)): f.stat().st_mtime_ns for f in sorted(p.rglob("*"))}


def test_the_cache_never_goes_into_the_model_folder_from_the_library_either(tmp_path, image_data):
    model = make_timm_folder(tmp_path / "m")
    before = _tree(model)
    for call in (repair.evaluate, repair.probe):
        with pytest.raises(BadInput, match="--cache-dir is inside the checkpoint folder|inside the input model"):
            call(model, image_data, runtime=RuntimeOptions(cache_dir=str(model / "cache"), progress=False))
        assert _tree(model) == before


def test_a_model_changed_in_memory_is_never_credited_to_its_file(tmp_path, capsys):
    """``repair.fix``'s model in memory exports with the repair's provenance; evaluated, its figures name
    no file's sha256; a caller's own change exports as ``unrecorded``. Quiet means warnings only."""
    from safetensors import safe_open

    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=8, seed=4)
    quiet = RuntimeOptions(progress=False)
    capsys.readouterr()
    res = repair.fix(model, data, tmp_path / "out", recipe="dfr", runtime=quiet)
    err = capsys.readouterr().err
    assert all(ln.startswith(("warning", "notice")) for ln in err.splitlines() if ln.strip()), err
    other = make_images(tmp_path / "e", n_per_class=8, seed=5)      # not the repair set (that is refused)
    original = repair.evaluate(model, other, runtime=quiet)["model"]
    repaired = repair.evaluate(res.adapter, other, runtime=quiet)["model"]
    assert repaired["sha256"] is None and repaired["changed_from_sha256"] == original["sha256"]
    assert repaired["changed_tensors"]
    out = tmp_path / "mem"
    repair.export_model(res.adapter, out, format="safetensors")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["repair.method"] == "dfr" and json.loads(meta["repair.settings"])["recipe"] == "dfr"
    W, b = res.adapter.head_params()              # changed after the repair: its record no longer holds
    res.adapter.set_head(W + 1, b)
    out3 = tmp_path / "after"
    repair.export_model(res.adapter, out3, format="safetensors")
    with safe_open(str(out3 / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["repair.method"] == "unrecorded" and meta["repair.changed_after"] == "dfr"
    own = repair.load_model(model)
    W, b = own.head_params()
    own.set_head(W * 0.5, b)
    out2 = tmp_path / "own"
    repair.export_model(own, out2, format="safetensors")
    with safe_open(str(out2 / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["repair.method"] == "unrecorded" and json.loads(meta["repair.changed_tensors"])


def test_library_arguments_are_checked_and_compared_as_the_cli_does(tmp_path, image_data):
    model = make_timm_folder(tmp_path / "m")
    with pytest.raises(BadInput, match="options must be a LoadOptions"):
        repair.load_model(model, {"arch": "resnet18"})
    from repair.pipeline import FixOptions

    held = make_images(tmp_path / "t", n_per_class=4, seed=9)
    res = repair.fix(model, image_data, tmp_path / "o", eval_data=held,
                     options=FixOptions(recipe="dfr", eval_data=held), runtime=RuntimeOptions(progress=False))
    assert res["after"]["n"] == 4 * 3


def test_the_report_says_what_ended_training(tmp_path, timm_folder, image_data):
    code, out, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "mixft", "--budget", "2steps",
                             "--out", tmp_path / "o", "--report", tmp_path / "r.html", "--json", "-q")
    assert code == 0, err
    stopped = json.loads(out)["model_change"]["stopped_by"]
    doc = json.loads((tmp_path / "r.json").read_text())
    mc = doc["models"][0]["result"]["model_change"]
    assert mc["stopped_by"] == stopped and mc["budget"]
    assert f"training ended by {stopped}" in (tmp_path / "r.html").read_text()


def test_a_loaded_model_changed_in_place_or_left_in_train_mode_is_measured_as_it_is(tmp_path):
    """Found by an audit: `evaluate` of a model given loaded ran it in whatever mode the caller left
    (train: BatchNorm statistics moved, the user's model changed) and keyed the cache by the file's body
    hash, so the next run from the file's path read those embeddings (0.17 where the file gives 0.33);
    a body edited in place was measured with the file's cached embeddings, named by the file's sha256
    and exported as the file's body. In-place changes are now registered (identity, cache key, export),
    and the forward passes run in eval mode with the caller's modes restored."""
    import torch

    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=8, seed=4)
    quiet = RuntimeOptions(progress=False, cache_dir=tmp_path / "cache")
    fresh = repair.evaluate(model, data, runtime=RuntimeOptions(progress=False, use_cache=False))
    a = repair.load_model(model)
    a.model.train()
    before = {k: v.clone() for k, v in a.model.state_dict().items()}
    rep = repair.evaluate(a, data, runtime=quiet)
    assert a.model.training and all(m.training for m in a.model.modules())        # modes restored
    assert all(torch.equal(v, before[k]) for k, v in a.model.state_dict().items())  # nothing moved
    assert rep["model"]["sha256"] == fresh["model"]["sha256"] and rep["accuracy"] == fresh["accuracy"]
    again = repair.evaluate(model, data, runtime=quiet)                             # the file, from the cache
    assert again["embedding"]["from_cache"] and again["accuracy"] == fresh["accuracy"]
    # a body tensor edited in place (outside set_tensors)
    a.model.eval()
    name = next(n for n, p in a.model.named_parameters() if p.ndim == 4)
    with torch.no_grad():
        dict(a.model.named_parameters())[name].mul_(-3.0)
    mine = repair.evaluate(a, data, runtime=quiet)
    assert mine["model"]["sha256"] is None and name in mine["model"]["changed_tensors"]
    assert not mine["embedding"]["from_cache"]
    out = tmp_path / "edited"
    repair.export_model(a, out, format="safetensors")
    written = repair.evaluate(out, data, runtime=RuntimeOptions(progress=False, use_cache=False))
    assert written["accuracy"] == mine["accuracy"] and written["per_class"] == mine["per_class"]


def test_evaluate_leaves_out_the_samples_of_exclude_as_repair_eval_does(tmp_path):
    """Found by an audit: repair.evaluate had no ``exclude`` (repair.api.evaluate_model and
    ``repair eval --exclude`` have), so the Python API example counted repair-set samples that are
    also in the test data in its "after" figure, silently."""
    import shutil

    from repair.api import evaluate_model
    from repair.data import DataOptions

    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "test", n_per_class=6)
    repair_set = tmp_path / "repair-set"
    for rel in ("cat/000.png", "cat/002.png", "dog/001.png"):      # 3 of the test images, byte for byte
        (repair_set / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data / rel, repair_set / rel)
    make_images(tmp_path / "other", n_per_class=2, seed=7)            # and samples the test data lacks
    for f in (tmp_path / "other").rglob("*.png"):
        dst = repair_set / f.parent.name / f"other-{f.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
    quiet = RuntimeOptions(progress=False)
    full = repair.evaluate(model, data, group_by="place", runtime=quiet)
    rep = repair.evaluate(model, data, group_by="place", exclude=repair_set, runtime=quiet)
    assert full["n"] == 18 and rep["n"] == 15
    same = evaluate_model(model, data, None, DataOptions(group_by="place"), quiet, exclude=repair_set)
    assert [(g["name"], g["n"], g["accuracy"]) for g in rep["per_group"]] == \
        [(g["name"], g["n"], g["accuracy"]) for g in same["per_group"]]
    code, out, err = run_cli("eval", model, "--data", data, "--group-by", "place", "--exclude", repair_set,
                             "--json", "--quiet")
    assert code == 0, err
    assert json.loads(out)["n"] == rep["n"]


def test_every_kind_of_in_place_edit_of_a_loaded_model_is_seen(tmp_path):
    """Found by a review: finding in-place changes by torch's version counters (to spare reading the file
    back) missed writes through ``.data``, through numpy and fused optimizer steps: the old cached
    embeddings were served and the file's weights exported. Every edit is seen (the file is compared)."""
    import torch

    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=4, seed=4)
    quiet = RuntimeOptions(progress=False, cache_dir=tmp_path / "cache")
    base = repair.evaluate(model, data, runtime=quiet)
    for k, edit in enumerate(("data", "numpy")):
        a = repair.load_model(model)
        repair.evaluate(a, data, runtime=quiet)
        name = next(n for n, p in a.model.named_parameters() if p.ndim == 4)
        p = dict(a.model.named_parameters())[name]
        if edit == "data":
            p.data.mul_(-3.0)
        else:
            p.detach().numpy()[...] *= 2.0          # another body than the .data edit's
        rep = repair.evaluate(a, data, runtime=quiet)
        assert rep["model"]["changed_tensors"] == [name] and not rep["embedding"]["from_cache"], edit
        out = tmp_path / f"e{k}"
        repair.export_model(a, out, format="safetensors")
        from repair.io import load_safetensors

        written, _ = load_safetensors(out / "model.safetensors")
        assert torch.equal(written[name], p.detach().to(written[name].dtype)), edit
    assert base["model"]["sha256"] is not None


def test_a_loaded_model_whose_file_is_gone_is_still_measured(tmp_path):
    """Found by a review: looking for in-place edits read the weights file back on every call, so a
    model loaded from a folder since removed (a temporary download) failed every call with an internal
    FileNotFoundError. Unchanged tensors are told by the digests taken when the file was read; a changed
    one whose file is gone is a BadInput naming it."""
    import shutil

    import torch

    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=4, seed=4)
    quiet = RuntimeOptions(progress=False, use_cache=False)
    a = repair.load_model(model)
    first = repair.evaluate(a, data, runtime=quiet)
    shutil.move(str(model), str(tmp_path / "gone"))
    again = repair.evaluate(a, data, runtime=quiet)
    assert again["accuracy"] == first["accuracy"] and again["model"]["sha256"] == first["model"]["sha256"]
    with torch.no_grad():
        next(p for p in a.model.parameters() if p.ndim == 4).mul_(2.0)
    with pytest.raises(BadInput, match="cannot be read"):
        repair.evaluate(a, data, runtime=quiet)


def test_a_loaded_model_changed_in_place_and_saved_over_its_file_is_not_served_the_old_figures(tmp_path):
    """Found by a review: a model changed in place and then saved over its own weights file matched the
    file when the changed tensors were read back, so it counted as unchanged: the load-time cache key and
    sha256 served the old weights' figures (67.8% where the weights give 69.8%). A file rewritten since it
    was loaded is a BadInput asking to load it again."""
    import torch
    from safetensors.torch import save_file

    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=4, seed=4)
    quiet = RuntimeOptions(progress=False, cache_dir=tmp_path / "cache")
    a = repair.load_model(model)
    repair.evaluate(a, data, runtime=quiet)
    with torch.no_grad():
        next(p for p in a.model.parameters() if p.ndim == 4).mul_(-1.0)
    save_file({k: v.contiguous() for k, v in a.model.state_dict().items()}, str(model / "model.safetensors"))
    with pytest.raises(BadInput, match="changed since the model was loaded"):
        repair.evaluate(a, data, runtime=quiet)
    fresh = repair.load_model(model)                 # loaded again: the new file, its own cache entry
    rep = repair.evaluate(fresh, data, runtime=quiet)
    assert rep["model"]["sha256"] is not None and not rep["embedding"]["from_cache"]


def test_evaluate_with_exclude_refuses_a_cache_in_the_model_folder_before_writing_there(tmp_path):
    """Found by a review: ``repair.evaluate(exclude=...)`` cached the images' input keys in the cache
    folder before checking it, so a cache folder inside the input model wrote files into the model's
    folder, then refused it. Refused before anything is written."""
    import os

    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "test", n_per_class=4)
    other = make_images(tmp_path / "other", n_per_class=2, seed=7)
    before = sorted(os.listdir(model))
    with pytest.raises(BadInput, match="inside the input model"):
        repair.evaluate(model, data, exclude=other, runtime=RuntimeOptions(progress=False, cache_dir=model))
    assert sorted(os.listdir(model)) == before
