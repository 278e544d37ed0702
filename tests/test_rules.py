"""The rules' one home (repair.rules) and the guarantees built on it: outputs never replace an input
(whatever --out, --report, --force or a manifest say), gates compare exact counts and fail closed, a
failed command leaves nothing, options validate themselves, each input is read once and the model
loaded once, a zoo has one driver per folder and redoes a journaled model whose output went missing."""
from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from conftest import make_images, make_texts, run_cli, texts_with_upper_copies, write_rows
from repair.errors import BadInput


def digest_tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ gates: exact counts, one comparison
def test_gate_compares_exact_counts_and_shows_the_digits():
    from repair.rules import judge

    figures = {"n": 60, "accuracy": 42 / 60, "per_class": [{"name": "a", "n": 60, "accuracy": 42 / 60}]}
    g = judge(figures, "70%", "accuracy")
    assert g["passed"] and g["correct"] == 42 and g["n"] == 60          # float 0.7 would fail this
    assert judge(figures, 0.7, "accuracy")["passed"] and judge(figures, "0.7", "accuracy")["passed"]
    low = judge({"n": 60, "accuracy": 41 / 60}, "70%", "accuracy")
    assert not low["passed"] and "41/60 = 68.33% < 70%" in low["message"]
    # worst group: the smallest exact fraction, named
    fig = {"per_group": [{"name": "a|w", "n": 3, "accuracy": 2 / 3}, {"name": "b|w", "n": 7, "accuracy": 5 / 7}]}
    g = judge(fig, "2/3" if False else "66.67%", "worst_group")
    assert g["where"] == "a|w" and g["correct"] == 2 and not g["passed"]     # 2/3 < 66.67%
    # the line shows the digits that tell them apart (an audit: it read "66.67% < 66.67%")
    assert "2/3 = 66.667% < 66.67%" in g["message"], g["message"]
    assert judge(fig, "66.66%", "worst_group")["passed"]
    # a figure that rounds onto the threshold, and a threshold with more digits than two (a review)
    near = judge({"n": 30000, "accuracy": 20999 / 30000}, "70%", "accuracy")
    assert "20999/30000 = 69.997% < 70%" in near["message"], near["message"]
    fine = judge({"n": 100000, "accuracy": 12346 / 100000}, "0.123456789", "accuracy")
    assert fine["passed"] and "12.3460% >= 12.3456789%" in fine["message"], fine["message"]
    from repair.report import gate_summary

    old = {k: v for k, v in judge({"n": 10000, "accuracy": 0.7133}, "71.34%", "accuracy").items()
           if k not in ("threshold_text", "correct")}                # a report written before the counts
    assert gate_summary(old) == "accuracy 71.33% < 71.34%"


def test_gate_fails_closed_on_figures_that_cannot_be_measured():
    from repair.rules import judge

    assert judge({"n": 0, "accuracy": None}, "0%", "accuracy")["passed"] is False
    assert judge({"n": 10, "accuracy": float("nan")}, "0%", "accuracy")["passed"] is False
    assert judge({"per_group": [{"name": "g", "n": 0, "accuracy": None}]}, "0", "worst_group")["passed"] is False


def test_a_worst_group_or_class_gate_fails_closed_on_what_it_did_not_measure():
    """A group or class without samples (listed with n 0, or a class x value the data never had) is
    not vouched for by the worst figure over the others: the gate fails, naming it; ``expected`` (the
    groups the user says must be there) limits that to them."""
    from repair.rules import judge

    ok = {"name": "a|p=x", "n": 4, "accuracy": 1.0}
    fig = {"per_group": [ok, {"name": "a|p=y", "n": 0, "accuracy": None}], "absent_groups": ["b|p=x"]}
    g = judge(fig, "50%", "worst_group")
    assert not g["passed"] and g["unmeasured"] == ["a|p=y", "b|p=x"] and g["value"] == 1.0
    assert "4/4 = 100%, but group(s) a|p=y, b|p=x have no samples" in g["message"]
    assert "fails closed" in g["message"]
    assert judge(fig, "50%", "worst_group", expected=["a|p=x"])["passed"]
    assert judge(fig, "50%", "worst_group", expected=["a|p=x", "b|p=x"])["unmeasured"] == ["b|p=x"]
    assert judge({"per_group": [ok]}, "50%", "worst_group")["passed"]
    # worst class: a class of the model with no samples (no group column, auto -> worst_class)
    cls = {"per_class": [{"name": "cat", "n": 5, "accuracy": 1.0}, {"name": "fox", "n": 0, "accuracy": None}]}
    g = judge(cls, "90%", "auto")
    assert g["metric"] == "worst_class" and not g["passed"] and "class(es) fox has no samples" in g["message"]
    # accuracy is over every sample there is: nothing unmeasured
    assert judge({**cls, "n": 5, "accuracy": 1.0}, "90%", "accuracy")["passed"]
    many = {"per_class": [ok] + [{"name": f"c{i}", "n": 0} for i in range(8)]}
    assert "c0, c1, c2, c3, c4 and 3 more" in judge(many, "0%", "worst_class")["message"]


def test_zoo_and_fix_gates_fail_closed_on_a_group_the_evaluation_lacks(tmp_path, timm_folder, image_data):
    """The zoo gates as `repair eval` does: an evaluation set without one group's rows fails a
    worst-group gate in eval mode and in fix mode (exit 1), and `repair fix --eval` lists the group
    among the figures' absent groups."""
    test = make_images(tmp_path / "test", seed=1)
    with open(test / "metadata.csv") as f:
        rows = [r for r in csv.DictReader(f) if not (r["y"] == "cat" and r["place"] == "water")]
    with open(test / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "place"])
        w.writeheader()
        w.writerows(rows)
    code, out, err = run_cli("eval", timm_folder, "--data", test, "--group-by", "place", "--fail-under-wga", "0%",
                             "--json", "-q")
    assert code == 1 and "cat|place=water" in err and json.loads(out)["passed"] is False
    for mode in ("eval", "fix"):
        manifest = tmp_path / f"zoo-{mode}.yaml"
        (tmp_path / f"o-{mode}").mkdir()
        manifest.write_text(yaml.safe_dump({
            "defaults": {"group_by": "place", "gate": "0%", "recipe": "dfr", "output_dir": str(tmp_path / f"o-{mode}")},
            "models": [{"name": "m", "checkpoint": str(timm_folder), "data": str(image_data), "eval": str(test)}]}))
        code, out, err = run_cli("zoo", manifest, "--mode", mode, "--json", "-q")
        assert code == 1, (mode, err)
        gate = json.loads(out)["models"][0]["gate"]
        assert not gate["passed"] and gate["unmeasured"] == ["cat|place=water"], (mode, gate)
    # a row that names the groups it requires (as repair eval --expect-groups) passes without the others,
    # and fails naming one it requires that has no samples
    for expect, ok in (("dog|water,fox|land", True), (["cat|water", "dog|land"], False)):
        manifest = tmp_path / "zoo-expect.yaml"
        manifest.write_text(yaml.safe_dump({
            "defaults": {"group_by": "place", "gate": "0%", "expect_groups": expect},
            "models": [{"name": "m", "checkpoint": str(timm_folder), "data": str(image_data), "eval": str(test)}]}))
        code, out, err = run_cli("zoo", manifest, "--mode", "eval", "--out-dir", tmp_path / f"rep-{ok}", "--json", "-q")
        gate = json.loads(out)["models"][0]["gate"]
        assert code == (0 if ok else 1) and gate["passed"] is ok, (expect, err, gate)
        assert gate["unmeasured"] == ([] if ok else ["cat|place=water"])
    # ... whatever the gate's metric (accuracy and worst class ignored expect_groups: exit 0 on a set
    # without a group the row requires, where repair eval --expect-groups exits 1)
    for metric in ("accuracy", "worst_class"):
        manifest.write_text(yaml.safe_dump({
            "defaults": {"group_by": "place", "gate": "0%", "gate_metric": metric, "expect_groups": ["cat|water"]},
            "models": [{"name": "m", "checkpoint": str(timm_folder), "data": str(image_data), "eval": str(test)}]}))
        code, out, err = run_cli("zoo", manifest, "--mode", "eval", "--out-dir", tmp_path / f"rep-{metric}",
                                 "--json", "-q")
        gate = json.loads(out)["models"][0]["gate"]
        assert code == 1 and not gate["passed"] and gate["unmeasured"] == ["cat|place=water"], (metric, err, gate)
    code, out, err = run_cli("eval", timm_folder, "--data", test, "--group-by", "place", "--fail-under-acc", "0%",
                             "--expect-groups", "cat|water", "--json", "-q")
    failed = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert code == 1 and json.loads(out)["passed"] is False, err
    assert len(failed) == 1 and failed[0].count("cat|place=water") == 1, err           # one problem, once
    manifest.write_text(yaml.safe_dump({"models": [{"name": "m", "checkpoint": str(timm_folder),
                                                    "data": str(image_data), "expect_groups": "cat"}]}))
    code, _, err = run_cli("zoo", manifest, "--mode", "eval", "-q")
    assert code == 2 and "expect_groups" in err, err
    # a row that requires groups but has no gate to fail is refused, not listed as "no gate"
    manifest.write_text(yaml.safe_dump({"models": [{"name": "m", "checkpoint": str(timm_folder), "group_by": "place",
                                                    "data": str(image_data), "expect_groups": "cat|water"}]}))
    code, _, err = run_cli("zoo", manifest, "--mode", "eval", "-q")
    assert code == 2 and "expect_groups" in err and "needs a gate" in err and err.count("\n") == 1, err
    code, out, err = run_cli("fix", timm_folder, "--data", image_data, "--group-by", "place", "--recipe", "dfr",
                             "--eval", test, "--out", tmp_path / "fixed", "--json", "-q")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["after"]["absent_groups"] == ["cat|place=water"] == rep["before"]["absent_groups"]


