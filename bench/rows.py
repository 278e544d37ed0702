"""The rows of the benchmark: what is run on one task x repair-set variant x seed.

* ``erm``: the checkpoint's own head;
* every registered head repair (:func:`repair.methods.list_methods`) with group labels and
  without them, as its registration allows, fitted on the whole repair set with ``seed``
  (plus the settings in :data:`EXTRA_CONFIGS`);
* ``auto``: the real ``repair fix`` pipeline (:func:`repair.pipeline.fix_model`, recipe
  ``auto``) on the repair set, label-free and with ``--group-by``, measured on the test split
  through ``--eval``;
* references (:mod:`bench.references`): the DFR paper's protocol and SpuCo's DFR / DISPEL
  (group labels), and the plain pseudo-group DFR (no labels);
* model repairs (:data:`MODEL_ROWS`): ``repair fix --recipe <method>`` on the repair set,
  with and without group labels, measured on the test split; seeds and tasks as listed there.

Every figure is test worst-group / mean accuracy; the test split is never used for fitting
or selection.
"""
from __future__ import annotations

import shutil
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import tasks as T
from .measure import _jsonable, log, measured

ERM = "erm"
AUTO = "auto"
REF_DFR = "ref:dfr-protocol"
REF_PSEUDO_DFR = "ref:pseudo-group-dfr"
REF_SPUCO_DFR = "ref:spuco-DFR"
REF_SPUCO_DISPEL = "ref:spuco-DISPEL"

# non-default settings also benchmarked, when the method's config has them (each is a separate row)
# (``tune_score: accuracy``: the bagged protocol's strength chosen by held-out worst-group accuracy, as before
# the fourteenth session, beside the default probability score)
EXTRA_CONFIGS = {"dfr": [{"protocol": "paper"}, {"tune_score": "accuracy"}], "mix": [{"tune_score": "accuracy"}]}


@dataclass
class ModelRow:
    """One model-repair row: ``repair fix --recipe method`` with ``params``."""
    label: str
    method: str
    params: dict = field(default_factory=dict)
    groups: tuple = (False, True)          # run without / with group labels
    modalities: tuple = ("image", "text")
    budget: Optional[str] = None
    tasks: Optional[tuple] = None          # None: every task of a fitting modality
    note: str = ""
    recipe: Optional[str] = None           # a built-in recipe to run instead of the one-method recipe


#: auto-ft's mixft setting until the twentieth session (recipes/auto-ft.yaml): LP-FT start, lr 5e-4, the whole 4-epoch schedule kept at its
#: last step, selected by the worst inferred group; the rows that vary one option of it start from this. Written
#: out rather than read from the recipe, so that the rows keep the setting they were measured with; a test
#: (tests/test_bench_smoke.py) says when the recipe moves away from it
_LPFT_WIG_LAST = {"head_init": "refit", "lr": 5e-4, "epochs": 4.0, "patience": 0,
                  "selection": "worst_inferred_group", "keep": "last"}

