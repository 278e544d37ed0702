"""HTML reports: `repair fix --report`, the probe's delta histogram, one self-contained page."""
from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_images
from repair_cli.main import app

runner = CliRunner()
VOID = {"meta", "br", "hr", "img", "input", "link", "rect", "line", "path", "circle"}


class _Balance(HTMLParser):
    """Every opened element is closed in order; records what a page would fetch."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.fetches = [], [], []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href") and v and not v.startswith("#"):
                self.fetches.append(v)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()


def assert_self_contained_page(html: str) -> None:
    p = _Balance()
    p.feed(html)
    assert not p.errors and not p.stack, (p.errors, p.stack)
    assert not p.fetches, p.fetches
    assert "url(" not in html and "@import" not in html


@pytest.fixture(scope="module")
def repair_images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("reportdata") / "val", n_per_class=12, seed=4)


def test_fix_report_page_and_json(timm_folder, repair_images, tmp_path):
    html_path = tmp_path / "fix.html"
    res = runner.invoke(app, ["fix", str(timm_folder), "--data", str(repair_images), "--group-by", "place",
                              "--out", str(tmp_path / "fixed"), "--report", str(html_path), "--json", "-q",
                              "--seed", "3"])
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["report"] == str(html_path)
    doc = json.loads(html_path.with_suffix(".json").read_text())
    assert doc["kind"] == "fix" and len(doc["models"]) == 1
    m = doc["models"][0]["result"]
    assert m["candidate"] == rep["candidate"] and m["after"]["per_group"] == rep["after"]["per_group"]
    # the report stands alone: what a rerun must give to reproduce the repair (its seed and recipe's source)
    assert m["seed"] == rep["settings"]["seed"] == 3 and m["recipe_source"] == rep["settings"]["recipe_source"]
    assert f"chose <b>{rep['candidate']}</b> (head repair), seed 3" in html_path.read_text()
    assert m["delta_histogram"]["dims"] == rep["model"]["embedding_dim"]
    html = html_path.read_text()
    assert_self_contained_page(html)
    assert html.count("<svg") >= 1 and "accuracy per group" in html
    assert "<h4>candidates" in html and html.count("<tr") >= len(rep["candidates"])
    assert "<h4>probe</h4>" in html
    for c in rep["candidates"]:
        assert c["candidate"] in html


@pytest.mark.parametrize("name", ["report.txt", "missing/report.html"])
def test_bad_report_path_is_exit_2_before_any_work(timm_folder, repair_images, tmp_path, name):
    out = tmp_path / "fixed"
    res = runner.invoke(app, ["fix", str(timm_folder), "--data", str(repair_images), "--out", str(out),
                              "--report", str(tmp_path / name), "-q"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "--report" in res.stderr
    assert not out.exists()


def test_delta_histogram_and_its_svg():
    from repair.report import histogram_of, histogram_svg

    deltas = torch.tensor([[0.5, -1.0, 0.1, -0.2], [float("nan")] * 4, [2.0, -0.5, 0.0, 0.3]])
    h = histogram_of(deltas, ["a", "b", "c"], bins=6, top=2)
    assert h["n"] == 8 and sum(h["counts"]) == 8 and h["positive"] == 4
    assert h["edges"][0] == -1.0 and h["edges"][-1] == 2.0
    assert h["top"] == [{"class": "c", "neuron": 0, "delta": 2.0}, {"class": "a", "neuron": 0, "delta": 0.5}]
    svg = histogram_svg(h)
    assert svg.count("<rect") == 6 and "#c53030" in svg and "c/#0" in svg
    assert "no neuron deltas" in histogram_svg(histogram_of(torch.full((2, 3), float("nan")), ["a", "b"]))


def test_zoo_page_renders_every_state():
    from repair.report import model_entry, render

    figs = {"n": 4, "accuracy": 0.75, "worst_class_accuracy": 0.5, "worst_group_accuracy": 0.5,
            "worst_group": "x|g=1", "per_group": [{"name": "x|g=1", "n": 2, "accuracy": 0.5},
                                                  {"name": "y|g=0", "n": 2, "accuracy": 1.0}],
            "per_class": [], "per_inferred_group": None}
    result = {"mode": "fix", "model": "m", "family": "timm", "candidate": "dfr <b>", "before": figs,
              "after": {**figs, "worst_group_accuracy": 0.9}, "candidates": [], "delta_histogram": None}
    models = [model_entry("ok", result, gate={"metric": "worst_group", "threshold": 0.7, "value": 0.9, "passed": True}),
              model_entry("broken <model>", None, status="error", error="x: bad"),
              model_entry("later", None, status="pending")]
    doc = {"kind": "zoo", "manifest": "z.yaml", "mode": "fix", "executor": "local", "generated": "now",
           "wall_seconds": 1.0, "interrupted": True,
           "summary": {"models": 3, "passed": 1, "failed": [], "errors": ["broken <model>"], "pending": ["later"]},
           "models": models}
    html = render(doc)
    assert_self_contained_page(html)
    assert "broken &lt;model&gt;" in html and "dfr &lt;b&gt;" in html and "interrupted" in html
    assert html.count('<section class="model"') == 3 and 'data-v="0.900000"' in html


def test_model_anchors_differ_for_names_that_slug_alike():
    from repair.report import model_anchor

    names = ["a.b", "a-b", "a b", "a/b"]
    anchors = [model_anchor(n) for n in names]
    assert len(set(anchors)) == len(names) and all(a.startswith("m-a-b-") for a in anchors)
    assert model_anchor("a.b") == model_anchor("a.b")


def test_every_json_document_is_strict_json(capsys):
    """NaN and infinity (a non-finite ONNX output, an overflowing ratio) are written as null: jq,
    JSON.parse and Python's strict parsing read every document the tool prints or saves."""
    from repair.io import json_text
    from repair.report import report_json
    from repair_cli.app import emit_json

    doc = {"max_abs_diff": float("nan"), "bound": {"ratio": float("inf"), "worst": [-float("inf"), 1.5]}, "n": 3}

    def strict(text):
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))

    emit_json(doc)
    for text in (capsys.readouterr().out, report_json(doc), json_text(doc)):
        assert strict(text) == {"max_abs_diff": None, "bound": {"ratio": None, "worst": [None, 1.5]}, "n": 3}