def test_eval_groups_left_out_as_repair_samples_are_absent_and_the_gate_fails_closed(tmp_path, timm_folder,
                                                                                    image_data):
    """Found by an audit: --eval rows that are also in the repair set are left out of the figures; when
    that left out every row of one value of the --eval group column (the repair itself grouped by
    nothing, as the README's zoo and CI examples run it), those groups were not listed as absent and
    a worst-group gate passed on the others. Now they are absent, and the gate fails naming them."""
    test = make_images(tmp_path / "test", seed=1)
    ev = tmp_path / "ev"
    rows = []
    for src, keep, suffix in ((test, "land", ""), (image_data, "water", "_w")):
        with open(src / "metadata.csv") as f:
            for r in csv.DictReader(f):
                if r["place"] != keep:
                    continue
                rel = r["img_filename"].replace(".png", f"{suffix}.png")
                (ev / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src / r["img_filename"], ev / rel)          # water rows: the repair set's own images
                rows.append({**r, "img_filename": rel})
    with open(ev / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "place"])
        w.writeheader()
        w.writerows(rows)
    code, out, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "dfr", "--eval", ev,
                             "--eval-group-by", "place", "--out", tmp_path / "fixed", "--json", "-q")
    assert code == 0, err
    after = json.loads(out)["after"]
    water = ["cat|place=water", "dog|place=water", "fox|place=water"]
    assert sorted(after["absent_groups"]) == water and all("water" not in g["name"] for g in after["per_group"])
    manifest = tmp_path / "zoo.yaml"
    (tmp_path / "o").mkdir()
    manifest.write_text(yaml.safe_dump({
        "defaults": {"recipe": "dfr", "gate": "0%", "output_dir": str(tmp_path / "o")},
        "models": [{"name": "m", "checkpoint": str(timm_folder), "data": str(image_data), "eval": str(ev),
                    "eval_group_by": "place"}]}))
    code, out, err = run_cli("zoo", manifest, "--mode", "fix", "--json", "-q")
    gate = json.loads(out)["models"][0]["gate"]
    assert code == 1 and not gate["passed"] and sorted(gate["unmeasured"]) == water, (err, gate)
    # the re-gate of examples/ci/gate.sh: repair eval --exclude REPAIR_DATA leaves the copies out as fix
    # does (without it, the water rows -- repair samples -- were counted), and fails naming the groups
    code, out, err = run_cli("eval", tmp_path / "fixed", "--data", ev, "--group-by", "place", "--exclude", image_data,
                             "--fail-under-wga", "0%", "--json", "-q")
    rep = json.loads(out)
    assert code == 1 and rep["excluded"]["n"] == len(rows) // 2 and sorted(rep["absent_groups"]) == water, err
    assert rep["n"] == len(rows) // 2 and "also in" in err
    code, out, err = run_cli("eval", tmp_path / "fixed", "--data", ev, "--group-by", "place", "--exclude", ev, "-q")
    assert code == 2 and "also in --exclude" in err and err.count("\n") == 1, err
    code, out, err = run_cli("eval", tmp_path / "fixed", "--data", ev, "--exclude", tmp_path / "nowhere", "-q")
    assert code == 2 and "nowhere" in err and err.count("\n") == 1, err


def test_cli_report_and_zoo_use_the_one_gate():
    """The CLI eval gate, the report's check_gate and zoo go through rules.judge_gates (and it through
    rules.judge)."""
    import inspect

    import repair.report as report
    import repair.rules as rules
    import repair.zoo as zoo
    from repair_cli import commands

    assert "judge(" in inspect.getsource(rules.judge_gates)
    assert "judge_gates(" in inspect.getsource(commands.eval_cmd) if hasattr(commands, "eval_cmd") else True
    assert "judge_gates(" in inspect.getsource(report.check_gate)
    assert "check_gate(" in inspect.getsource(zoo)
    figures = {"n": 60, "accuracy": 42 / 60}
    assert report.check_gate({"after": figures}, "70%", "accuracy")["passed"]


def test_cli_gate_at_the_exact_boundary(tmp_path, timm_folder):
    """--fail-under-acc at exactly k/n passes; one sample more fails with k/n in the message."""
    data = make_images(tmp_path / "d", n_per_class=4, with_metadata=False)      # 12 images: k/12
    code, out, _ = run_cli("eval", timm_folder, "--data", data, "--json", "-q")
    assert code == 0
    rep = json.loads(out)
    n = rep["n"]
    k = round(rep["accuracy"] * n)
    if k == n:
        pytest.skip("the random tiny model classifies every sample correctly")
    exact = Fraction(100 * k, n)
    # just below k/n passes, k/n itself passes when it is a finite decimal, one sample more fails
    code, _, err = run_cli("eval", timm_folder, "--data", data, "--fail-under-acc",
                           f"{float(exact) - 1e-7:.7f}%", "-q")
    assert code == 0, err
    if (100 * k * 10**6) % n == 0:
        code, _, err = run_cli("eval", timm_folder, "--data", data, "--fail-under-acc", f"{float(exact):.6f}%", "-q")
        assert code == 0, err
    above = f"{float(Fraction(100 * (k + 1), n)):.6f}%"
    code, _, err = run_cli("eval", timm_folder, "--data", data, "--fail-under-acc", above, "-q")
    assert code == 1 and f"{k}/{n} = " in err, err


# ------------------------------------------------------------------ inputs are never replaced
def test_out_over_files_a_table_lists_is_refused_even_with_force(tmp_path, timm_folder):
    """metadata.csv lists images in a pool folder: --out pool --force would replace them."""
    pool = make_images(tmp_path / "pool", n_per_class=4, with_metadata=False)
    data = tmp_path / "v2"
    data.mkdir()
    rows = [{"img_filename": f"../pool/{c}/{i:03d}.png", "y": c} for c in ("cat", "dog", "fox") for i in range(4)]
    with open(data / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y"])
        w.writeheader()
        w.writerows(rows)
    before = digest_tree(pool)
    extra = ["--allow-outside-paths"] if "--allow-outside-paths" in run_cli("fix", "--help")[1] else []
    code, _, err = run_cli("fix", timm_folder, "--data", data, "--recipe", "dfr", "--out", pool, "--force", "-q",
                           *extra)
    assert code == 2, err
    assert "would replace a folder that holds" in err or "outside" in err
    assert digest_tree(pool) == before


def test_report_json_never_replaces_the_repair_data(tmp_path, bert_folder):
    data = make_texts(tmp_path / "reviews.json", n=24, fmt="jsonl")
    before = data.read_bytes()
    code, _, err = run_cli("fix", bert_folder, "--data", data, "--recipe", "dfr", "--report",
                           tmp_path / "reviews.html", "--out", tmp_path / "out", "-q")
    assert code == 2 and "--report" in err and "repair data" in err, err
    assert data.read_bytes() == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "reviews.html").exists()


def test_zoo_row_output_is_another_rows_checkpoint(tmp_path, timm_folder, image_data):
    b = tmp_path / "b-model"
    shutil.copytree(timm_folder, b)
    before = digest_tree(b)
    m = tmp_path / "zoo.yaml"
    m.write_text(yaml.safe_dump({"defaults": {"recipe": "dfr"}, "models": [
        {"name": "a", "checkpoint": str(timm_folder), "data": str(image_data), "output": str(b)},
        {"name": "b", "checkpoint": str(b), "data": str(image_data), "output": str(tmp_path / "b-out")}]}))
    code, _, err = run_cli("zoo", m, "--force", "--out-dir", tmp_path / "r")
    assert code == 2 and "row 1 (a)" in err and "checkpoint of row 2" in err, err
    assert digest_tree(b) == before and not (tmp_path / "r").exists()


def test_outputs_of_one_run_are_apart():
    from repair.rules import check_outputs_distinct

    with pytest.raises(BadInput, match="same place"):
        check_outputs_distinct({"--out": "/tmp/x/m", "--report": "/tmp/x/m/r.html"})
    check_outputs_distinct({"--out": "/tmp/x/m", "--report": "/tmp/x/r.html"})


# ------------------------------------------------------------------ nothing half-written
def test_report_failure_leaves_no_model_behind(tmp_path, timm_folder, image_data, monkeypatch):
    """A full disk under the report: exit 2, and the repaired model is not left behind (the identical
    rerun is not refused with 'output already exists')."""
    import errno

    import repair.report as report

    def full(doc):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "render", full)
    out = tmp_path / "out"
    args = ("fix", timm_folder, "--data", image_data, "--recipe", "dfr", "--out", out, "--report",
            tmp_path / "r.html", "-q")
    code, _, err = run_cli(*args)
    assert code == 2 and "no space left" in err, err
    assert not out.exists() and not (tmp_path / "r.html").exists() and not (tmp_path / "r.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert out.is_dir() and (tmp_path / "r.html").is_file() and (tmp_path / "r.json").is_file()


def test_output_set_commits_all_or_nothing(tmp_path):
    from repair.io import outputs

    (tmp_path / "b").write_text("old")
    with pytest.raises(RuntimeError):
        with outputs(force=True) as tx:
            tx.stage(tmp_path / "a").write_text("new a")
            tx.stage(tmp_path / "b").write_text("new b")
            raise RuntimeError("fails after staging")
    assert not (tmp_path / "a").exists() and (tmp_path / "b").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    with outputs(force=True) as tx:
        tx.stage(tmp_path / "a").write_text("new a")
        tx.stage(tmp_path / "b").write_text("new b")
    assert (tmp_path / "a").read_text() == "new a" and (tmp_path / "b").read_text() == "new b"


def test_quiet_keeps_notices(tmp_path, timm_folder, image_data):
    """-q drops progress, never a warning or a notice (here: a stale temp of ours was removed)."""
    out = tmp_path / "out"
    stale = tmp_path / ".out.abcdefgh.tmp"
    stale.mkdir()
    os.utime(stale, (1, 1))
    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "dfr", "--out", out, "-q")
    assert code == 0 and f"removed {stale}" in err and "loaded" not in err, err


