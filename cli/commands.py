"""`repair eval`, `probe`, `fix`, `methods` and `demo`: thin shims over ``repair.api`` and friends."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from repair.errors import BadInput, GateFailed

from .app import LAZY_COMMANDS, app, command, emit_json, log, logger, one_line, say
from .format import eval_table, pct, table
from .options import (PANEL_GATE, OptionBundle, PANEL_INPUTS, PANEL_OUTPUT, PANEL_REPAIR, AsJson, Columns, DataPath, ItemColumns,
                      DemoSeed, Load, ModelArg, Runtime, Seed)


# ------------------------------------------------------------------ eval
@app.command("eval")
@command
def eval_cmd(model: ModelArg, data: DataPath, columns: Columns, load: Load, runtime: Runtime,
             as_json: AsJson = False,
             fail_under_wga: Annotated[Optional[str], typer.Option("--fail-under-wga", rich_help_panel=PANEL_GATE, help="Exit 1 if worst-group accuracy is below this: a fraction 0-1 (0.8) or a percentage (80%), compared as exact counts (42 of 60 passes 70%). Also exit 1 if a group has no samples, unless --expect-groups names the groups to expect. Default: no gate.")] = None,
             fail_under_acc: Annotated[Optional[str], typer.Option("--fail-under-acc", rich_help_panel=PANEL_GATE, help="Exit 1 if accuracy is below this: a fraction 0-1 (0.8) or a percentage (80%). Default: no gate.")] = None,
             expect_groups: Annotated[Optional[str], typer.Option("--expect-groups", rich_help_panel=PANEL_GATE, help="Comma-separated groups the data must hold (class|value or class|COL=value): the groups a gate requires (needs --fail-under-wga or --fail-under-acc; --fail-under-acc 0% checks only that they have samples); exit 1 if one has no samples. Other empty groups are then only reported (a class of the model with no samples still fails a worst-group gate). Default: every class x value seen.")] = None,
             exclude: Annotated[Optional[Path], typer.Option("--exclude", rich_help_panel=PANEL_GATE, help="Data (a folder or table, read with the same column options) whose samples are left out of the figures: the repair set a model was repaired on, so a re-gate on held-out data never counts a sample the repair fitted on. Groups left without samples fail a worst-group gate. Default: none.")] = None):
    """Accuracy, per-class and per-group accuracy, worst-group / worst-class; a CI gate."""
    from repair.preflight import check_cache_dir, read_inputs
    from repair.rules import check_gate_options, judge_gates, threshold_option

    thresholds = {"worst_group": threshold_option(fail_under_wga, "--fail-under-wga"),
                  "accuracy": threshold_option(fail_under_acc, "--fail-under-acc")}
    if fail_under_wga is not None and columns.group_by is None:
        raise BadInput("--fail-under-wga needs --group-by (groups are class x the values of that column)")
    expected = check_gate_options(thresholds, expect_groups, columns.group_by)     # before any work
    inputs = read_inputs(model, data, columns, data_flag="data (--data)", load_opts=load)
    excluded = None
    if exclude is not None:
        import dataclasses

        from repair.preflight import read_data

        excluded = read_data(exclude, dataclasses.replace(columns, group_by=None))
        inputs.protected.add_data(excluded, "excluded data (--exclude)")
    check_cache_dir(inputs.protected, runtime)
    from repair.api import evaluate_model

    rep = evaluate_model(model, inputs.data, load, columns, runtime, exclude=excluded)
    gates, problems, missing = judge_gates(rep, thresholds, expected, columns.group_by)    # the one home of gates
    if missing is not None:
        rep["missing_groups"] = missing
    rep["gates"] = gates
    rep["passed"] = not problems                      # every gate, the groups --expect-groups requires included
    for w in rep.get("warnings") or []:
        log(f"warning: {w}")
    if as_json:
        emit_json(rep)
    else:
        src = "cache" if rep["embedding"]["from_cache"] else rep["embedding"]["device"]
        say(eval_table(rep, f"{one_line(model)} on {one_line(data)}  (embeddings: {src}, {rep['embedding']['seconds']:.2f}s)"))
        for g in gates:
            say(("gate passed: " if g["passed"] else "gate FAILED: ") + g["message"])
    if problems:
        raise GateFailed("; ".join(problems))


# ------------------------------------------------------------------ probe
@app.command("probe")
@command
def probe_cmd(model: ModelArg, data: DataPath, columns: ItemColumns, load: Load, runtime: Runtime,
              as_json: AsJson = False,
              top: Annotated[int, typer.Option("--top", min=1, help="How many neurons to list.", rich_help_panel=PANEL_OUTPUT)] = 10):
    """Probe embeddings without group labels: spurious neurons, dispersion, pseudo-groups."""
    from repair.preflight import check_cache_dir, read_inputs

    inputs = read_inputs(model, data, columns, data_flag="data (--data)", load_opts=load)
    check_cache_dir(inputs.protected, runtime)
    from repair.api import probe_model

    rep = probe_model(model, inputs.data, load, columns, runtime, top_k=top)
    for w in rep.get("warnings") or []:
        log(f"warning: {w}")
    if as_json:
        emit_json(rep)
        return
    say(f"{one_line(model)} on {one_line(data)}: n={rep['n']}  accuracy={pct(rep['accuracy'])}  embedding dim={rep['embedding_dim']}")
    say("\nper class (dispersion = nearest class prototype is another class):")
    say(table(["class", "n", "acc", "misclassified", "dispersion", "neurons with delta>0", "significant", "max delta"],
                [[r["class"], r["n"], pct(r["accuracy"]), r["misclassified"], pct(r["dispersion"]),
                  r["positive_delta_neurons"], r["spurious_neurons"],
                  "-" if r["max_delta"] is None else f"{r['max_delta']:.3f}"]
                 for r in rep["per_class"]]))
    sig = rep["significance"]
    say(f"\nneurons whose activation is significantly higher in a class's misclassified samples than in its "
        f"correct ones (delta = median misclassified - correct, NeuronTune; p: {sig['test']}, level "
        f"{sig['level']:g} over {sig['tests']} tests). Candidates for a shortcut, not proof: a class feature "
        "that is weak in the misclassified samples can show here too")
    if not sig["tests"]:
        say("none tested: no class has both misclassified and correctly classified samples")
    elif rep["top_spurious_neurons"]:
        say(table(["class", "neuron", "delta", "p", "head weight"],
                  [[t["class"], t["neuron"], f"{t['delta']:.3f}", f"{t['p_value']:.2g}", f"{t['head_weight']:.3f}"]
                   for t in rep["top_spurious_neurons"]]))
    else:
        say("none: no neuron separates misclassified from correct samples beyond what chance gives")
    say("\npseudo-groups (class x correctly/incorrectly classified):")
    say(table(["group", "n"], [[g["group"], g["n"]] for g in rep["pseudo_groups"]]))


# ------------------------------------------------------------------ fix
def fix_table(rep: dict) -> str:
    # paths shown on one line whatever they hold (a folder named "m\ngate passed: ..." forges no line)
    out = [f"repaired {one_line(rep['model']['source'])} -> {one_line(rep['output'])}",
           f"recipe {rep['recipe']}: chose {rep['candidate']}"
           + (f" by {rep['selection_criterion']}" if rep.get('selection_criterion') else "")]
    if rep["candidates"]:
        from repair.report import chosen_members

        chosen = chosen_members(rep)
        tick = " (chosen)" if len(chosen) == 1 else " (averaged)"
        out.append(table(["candidate", "selection score", "selection acc", "fit s"],
                         [[c["candidate"] + (tick if c["candidate"] in chosen else ""), (pct(c.get("score")) + ("*" if c.get("out_of_contention") else ""))
                           if c.get("score_at_most") is None else f"<= {pct(c['score_at_most'])}",
                           pct(c.get("selection_accuracy")), c.get("fit_seconds", c.get("skipped"))]
                          for c in rep["candidates"]]))
        if any(c.get("out_of_contention") for c in rep["candidates"]):
            out.append("* out of contention after the first repeat, scored on it alone (not refitted on the others)")
    if rep.get("neurons_suppressed") is not None:
        out.append(f"neurons suppressed: {rep['neurons_suppressed']}")
    b, a = rep["before"], rep["after"]
    out.append(f"\nbefore -> after, measured on {one_line(rep['measured_on'])}:")
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
        out.append(f"\nONNX {one_line(e.get('path'))}: verified={e.get('passed')}  max|diff|={e.get('max_abs_diff')} "
                   f"(tolerance {e.get('tolerance')})  argmax agreement={pct(e.get('argmax_agreement'))} "
                   f"over {e.get('n_verified')} samples")
        from .export_cmds import fallback_line

        if fallback_line(e):                # why the TorchScript exporter was used, as `repair export` says it
            out.append(fallback_line(e))
    from repair.report import training_sentence

    trained = training_sentence(rep.get("model_change"))
    if trained:
        out.append(trained)
    for n in rep.get("selection_notes") or []:
        out.append(n)
    if rep.get("report"):
        out.append(f"report: {one_line(rep['report'])} (JSON beside it)")
    for w in rep.get("warnings") or []:
        out.append(f"warning: {one_line(w)}")
    t = rep["timing"]
    out.append(f"\ntime: {t['total_seconds']:.1f}s total, embeddings {t['embedding_seconds']:.1f}s"
               f"{' (cache)' if t['embedding_from_cache'] else ''}, head fitting {t['fit_seconds']:.2f}s")
    return "\n".join(out)


def resource_kind(r) -> str:
    """A model-repair input's kind as shown (help, ``repair methods``): a choice's choices (``a | b``), said
    here only -- an input's own help leaves them out."""
    return " | ".join(getattr(r, "choices", ()) or ()) if r.kind == "choice" else r.kind