def test_controls_and_invisible_characters_in_a_users_names_are_shown_not_obeyed(tmp_path):
    """A class or group name holding a bidi override (text that reads otherwise than it is), a
    zero-width space or a terminal escape reaches the page, stderr and stdout as visible escapes; a
    --json document still parses to the very same strings."""
    from conftest import make_timm_folder, run_cli

    evil = "cat\u202e\u200bx\x1b[31m"
    model = make_timm_folder(tmp_path / "m", classes=[evil, "dog", "fox"])
    data = make_images(tmp_path / "d", n_per_class=12, classes=[evil, "dog", "fox"], seed=3)
    code, out, err = run_cli("fix", model, "--data", data, "--group-by", "place", "--recipe", "dfr",
                             "--out", tmp_path / "o", "--report", tmp_path / "r.html")
    assert code == 0, err
    html = (tmp_path / "r.html").read_text()
    for text in (html, out, err):
        assert "\u202e" not in text and "\u200b" not in text and "\x1b" not in text
    assert "cat\\u202e\\u200bx\\u001b[31m" in html and "cat\\u202e\\u200bx\\u001b[31m" in out
    code, out, err = run_cli("eval", model, "--data", data, "--group-by", "place", "--json")
    assert code == 0 and "\u202e" not in out and json.loads(out)["per_class"][0]["name"] == evil, err


def test_a_line_break_in_a_users_name_is_refused_before_it_can_print_a_line_of_its_own(tmp_path):
    """Every control character of a name is shown as an escape but the newline, which separates the
    lines of every message: a group value, a class name or a zoo row's name holding one would print a
    forged line ("gate passed: ...") among the output's. Exit 2 naming the file and the row, with
    nothing on stdout."""
    import csv

    import yaml
    from conftest import make_timm_folder, one_line_naming, run_cli

    forged = "land\ngate passed: worst-group accuracy (x) 50/50 = 100% >= 90%"
    model = make_timm_folder(tmp_path / "m")
    data = make_images(tmp_path / "d", n_per_class=8, seed=3)
    rows = list(csv.DictReader(open(data / "metadata.csv")))
    with open(data / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**r, "place": forged if r["place"] == "land" else r["place"]} for r in rows])
    code, out, err = run_cli("eval", model, "--data", data, "--group-by", "place", "--fail-under-wga", "90%")
    one_line_naming(code, err, data / "metadata.csv", "row 1", "'place' value", "line break")
    assert "gate passed" not in out and not out.strip()
    # without --group-by the column is no name the output shows: the data is read as before
    code, out, err = run_cli("eval", model, "--data", data)
    assert code == 0, err
    # a checkpoint's class name
    bad = make_timm_folder(tmp_path / "m2", classes=["cat", "dog\nfox", "fox"])
    code, out, err = run_cli("eval", bad, "--data", data)
    assert code == 2 and "class 1's name" in err and "line break" in err and len(err.strip().splitlines()) == 1, err
    # a zoo row's name: the manifest is refused before any work
    man = tmp_path / "zoo.yaml"
    man.write_text(yaml.safe_dump({"defaults": {"recipe": "dfr"}, "models": [
        {"name": "a\ngate passed", "checkpoint": str(model), "data": str(data), "output": str(tmp_path / "z")}]}))
    code, out, err = run_cli("zoo", man)
    assert code == 2 and "line break" in err and not (tmp_path / "z").exists(), err


def test_the_training_sentence_writes_the_budget_as_it_is_given():
    """It showed the budget's record, a Python dict (``budget {'seconds': 2.0, 'default': False}``)."""
    from repair.report import training_sentence

    line = training_sentence({"stopped_by": "budget:time", "budget": {"seconds": 2.0, "default": False}})
    assert line == "training ended by budget:time (budget 2s)"
    line = training_sentence({"stopped_by": "epochs", "budget": {"steps": 200, "seconds": 600.0, "default": True}})
    assert line == "training ended by epochs (budget 200steps,600s (default))"
    from repair.modelrepair.finetune import Budget
    from repair.report import budget_text

    for given in ("1000000steps", "8000h", "1234567s", "2.5s", "3epochs,90s"):     # read back as given
        shown = budget_text(Budget.parse(given).describe())
        assert Budget.parse(shown).describe() == Budget.parse(given).describe(), (given, shown)
    assert budget_text({"default": False}) == "none"
    assert budget_text({"seconds": 300.0, "default": True, "cross_fit": 2}) == \
        "300s for each of 2 cross-fit runs (default)"
    assert budget_text({"seconds": 1.0, "default": False, "members": 2}) == "1s for each of 2 members"
    # a cross-fitted run's record holds members too (session 46: it was called "2 members")
    assert budget_text({"steps": 10, "default": False, "members": 2, "cross_fit": 2}) == \
        "10steps for each of 2 cross-fit runs"