# ------------------------------------------------------------------ options validate themselves
@pytest.mark.parametrize("make, cli, words", [
    (lambda: __import__("repair.adapters", fromlist=["x"]).LoadOptions(std=[0.0]), ["--std", "0"], "--std must be"),
    (lambda: __import__("repair.adapters", fromlist=["x"]).LoadOptions(class_names=["a", "a"]),
     ["--class-names", "a,a"], "--class-names must be"),
    (lambda: __import__("repair.runtime", fromlist=["x"]).RuntimeOptions(device="gpu0"), ["--device", "gpu0"],
     "--device must be"),
])
def test_options_give_the_same_error_from_python_and_the_cli(make, cli, words, timm_folder, image_data):
    with pytest.raises(BadInput, match=words.replace("-", r"\-")):
        make()
    code, _, err = run_cli("eval", timm_folder, "--data", image_data, *cli)
    assert code == 2 and words in err, err


def test_fix_and_zoo_options_validate():
    from repair.pipeline import FixOptions
    from repair.zoo import ZooOptions

    for kw, words in (({"tolerance": -1.0}, "--tolerance"), ({"export": "tflite"}, "--export"),
                      ({"seed": -1}, "--seed"), ({"eval_group_by": "x"}, "--eval"),
                      ({"report": "r.txt"}, "--report")):
        with pytest.raises(BadInput, match=words):
            FixOptions(**kw)
    with pytest.raises(BadInput, match="--cpus-per-model"):
        ZooOptions(cpus_per_model=0)
    with pytest.raises(BadInput, match="--mode"):
        ZooOptions(mode="train")


# ------------------------------------------------------------------ read once, load once
def count_reads_and_loads(monkeypatch, *load_model_users):
    """Lists that fill with the name of every data set read and every model loaded (through the
    library's one reader and one loader, wherever they are called from)."""
    import repair.adapters as adapters
    import repair.data as data_mod
    import repair.preflight as preflight

    reads, loads = [], []
    real_read, real_load = data_mod.load_data, adapters.load_model

    def counting_read(path, *a, **k):
        reads.append(Path(path).name)
        return real_read(path, *a, **k)

    def counting_load(path, *a, **k):
        loads.append(Path(path).name)
        return real_load(path, *a, **k)

    for mod in (preflight, data_mod):
        monkeypatch.setattr(mod, "load_data", counting_read)
    for mod in (adapters, *load_model_users):
        monkeypatch.setattr(mod, "load_model", counting_load)
    return reads, loads


def test_fix_reads_each_input_once_and_loads_the_model_once(tmp_path, timm_folder, image_data, monkeypatch):
    import repair.pipeline as pipeline

    reads, loads = count_reads_and_loads(monkeypatch, pipeline)
    test = make_images(tmp_path / "test", n_per_class=4, seed=3)
    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--eval", test, "--recipe", "dfr",
                           "--out", tmp_path / "out", "--report", tmp_path / "r.html", "-q")
    assert code == 0, err
    assert sorted(reads) == sorted([image_data.name, test.name]), reads
    assert loads == [timm_folder.name], loads
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["models"][0]["result"]["delta_histogram"]["dims"] > 0    # from the embeddings in hand


# ------------------------------------------------------------------ zoo: one driver, honest resume
def _zoo(tmp_path, timm_folder, image_data, n=2):
    m = tmp_path / "zoo.yaml"
    m.write_text(yaml.safe_dump({"defaults": {"recipe": "dfr", "output_dir": str(tmp_path / "out")},
                                 "models": [{"name": f"m{i}", "checkpoint": str(timm_folder), "data": str(image_data),
                                             "seed": i} for i in range(n)]}))
    (tmp_path / "out").mkdir()
    return m


def test_zoo_second_driver_is_refused_naming_the_holder(tmp_path, timm_folder, image_data):
    m = _zoo(tmp_path, timm_folder, image_data)
    r = tmp_path / "r"
    r.mkdir()
    fd = os.open(r / ".zoo-lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"pid 4242 on ci-runner\n")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        code, _, err = run_cli("zoo", m, "--out-dir", r)
    finally:
        os.close(fd)
    assert code == 2 and "another repair zoo is running" in err and "pid 4242 on ci-runner" in err, err
    assert not list((tmp_path / "out").iterdir())


def test_zoo_redoes_a_journaled_model_whose_output_is_missing_or_changed(tmp_path, timm_folder, image_data):
    m = _zoo(tmp_path, timm_folder, image_data)
    r = tmp_path / "r"
    code, _, err = run_cli("zoo", m, "--out-dir", r, "-q")
    assert code == 0, err
    shutil.rmtree(tmp_path / "out" / "m0")                                  # deleted after it was journaled
    w = next((tmp_path / "out" / "m1").glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:-8] + b"\x00" * 8)                        # changed after it was journaled
    changed = w.read_bytes()
    code, out, err = run_cli("zoo", m, "--out-dir", r, "--json", "-q")     # m1's is the user's now: kept
    assert code == 2 and f"{w.name} differs from what was written" in err and "--force" in err, err
    assert w.read_bytes() == changed and not (tmp_path / "out" / "m0").exists()
    code, out, err = run_cli("zoo", m, "--out-dir", r, "--json", "-q", "--force")
    assert code == 0, err
    doc = json.loads(out)
    redone = {x["name"]: x.get("redone") for x in doc["models"]}
    assert redone == {"m0": "its output is missing",
                      "m1": f"its output file m1/{w.name} differs from what was written"}, redone
    assert (tmp_path / "out" / "m0").is_dir()
    assert "run again: its output is missing" in (r / "zoo-report.html").read_text()


def test_zoo_never_runs_a_manifests_plugin_unasked(tmp_path, timm_folder, image_data):
    """A shared recipe with plugins: validation imports nothing (eval mode runs, the plugin never);
    fix mode is refused before any work naming the row; --allow-plugins is the only way in."""
    marker = tmp_path / "ran"
    (tmp_path / "p.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (tmp_path / "r.yaml").write_text("plugins: [p.py]\ncandidates:\n  - method: dfr\n")
    m = tmp_path / "zoo.yaml"
    m.write_text(yaml.safe_dump({"models": [{"name": "a", "checkpoint": str(timm_folder), "data": str(image_data),
                                             "recipe": str(tmp_path / "r.yaml"),
                                             "output": str(tmp_path / "out")}]}))
    code, _, err = run_cli("zoo", m, "--mode", "eval", "--out-dir", tmp_path / "r1", "-q")
    assert code == 0 and not marker.exists(), err
    code, _, err = run_cli("zoo", m, "--out-dir", tmp_path / "r2", "-q")
    assert code == 2 and "row 1 (a), recipe" in err and "--allow-plugins" in err, err
    assert not marker.exists() and not (tmp_path / "out").exists() and not (tmp_path / "r2").exists()


@pytest.mark.parametrize("command", ["eval", "probe", "export", "verify"])
def test_every_command_reads_its_data_once_and_loads_the_model_once(command, tmp_path, timm_folder, image_data,
                                                                     monkeypatch):
    import repair.api as api

    onnx = tmp_path / "m.onnx"
    if command == "verify":
        assert run_cli("export", timm_folder, "--data", image_data, "--out", onnx, "-q")[0] == 0
    reads, loads = count_reads_and_loads(monkeypatch, api)
    args = {"eval": ["eval", timm_folder, "--data", image_data, "--group-by", "place"],
            "probe": ["probe", timm_folder, "--data", image_data],
            "export": ["export", timm_folder, "--data", image_data, "--out", tmp_path / "e.onnx"],
            "verify": ["verify", onnx, "--reference", timm_folder, "--data", image_data]}[command]
    code, _, err = run_cli(*args, "-q")
    assert code == 0, err
    assert reads == [image_data.name] and loads == [timm_folder.name], (reads, loads)


def test_figures_are_never_measured_on_the_repair_data(tmp_path, timm_folder, image_data):
    """`--eval` naming the repair data (the same folder, or a copy of every sample) is exit 2 naming
    it, before any work; an evaluation set sharing some samples with the repair data is measured on
    the others only, and the report says how many were left out."""
    copy = tmp_path / "copy"
    shutil.copytree(image_data, copy)
    for ev in (image_data, copy):
        code, out, err = run_cli("fix", timm_folder, "--data", image_data, "--group-by", "place", "--recipe", "dfr",
                                 "--eval", ev, "--out", tmp_path / "fixed", "-q")
        assert code == 2 and err.count("\n") == 1 and "is the repair data itself" in err and str(ev) in err, err
        assert not (tmp_path / "fixed").exists()
    mixed = make_images(tmp_path / "mixed", seed=1)
    with open(image_data / "metadata.csv") as f:
        shared = list(csv.DictReader(f))[:4]
    with open(mixed / "metadata.csv") as f:
        rows = list(csv.DictReader(f))
    for i, r in enumerate(shared):                       # 4 of the repair set's images, under new names
        shutil.copy(image_data / r["img_filename"], mixed / r["y"] / f"shared{i}.png")
        rows.append({**r, "img_filename": f"{r['y']}/shared{i}.png"})
    with open(mixed / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "place"])
        w.writeheader()
        w.writerows(rows)
    code, out, err = run_cli("fix", timm_folder, "--data", image_data, "--group-by", "place", "--recipe", "dfr",
                             "--eval", mixed, "--out", tmp_path / "fixed", "--json", "-q")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["after"]["n"] == len(rows) - 4 == rep["before"]["n"]
    assert "4 also in the repair set left out" in rep["measured_on"]
    assert any("4 of the" in w and "also in the repair data" in w for w in rep["warnings"])