def resources_bundle() -> OptionBundle:
    """The ``fix`` options of the model-repair inputs: one per input a registered model repair
    declares (``repair methods`` lists them), so a plugin's new input is an option here too."""
    from repair.preflight import declared_resources

    opts = {}
    for r in declared_resources():
        kind = {"file": "a file", "folder": "a folder", "data": "data (same format as --data)"}.get(r.kind,
                                                                                                 resource_kind(r))
        opts[r.name] = (Annotated[Optional[str], typer.Option(
            r.flag, help=f"{r.help.rstrip().rstrip('.')} ({kind}; default: none).", rich_help_panel=PANEL_INPUTS)],
            None)
    return OptionBundle("resources", opts, lambda **kw: {k: v for k, v in kw.items() if v is not None})


def make_fix_command(inputs_bundle: OptionBundle):
    """The ``fix`` command with the model-repair inputs of ``inputs_bundle`` as options."""

    def fix_cmd(model: ModelArg, data: DataPath,
                out: Annotated[Optional[Path], typer.Option("--out", "-o", rich_help_panel=PANEL_OUTPUT, help="Output (default: <model>-repaired beside the model, in the same format).")] = None,
                recipe: Annotated[str, typer.Option("--recipe", rich_help_panel=PANEL_REPAIR, help="Built-in recipe name (repair methods lists them) or a YAML path.")] = "auto",
                eval_data: Annotated[Optional[Path], typer.Option("--eval", rich_help_panel=PANEL_REPAIR, help="Separate test data for the before/after figures (default: a held-out 25% of --data).")] = None,
                eval_group_by: Annotated[Optional[str], typer.Option("--eval-group-by", rich_help_panel=PANEL_REPAIR, help="Group column of --eval data (default: --group-by).")] = None,
                export: Annotated[Optional[str], typer.Option("--export", rich_help_panel=PANEL_OUTPUT, help="Also export ONNX and verify it with onnxruntime: onnx (default: no export).")] = None,
                tolerance: Annotated[Optional[float], typer.Option("--tolerance", rich_help_panel=PANEL_OUTPUT, help="ONNX verification: an absolute max |logit difference| (default: 1e-5 + 1e-3 x the larger of the logit and the sample's top logit, each less the head's bias, + 1e-5 x their magnitude).")] = None,
                max_verify: Annotated[Optional[int], typer.Option("--max-verify", min=1, rich_help_panel=PANEL_OUTPUT, help="ONNX verification: samples of --data to verify on (default: 512).")] = None,
                seed: Seed = 0,
                budget: Annotated[Optional[str], typer.Option("--budget", rich_help_panel=PANEL_REPAIR, help="Model repairs: training budget per run, e.g. 300steps, 3epochs, 10min (first reached ends training; steps or epochs set the run's length in place of the recipe's epochs, time only cuts it; default: 10min).")] = None,
                force: Annotated[bool, typer.Option("--force", rich_help_panel=PANEL_OUTPUT, help="Overwrite an existing output (never an input; a folder only when empty or written by repair and holding nothing else). Default: refuse.")] = False,
                allow_finetune: Annotated[bool, typer.Option("--allow-finetune", rich_help_panel=PANEL_REPAIR, help="Recipe auto may escalate to fine-tuning the network (mixft) when it beats the head on the same folds (= --recipe auto-ft). Default: heads only.")] = False,
                allow_plugins: Annotated[bool, typer.Option("--allow-plugins", rich_help_panel=PANEL_REPAIR, help="Let the recipe's plugins: (Python files) run. Default: refused, since they are code.")] = False,
                report: Annotated[Optional[Path], typer.Option("--report", rich_help_panel=PANEL_OUTPUT, help="Also write an HTML report (and .json beside it): figures, per-group bars, candidates, the probe's neuron deltas. Default: none.")] = None,
                *, resources: dict, columns: Columns, load: Load, runtime: Runtime, as_json: AsJson = False):
        """Repair the model from the repair set; write it in the checkpoint's own format."""
        from repair.pipeline import FixOptions
        from repair.preflight import read_inputs

        o = FixOptions(recipe=recipe, seed=seed, eval_data=None if eval_data is None else str(eval_data),
                       eval_group_by=eval_group_by, export=export, tolerance=tolerance, max_verify=max_verify,
                       budget=budget,
                       resources=resources, report=None if report is None else str(report), force=force,
                       allow_finetune=allow_finetune, allow_plugins=allow_plugins)
        inputs = read_inputs(model, data, columns, eval_data=o.eval_data, eval_group_by=eval_group_by,
                             resources=o.resources, load_opts=load)
        from repair.pipeline import fix_model

        try:
            rep = fix_model(model, inputs.data, out, load_opts=load, data_opts=columns, runtime=runtime, options=o,
                            inputs=inputs, log=logger(runtime))
        except GateFailed as e:             # the ONNX export failed its verification: nothing was written
            if as_json:
                emit_json({"passed": False, "error": str(e), "output": None,
                           "export": getattr(e, "report", None)})
            raise
        if as_json:
            emit_json(rep.report)
        else:
            say(fix_table(rep.report))

    fix_cmd.__annotations__["resources"] = Annotated[dict, inputs_bundle]
    return fix_cmd