#: the model repairs the benchmark runs (filled in as model repairs land; order = table order). Rows with
#: ``settle: either`` were measured before settling compared refitted heads alone (``settle: refit``, the
#: default since the seventh session): they keep the setting they were measured with, so that running them
#: again reproduces their figures
MODEL_ROWS: list[ModelRow] = [
    ModelRow("finetune", "finetune", {}, note="plain fine-tuning of the last block (the simplest model repair)"),
    ModelRow("mixft", "mixft", {}, note="data-mixing fine-tuning (Xue et al. 2023), the method's defaults"),
    ModelRow("mixft-heldout", "mixft", {"settle_strength": "heldout", "early_stop": "anytime"}, groups=(False,),
             note="mixft's defaults until the twenty-seventh session: the refitted head's strength chosen on the "
                  "held-out part under every criterion, and early stopping free to end a run at its start"),
    ModelRow("mixft-a0", "mixft", {"settle_alphas": (0.0, 0.5, 1.0)}, groups=(False,),
             note="mixft settled with the original body among the candidates (alpha 0, a moved body needs "
                  "two standard errors over it)"),
    ModelRow("mixft-stoprefit", "mixft", {"stop_head": "refit"}, groups=(False,),
             note="mixft with every held-out evaluation (early stopping, the kept state) scoring the body with "
                  "a refitted head, as settling does, instead of the model's own head"),
    ModelRow("mixft-lpft", "mixft", {"head_init": "refit", "lr": 5e-4, "epochs": 4.0, "patience": 0, "settle": "either"},
             modalities=("text",), budget="4epochs", tasks=("sst2_capped",),
             note="mixft from a refitted head (LP-FT), lr 5e-4, the whole 4-epoch schedule (no early stop, no "
                  "time cut: at this lr the held-out score first collapses, then recovers), settled "
                  "(interpolation + head refit chosen on the held-out part)"),
    ModelRow("mixft-lpft-wig", "mixft", {"head_init": "refit", "lr": 5e-4, "epochs": 4.0, "patience": 0,
                                         "selection": "worst_inferred_group", "settle": "either"},
             modalities=("text",), budget="4epochs", tasks=("sst2_capped",), groups=(False,),
             note="mixft-lpft selected by the worst inferred group (class x correct/incorrect under the "
                  "original) even on a balanced repair set"),
    ModelRow("mixft-lpft-wig-last", "mixft", {**_LPFT_WIG_LAST},
             modalities=("text",), budget="4epochs", tasks=("sst2_capped", "sst2_negation"), groups=(False,),
             note="mixft-lpft-wig ending at the schedule's last step (keep last) instead of the best held-out "
                  "evaluation, which on some seeds was the start; then settled"),
    ModelRow("mixft-lpft-last", "mixft", {**_LPFT_WIG_LAST, "settle": "either"},
             modalities=("image",), budget="4epochs", groups=(False,),
             note="the capped task's mixft setting (mixft-lpft-wig-last, auto-ft's candidate until the twentieth session) on the image tasks"),
    ModelRow("mixft-orig", "mixft", {"settle_strength": "original"}, groups=(False,),
             note="mixft whose settled bodies' refitted heads all take the strength repeated folds choose for "
                  "the original body (settle_strength original) instead of each body's held-out choice"),
    ModelRow("mixft-lpft-wig-last-orig", "mixft", {**_LPFT_WIG_LAST, "settle_strength": "original"},
             modalities=("text",), budget="4epochs", tasks=("sst2_capped",), groups=(False,),
             note="mixft-lpft-wig-last (auto-ft's mixft until the twentieth session) with settle_strength original"),
    ModelRow("mixft-soup3", "mixft", {"members": 3}, groups=(False,), modalities=("image",),
             note="mixft as a weight-space soup of three seeds' training from the same start (members 3), then "
                  "settled"),
    ModelRow("mixft-1se", "mixft", {"settle_strength": "heldout_1se"}, groups=(False,),
             note="mixft whose settled bodies' refitted heads take the strongest L2 within one standard error of "
                  "the best held-out score (settle_strength heldout_1se) instead of the best itself"),
    ModelRow("mixft-lpft-wig-last-1se", "mixft", {**_LPFT_WIG_LAST, "settle_strength": "heldout_1se"},
             modalities=("text",), budget="4epochs", tasks=("sst2_capped",), groups=(False,),
             note="mixft-lpft-wig-last (auto-ft's mixft until the twentieth session) with settle_strength heldout_1se"),
    ModelRow("mixft-lpft-wig-last-soup3", "mixft", {**_LPFT_WIG_LAST, "members": 3},
             modalities=("text",), budget="4epochs", tasks=("sst2_capped",), groups=(False,),
             note="mixft-lpft-wig-last (auto-ft's mixft until the twentieth session) as a uniform weight-space soup of three seeds' 4-epoch runs "
                  "from the same LP-FT start (members 3), then settled"),
    ModelRow("mixft-all", "mixft", {"scope": "all"}, groups=(False,), modalities=("text",),
             note="mixft training every layer (scope all): what scope auto trained on CUDA but not on the CPU (the "
                  "last two layers of a text model there) until the twentieth session; the same as mixft since"),
    ModelRow("mixft-tail", "mixft", {"keep": "tail", "patience": 0}, groups=(False,),
             note="mixft run to the end of its schedule, ending at the average of the states at the held-out "
                  "evaluations of the schedule's second half (keep tail) instead of the best one, then settled"),
    ModelRow("mixft-last", "mixft", {"keep": "last", "patience": 0}, groups=(False,),
             note="mixft run to the end of its schedule and ending at its last step (keep last) instead of the "
                  "best held-out evaluation, then settled"),
    ModelRow("mixft-tail-soup3", "mixft", {"keep": "tail", "patience": 0, "members": 3}, groups=(False,),
             note="mixft-tail as a uniform weight-space soup of three seeds' runs from the same start (members 3; "
                  "a time budget is shared among them), then settled"),
    ModelRow("mixft-avgl2", "mixft", {"settle_strength": "average"}, groups=(False,),
             note="mixft whose settled bodies' refitted heads average the heads of every L2 strength of the grid "
                  "(settle_strength average) instead of one strength chosen on the held-out part"),
    ModelRow("mixft-avg1se", "mixft", {"settle_strength": "average_1se"}, groups=(False,),
             note="mixft whose settled bodies' refitted heads average the heads of the L2 strengths within one "
                  "standard error of the best held-out score (settle_strength average_1se)"),
    ModelRow("mixft-tail-avgl2", "mixft", {"keep": "tail", "patience": 0, "settle_strength": "average"},
             groups=(False,), note="mixft-tail with settle_strength average: no held-out choice but the "
                                   "interpolation weight"),
    ModelRow("mixft-tail-avgl2-a1", "mixft", {"keep": "tail", "patience": 0, "settle_strength": "average",
                                              "settle_alphas": [1.0]}, groups=(False,),
             note="mixft-tail-avgl2 kept at the fine-tuned body (settle_alphas [1.0]): no held-out choice at all, "
                  "the tail average with the strengths' averaged head refitted on it"),
    ModelRow("mixft-cf2", "mixft", {"cross_fit": 2}, groups=(False,),
             note="mixft cross-fitted (cross_fit 2): two members, each trained on one half of the repair set and "
                  "early-stopped on the other, averaged into one model; settled on the out-of-fold predictions "
                  "of every repair row instead of one held-out quarter"),
    ModelRow("mixft-cf2-p0", "mixft", {"cross_fit": 2, "patience": 0}, groups=(False,),
             note="mixft-cf2 whose members run their whole schedule (patience 0; each still keeps its best "
                  "held-out evaluation): a member whose held-out score collapses early is not stopped at the start"),
    ModelRow("mixft-cf2-tail", "mixft", {"cross_fit": 2, "patience": 0, "keep": "tail"}, groups=(False,),
             note="mixft-cf2-p0 whose members end at the average of their second half's evaluated states (keep "
                  "tail) instead of their best evaluation: two averagings, along each run and across the members"),
    ModelRow("mixft-cf2-p0-avg1se", "mixft", {"cross_fit": 2, "patience": 0, "settle_strength": "average_1se"},
             groups=(False,),
             note="mixft-cf2-p0 settled with the heads of the strengths the out-of-fold rows cannot tell from "
                  "the best averaged (settle_strength average_1se)"),
    ModelRow("mixft-lr3e5", "mixft", {"lr": 3e-5}, groups=(False,),
             note="mixft at a third of its learning rate (lr 3e-5 instead of 1e-4): at 1e-4 the held-out score "
                  "collapses in the first epochs (the model predicts one class) and recovers, so the best "
                  "evaluation is picked on a jagged curve"),
    ModelRow("mixft-unsettled", "mixft", {"settle": "off"}, groups=(False,),
             note="mixft's early-stopped weights with their own head, not settled (settle off)"),
    ModelRow("mixft-tail-unsettled", "mixft", {"keep": "tail", "patience": 0, "settle": "off"}, groups=(False,),
             note="mixft-tail's averaged weights with their own head, not settled (settle off)"),
    ModelRow("mixft-fp32", "mixft", {"amp": False}, groups=(False,),
             note="mixft without bfloat16 autocast on CUDA (amp false; on the CPU the same as mixft): what "
                  "autocast changes"),
    ModelRow("auto-ft", "mixft", {}, groups=(False,), recipe="auto-ft",
             note="recipe auto-ft: auto's heads, then mixft cross-fitted on the same folds (cross_fit 2, patience 0), "
                  "its out-of-fold predictions scored against the head, the members' average kept only if it wins"),
    ModelRow("auto-ft-defaults", "mixft", {}, groups=(False,),
             recipe=str(Path(__file__).resolve().parent / "recipes" / "auto-ft-mixft-defaults.yaml"),
             note="auto-ft with its mixft candidate at mixft's defaults (every layer), trained fold by fold and once "
                  "more on the whole fit part when it wins: recipe auto-ft from the twentieth session to the "
                  "twenty-fourth"),
    ModelRow("clp", "clp", {}, groups=(False,), modalities=("image",),
             note="retraining with causal logit perturbation (attribution masks), the method's defaults"),
    ModelRow("clp-unsettled", "clp", {"settle": "off"}, groups=(False,), modalities=("image",),
             note="clp with the early-stopped weights as they are (settle off): what settling changes"),
    ModelRow("clp-no-a0", "clp", {"settle_alphas": (0.5, 1.0), "settle": "either"}, groups=(False,), modalities=("image",),
             note="clp settled without the original body among the candidates (no alpha 0: what it changes)"),
    ModelRow("clp-soup3", "clp", {"members": 3}, groups=(False,), modalities=("image",),
             note="clp as a weight-space soup of three seeds' training (members 3), then settled"),
    ModelRow("clp-ablation", "clp", {"meta": False, "saliency_weight": 0.0}, groups=(False,), modalities=("image",),
             note="ablation: the same loop and data without the perturbation network (plain fine-tuning)"),
    ModelRow("recompose", "recompose", {}, modalities=("image",),
             note="composite counterfactuals (contrast masks), pruned, retrained"),
    ModelRow("recompose-ag", "recompose", {"early_stop": "after_gain"}, groups=(False,), modalities=("image",),
             note="recompose with mixft's early stopping (early_stop after_gain): no early stop while the start is "
                  "still the best evaluation"),
    ModelRow("recompose-unsettled", "recompose", {"settle": "off"}, groups=(False,), modalities=("image",),
             note="recompose with the early-stopped weights as they are (settle off): what settling changes"),
    ModelRow("recompose-no-a0", "recompose", {"settle_alphas": (0.5, 1.0), "settle": "either"}, groups=(False,), modalities=("image",),
             note="recompose settled without the original body among the candidates (no alpha 0)"),
    ModelRow("recompose-soup3", "recompose", {"members": 3}, groups=(False,), modalities=("image",),
             note="recompose as a weight-space soup of three seeds' retraining (members 3), then settled"),
    ModelRow("recompose-noprune", "recompose", {"min_probability": 0.0, "min_attribution": 0.0}, groups=(False,),
             modalities=("image",), note="ablation: every generated image kept"),
]