def test_two_tables_in_one_folder_are_two_data_sets(tmp_path, bert_folder):
    """A repair table and an evaluation table side by side in one folder are different data (the
    folder is not what identifies a table)."""
    val = make_texts(tmp_path / "val.csv", n=40, seed=1)
    test = tmp_path / "test.csv"
    test.write_text("text,label,negation\nthe plot never was great fun at all,positive,yes\n"
                    "a boring awful movie is awful,negative,no\n")
    code, out, err = run_cli("fix", bert_folder, "--data", val, "--recipe", "dfr", "--eval", test,
                             "--out", tmp_path / "fixed", "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["after"]["n"] == 2


def test_every_file_a_run_reads_is_protected_and_reports_need_force(tmp_path, timm_folder, image_data):
    """The recipe YAML (and its plugin files), a zoo manifest and its rows' recipes are inputs: an
    output over or around them is exit 2 naming both, before any work, whatever --force says. An
    existing report, and the JSON beside it (a name the user did not type), is replaced only with
    --force. The embedding cache and a zoo's report and journal never go into an input model folder."""
    digest = lambda: digest_tree(tmp_path)                                           # noqa: E731
    b = tmp_path / "b"
    b.mkdir()
    (b / "my-recipe.yaml").write_text("candidates:\n  - method: dfr\n")
    before = digest()
    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", b / "my-recipe.yaml", "--out", b,
                           "--force", "-q")
    assert code == 2 and "recipe (--recipe)" in err and err.count("\n") == 1, err
    assert digest() == before
    # a zoo whose row output is the folder holding the manifest and the row's recipe
    z = tmp_path / "z"
    z.mkdir()
    (z / "r.yaml").write_text("candidates:\n  - method: dfr\n")
    (z / "zoo.yaml").write_text(yaml.safe_dump({"models": [
        {"name": "a", "checkpoint": str(timm_folder), "data": str(image_data), "recipe": "r.yaml", "output": str(z)}]}))
    before = digest()
    code, _, err = run_cli("zoo", z / "zoo.yaml", "--out-dir", tmp_path / "rep", "--force", "-q")
    assert code == 2 and ("manifest" in err or "recipe of row 1" in err), err
    assert digest() == before
    # reports: an existing one (and its JSON) needs --force
    a = tmp_path / "a"
    a.mkdir()
    (a / "r.json").write_text("my notes")
    (a / "r.html").write_text("my page")
    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "dfr", "--out", a / "fixed",
                           "--report", a / "r.html", "-q")
    assert code == 2 and "--report" in err and "--force" in err, err
    assert (a / "r.json").read_text() == "my notes" and (a / "r.html").read_text() == "my page"
    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "dfr", "--out", a / "fixed",
                           "--report", a / "r.html", "--force", "-q")
    assert code == 0 and (a / "r.html").read_text() != "my page", err
    # the cache and a zoo's report folder inside an input model folder
    model = tmp_path / "model"
    shutil.copytree(timm_folder, model)
    before = digest_tree(model)
    code, _, err = run_cli("eval", model, "--data", image_data, "--cache-dir", model / "cache", "-q")
    assert code == 2 and "--cache-dir" in err and "input model" in err, err
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"models": [{"name": "m", "checkpoint": str(model),
                                                                 "data": str(image_data)}]}))
    code, _, err = run_cli("zoo", tmp_path / "m.yaml", "--mode", "eval", "--out-dir", model, "-q")
    assert code == 2 and "--out-dir" in err, err
    assert digest_tree(model) == before


def test_an_output_named_dot_or_dotdot_is_exit_2_before_any_work(tmp_path, timm_folder, image_data, monkeypatch):
    inner = tmp_path / "I" / "inner"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    for out in (".", "..", str(inner / "..")):
        code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "dfr", "--out", out, "--force",
                               "-q")
        assert code == 2 and "must be named" in err and err.count("\n") == 1, (out, err)
    assert list(inner.iterdir()) == [] and [p.name for p in (tmp_path / "I").iterdir()] == ["inner"]


def test_a_train_set_that_cannot_serve_is_refused_before_any_work(tmp_path, timm_folder, image_data, monkeypatch):
    """--train with the wrong modality or a label the model does not have is exit 2 naming it right
    after the model loads: before the repair set is embedded or anything is fitted."""
    import repair.pipeline as pipeline

    def no_work(*a, **k):
        raise AssertionError("the repair set was embedded before --train was checked")

    monkeypatch.setattr(pipeline, "prepare_data", no_work)
    texts = make_texts(tmp_path / "t.csv")
    wolves = make_images(tmp_path / "w", n_per_class=2, classes=("wolf",))
    for train, words in ((texts, "text"), (wolves, "wolf")):
        code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "clp-ablation", "--train", train,
                               "--out", tmp_path / "o", "-q")
        assert code == 2 and words in err and err.count("\n") == 1, err


def test_a_model_args_file_is_an_input(tmp_path, timm_folder, image_data):
    """``--model-args FILE.json`` is read for the run: an output that would replace it (here the JSON
    beside ``--report FILE.html``) is exit 2 naming it, whatever --force says, and it is untouched."""
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(timm_folder / "config.json", d / "args.json")           # a timm config.json: its model_args
    before = digest_tree(d)
    code, _, err = run_cli("fix", timm_folder / "model.safetensors", "--arch", "test_resnet", "--class-names",
                           "cat,dog,fox", "--model-args", d / "args.json", "--data", image_data, "--recipe", "dfr",
                           "--out", d / "fixed.safetensors", "--report", d / "args.html", "--force", "-q")
    assert code == 2 and "args.json" in err and err.count("\n") == 1, err
    assert digest_tree(d) == before


def test_training_data_never_holds_what_the_figures_are_measured_on(tmp_path, timm_folder, image_data):
    """--train samples that are also in the repair data or --eval are left out of training (the choice
    and the figures are measured there); --train that is the repair data itself is exit 2 naming it."""
    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "clp-ablation", "--train", image_data,
                           "--budget", "2steps", "--out", tmp_path / "o", "-q")
    assert code == 2 and "every sample of --train" in err and err.count("\n") == 1, err
    extra = make_images(tmp_path / "extra", n_per_class=2, seed=7)
    mixed = tmp_path / "mixed"
    shutil.copytree(image_data, mixed)
    with open(extra / "metadata.csv") as f:
        new = list(csv.DictReader(f))
    for r in new:
        shutil.copy(extra / r["img_filename"], mixed / r["y"] / ("x" + Path(r["img_filename"]).name))
    with open(mixed / "metadata.csv", "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "place"])
        w.writerows({**r, "img_filename": f"{r['y']}/x{Path(r['img_filename']).name}"} for r in new)
    code, out, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "clp-ablation", "--train", mixed,
                             "--budget", "2steps", "--out", tmp_path / "o", "--json", "-q")
    assert code == 0, err
    rep = json.loads(out)
    n_repair = len(list(csv.DictReader(open(image_data / "metadata.csv"))))
    assert any(f"{n_repair} of the {n_repair + len(new)} samples of --train" in w for w in rep["warnings"])
    # the repair images saved again as BMP (other bytes, the same pixels) are the repair samples too
    bmp = tmp_path / "bmp"
    rows = _resave(image_data, bmp, "BMP") + [{**r, "img_filename": f"{r['y']}/x{Path(r['img_filename']).name}"}
                                              for r in new]
    for r in new:
        shutil.copy(extra / r["img_filename"], bmp / r["y"] / ("x" + Path(r["img_filename"]).name))
    with open(bmp / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "place"])
        w.writeheader()
        w.writerows(rows)
    code, out, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "clp-ablation", "--train", bmp,
                             "--budget", "2steps", "--out", tmp_path / "o", "--json", "-q", "--force")
    assert code == 0, err
    assert any(f"{n_repair} of the {n_repair + len(new)} samples of --train" in w for w in json.loads(out)["warnings"])


