"""`repair` command line: thin shims over ``repair.api`` and friends.

Results go to stdout (``--json``: one JSON document), progress and warnings to
stderr. Exit codes: 0 ok, 1 gate or verification failed, 2 bad input/usage,
3 internal error.
"""
from __future__ import annotations

import functools
import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from repair.errors import BadInput, GateFailed, RepairError

from .format import eval_table, pct, table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Repair classifiers that lean on spurious correlations: measure, probe, fix, export.")
STATE = {"debug": False}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def command(fn: Callable) -> Callable:
    """Map library errors to one line on stderr and the documented exit codes."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except RepairError as e:
            if STATE["debug"]:
                traceback.print_exc()
            log(f"error: {e}" if not isinstance(e, GateFailed) else f"FAILED: {e}")
            raise typer.Exit(e.exit_code)
        except BrokenPipeError:  # stdout closed early (| head): not an error of ours
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0)
        except KeyboardInterrupt:
            log("interrupted")
            raise typer.Exit(130)
        except Exception as e:  # an internal error: one line unless --debug
            if STATE["debug"]:
                traceback.print_exc()
            first = str(e).splitlines()[0] if str(e) else ""
            log(f"internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)")
            raise typer.Exit(3)
    return wrapper


@app.callback()
def main_callback(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False):
    STATE["debug"] = debug


# ------------------------------------------------------------------ shared options
ModelArg = Annotated[Path, typer.Argument(help="Checkpoint: timm hub folder, transformers folder, .safetensors (+--arch/--factory) or .onnx.")]
DataOpt = Annotated[Path, typer.Option("--data", "-d", help="Repair data: image folder / metadata.csv, or text CSV/TSV/JSONL.")]
GroupBy = Annotated[Optional[str], typer.Option("--group-by", help="Attribute column; groups = class x attribute value.")]
LabelCol = Annotated[Optional[str], typer.Option("--label-col", help="Column with class labels (default: y/label/class).")]
PathCol = Annotated[Optional[str], typer.Option("--path-col", help="Column with image paths (default: img_filename/filename/path).")]
TextCol = Annotated[Optional[str], typer.Option("--text-col", help="Column with texts (default: text/sentence/content).")]
Arch = Annotated[Optional[str], typer.Option("--arch", help="timm architecture of a bare weights file.")]
Factory = Annotated[Optional[str], typer.Option("--factory", help="package.module:function returning the nn.Module.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Accept .pt/.pth/.bin (loaded with weights_only=True).")]
MaxLength = Annotated[Optional[int], typer.Option("--max-length", help="Text: tokenizer truncation length.")]
ImageSize = Annotated[Optional[int], typer.Option("--image-size", help="Input size for checkpoints without preprocessing (ONNX, factories).")]
Mean = Annotated[Optional[str], typer.Option("--mean", help="Normalisation mean, e.g. 0.485,0.456,0.406.")]
Std = Annotated[Optional[str], typer.Option("--std", help="Normalisation std, e.g. 0.229,0.224,0.225.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1)]
CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", help="Embedding cache (default ~/.cache/repair/embeddings or $REPAIR_CACHE_DIR).")]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the embedding cache.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
ClassNames = Annotated[Optional[str], typer.Option("--class-names", help="Comma-separated class names in the head's order, for checkpoints that carry none (bare weights, factories, ONNX).")]
AsJson = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]


def _floats(s: Optional[str], name: str) -> Optional[list]:
    if s is None:
        return None
    try:
        vals = [float(v) for v in s.split(",")]
    except ValueError:
        raise BadInput(f"{name} must be comma-separated numbers, got {s!r}") from None
    return vals * 3 if len(vals) == 1 else vals


def load_options(arch, factory, allow_pickle, max_length, image_size, mean, std, class_names=None):
    from repair.adapters import LoadOptions

    names = [c.strip() for c in class_names.split(",")] if class_names else None
    return LoadOptions(arch=arch, factory=factory, allow_pickle=allow_pickle, max_length=max_length,
                       image_size=image_size, mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
                       class_names=names)


def runtime_options(device, batch_size, cache_dir, no_cache, quiet):
    from repair.api import RuntimeOptions

    return RuntimeOptions(device=device, batch_size=batch_size,
                          cache_dir=str(cache_dir) if cache_dir else None, use_cache=not no_cache,
                          progress=not quiet)


def emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


# ------------------------------------------------------------------ eval
@app.command("eval")
@command
def eval_cmd(model: ModelArg, data: DataOpt, group_by: GroupBy = None, label_col: LabelCol = None,
             path_col: PathCol = None, text_col: TextCol = None, arch: Arch = None, factory: Factory = None,
             allow_pickle: AllowPickle = False, max_length: MaxLength = None, image_size: ImageSize = None,
             mean: Mean = None, std: Std = None, class_names: ClassNames = None, device: Device = "auto", batch_size: BatchSize = 64,
             cache_dir: CacheDir = None, no_cache: NoCache = False, quiet: Quiet = False,
             as_json: AsJson = False,
             fail_under_wga: Annotated[Optional[float], typer.Option("--fail-under-wga", help="Exit 1 if worst-group accuracy is below this (0-1 or percent).")] = None,
             fail_under_acc: Annotated[Optional[float], typer.Option("--fail-under-acc", help="Exit 1 if accuracy is below this (0-1 or percent).")] = None):
    """Accuracy, per-class and per-group accuracy, worst-group / worst-class; a CI gate."""
    from repair.api import evaluate_model
    from repair.data import DataOptions

    if fail_under_wga is not None and group_by is None:
        raise BadInput("--fail-under-wga needs --group-by (worst-group accuracy needs group labels)")
    rep = evaluate_model(model, data, load_options(arch, factory, allow_pickle, max_length, image_size, mean, std, class_names),
                         DataOptions(label_col=label_col, path_col=path_col, text_col=text_col, group_by=group_by),
                         runtime_options(device, batch_size, cache_dir, no_cache, quiet))
    gates = []
    for name, thr, val in (("worst-group accuracy", fail_under_wga, rep["worst_group_accuracy"]),
                           ("accuracy", fail_under_acc, rep["accuracy"])):
        if thr is None:
            continue
        thr = thr / 100 if thr > 1 else thr
        gates.append({"metric": name, "threshold": thr, "value": val, "passed": val is not None and val >= thr})
    rep["gates"] = gates
    if as_json:
        emit_json(rep)
    else:
        src = "cache" if rep["embedding"]["from_cache"] else rep["embedding"]["device"]
        print(eval_table(rep, f"{model} on {data}  (embeddings: {src}, {rep['embedding']['seconds']:.2f}s)"))
    failed = [g for g in gates if not g["passed"]]
    if failed:
        raise GateFailed("; ".join(f"{g['metric']} {pct(g['value'])} < {pct(g['threshold'])}" for g in failed))


# ------------------------------------------------------------------ probe
@app.command("probe")
@command
def probe_cmd(model: ModelArg, data: DataOpt, label_col: LabelCol = None, path_col: PathCol = None,
              text_col: TextCol = None, arch: Arch = None, factory: Factory = None,
              allow_pickle: AllowPickle = False, max_length: MaxLength = None, image_size: ImageSize = None,
              mean: Mean = None, std: Std = None, class_names: ClassNames = None, device: Device = "auto", batch_size: BatchSize = 64,
              cache_dir: CacheDir = None, no_cache: NoCache = False, quiet: Quiet = False,
              as_json: AsJson = False,
              top: Annotated[int, typer.Option("--top", min=1, help="How many neurons to list.")] = 10):
    """Probe embeddings without group labels: spurious neurons, dispersion, pseudo-groups."""
    from repair.api import probe_model
    from repair.data import DataOptions

    rep = probe_model(model, data, load_options(arch, factory, allow_pickle, max_length, image_size, mean, std, class_names),
                      DataOptions(label_col=label_col, path_col=path_col, text_col=text_col),
                      runtime_options(device, batch_size, cache_dir, no_cache, quiet), top_k=top)
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
    t = rep["timing"]
    out.append(f"\ntime: {t['total_seconds']:.1f}s total, embeddings {t['embedding_seconds']:.1f}s"
               f"{' (cache)' if t['embedding_from_cache'] else ''}, head fitting {t['fit_seconds']:.2f}s")
    return "\n".join(out)


@app.command("fix")
@command
def fix_cmd(model: ModelArg, data: DataOpt,
            out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output (default: <model>-repaired in the same format).")] = None,
            recipe: Annotated[str, typer.Option("--recipe", help="Built-in recipe name or a YAML path.")] = "auto",
            eval_data: Annotated[Optional[Path], typer.Option("--eval", help="Separate test data for before/after figures.")] = None,
            eval_group_by: Annotated[Optional[str], typer.Option("--eval-group-by", help="Group column of --eval data (default: --group-by).")] = None,
            export: Annotated[Optional[str], typer.Option("--export", help="Also export ONNX and verify it (onnx).")] = None,
            tolerance: Annotated[Optional[float], typer.Option("--tolerance", help="ONNX verification max |diff|.")] = None,
            seed: Annotated[int, typer.Option("--seed")] = 0,
            force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
            group_by: GroupBy = None, label_col: LabelCol = None, path_col: PathCol = None,
            text_col: TextCol = None, arch: Arch = None, factory: Factory = None,
            allow_pickle: AllowPickle = False, max_length: MaxLength = None, image_size: ImageSize = None,
            mean: Mean = None, std: Std = None, class_names: ClassNames = None, device: Device = "auto", batch_size: BatchSize = 64,
            cache_dir: CacheDir = None, no_cache: NoCache = False, quiet: Quiet = False, as_json: AsJson = False):
    """Repair the model's head from the repair set; write it in the checkpoint's own format."""
    from repair.data import DataOptions
    from repair.fix import FixOptions, fix_model

    rep = fix_model(model, data, out,
                    load_opts=load_options(arch, factory, allow_pickle, max_length, image_size, mean, std, class_names),
                    data_opts=DataOptions(label_col=label_col, path_col=path_col, text_col=text_col, group_by=group_by),
                    runtime=runtime_options(device, batch_size, cache_dir, no_cache, quiet),
                    options=FixOptions(recipe=recipe, seed=seed, eval_data=str(eval_data) if eval_data else None,
                                       eval_group_by=eval_group_by, export=export, tolerance=tolerance, force=force),
                    log=(lambda m: None) if quiet else log)
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
        emit_json({"methods": [{"name": m.name, "summary": m.summary, "needs_groups": m.needs_groups,
                                "uses_groups": m.uses_groups, "config": dataclasses.asdict(m.default_config())}
                               for m in infos], "recipes": available()})
        return
    print(table(["method", "group labels", "summary"],
                [[m.name, "required" if m.needs_groups else ("optional" if m.uses_groups else "never used"), m.summary]
                 for m in infos]))
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
    from repair.fix import FixOptions, fix_model

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


from . import export_cmds  # noqa: E402,F401  (registers the export/verify)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