#: mixft's defaults that changed in the twenty-seventh session: ``settle_strength`` ``auto`` (the heads of every
#: strength averaged under the worst inferred group criterion, the skewed sets') and ``early_stop`` ``after_gain``
#: (no early stop back at the start); the other model repairs' ``early_stop`` default that changed in the
#: twenty-eighth: ``auto`` (``after_gain`` under the worst inferred group criterion), ``anytime`` before. The rows
#: measured before that left them at their defaults keep the values they were measured with (a row named as its
#: method is the default, whatever it is); a setting that cannot act on a row (no settling, no early stopping) is
#: left out
def _default_patience(method: str) -> int:
    from repair.methods import get_method

    return get_method(method).default_config().patience


for _row in MODEL_ROWS:
    if _row.label == _row.method or _row.recipe is not None:
        continue
    if _row.method == "mixft" and "settle_strength" not in _row.params and _row.params.get("settle") != "off":
        _row.params = {**_row.params, "settle_strength": "heldout"}
    if "early_stop" not in _row.params and _row.params.get("patience", _default_patience(_row.method)) != 0:
        _row.params = {**_row.params, "early_stop": "anytime"}
del _row

#: rows added since, measured with mixft's defaults of their time
MODEL_ROWS += [
    ModelRow("mixft-wu30", "mixft", {"warmup_fraction": 0.3}, groups=(False,),
             note="mixft with three times the learning-rate warm-up (warmup_fraction 0.3 instead of 0.1): the "
                  "held-out collapse of the skewed sets comes in the first epochs at the peak rate"),
    ModelRow("recompose-anytime", "recompose", {"early_stop": "anytime"}, groups=(False,), modalities=("image",),
             note="recompose's early stopping until the twenty-eighth session (anytime: patience counts from the "
                  "start), beside the default's auto (after_gain under the worst inferred group criterion)"),
    ModelRow("mixft-ho40", "mixft", {"holdout_fraction": 0.4}, groups=(False,), modalities=("text",),
             note="mixft with 40% of the repair set held out (25% by default): a skewed set's held-out part has "
                  "about 13 rows of each group the original model gets wrong, and the spread over seeds follows the "
                  "split"),
    ModelRow("mixft-cf3-p0", "mixft", {"cross_fit": 3, "patience": 0, "settle_strength": "heldout"}, groups=(False,),
             modalities=("text",), tasks=("sst2_capped",),
             note="the recipe mixft-crossfit with three folds instead of two: each member trains on two thirds of "
                  "the repair set, every row scored out of fold"),
    ModelRow("mixft-soup3t", "mixft", {"members": 3}, groups=(False,), modalities=("text",), tasks=("sst2_capped",),
             note="mixft at its defaults as a weight-space soup of three seeds' training from the same start "
                  "(members 3), then settled, on the capped text task (mixft-soup3 is the image rows, measured "
                  "with the defaults before the twenty-seventh session)"),
]