def test_figures_need_held_out_samples_and_their_warnings_reach_the_report(tmp_path, timm_folder):
    """A repair set too small to hold out any sample is exit 2 (it printed figures of 0 samples);
    label-free runs warn about small inferred groups in the figures too; the warnings, the share
    actually held out and the duplicate counts reach the HTML report and its JSON."""
    tiny = make_images(tmp_path / "tiny", n_per_class=1, seed=6)
    code, _, err = run_cli("fix", timm_folder, "--data", tiny, "--recipe", "dfr", "--out", tmp_path / "o", "-q")
    assert code == 2 and "too small to hold out" in err and err.count("\n") == 1, err
    # every row one sample (an audit: the message spoke of size only): it says the copies are why
    same = make_images(tmp_path / "same", n_per_class=1, seed=6)
    with open(same / "metadata.csv") as f:
        rows = list(csv.DictReader(f))
    with open(same / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([r for r in rows for _ in range(8)])
    code, _, err = run_cli("fix", timm_folder, "--data", same, "--recipe", "dfr", "--out", tmp_path / "o", "-q")
    assert code == 2 and f"{8 * len(rows)} samples, {len(rows)} distinct" in err and err.count("\n") == 1, err
    small = make_images(tmp_path / "small", n_per_class=2, seed=5)
    code, out, err = run_cli("fix", timm_folder, "--data", small, "--recipe", "neurontune", "--out", tmp_path / "o",
                             "--report", tmp_path / "r.html", "--json", "-q")
    assert code == 0, err
    rep = json.loads(out)
    held = rep["settings"]["splits"]["report"]
    assert f"held-out {round(100 * held / 6)}% of the repair set ({held} samples)" in rep["measured_on"]
    figs = [w for w in rep["warnings"] if w.startswith("the reported figures")]
    assert figs and all("|correct" in w or "|misclassified" in w for w in figs)     # the inferred groups
    page = (tmp_path / "r.html").read_text()
    assert "warning: the reported figures" in page
    text = (tmp_path / "r.json").read_text()
    assert all(json.dumps(w) in text for w in rep["warnings"])


def test_a_model_repair_input_no_candidate_uses_is_refused(tmp_path, timm_folder, image_data):
    """--train given to a recipe whose model repairs do not read it (mixft, recompose) is exit 2 naming
    it and the methods that take it, instead of being ignored in silence."""
    extra = make_images(tmp_path / "extra", n_per_class=2, seed=7)
    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "mixft", "--train", extra,
                           "--budget", "2steps", "--out", tmp_path / "o", "-q")
    assert code == 2 and "--train: no candidate of recipe 'mixft' uses it" in err and "clp" in err, err


def test_expect_groups_naming_another_column_is_bad_input():
    from repair.rules import expected_group_names

    fig = {"per_class": [{"name": "a"}, {"name": "b"}]}
    with pytest.raises(BadInput) as e:
        expected_group_names(fig, "place", ["a|foo=land"], "--expect-groups")
    assert "foo" in str(e.value) and "--expect-groups" in str(e.value)
    assert expected_group_names(fig, "place", ["a|place=land", "b|land"], "--expect-groups") == \
        ["a|place=land", "b|place=land"]


# ------------------------------------------------------------------ honest figures on --eval data too
def test_figures_on_few_or_no_samples_are_flagged_wherever_they_are_measured(tmp_path, timm_folder, image_data):
    """The held-out part's small groups were always flagged; the same sentence now comes for --eval
    data (fix), for `repair eval` and for a zoo's eval mode, and a group of the column with no samples
    there is named (its worst-group figure cannot speak for it)."""
    from repair.selection import figure_warnings

    ev = make_images(tmp_path / "ev", n_per_class=8, seed=5)                 # 4 samples per class x place
    table = ev / "metadata.csv"
    table.write_text("\n".join(l for l in table.read_text().splitlines() if not l.endswith("fox,water")) + "\n")
    code, out, err = run_cli("fix", timm_folder, "--data", image_data, "--group-by", "place", "--eval", ev,
                             "--recipe", "dfr", "--out", tmp_path / "o", "--json", "-q")
    assert code == 0, err
    ws = json.loads(out)["warnings"]
    small = [w for w in ws if w.startswith("the reported figures (--eval data): group ") and "only 4 samples" in w]
    assert len(small) == 5, ws
    assert "the reported figures (--eval data): group fox|place=water has no samples in it, so no figure speaks " \
           "for it" in ws and "warning: the reported figures (--eval data): group fox|place=water" in err
    code, out, err = run_cli("eval", timm_folder, "--data", ev, "--group-by", "place", "--json", "-q")
    assert code == 0 and len(json.loads(out)["warnings"]) == 6, err
    assert "warning: the figures: group cat|place=land has only 4 samples (fewer than 10)" in err
    # the rule itself: a group with 10 samples is fine, label-free figures speak of the inferred groups
    fig = {"per_group": [{"name": "a", "n": 10}, {"name": "b", "n": 9}, {"name": "c", "n": 0}], "absent_groups": ["d"]}
    assert [w.split(": group ")[1].split(" ")[0] for w in figure_warnings(fig, what="x")] == ["b", "c", "d"]
    free = {"per_group": None, "per_inferred_group": [{"name": "a by original", "n": 0}, {"name": "b", "n": 3}]}
    assert [w.split(": group ")[1].split(" ")[0] for w in figure_warnings(free, what="x")] == ["b"]


def test_zoo_exit_code_says_whether_a_model_failed_its_gate_or_could_not_be_run(tmp_path, timm_folder, image_data):
    m = _zoo(tmp_path, timm_folder, image_data, n=3)
    broken = tmp_path / "broken"
    shutil.copytree(timm_folder, broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])                 # passes the manifest check
    doc = yaml.safe_load(m.read_text())
    doc["models"][2]["checkpoint"] = str(broken)
    doc["models"][0]["gate"] = 0
    m.write_text(yaml.safe_dump(doc))
    code, out, err = run_cli("zoo", m, "--out-dir", tmp_path / "r", "--json", "-q")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: 1 model(s) could not be run: m2 (exit 2)"), err
    s = json.loads(out)["summary"]
    assert s["errors"] == ["m2"] and s["passed"] == 1 and s["no_gate"] == ["m1"], s
    assert "3 models: 1 passed, 1 without a gate, 1 could not be run" in (tmp_path / "r" / "zoo-report.html").read_text()


def test_written_weights_get_the_users_usual_permissions(tmp_path, timm_folder, image_data):
    """safetensors writes its files 0600; an output (and a cache entry) is any file the user writes:
    0666 less the umask, as the ONNX file beside it."""
    old = os.umask(0o022)
    try:
        code, _, err = run_cli("fix", timm_folder / "model.safetensors", "--data", image_data, "--recipe", "dfr",
                               "--out", tmp_path / "x.safetensors", "--cache-dir", tmp_path / "cache", "-q")
    finally:
        os.umask(old)
    assert code == 0, err
    entries = list((tmp_path / "cache").glob("*.safetensors"))
    assert entries, "no cache entry written"
    for p in [tmp_path / "x.safetensors", *entries]:
        assert oct(p.stat().st_mode & 0o777) == oct(0o644), p


def test_a_threshold_with_a_huge_exponent_is_refused_at_once():
    """``--fail-under-wga 1e-100000000`` built a 100-million-digit fraction (a hang at full CPU);
    now refused like any malformed threshold, and ordinary exponents still read exactly."""
    import time

    from repair.rules import parse_threshold

    t0 = time.perf_counter()
    for bad in ("1e-100000000", "1e+99999999%", "0." + "0" * 200 + "1"):
        with pytest.raises(ValueError):
            parse_threshold(bad)
    assert time.perf_counter() - t0 < 5.0
    assert float(parse_threshold("7e-1")) == 0.7 and float(parse_threshold("1e-5")) == 1e-5


def test_copies_in_the_measured_data_are_said_and_counted_once_for_the_small_group_warning(tmp_path, timm_folder):
    """Found by an audit: `repair eval` on a table listing one image 12 times per group passed a 100% gate
    with n=12 and no warning (fix warns about duplicates; eval did not). Now the figures say how many
    copies there are, and a group of one distinct sample is warned about as such."""
    data = make_images(tmp_path / "d", n_per_class=3)
    with open(data / "metadata.csv") as f:
        rows = list(csv.DictReader(f))
    firsts = {}
    for r in rows:
        firsts.setdefault((r["y"], r["place"]), r)
    with open(data / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "place"])
        w.writeheader()
        w.writerows([r for r in firsts.values() for _ in range(12)])
    code, out, err = run_cli("eval", timm_folder, "--data", data, "--group-by", "place", "--json", "-q")
    rep = json.loads(out)
    assert code == 0 and rep["duplicates"]["n_unique"] == len(firsts) and rep["n"] == 12 * len(firsts), err
    assert all(g["n"] == 12 and g["n_distinct"] == 1 for g in rep["per_group"])
    assert "duplicate sample(s)" in err and "has only 1 distinct samples (12 rows)" in err, err