def fix_command():
    """The ``fix`` click command with every declared model-repair input (built when ``fix`` runs or
    its help is shown: the declarations live with the methods, which load torch)."""
    sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    sub.command("fix")(command(make_fix_command(resources_bundle())))
    return typer.main.get_command(sub)


# registered without the model-repair inputs (so `repair --help` needs no torch); the app builds
# the full command through fix_command() when fix is run
app.command("fix")(command(make_fix_command(OptionBundle("resources", {}, lambda **kw: {}))))
LAZY_COMMANDS["fix"] = fix_command


@app.command("methods")
@command
def methods_cmd(as_json: AsJson = False):
    """List the registered repair methods, their model-repair inputs and the recipes (one line each)."""
    import dataclasses

    from repair.methods import list_methods
    from repair.preflight import declared_resources
    from repair.recipes import available

    infos = list_methods()
    recipes = available()
    inputs = declared_resources()
    if as_json:
        emit_json({"methods": [{"name": m.name, "kind": m.kind, "summary": m.summary, "groups": m.groups,
                                "needs_groups": m.needs_groups, "uses_groups": m.uses_groups,
                                "transform": m.transform.name if m.transform else None,
                                "resources": [r.name for r in getattr(m, "resources", ()) or ()],
                                "config": dataclasses.asdict(m.default_config())}
                               for m in infos],
                   "inputs": [{"name": r.name, "flag": r.flag, "kind": r.kind, "help": r.help,
                               **({"choices": list(r.choices)} if r.kind == "choice" else {})} for r in inputs],
                   "recipes": recipes})
        return
    say(table(["method", "kind", "group labels", "summary"],
                [[m.name, m.kind, {"required": "required", "optional": "optional", "never": "never used"}[m.groups],
                  m.summary] for m in infos]))
    say("\nmodel-repair inputs (repair fix options, zoo manifest fields):")
    say(table(["option", "kind", "help"], [[r.flag, resource_kind(r), r.help] for r in inputs]))
    say("\nrecipes (--recipe NAME):")
    say(table(["recipe", "description"], [[k, v] for k, v in recipes.items()]))