# ============================================================================ data
@dataclass
class TaskData:
    task: T.Task
    variant: str
    data: Path                 # the repair set as repair reads it (folder or table)
    X_val: Any
    y_val: Any
    g_val: Any
    X_test: Any
    y_test: Any
    g_test: Any
    test_group_names: list
    class_names: list
    W0: Any
    b0: Any
    embed_seconds: dict
    group_counts: Optional[dict] = None
    val_group_names: Optional[list] = None     # the repair set's group names (``g_val``'s ids)


def load_task_data(task: T.Task, variant: str, cache_dir: Path) -> TaskData:
    from repair.api import RuntimeOptions, prepare, prepare_data
    from repair.data import DataOptions

    v = T.variant_data(task, variant)
    rt = RuntimeOptions(device="cpu", cache_dir=str(cache_dir), use_cache=True, progress=False)
    opts = DataOptions(group_by=task.group_by)
    p = prepare(task.model_dir, v["data"], data_opts=opts, runtime=rt)
    _, enc_t, emb_t = prepare_data(p.adapter, task.test, opts, rt)
    W0, b0 = p.adapter.head_params()
    return TaskData(task, variant, Path(v["data"]), p.emb.X, p.enc.y, p.enc.groups, emb_t.X, enc_t.y, enc_t.groups,
                    list(enc_t.group_names), list(p.enc.class_names), W0, b0,
                    {"val": round(p.emb.seconds, 3), "val_from_cache": p.emb.from_cache,
                     "test": round(emb_t.seconds, 3), "test_from_cache": emb_t.from_cache},
                    v.get("group_counts"), list(p.enc.group_names))