def test_evaluation_texts_the_model_reads_as_repair_texts_are_left_out(tmp_path, bert_folder):
    """Found by an audit: --eval texts that differ from repair texts only in case and spacing (which the
    lowercasing tokenizer drops) were "separate evaluation data" with the repair texts' own figures.
    The model reads them as the same samples: left out like byte-identical copies, and an --eval that
    is all such copies is refused (exit 2), by `repair fix --eval` and `repair eval --exclude`."""
    repair = make_texts(tmp_path / "r.csv", n=60, seed=0)
    with open(repair) as f:
        rrows = list(csv.DictReader(f))
    norm = lambda t: " ".join(t.lower().split())                           # noqa: E731
    copies = tmp_path / "copies.csv"
    with open(copies, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label", "negation"])
        w.writeheader()
        w.writerows({**r, "text": r["text"].upper() + "  "} for r in rrows)
    code, _, err = run_cli("fix", bert_folder, "--data", repair, "--recipe", "dfr", "--eval", copies,
                           "--out", tmp_path / "o1", "-q")
    assert code == 2 and "as the model reads them" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o1").exists()
    fresh = make_texts(tmp_path / "f.csv", n=60, seed=5)
    with open(fresh) as f:
        frows = list(csv.DictReader(f))
    mixed = tmp_path / "mixed.csv"
    erows = frows + [{**r, "text": " " + r["text"].title()} for r in rrows[:10]]
    with open(mixed, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label", "negation"])
        w.writeheader()
        w.writerows(erows)
    same = sum(norm(r["text"]) in {norm(x["text"]) for x in rrows} for r in erows)
    assert 10 <= same < len(erows)
    code, out, err = run_cli("fix", bert_folder, "--data", repair, "--recipe", "dfr", "--eval", mixed,
                             "--out", tmp_path / "o2", "--json", "-q")
    rep = json.loads(out)
    assert code == 0 and rep["after"]["n"] == len(erows) - same, err
    assert f"{same} also in the repair set left out" in rep["measured_on"]
    code, out, err = run_cli("eval", bert_folder, "--data", mixed, "--exclude", repair, "--json", "-q")
    assert code == 0 and json.loads(out)["excluded"]["n"] == same and json.loads(out)["n"] == len(erows) - same, err


def _resave(src: Path, dst: Path, fmt: str, rows=None) -> Path:
    """``src``'s images (or those of ``rows``) saved again as ``fmt``: the same pixels, other bytes."""
    from PIL import Image

    with open(src / "metadata.csv") as f:
        all_rows = list(csv.DictReader(f))
    out = []
    for r in (rows if rows is not None else all_rows):
        rel = str(Path(r["img_filename"]).with_suffix("." + fmt.lower()))
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src / r["img_filename"]) as im:
            im.save(dst / rel, format=fmt)
        out.append({**r, "img_filename": rel})
    return out


def test_evaluation_images_with_the_repair_images_pixels_are_left_out(tmp_path, timm_folder):
    """Found by an audit: the repair set's images saved again in another format (the same pixels,
    other bytes) were "separate evaluation data" with the repair set's own figures. They are the same
    samples to the model: left out like byte-identical copies, and an --eval that is all such copies
    is refused (exit 2), by `repair fix --eval` and `repair eval --exclude`."""
    import hashlib

    repair = make_images(tmp_path / "r", n_per_class=4, seed=0)
    copies = tmp_path / "copies"
    rows = _resave(repair, copies, "BMP")
    with open(copies / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "place"])
        w.writeheader()
        w.writerows(rows)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()          # noqa: E731
    assert not {digest(p) for p in copies.rglob("*.bmp")} & {digest(p) for p in repair.rglob("*.png")}
    code, _, err = run_cli("fix", timm_folder, "--data", repair, "--recipe", "dfr", "--eval", copies,
                           "--out", tmp_path / "o1", "-q")
    assert code == 2 and "as the model reads them" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o1").exists()
    code, _, err = run_cli("eval", timm_folder, "--data", copies, "--exclude", repair, "-q")
    assert code == 2 and "as the model reads them" in err, err
    # fresh images of another size (not decoded: no repair image has it) and five re-encoded repair images
    mixed = make_images(tmp_path / "m", n_per_class=3, seed=7, size=40)
    with open(mixed / "metadata.csv") as f:
        fresh = list(csv.DictReader(f))
    with open(repair / "metadata.csv") as f:
        rrows = list(csv.DictReader(f))
    again = _resave(repair, mixed, "TIFF", rows=rrows[:5])
    with open(mixed / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "place"])
        w.writeheader()
        w.writerows(fresh + again)
    code, out, err = run_cli("fix", timm_folder, "--data", repair, "--recipe", "dfr", "--eval", mixed,
                             "--out", tmp_path / "o2", "--json", "-q")
    rep = json.loads(out)
    assert code == 0 and rep["after"]["n"] == len(fresh), err
    assert "5 also in the repair set left out" in rep["measured_on"]
    code, out, err = run_cli("eval", timm_folder, "--data", mixed, "--exclude", repair, "--json", "-q")
    doc = json.loads(out)
    assert code == 0 and doc["excluded"]["n"] == 5 and doc["n"] == len(fresh), err
    # without the cache: only the images of a size both sets have are decoded, and the copies still found
    code, out, err = run_cli("eval", timm_folder, "--data", mixed, "--exclude", repair, "--json", "-q", "--no-cache")
    assert code == 0 and json.loads(out)["excluded"]["n"] == 5, err
    # a changed pixel is another image
    from PIL import Image

    one = mixed / again[0]["img_filename"]
    with Image.open(one) as im:
        px = im.convert("RGB")
    px.putpixel((0, 0), tuple((v + 1) % 256 for v in px.getpixel((0, 0))))
    px.save(one, format="TIFF")
    code, out, err = run_cli("eval", timm_folder, "--data", mixed, "--exclude", repair, "--json", "-q")
    assert code == 0 and json.loads(out)["excluded"]["n"] == 4, err


def _model_input_ids(data, model, cache, n_bytes_distinct: int):
    """(the data, its duplicate ids by model input): checks that its bytes are all distinct and that a
    cold and a warm extraction (``cache``) give the same input digests."""
    import torch

    from repair.adapters import load_model
    from repair.data import load_data
    from repair.embeddings import extract

    d, a = load_data(data), load_model(model)
    assert int(d.duplicate_ids().unique().numel()) == n_bytes_distinct          # bytes: all distinct
    cold = extract(a, d, cache_dir=cache, progress=False)
    warm = extract(a, d, cache_dir=cache, progress=False)
    assert not cold.from_cache and warm.from_cache and torch.equal(cold.inputs, warm.inputs)
    return d, d.duplicate_ids(warm.inputs)


def test_a_repair_image_saved_again_in_another_format_is_one_sample_to_the_splits(tmp_path, timm_folder):
    """The repair set holding its images twice, once as PNG and once as BMP (other bytes, the same
    pixels): the copies were separate samples, so a copy could sit in the fitted part and its twin in
    the held-out part the figures are measured on. The model is fed them identically: one sample
    (the embeddings' input digests, cached with them: a warm run finds the same)."""
    data = make_images(tmp_path / "d", n_per_class=4, seed=0)
    with open(data / "metadata.csv") as f:
        rows = list(csv.DictReader(f))
    copies = _resave(data, data, "BMP")
    with open(data / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "place"])
        w.writeheader()
        w.writerows(rows + copies)
    d, ids = _model_input_ids(data, timm_folder, tmp_path / "c", 2 * len(rows))
    assert ids[:len(rows)].tolist() == list(range(len(rows))) and ids[len(rows):].tolist() == list(range(len(rows)))
    code, out, err = run_cli("fix", timm_folder, "--data", data, "--recipe", "dfr", "--out", tmp_path / "o",
                             "--json", "-q", "--cache-dir", tmp_path / "c2")
    rep = json.loads(out)
    assert code == 0 and rep["duplicates"]["n_duplicates"] == len(rows), err
    assert "duplicate sample(s)" in err
    code, out, err = run_cli("eval", timm_folder, "--data", data, "--json", "-q")
    assert code == 0 and json.loads(out)["duplicates"]["n_unique"] == len(rows), err


def test_a_repair_text_the_tokenizer_reads_as_another_is_one_sample_to_the_splits(tmp_path, bert_folder):
    """Found by an audit: a repair set holding each text twice, once in upper case (other bytes, the
    same tokens to a lowercasing tokenizer): the copies were separate samples to the splits, so most of
    the held-out rows behind the figure were, as the model reads them, rows the repair trained on --
    while `--eval` and `--train` already counted such texts as one. One rule now: the model's input
    (token ids) joins them, cold or warm, in `fix`'s splits and in `eval`'s duplicate counts."""
    src = make_texts(tmp_path / "r.csv", n=30, seed=0)
    data = tmp_path / "twice.csv"
    rows = texts_with_upper_copies(src, data)
    d, ids = _model_input_ids(data, bert_folder, tmp_path / "c", 2 * len(rows))
    assert ids[len(rows):].tolist() == ids[:len(rows)].tolist()
    assert int(ids.unique().numel()) == int(d.duplicate_ids()[:len(rows)].unique().numel())
    code, out, err = run_cli("fix", bert_folder, "--data", data, "--recipe", "dfr", "--out", tmp_path / "o",
                             "--json", "-q", "--no-cache")
    rep = json.loads(out)
    assert code == 0 and rep["duplicates"]["n_duplicates"] >= len(rows), err
    code, out, err = run_cli("eval", bert_folder, "--data", data, "--json", "-q", "--no-cache")
    assert code == 0 and json.loads(out)["duplicates"]["n_unique"] <= len(rows), err


def test_image_input_keys_are_cached_beside_the_embeddings(tmp_path, timm_folder, monkeypatch, capsys):
    """A warm `fix --eval` / `eval --exclude` of image data decodes no image: every image's model-input
    digest is kept in the cache, keyed by the data's fingerprint and the model's preprocessing (a
    changed file is another entry); an entry that does not read back whole is recomputed. The keys
    are the embeddings' input digests (one rule of "the same image" within a set and across sets)."""
    import repair.embeddings as remb
    from repair.adapters import load_model
    from repair.data import load_data
    from repair.embeddings import extract, image_input_keys

    data = make_images(tmp_path / "d", n_per_class=2, seed=0)
    adapter = load_model(timm_folder)
    d, cache = load_data(data), tmp_path / "c"
    first = image_input_keys(adapter, d, cache)
    inputs = extract(adapter, d, cache_dir=tmp_path / "e", progress=False).inputs
    assert first == [bytes(r.tolist()).hex() for r in inputs]
    (entry,) = list(cache.glob("inputs-*.json"))

    def boom(*a, **k):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(remb, "_image_input_keys", boom)
    assert image_input_keys(adapter, load_data(data), cache) == first          # warm: nothing decoded
    monkeypatch.undo()
    doc = json.loads(entry.read_text())
    entry.write_text(json.dumps({**doc, "digests": doc["digests"][:-1]}))  # a short entry: recomputed
    assert image_input_keys(adapter, load_data(data), cache) == first
    assert len(json.loads(entry.read_text())["digests"]) == len(first)
    # a well-formed entry with one digit changed (it would name another image: --eval would leave out
    # other samples, the figures changed silently): its sha256 no longer holds, recomputed with a notice
    doc = json.loads(entry.read_text())
    flipped = ("0" if doc["digests"][1][0] != "0" else "1") + doc["digests"][1][1:]
    entry.write_text(json.dumps({**doc, "digests": [doc["digests"][0], flipped, *doc["digests"][2:]]}))
    capsys.readouterr()
    assert image_input_keys(adapter, load_data(data), cache) == first
    assert "input-digest cache entry" in capsys.readouterr().err and json.loads(entry.read_text()) == doc
    from PIL import Image

    one = Path(d.items[0])
    Image.new("RGB", (36, 36), (1, 2, 3)).save(one)                      # a changed file: another entry
    again = image_input_keys(adapter, load_data(data), cache)
    assert again[0] != first[0] and again[1:] == first[1:] and len(list(cache.glob("inputs-*.json"))) == 2
    assert image_input_keys(adapter, load_data(data), use_cache=False) == again


