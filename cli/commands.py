"""`repair eval`, `probe`, `fix`, `methods` and `demo`: thin shims over ``repair.api`` and friends."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from repair.errors import BadInput, GateFailed

from .app import app, command, emit_json, log
from .format import eval_table, pct, table
from .options import AsJson, Columns, DataPath, ItemColumns, Load, ModelArg, Runtime


# ------------------------------------------------------------------ eval
@app.command("eval")
@command
def eval_cmd(model: ModelArg, data: DataPath, columns: Columns, load: Load, runtime: Runtime,
             as_json: AsJson = False,
             fail_under_wga: Annotated[Optional[str], typer.Option("--fail-under-wga", help="Exit 1 if worst-group accuracy is below this: a fraction 0-1 (0.8) or a percentage (80%). Also exit 1 if a group has no samples, unless --expect-groups names the groups to expect.")] = None,
             fail_under_acc: Annotated[Optional[str], typer.Option("--fail-under-acc", help="Exit 1 if accuracy is below this: a fraction 0-1 (0.8) or a percentage (80%).")] = None,
             expect_groups: Annotated[Optional[str], typer.Option("--expect-groups", help="Comma-separated groups the data must hold (class|value or class|COL=value); exit 1 if one has no samples. Other empty groups are then only reported.")] = None):
    """Accuracy, per-class and per-group accuracy, worst-group / worst-class; a CI gate."""
    thresholds = {"worst-group accuracy": gate_threshold(fail_under_wga, "--fail-under-wga"),
                  "accuracy": gate_threshold(fail_under_acc, "--fail-under-acc")}
    for flag, given in (("--fail-under-wga", fail_under_wga), ("--expect-groups", expect_groups)):
        if given is not None and columns.group_by is None:
            raise BadInput(f"{flag} needs --group-by (groups are class x the values of that column)")
    expected = None if expect_groups is None else [g.strip() for g in expect_groups.split(",") if g.strip()]
    if expected is not None and (not expected or not all(g.partition("|")[0] and g.partition("|")[2] for g in expected)):
        raise BadInput(f"--expect-groups: give the groups as class|value separated by commas, got {expect_groups!r}")
    check_inputs(model, data, columns)
    from repair.api import evaluate_model

    rep = evaluate_model(model, data, load, columns, runtime)
    gates = []
    for name, val in (("worst-group accuracy", rep["worst_group_accuracy"]), ("accuracy", rep["accuracy"])):
        thr = thresholds[name]
        if thr is not None:
            gates.append({"metric": name, "threshold": thr, "value": val, "passed": val is not None and val >= thr})
    problems = [f"{g['metric']} {pct(g['value'])} < {pct(g['threshold'])}" for g in gates if not g["passed"]]
    if rep.get("absent_groups") is not None:
        missing = group_check(rep, columns.group_by, expected)
        if missing and (expected is not None or thresholds["worst-group accuracy"] is not None):
            problems.append(f"group(s) {', '.join(missing)} have no samples in {data}, so worst-group accuracy "
                            "cannot speak for them" + ("" if expected is not None else
                                                       " (name the groups to expect with --expect-groups)"))
    rep["gates"] = gates
    if as_json:
        emit_json(rep)
    else:
        src = "cache" if rep["embedding"]["from_cache"] else rep["embedding"]["device"]
        print(eval_table(rep, f"{model} on {data}  (embeddings: {src}, {rep['embedding']['seconds']:.2f}s)"))
    if problems:
        raise GateFailed("; ".join(problems))



def check_inputs(model: Path, data: Path, columns) -> None:
    """The model path exists and the data reads (files, columns, labels as text), before torch or the
    model is loaded: a command that fails on its arguments returns at once."""
    from repair.data import load_data

    if not Path(model).exists():
        raise BadInput("model not found", model)
    load_data(data, columns)


def gate_threshold(value: Optional[str], flag: str) -> Optional[float]:
    from repair.metrics import parse_threshold

    if value is None:
        return None
    try:
        return parse_threshold(value)
    except ValueError as e:
        raise BadInput(f"{flag} {e}") from None


def group_check(rep: dict, group_by: str, expected: Optional[list]) -> list[str]:
    """The groups that make the gate fail for having no samples (``rep['missing_groups']``): with
    ``expected``, those of them without samples; else every class x value with no samples."""
    present = {g["name"] for g in rep["per_group"]}
    classes = [c["name"] for c in rep["per_class"]]
    if expected is None:
        missing = list(rep["absent_groups"])
    else:
        missing = []
        for g in expected:
            cls, _, val = g.partition("|")
            if cls not in classes:
                raise BadInput(f"--expect-groups: {cls!r} is not a class of the model ({', '.join(classes)})")
            name = g if val.startswith(f"{group_by}=") else f"{cls}|{group_by}={val}"
            if name not in present:
                missing.append(name)
    rep["missing_groups"] = missing
    return missing


# ------------------------------------------------------------------ probe
@app.command("probe")
@command
def probe_cmd(model: ModelArg, data: DataPath, columns: ItemColumns, load: Load, runtime: Runtime,
              as_json: AsJson = False,
              top: Annotated[int, typer.Option("--top", min=1, help="How many neurons to list.")] = 10):
    """Probe embeddings without group labels: spurious neurons, dispersion, pseudo-groups."""
    check_inputs(model, data, columns)
    from repair.api import probe_model

    rep = probe_model(model, data, load, columns, runtime, top_k=top)
    if as_json:
        emit_json(rep)
        return
    print(f"{model} on {data}: n={rep['n']}  accuracy={pct(rep['accuracy'])}  embedding dim={rep['embedding_dim']}")
    print("\nper class (dispersion = nearest class prototype is another class):")
    print(table(["class", "n", "acc", "misclassified", "dispersion", "neurons with delta>0", "max delta"],
                [[r["class"], r["n"], pct(r["accuracy"]), r["misclassified"], pct(r["dispersion"]),
                  r["spurious_neurons"], "-" if r["max_delta"] is None else f"{r['max_delta']:.3f}"]
                 for r in rep["per_class"]]))
    print("\nmost spurious neurons (delta = median activation misclassified - correct, NeuronTune):")
    print(table(["class", "neuron", "delta", "head weight"],
                [[t["class"], t["neuron"], f"{t['delta']:.3f}", f"{t['head_weight']:.3f}"] for t in rep["top_spurious_neurons"]]))
    print("\npseudo-groups (class x correctly/incorrectly classified):")
    print(table(["group", "n"], [[g["group"], g["n"]] for g in rep["pseudo_groups"]]))


# ------------------------------------------------------------------ fix
def fix_table(rep: dict) -> str:
    out = [f"repaired {rep['model']['source']} -> {rep['output']}",
           f"recipe {rep['recipe']}: chose {rep['candidate']}"
           + (f" by {rep['selection_criterion']}" if rep.get('selection_criterion') else "")]
    if rep["candidates"]:
        out.append(table(["candidate", "selection score", "selection acc", "fit s"],
                         [[c["candidate"], pct(c.get("score")), pct(c.get("selection_accuracy")),
                           c.get("fit_seconds", c.get("skipped"))] for c in rep["candidates"]]))
    if rep.get("neurons_suppressed") is not None:
        out.append(f"neurons suppressed: {rep['neurons_suppressed']}")
    b, a = rep["before"], rep["after"]
    out.append(f"\nbefore -> after, measured on {rep['measured_on']}:")
    rows = [["accuracy", pct(b["accuracy"]), pct(a["accuracy"])],
            ["worst-class accuracy", pct(b["worst_class_accuracy"]), pct(a["worst_class_accuracy"])]]
    if b.get("per_group") is not None:
        rows.append(["worst-group accuracy", pct(b["worst_group_accuracy"]), pct(a["worst_group_accuracy"])])
        rows += [[f"  {gb['name']} (n={gb['n']})", pct(gb["accuracy"]), pct(ga["accuracy"])]
                 for gb, ga in zip(b["per_group"], a["per_group"])]
    elif b.get("per_inferred_group") is not None:
        rows += [[f"  {gb['name']} (n={gb['n']})", pct(gb["accuracy"]), pct(ga["accuracy"])]
                 for gb, ga in zip(b["per_inferred_group"], a["per_inferred_group"])]
    out.append(table(["", "before", "after"], rows))
    if rep.get("export"):
        e = rep["export"]
        out.append(f"\nONNX {e.get('path')}: verified={e.get('passed')}  max|diff|={e.get('max_abs_diff')} "
                   f"(tolerance {e.get('tolerance')})  argmax agreement={pct(e.get('argmax_agreement'))} "
                   f"over {e.get('n_verified')} samples")
    for w in rep.get("warnings") or []:
        out.append(f"warning: {w}")
    t = rep["timing"]
    out.append(f"\ntime: {t['total_seconds']:.1f}s total, embeddings {t['embedding_seconds']:.1f}s"
               f"{' (cache)' if t['embedding_from_cache'] else ''}, head fitting {t['fit_seconds']:.2f}s")
    return "\n".join(out)


@app.command("fix")
@command
def fix_cmd(model: ModelArg, data: DataPath,
            out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output (default: <model>-repaired in the same format).")] = None,
            recipe: Annotated[str, typer.Option("--recipe", help="Built-in recipe name or a YAML path.")] = "auto",
            eval_data: Annotated[Optional[Path], typer.Option("--eval", help="Separate test data for before/after figures.")] = None,
            eval_group_by: Annotated[Optional[str], typer.Option("--eval-group-by", help="Group column of --eval data (default: --group-by).")] = None,
            export: Annotated[Optional[str], typer.Option("--export", help="Also export ONNX and verify it (onnx).")] = None,
            tolerance: Annotated[Optional[float], typer.Option("--tolerance", help="ONNX verification max |diff|.")] = None,
            seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
            budget: Annotated[Optional[str], typer.Option("--budget", help="Model repairs: training budget, e.g. 300steps, 3epochs, 10min (first reached ends training).")] = None,
            train: Annotated[Optional[Path], typer.Option("--train", help="Model repairs: extra training data (same format as --data).")] = None,
            masks: Annotated[Optional[Path], typer.Option("--masks", help="Model repairs on images: a folder of foreground masks (white = object), one per image, same name.")] = None,
            segmenter: Annotated[Optional[Path], typer.Option("--segmenter", help="Model repairs on images: a local transformers CLIPSeg folder for language-guided masks.")] = None,
            generator: Annotated[Optional[str], typer.Option("--generator", help="Image generation for recipes that generate (composite | diffusers).")] = None,
            generator_model: Annotated[Optional[Path], typer.Option("--generator-model", help="A local diffusers inpainting pipeline folder (--generator diffusers).")] = None,
            prompts: Annotated[Optional[Path], typer.Option("--prompts", help="A YAML file of generation prompts (overrides the built-in ones).")] = None,
            force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
            allow_finetune: Annotated[bool, typer.Option("--allow-finetune", help="Recipe auto may escalate to fine-tuning the network (mixft) when it beats the best head on held-out data (= --recipe auto-ft).")] = False,
            report: Annotated[Optional[Path], typer.Option("--report", help="Also write an HTML report (and .json beside it): figures, per-group bars, candidates, the probe's neuron deltas.")] = None,
            *, columns: Columns, load: Load, runtime: Runtime, as_json: AsJson = False):
    """Repair the model from the repair set; write it in the checkpoint's own format."""
    check_inputs(model, data, columns)
    from repair.pipeline import FixOptions, fix_model

    if report is not None:
        from repair.io import check_output

        if report.suffix.lower() not in (".html", ".htm"):
            raise BadInput("--report must be an .html file", report)
        try:
            check_output(report, force=True)   # written at the end: it must be writable now
        except BadInput as e:
            raise BadInput(f"--report: {e.problem}", e.path or report) from None
    if eval_group_by is not None and eval_data is None:
        raise BadInput("--eval-group-by names a group column of the --eval data; give --eval too")
    rep = fix_model(model, data, out, load_opts=load, data_opts=columns, runtime=runtime,
                    options=FixOptions(recipe=recipe, seed=seed, eval_data=str(eval_data) if eval_data else None,
                                       eval_group_by=eval_group_by, export=export, tolerance=tolerance,
                                       budget=budget, train_data=None if train is None else str(train),
                                       masks=None if masks is None else str(masks),
                                       segmenter=None if segmenter is None else str(segmenter), generator=generator,
                                       generator_model=None if generator_model is None else str(generator_model),
                                       prompts=None if prompts is None else str(prompts), force=force,
                                       allow_finetune=allow_finetune),
                    log=log if runtime.progress else (lambda m: None))
    if report is not None:
        from repair.report import fix_report

        rep["report"] = str(fix_report(report, rep, model, data, load, columns, runtime)[0])
    if as_json:
        emit_json(rep)
    else:
        print(fix_table(rep))