#: the splits an analysis script scores on: ``dev`` (the default) the held-out half of the repair set,
#: ``test`` the report's test split -- for describing a figure of the report, never for choosing a setting
ANALYSIS_SPLITS = ("dev", "test")


def development_data(td: TaskData, seed: int = 0) -> TaskData:
    """``td`` for a development analysis: the repair set cut in two halves stratified by group (seeded),
    fitted on one and scored on the other (``X_test``/``y_test``/``g_test`` become the held-out half, so
    :func:`score` and every script reading them score there). A default chosen so never saw the test split
    the report measures on."""
    import dataclasses

    from repair.selection import stratified_split

    fit, held = stratified_split(td.g_val, 0.5, seed)
    return dataclasses.replace(td, X_val=td.X_val[fit], y_val=td.y_val[fit], g_val=td.g_val[fit],
                               X_test=td.X_val[held], y_test=td.y_val[held], g_test=td.g_val[held],
                               test_group_names=list(td.val_group_names or []))


def analysis_sets(tasks, variants, work_dir, split: str = "dev"):
    """``(task name, variant, TaskData)`` for every task (built or reused under ``work_dir``) and repair set an
    analysis script reads (``bench.refit_strength``, ``bench.tune_score``, ``bench.mix_refits``), torch on one
    thread; ``split`` (:data:`ANALYSIS_SPLITS`): ``dev`` scores on the held-out half of the repair set
    (:func:`development_data`), ``test`` on the report's test split."""
    import torch

    if split not in ANALYSIS_SPLITS:
        raise ValueError(f"split must be one of {ANALYSIS_SPLITS}, got {split!r}")
    torch.set_num_threads(1)
    work = Path(work_dir)
    for name in tasks:
        task = T.build_task(name, work_dir=work)
        for variant in variants:
            td = load_task_data(task, variant, work / "cache")
            yield name, variant, (development_data(td) if split == "dev" else td)