# ------------------------------------------------------------------ demo
@app.command("demo")
@command
def demo_cmd(out: Annotated[Path, typer.Option("--out", help="Folder for the demo model and data (new, or empty; written under a temporary name and renamed into place at the end).")] = Path("repair-demo"),
             seed: DemoSeed = 0,
             size: Annotated[str, typer.Option("--size", help="default | tiny")] = "default",
             recipe: Annotated[str, typer.Option("--recipe", help="Recipe for the repair step.")] = "auto",
             force: Annotated[bool, typer.Option("--force", help="Rebuild even if the folder exists (only a previous demo folder is replaced).")] = False,
             quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr (warnings and errors still show).")] = False,
             as_json: AsJson = False):
    """Build a Waterbirds-like task, train a small timm model with ERM, show its shortcut, repair it."""
    from repair.demo import run_demo
    from repair.runtime import stderr_log

    doc = run_demo(out, seed=seed, size=size, recipe=recipe, force=force, log=stderr_log(not quiet))
    if as_json:
        emit_json(doc)
        return
    test, fixed = doc["erm_test"], doc["fix"]
    say(f"demo built in {one_line(out)} (ERM training {doc['erm_train_seconds']:.0f}s)")
    say(eval_table(test, "\nERM model on the test split (groups = class x place):"))
    gap = (test["accuracy"] - test["worst_group_accuracy"]) * 100
    say(f"\nThe shortcut: worst-group accuracy is {gap:.1f} points below mean accuracy.\n")
    say(fix_table(fixed))
    b, a = fixed["before"], fixed["after"]
    say(f"\nworst-group accuracy {pct(b['worst_group_accuracy'])} -> {pct(a['worst_group_accuracy'])}, "
          f"accuracy {pct(b['accuracy'])} -> {pct(a['accuracy'])} on the test split (no group labels used).")
    say(f"Try: repair eval {one_line(fixed['output'])} --data {one_line(doc['test'])} --group-by place")