@app.command("methods")
@command
def methods_cmd(as_json: AsJson = False):
    """List the registered repair methods and the built-in recipes."""
    import dataclasses

    from repair.methods import list_methods
    from repair.recipes import available

    infos = list_methods()
    if as_json:
        emit_json({"methods": [{"name": m.name, "kind": m.kind, "summary": m.summary, "groups": m.groups,
                                "needs_groups": m.needs_groups, "uses_groups": m.uses_groups,
                                "transform": m.transform.name if m.transform else None,
                                "config": dataclasses.asdict(m.default_config())}
                               for m in infos], "recipes": available()})
        return
    print(table(["method", "kind", "group labels", "summary"],
                [[m.name, m.kind, {"required": "required", "optional": "optional", "never": "never used"}[m.groups],
                  m.summary] for m in infos]))
    print("\nrecipes: " + ", ".join(available()))


# ------------------------------------------------------------------ demo
@app.command("demo")
@command
def demo_cmd(out: Annotated[Path, typer.Option("--out", help="Folder for the demo model and data.")] = Path("repair-demo"),
             seed: Annotated[int, typer.Option("--seed")] = 0,
             size: Annotated[str, typer.Option("--size", help="default | tiny")] = "default",
             recipe: Annotated[str, typer.Option("--recipe", help="Recipe for the repair step.")] = "auto",
             force: Annotated[bool, typer.Option("--force", help="Rebuild even if the folder exists.")] = False,
             as_json: AsJson = False):
    """Build a Waterbirds-like task, train a small timm model with ERM, show its shortcut, repair it."""
    from repair.api import RuntimeOptions, evaluate_model
    from repair.data import DataOptions
    from repair.demo import build_demo
    from repair.pipeline import FixOptions, fix_model

    if out.exists() and any(out.iterdir()) and not force:
        raise BadInput("demo folder exists and is not empty (use --force to rebuild)", out)
    if size not in ("default", "tiny"):
        raise BadInput(f"--size must be default or tiny, got {size!r}")
    art = build_demo(out, seed=seed, size=size, progress=log)
    rt = RuntimeOptions(progress=False)
    test = evaluate_model(art.model_dir, art.test_dir, data_opts=DataOptions(group_by="place"), runtime=rt)
    log("repairing with the validation split as repair set, WITHOUT its group labels ...")
    fixed = fix_model(art.model_dir, art.val_dir, Path(art.model_dir).with_name("model-repaired"),
                      runtime=rt, options=FixOptions(recipe=recipe, seed=seed, eval_data=str(art.test_dir),
                                                     eval_group_by="place", force=True), log=log)
    doc = {"model": str(art.model_dir), "repaired_model": fixed["output"], "train": str(art.train_dir),
           "val": str(art.val_dir), "test": str(art.test_dir), "erm_train_seconds": art.erm_train_seconds,
           "erm_test": test, "fix": fixed}
    if as_json:
        emit_json(doc)
        return
    print(f"demo built in {out} (ERM training {art.erm_train_seconds:.0f}s)")
    print(eval_table(test, "\nERM model on the test split (groups = class x place):"))
    gap = (test["accuracy"] - test["worst_group_accuracy"]) * 100
    print(f"\nThe shortcut: worst-group accuracy is {gap:.1f} points below mean accuracy.\n")
    print(fix_table(fixed))
    b, a = fixed["before"], fixed["after"]
    print(f"\nworst-group accuracy {pct(b['worst_group_accuracy'])} -> {pct(a['worst_group_accuracy'])}, "
          f"accuracy {pct(b['accuracy'])} -> {pct(a['accuracy'])} on the test split (no group labels used).")
    print(f"Try: repair eval {fixed['output']} --data {art.test_dir} --group-by place")