def score(td: TaskData, W, b) -> dict:
    import torch

    from repair.metrics import evaluate

    W = torch.as_tensor(W, dtype=torch.float32)
    b = torch.as_tensor(b, dtype=torch.float32)
    return _scores(evaluate(td.X_test @ W.T + b, td.y_test, td.class_names, td.g_test, td.test_group_names))


def _scores(rep: dict) -> dict:
    return {"accuracy": rep["accuracy"], "worst_group_accuracy": rep["worst_group_accuracy"],
            "worst_group": rep.get("worst_group"),
            "per_group": {g["name"]: g["accuracy"] for g in (rep.get("per_group") or [])}}


def _failed(row: dict, label: str, e: Exception) -> dict:
    log(f"  {label} failed: {type(e).__name__}: {e}")
    return {**row, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}


# ============================================================================ head repairs
def variant_label(name: str, with_groups: bool, params: Optional[dict] = None) -> str:
    if params:
        name += "(" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"
    return f"{name}[{'groups' if with_groups else 'no-groups'}]"


def method_variants() -> tuple[list, Optional[str]]:
    """[(MethodInfo, params or None, with_groups)] of the head repairs, or ([], why)."""
    try:
        from repair.methods import list_methods

        infos = list_methods(kind="head")
    except Exception as e:
        return [], f"{type(e).__name__}: {e}"
    out = []
    for m in infos:
        configs: list = [None]
        for params in EXTRA_CONFIGS.get(m.name, []):
            try:
                m.make_config(params)
            except (ValueError, TypeError):
                continue
            if any(getattr(m.default_config(), k, None) != v for k, v in params.items()):
                configs.append(params)
        for params in configs:
            for with_groups in ([True] if m.needs_groups else [False, True] if m.uses_groups else [False]):
                out.append((m, params, with_groups))
    return out, None