def test_a_repair_image_saved_again_at_the_models_input_size_is_left_out_of_the_figures(tmp_path, timm_folder):
    """Found by an audit: images were compared across data sets by their decoded pixels before the
    model's resize, within a repair set by the model's input; a repair image saved again at the model's
    input size was one sample to the splits but "separate evaluation data" to `fix --eval` (its figures
    counting 12 rows the head was fitted on), `eval --exclude` and `--train`. One rule now: the model's
    input."""
    import json as _json

    from PIL import Image
    from timm.data import create_transform

    repair = make_images(tmp_path / "r", n_per_class=12, size=64, seed=1)
    ev = make_images(tmp_path / "e", n_per_class=12, size=64, seed=2)
    cfg = _json.loads((Path(timm_folder) / "config.json").read_text())["pretrained_cfg"]
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    resize = create_transform(**{k: cfg[k] for k in keys if k in cfg}, is_training=False).transforms[0]
    with open(repair / "metadata.csv") as f:
        rrows = list(csv.DictReader(f))
    with open(ev / "metadata.csv") as f:
        erows = list(csv.DictReader(f))
    for r in rrows[:12]:
        rel = r["img_filename"].replace(".png", "_small.png")
        with Image.open(repair / r["img_filename"]) as im:
            resize(im.convert("RGB")).save(ev / rel)
        erows.append({**r, "img_filename": rel})
    with open(ev / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "place"])
        w.writeheader()
        w.writerows(erows)
    code, out, err = run_cli("fix", timm_folder, "--data", repair, "--eval", ev, "--group-by", "place",
                             "--recipe", "dfr", "--out", tmp_path / "o", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["before"]["n"] == len(erows) - 12 and "12 of the" in err, (rep["measured_on"], err)
    code, out, err = run_cli("eval", timm_folder, "--data", ev, "--group-by", "place", "--exclude", repair,
                             "--json", "-q", "--no-cache")
    assert code == 0 and json.loads(out)["n"] == len(erows) - 12, err


def test_the_held_out_part_counts_copies_once_for_the_small_group_warning(tmp_path, timm_folder):
    """Found by an audit: without --eval, fix checked the held-out part's groups by rows only; copies
    stay together in the split, so a group whose held-out rows were 10 copies of one image got no
    warning (eval and --eval warned). The held-out figures now count each group's distinct samples."""
    data = make_images(tmp_path / "d", n_per_class=40)
    with open(data / "metadata.csv") as f:
        rows = list(csv.DictReader(f))
    one = [r for r in rows if (r["y"], r["place"]) == (rows[0]["y"], rows[0]["place"])]
    keep = [r for r in rows if r not in one] + [r for r in one[:4] for _ in range(10)]  # 4 images x 10 rows
    with open(data / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "place"])
        w.writeheader()
        w.writerows(keep)
    code, out, err = run_cli("fix", timm_folder, "--data", data, "--group-by", "place", "--recipe", "dfr",
                             "--out", tmp_path / "o", "--json")
    rep = json.loads(out)
    assert code == 0, err
    name = f"{rows[0]['y']}|place={rows[0]['place']}"
    held = next(g for g in rep["after"]["per_group"] if g["name"] == name)
    assert held["n"] >= 10 and held["n_distinct"] < 10 and held["n_distinct"] < held["n"], held
    assert f"group {name} has only {held['n_distinct']} distinct samples ({held['n']} rows)" in err, err


def test_eval_of_a_repaired_model_on_its_own_repair_set_is_refused(tmp_path, timm_folder):
    """Found by an audit: `repair eval REPAIRED --data REPAIR_SET --fail-under-wga 50%` passed the gate on
    the rows the repair was fitted on (and on a copy of the folder), though the model's provenance
    records that set. It is now exit 2; other data, and the original model on the set, are measured."""
    data = make_images(tmp_path / "d", n_per_class=8, seed=3)
    other = make_images(tmp_path / "e", n_per_class=8, seed=4)
    code, _, err = run_cli("fix", timm_folder, "--data", data, "--group-by", "place", "--recipe", "dfr",
                           "--out", tmp_path / "rep", "-q")
    assert code == 0, err
    shutil.copytree(data, tmp_path / "copy")
    for d in (data, tmp_path / "copy"):
        code, out, err = run_cli("eval", tmp_path / "rep", "--data", d, "--group-by", "place",
                                 "--fail-under-wga", "0%", "-q")
        assert code == 2 and "the repair set this model was repaired on" in err and err.count("\n") == 1, err
        assert "gate passed" not in out
    code, _, err = run_cli("eval", tmp_path / "rep", "--data", data, "-q")          # no --group-by: the same rows
    assert code == 2, err
    for model, d in ((tmp_path / "rep", other), (timm_folder, data)):
        code, _, err = run_cli("eval", model, "--data", d, "--group-by", "place", "-q")
        assert code == 0, err


def test_eval_and_probe_refuse_an_edited_copy_of_the_repair_set(tmp_path, bert_folder):
    """Found by an audit: the repair set was recognised only row for row (samples, labels and groups in
    order), so a copy with the rows reversed, the labels written as indices or upper case, the group
    column dropped or rows repeated passed a gate on fitted rows (95.5% there, 87.5% on other data), and
    `repair probe` printed its accuracies on the repair set itself. Refused by the distinct samples."""
    import csv

    data = make_texts(tmp_path / "d.csv", n=40, seed=1)
    code, _, err = run_cli("fix", bert_folder, "--data", data, "--group-by", "negation", "--recipe", "dfr",
                           "--out", tmp_path / "rep", "-q")
    assert code == 0, err
    rows = list(csv.DictReader(open(data, newline="")))
    classes = ["negative", "positive"]
    variants = {"reversed": rows[::-1],
                "indices": [{**r, "label": str(classes.index(r["label"]))} for r in rows],
                "upper": [{**r, "label": r["label"].upper()} for r in rows],
                "no-groups": [{"text": r["text"], "label": r["label"]} for r in rows],
                "repeated": rows + rows[:5],
                # found by a review: texts as the model reads them (its tokenizer drops case and spacing)
                "upper-texts": [{**r, "text": r["text"].upper()} for r in rows],
                "spaced-texts": [{**r, "text": r["text"] + " "} for r in rows[::-1]]}
    for name, vrows in variants.items():
        f = tmp_path / f"{name}.csv"
        with open(f, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(vrows[0]))
            w.writeheader()
            w.writerows(vrows)
        for cmd in (["eval", "--fail-under-acc", "0%"], ["probe"]):
            code, out, err = run_cli(cmd[0], tmp_path / "rep", "--data", f, *cmd[1:], "-q")
            assert code == 2 and "the repair set this model was repaired on" in err, (name, cmd, err)
            assert err.count("\n") == 1 and "gate passed" not in out, (name, err)
    for cmd in ("eval", "probe"):
        code, _, err = run_cli(cmd, bert_folder, "--data", data, "-q")       # the original model: measured
        assert code == 0, err


