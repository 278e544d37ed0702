"""Recipes: YAML files naming repair methods and their settings grids.

Installed as the package ``repair.recipes``; ``--recipe NAME`` finds
``NAME.yaml`` here, ``--recipe PATH`` reads a user's own file.

    name: dfr
    description: one line
    selection: auto          # auto | worst_group | worst_class | worst_inferred_group
    candidates:
      - method: dfr
        params: {n_refits: 20}
        grid: {l1_grid: [[1.0, 0.3], [0.1]]}   # optional: one candidate per combination
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from repair.errors import BadInput

HERE = Path(__file__).resolve().parent
SELECTION_CRITERIA = ("auto", "worst_group", "worst_class", "worst_inferred_group")


@dataclass
class Candidate:
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.params:
            return self.method
        return self.method + "(" + ", ".join(f"{k}={v}" for k, v in sorted(self.params.items())) + ")"


@dataclass
class Recipe:
    name: str
    candidates: list[Candidate]
    selection: str = "auto"
    description: str = ""
    source: str = ""


def available() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def load_recipe(name_or_path: Union[str, Path]) -> Recipe:
    import yaml

    from repair.methods import get_method

    p = Path(name_or_path)
    if p.suffix.lower() in (".yaml", ".yml") or p.exists():
        path = p
    else:
        path = HERE / f"{name_or_path}.yaml"
        if not path.exists():
            raise BadInput(f"unknown recipe {name_or_path!r} (built in: {', '.join(available())}; or give a .yaml path)")
    if not path.exists():
        raise BadInput("recipe file not found", path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BadInput(f"not valid YAML ({str(e).splitlines()[0]})", path) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("candidates"), list) or not doc["candidates"]:
        raise BadInput("a recipe needs a non-empty 'candidates' list", path)
    selection = doc.get("selection", "auto")
    if selection not in SELECTION_CRITERIA:
        raise BadInput(f"selection must be one of {', '.join(SELECTION_CRITERIA)}", path)
    cands: list[Candidate] = []
    for n, c in enumerate(doc["candidates"], 1):
        if not isinstance(c, dict) or "method" not in c:
            raise BadInput(f"candidate {n} needs a 'method'", path)
        try:
            info = get_method(str(c["method"]))
        except KeyError as e:
            raise BadInput(str(e.args[0]), path) from None
        params = dict(c.get("params") or {})
        grid = dict(c.get("grid") or {})
        combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] if grid else [{}]
        for combo in combos:
            merged = {**params, **combo}
            try:
                info.make_config(merged)
            except (ValueError, TypeError) as e:
                raise BadInput(f"candidate {n}: {e}", path) from None
            cands.append(Candidate(info.name, merged))
    return Recipe(name=str(doc.get("name", path.stem)), candidates=cands, selection=selection,
                  description=str(doc.get("description", "")), source=path.name)