def run_methods(td: TaskData, seed: int, variants: list) -> dict:
    from repair.methods import RepairInputs

    rows = {}
    for info, params, with_groups in variants:
        label = variant_label(info.name, with_groups, params)
        row = {"kind": "ours", "method": info.name, "params": params, "group_labels": with_groups}
        inputs = RepairInputs(X=td.X_val, y=td.y_val, W=td.W0, b=td.b0,
                              groups=td.g_val if with_groups else None, seed=seed, device="cpu")
        cfg = info.make_config(params) if params else None
        try:
            out, secs, mem = measured(lambda: info(inputs, cfg))
            rows[label] = {**row, "test": score(td, out.W, out.b), "fit_seconds": secs, "peak_rss_mib": mem,
                           "diagnostics": _jsonable(out.diagnostics)}
        except Exception as e:
            rows[label] = _failed(row, label, e)
    return rows


def _fix(td: TaskData, seed: int, recipe: str, with_groups: bool, cache_dir: Path, scratch: Path,
         budget: Optional[str] = None, device: str = "cpu") -> dict:
    """``repair fix`` in-process on the variant's repair data, before/after on the test split (on ``device``:
    the benchmark's rows run on the CPU; the GPU check, ``bench.gpu``, runs model rows on CUDA)."""
    from repair.api import RuntimeOptions
    from repair.data import DataOptions
    from repair.pipeline import FixOptions, fix_model

    task = td.task
    out = Path(tempfile.mkdtemp(prefix="fix-", dir=scratch)) / "out"
    try:
        rep, secs, mem = measured(lambda: fix_model(
            task.model_dir, td.data, out,
            data_opts=DataOptions(group_by=task.group_by if with_groups else None),
            runtime=RuntimeOptions(device=device, cache_dir=str(cache_dir), use_cache=True, progress=False),
            options=FixOptions(recipe=recipe, seed=seed, eval_data=str(task.test), eval_group_by=task.group_by,
                               budget=budget, force=True),
            log=lambda m: None))
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    return {"method": rep.get("method"), "chosen": rep.get("candidate"), "group_labels": with_groups,
            "test": _scores(rep["after"]), "erm_test_by_fix": _scores(rep["before"]),
            "fit_seconds": rep["timing"]["fit_seconds"], "fix_total_seconds": secs, "peak_rss_mib": mem,
            "selection_criterion": rep.get("selection_criterion"), "warnings": rep.get("warnings"),
            "candidates": _jsonable(rep.get("candidates")), "model_change": _jsonable(_short_change(rep.get("model_change"))),
            "diagnostics": _jsonable(rep.get("diagnostics"))}


def _short_change(mc: Optional[dict]) -> Optional[dict]:
    """``model_change`` with a long list of changed tensors (every layer of a network trained) cut to its
    count and first names, so the record keeps ``stopped_by`` and the rest whole (a record over
    :func:`bench.measure._jsonable`'s limit is kept only as truncated text)."""
    names = (mc or {}).get("changed_tensors")
    if not isinstance(names, list) or len(names) <= 12:
        return mc
    return {**mc, "changed_tensors": {"count": len(names), "first": names[:5]}}


def run_auto(td: TaskData, seed: int, with_groups: bool, cache_dir: Path, scratch: Path) -> dict:
    label = variant_label(AUTO, with_groups)
    row = {"kind": "auto", "group_labels": with_groups}
    try:
        return {label: {**row, **_fix(td, seed, "auto", with_groups, cache_dir, scratch)}}
    except Exception as e:
        return {label: _failed(row, label, e)}