def test_eval_and_probe_leave_the_repair_sets_samples_out_of_a_subset_or_superset(tmp_path, bert_folder):
    """Left alone last session, done now: a strict subset of the repair set passed `repair eval` (a gate
    on fitted rows) and a superset counted its fitted rows in the figures. The provenance records each
    sample the repair read (`repair.samples`); a subset is refused, a superset is measured on its other
    rows, says how many were left out, and the groups left without rows are absent (a gate fails closed)."""
    import csv

    data = make_texts(tmp_path / "d.csv", n=40, seed=1)
    code, _, err = run_cli("fix", bert_folder, "--data", data, "--group-by", "negation", "--recipe", "dfr",
                           "--out", tmp_path / "rep", "-q")
    assert code == 0, err
    rows = list(csv.DictReader(open(data, newline="")))
    other = list(csv.DictReader(open(make_texts(tmp_path / "o.csv", n=120, seed=7), newline="")))
    fitted = {r["text"].lower().strip() for r in rows}
    new = [r for r in other if r["text"].lower().strip() not in fitted]
    assert 10 <= len(new)

    def write(name, rs):
        return write_rows(tmp_path / name, rs)

    sub = write("subset.csv", rows[:30])
    # found by a review: a --max-length that cuts a text changed its tokens, and the repair file itself passed
    for cmd in (["eval", "--fail-under-acc", "0%"], ["probe"], ["eval", "--max-length", "3"], ["probe", "--max-length", "4"]):
        for f in (sub, data):
            code, out, err = run_cli(cmd[0], tmp_path / "rep", "--data", f, *cmd[1:], "-q")
            assert code == 2 and "only samples of the repair set this model was repaired on" in err, (cmd, err)
            assert err.count("\n") == 1 and "gate passed" not in out, err
    sup = write("superset.csv", [{**r, "text": r["text"].upper()} for r in rows[:25]] + new)
    code, out, err = run_cli("eval", tmp_path / "rep", "--data", sup, "--group-by", "negation", "--json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["in_repair_set"] == 25 and doc["n"] == len(new), doc["in_repair_set"]
    assert f"25 of the {25 + len(new)} samples are in the repair set" in err, err
    alone = json.loads(run_cli("eval", tmp_path / "rep", "--data", write("new.csv", new), "--group-by", "negation",
                               "--json", "-q")[1])
    assert alone["in_repair_set"] == 0
    assert doc["accuracy"] == alone["accuracy"] and doc["per_group"] == alone["per_group"]
    code, out, err = run_cli("probe", tmp_path / "rep", "--data", sup, "--json", "-q")
    assert code == 0 and json.loads(out)["in_repair_set"] == 25 and json.loads(out)["n"] == len(new), err
    # the group whose every row is a fitted one: absent, so a worst-group gate cannot pass over it
    neg = [r for r in rows if r["negation"] == "yes"][:3]
    only = write("mixed.csv", neg + [r for r in new if r["negation"] == "no"])
    code, out, err = run_cli("eval", tmp_path / "rep", "--data", only, "--group-by", "negation",
                             "--fail-under-wga", "0%", "--json", "-q")
    doc = json.loads(out)
    assert code == 1 and doc["passed"] is False and doc["in_repair_set"] == 3, err
    assert any("yes" in g for g in doc["absent_groups"]), doc["absent_groups"]


def test_expect_groups_never_waives_a_class_of_the_model_with_no_samples(tmp_path, timm_folder):
    """Found by an audit: `--expect-groups` naming only the groups of the classes present let a
    worst-group gate pass on data with no samples of a class of the model at all (README: a worst-group
    gate fails when a class of the model has no samples). It fails closed, naming the class."""
    from repair.rules import judge

    data = make_images(tmp_path / "d", classes=["cat", "dog"], n_per_class=8)
    code, out, err = run_cli("eval", timm_folder, "--data", data, "--group-by", "place", "--fail-under-wga", "0%",
                             "--expect-groups", "cat|land,cat|water,dog|land,dog|water", "--json", "-q")
    doc = json.loads(out)
    assert code == 1 and doc["passed"] is False and "class(es) fox has no samples" in err, err
    figures = {"per_group": [{"name": "a|g=x", "n": 4, "n_correct": 4}],
               "per_class": [{"name": "a", "n": 4, "n_correct": 4}, {"name": "b", "n": 0, "n_correct": 0}],
               "worst_group_accuracy": 1.0}
    assert judge(figures, "0%", "worst_group", expected=["a|g=x"])["unmeasured"] == ["b"]
    figures["per_class"][1]["n"] = 3
    figures["per_group"].append({"name": "b|g=x", "n": 3, "n_correct": 3})
    assert judge(figures, "0%", "worst_group", expected=["a|g=x"])["passed"]


def test_the_samples_record_answers_membership_and_knows_nothing_when_damaged():
    from repair import provenance as P

    rec = P._record(["a", "b", "b", "c"])
    assert rec.startswith(P.SAMPLES_SCHEME) and len(rec) == len(P.SAMPLES_SCHEME) + 32      # 3 x 8 bytes
    assert P.in_samples_record(["c", "x", "a", "a"], rec) == [True, False, True, True]
    assert P.in_samples_record([], rec) == []
    assert P.in_samples_record(["a"], P._record([])) == [False]
    # damaged, of another scheme or absent: nothing is known (the whole-set digest then decides)
    for bad in (None, 42, "md5:" + rec.split(":", 1)[1], rec[:-2], rec[:-4] + "!!!!",
                P.SAMPLES_SCHEME + __import__("base64").b64encode(bytes(range(16))[::-1]).decode()):
        assert P.in_samples_record(["a"], bad) is None, bad


def test_a_model_repaired_before_the_samples_record_is_still_recognised_by_its_whole_set_digest(tmp_path, bert_folder):
    """The record came with a shorter text key (the embeddings' 16-byte input digest: no second
    tokenization); a model written before it (no ``repair.samples``, ``samples_sha256`` over the whole
    input_keys digests) still has its repair set refused."""
    import csv
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    from repair import load_model
    from repair.data import DataOptions, load_data

    data = make_texts(tmp_path / "d.csv", n=40, seed=1)
    assert run_cli("fix", bert_folder, "--data", data, "--recipe", "dfr", "--out", tmp_path / "rep", "-q")[0] == 0
    f = next((tmp_path / "rep").glob("*.safetensors"))
    with safe_open(str(f), "pt") as sf:
        meta, tensors = dict(sf.metadata()), {k: sf.get_tensor(k) for k in sf.keys()}
    keys = load_model(tmp_path / "rep").input_keys(load_data(data, DataOptions()).items)
    old = hashlib.sha256("".join(f"{k}\n" for k in sorted(set(keys))).encode()).hexdigest()
    settings = json.loads(meta["repair.settings"])
    assert settings["data"]["samples_sha256"] != old            # the key is another now
    settings["data"]["samples_sha256"] = old
    meta["repair.settings"] = json.dumps(settings)
    del meta["repair.samples"]
    save_file(tensors, str(f), metadata=meta)
    rows = list(csv.DictReader(open(data, newline="")))
    rev = tmp_path / "rev.csv"
    with open(rev, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows[::-1])
    code, _, err = run_cli("eval", tmp_path / "rep", "--data", rev, "-q")
    assert code == 2 and "the samples of the repair set this model was repaired on" in err, err


def test_a_repaired_model_repaired_again_never_measures_on_its_earlier_repair_set(tmp_path, bert_folder):
    """Found by a review: `repair fix` of a repaired model measured its figures (the held-out part, or
    --eval) on samples the source's own repair had fitted on. Its provenance records them: they are
    fitted on again, never measured, and data holding only them is refused."""
    import csv

    a = make_texts(tmp_path / "a.csv", n=40, seed=1)
    assert run_cli("fix", bert_folder, "--data", a, "--recipe", "dfr", "--out", tmp_path / "rep1", "-q")[0] == 0
    rows = list(csv.DictReader(open(a, newline="")))
    seen = {r["text"].lower().strip() for r in rows}
    new = [r for r in csv.DictReader(open(make_texts(tmp_path / "o.csv", n=200, seed=9), newline=""))
           if r["text"].lower().strip() not in seen]
    new = list({r["text"]: r for r in new}.values())

    def write(name, rs):
        return write_rows(tmp_path / name, rs)

    code, _, err = run_cli("fix", tmp_path / "rep1", "--data", a, "--recipe", "dfr", "--out", tmp_path / "x", "-q")
    assert code == 2 and "was itself repaired on" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
    both = write("both.csv", rows + new)
    code, out, err = run_cli("fix", tmp_path / "rep1", "--data", both, "--recipe", "dfr", "--out", tmp_path / "rep2",
                             "--json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    assert "was itself repaired on" in err and any("was itself repaired on" in w for w in doc["warnings"])
    # the count is of the repair set's samples the earlier repair fitted, not only those drawn for the held-out part
    assert any(w.startswith(f"{len(rows)} of the {len(rows) + len(new)} samples of the repair set are in the repair set")
               for w in doc["warnings"]), doc["warnings"]
    held = doc["settings"]["splits"]["report"]
    assert 0 < held and doc["after"]["n"] == held
    # the figures' rows are new ones only: measured again on those alone, the same figure
    from repair import load_model
    from repair.api import recorded_repair_rows
    from repair.data import DataOptions, load_data

    d = load_data(both, DataOptions())
    earlier = recorded_repair_rows(load_model(tmp_path / "rep1"), d)
    assert sum(earlier) == len(rows)
    # --eval: its samples of the earlier repair set are left out, and --eval of only those is refused
    ev = write("ev.csv", rows[:10] + new[:20])
    code, out, err = run_cli("fix", tmp_path / "rep1", "--data", write("b.csv", new[20:]), "--eval", ev,
                             "--recipe", "dfr", "--out", tmp_path / "rep3", "--json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["after"]["n"] == 20 and "10 of the 30 samples of --eval are in the repair set" in err, err
    code, _, err = run_cli("fix", tmp_path / "rep1", "--data", write("b2.csv", new[20:]), "--eval",
                           write("ev2.csv", rows[:10]), "--recipe", "dfr", "--out", tmp_path / "rep4", "-q")
    assert code == 2 and "was itself repaired on" in err and err.count("\n") == 1, err
    assert not (tmp_path / "rep4").exists()


def test_warm_runs_of_a_repaired_image_model_read_no_image_file(tmp_path, timm_folder, monkeypatch):
    """The per-sample record first keyed every sample by its bytes too, so each `repair fix` and each
    `repair eval` of a repaired model read every image file again, where the embedding cache spares a
    warm run any image read. Images are keyed by their model input alone (texts by their bytes too)."""
    import repair.data as D

    data, other = make_images(tmp_path / "d", n_per_class=8, seed=1), make_images(tmp_path / "o", n_per_class=8, seed=2)
    cache = ["--cache-dir", tmp_path / "cache"]
    args = ["fix", timm_folder, "--data", data, "--group-by", "place", "--recipe", "dfr", "-q", *cache]
    assert run_cli(*args, "--out", tmp_path / "r1")[0] == 0
    assert run_cli("eval", tmp_path / "r1", "--data", other, "-q", *cache)[0] == 0        # cold: reads them
    reads = []
    real = D.read_image_bytes
    monkeypatch.setattr(D, "read_image_bytes", lambda p, *a, **k: reads.append(p) or real(p, *a, **k))
    assert run_cli(*args, "--out", tmp_path / "r2")[0] == 0
    assert run_cli("eval", tmp_path / "r1", "--data", other, "-q", *cache)[0] == 0
    assert reads == [], reads[:3]