def run_references(td: TaskData, seed: int, spuco: bool) -> dict:
    from . import references as R

    X, y, g = td.X_val.numpy(), td.y_val.numpy(), td.g_val.numpy()
    lg0 = (td.X_val @ td.W0.T + td.b0).numpy()
    C = len(td.class_names)
    rows = {}
    todo = [(REF_DFR, True, lambda: R.dfr_reference(X, y, g, num_classes=C, seed=seed)),
            (REF_PSEUDO_DFR, False, lambda: R.pseudo_dfr_reference(X, y, lg0, num_classes=C, seed=seed))]
    why_not = R.spuco_available() if spuco else "skipped (--no-spuco / --smoke)"
    if why_not is None:
        todo += [(REF_SPUCO_DFR, True, lambda: R.spuco_reference("DFR", X, y, g, num_classes=C, seed=seed)),
                 (REF_SPUCO_DISPEL, True, lambda: R.spuco_reference("DISPEL", X, y, g, num_classes=C, seed=seed))]
    else:
        for label in (REF_SPUCO_DFR, REF_SPUCO_DISPEL):
            rows[label] = {"kind": "reference", "group_labels": True, "skipped": why_not}
    for label, groups, fn in todo:
        row = {"kind": "reference", "group_labels": groups}
        try:
            res, secs, mem = measured(fn)
            rows[label] = {**row, "test": score(td, res.W, res.b), "fit_seconds": secs, "peak_rss_mib": mem,
                           "info": _jsonable(res.info)}
        except Exception as e:
            rows[label] = _failed(row, label, e)
    return rows


def head_rows(td: TaskData, seed: int, variants: list, cache_dir: Path, scratch: Path, spuco: bool) -> dict:
    rows = {ERM: {"kind": "erm", "group_labels": False, "test": score(td, td.W0, td.b0), "fit_seconds": 0.0,
                  "peak_rss_mib": 0.0}}
    rows.update(run_methods(td, seed, variants))
    rows.update(run_auto(td, seed, False, cache_dir, scratch))
    rows.update(run_auto(td, seed, True, cache_dir, scratch))
    rows.update(run_references(td, seed, spuco))
    return rows


# ============================================================================ model repairs
def check_model_rows(labels) -> None:
    """ValueError naming the labels of ``labels`` (``--model-rows``) that no row of :data:`MODEL_ROWS` has:
    a mistyped label would measure nothing (the one check of them, for every command that takes them)."""
    known = {r.label for r in MODEL_ROWS}
    unknown = [r for r in labels if r not in known]
    if unknown:
        raise ValueError(f"unknown --model-rows {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def model_rows_for(task: T.Task, only: Optional[list] = None) -> list[ModelRow]:
    """The model rows that apply to a task (modality, task list, registered, ``--model-rows``)."""
    from repair.methods import list_methods

    if only is not None:
        check_model_rows(only)

    known = {m.name for m in list_methods(kind="model")}
    modality = task.info.get("modality", "image")
    return [r for r in MODEL_ROWS if r.method in known and modality in r.modalities
            and (r.tasks is None or task.name in r.tasks) and (only is None or r.label in only)]


def run_model_rows(td: TaskData, seed: int, rows_spec: list[ModelRow], cache_dir: Path, scratch: Path,
                   groups: Optional[bool] = None, device: str = "cpu") -> dict:
    """``groups``: only the runs with (True) or without (False) group labels; None: the row's own.
    ``device``: where ``repair fix`` runs (``cuda`` in the GPU check)."""
    rows = {}
    for spec in rows_spec:
        for with_groups in spec.groups:
            if groups is not None and with_groups != groups:
                continue
            label = variant_label(spec.label, with_groups)
            row = {"kind": "model", "method": spec.method, "params": spec.params, "group_labels": with_groups,
                   "budget": spec.budget}
            if spec.recipe is not None:
                recipe = spec.recipe
            else:
                import yaml

                recipe = scratch / f"recipe-{spec.label}.yaml"
                recipe.write_text(yaml.safe_dump({"name": f"bench-{spec.label}", "candidates": [
                    {"method": spec.method, **({"params": spec.params} if spec.params else {})}]}))
            try:
                rows[label] = {**row, **_fix(td, seed, str(recipe), with_groups, cache_dir, scratch, spec.budget,
                                             device=device)}
            except Exception as e:
                rows[label] = _failed(row, label, e)
            r = rows[label]
            if "test" in r:
                log(f"    {label:<32} WGA {100 * r['test']['worst_group_accuracy']:5.1f}  acc "
                    f"{100 * r['test']['accuracy']:5.1f}  {r['fix_total_seconds']:.0f}s")
    return rows
