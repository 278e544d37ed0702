"""The bad-input matrix of the command line, in one table, and what a run promises beyond it.

Every case builds its bad input under ``tmp_path`` and runs ``repair ...`` in this process; it
must give the expected exit code (2 bad input or usage, 1 only a gate or a verification), ONE
stderr line (``error: `` naming the file or option and the problem), no traceback, no new file
beside the output location and every input byte for byte as it was. Most cases fail before a
model is loaded.

Then: equal inputs and seed give byte-identical outputs (``fix`` and ``export``); a stale
temporary folder of ours beside an output is removed and nothing else; the design card's
``repair fix FOLDER/model.safetensors`` and a bare file with ``--arch``/``--model-args``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import yaml

from conftest import make_images, run_cli


# ------------------------------------------------------------------ builders of bad inputs
def copy_of(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return dst


def timm_with(e, **config) -> Path:
    """A copy of the tiny timm folder with ``config.json`` changed."""
    d = copy_of(e.timm, e.tmp / "model")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(config)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def truncated(e) -> Path:
    d = copy_of(e.timm, e.tmp / "model")
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[:100])
    return d


def bare_weights(e) -> Path:
    return copy_of(e.timm / "model.safetensors", e.tmp / "weights.safetensors")


def pickle_weights(e) -> Path:
    import torch

    torch.save({"a": torch.zeros(1)}, e.tmp / "w.pt")
    return e.tmp / "w.pt"


def empty_folder(e) -> Path:
    (e.tmp / "empty").mkdir()
    return e.tmp / "empty"


def unreadable_image(e) -> Path:
    d = make_images(e.tmp / "data", n_per_class=2)
    (d / "cat" / "000.png").write_bytes(b"not a png")
    return d


def latin1_texts(e) -> Path:
    f = e.tmp / "latin.csv"
    f.write_bytes("text,label\ncaf\xe9 good,positive\n".encode("latin-1"))
    return f


def no_path_column(e) -> Path:
    """An image folder whose metadata.csv lost its path column."""
    d = copy_of(e.images, e.tmp / "data")
    lines = (d / "metadata.csv").read_text().splitlines()
    (d / "metadata.csv").write_text("\n".join(",".join(line.split(",")[1:]) for line in lines) + "\n")
    return d


def text_file(e, name: str, text: str) -> Path:
    (e.tmp / name).write_text(text)
    return e.tmp / name


def recipe(e, text: str) -> Path:
    return text_file(e, "recipe.yaml", text)


def garbage_onnx(e) -> Path:
    (e.tmp / "garbage.onnx").write_bytes(b"\x00garbage" * 10)
    return e.tmp / "garbage.onnx"


def read_only_folder(e) -> Path:
    d = e.tmp / "locked"
    d.mkdir()
    d.chmod(0o555)
    e.cleanup.append(lambda: d.chmod(0o755))
    if os.access(d, os.W_OK):       # root writes anyway
        pytest.skip("running as root: a 0o555 folder is writable")
    return d


def no_cuda(e) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")


def zoo_manifest(e, change: dict) -> Path:
    """Two rows (cf. tests/test_zoo.py): a good one and one with ``change``."""
    (e.tmp / "out").mkdir(exist_ok=True)
    good = {"name": "first", "checkpoint": str(e.timm), "data": str(e.images), "output": "out/first"}
    bad = {"name": "second", "checkpoint": str(e.timm), "data": str(e.images), "output": "out/second", **change}
    path = e.tmp / "zoo.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"recipe": "dfr", "group_by": "place"}, "models": [good, bad]},
                                   sort_keys=False))
    return path


# ------------------------------------------------------------------ the table
@dataclass
class Case:
    """``args``: the command line, ``{name}`` filled from the fixtures (timm, images, bert, texts),
    ``tmp`` / ``out`` (an empty folder for outputs) and what ``build`` returns."""
    args: list
    words: tuple = ()                    # all in the stderr line
    build: Optional[Callable] = None     # e -> {name: value} (or None): makes the bad input
    code: int = 2
    absent: tuple = ()                   # none of these in the stderr line


def head_stored_as(e, dtype: str) -> Path:
    """A copy of the tiny timm folder whose head bias is stored as ``dtype`` (bool, int64)."""
    import torch
    from safetensors.torch import load_file, save_file

    d = copy_of(e.timm, e.tmp / "model")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["fc.bias"] = tensors["fc.bias"].to(getattr(torch, dtype))
    save_file(tensors, str(d / "model.safetensors"))
    return d


def deep_config(e) -> Path:
    d = copy_of(e.timm, e.tmp / "model")
    (d / "config.json").write_text('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
    return d


def nul_in_a_path(e) -> Path:
    d = copy_of(e.images, e.tmp / "data")
    table = d / "metadata.csv"
    lines = table.read_text().splitlines()
    lines[1] = lines[1].replace(".png", "\x00.png", 1)
    table.write_text("\n".join(lines) + "\n")
    return d


def jsonl_texts(e, first: str) -> Path:
    """The texts as JSONL, the first line replaced by ``first``."""
    from conftest import make_texts

    path = make_texts(e.tmp / "t.jsonl", fmt="jsonl")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([first] + lines[1:]) + "\n")
    return path


def one(name: str, fn: Callable) -> Callable:
    return lambda e: {name: fn(e)}


EVAL, PROBE, FIX, EXPORT, VERIFY, ZOO = "eval", "probe", "fix", "export", "verify", "zoo"
M_I = ["{timm}", "--data", "{images}"]          # the tiny timm model on its images
FIX_OUT = [FIX, *M_I, "--out", "{out}/fixed"]
ONNX_OUT = [EXPORT, *M_I, "--out", "{out}/m.onnx"]
NEG_C = "candidates:\n  - method: dfr\n    params: {c_grid: [-1.0]}\n"

CASES: dict[str, Case] = {
    # ---- eval: the model
    "eval: missing model": Case([EVAL, "{tmp}/nope", "--data", "{images}"], ("nope", "not found")),
    "eval: a folder named .onnx": Case([EVAL, "{d}", "--data", "{images}"], ("m.onnx", "got a folder"),
                                       lambda e: {"d": (e.tmp / "m.onnx").mkdir() or e.tmp / "m.onnx"}),
    "eval: truncated safetensors": Case([EVAL, "{model}", "--data", "{images}"], ("model.safetensors", "safetensors"),
                                        one("model", truncated)),
    "eval: unknown timm architecture": Case([EVAL, "{model}", "--data", "{images}"], ("unknown timm architecture",),
                                            lambda e: {"model": timm_with(e, architecture="resnet_does_not_exist")}),
    "eval: head shape vs config": Case([EVAL, "{model}", "--data", "{images}"], ("num_classes=5",),
                                       lambda e: {"model": timm_with(e, num_classes=5)}),
    "eval: bare weights without --arch": Case([EVAL, "{w}", "--data", "{images}"], ("weights.safetensors", "--arch"),
                                              one("w", bare_weights)),
    "eval: bare weights, unknown --arch": Case([EVAL, "{w}", "--arch", "no_such_net", "--data", "{images}"],
                                               ("unknown timm architecture", "no_such_net"), one("w", bare_weights)),
    "eval: pickle without --allow-pickle": Case([EVAL, "{w}", "--arch", "test_resnet", "--data", "{images}"],
                                                ("w.pt", "allow-pickle"), one("w", pickle_weights)),
    "eval: --model-args not JSON": Case([EVAL, *M_I, "--model-args", "{{not json"], ("--model-args", "not valid JSON")),
    "eval: --model-args not an object": Case([EVAL, *M_I, "--model-args", "[1, 2]"], ("--model-args", "JSON object")),
    "eval: --model-args a folder": Case([EVAL, *M_I, "--model-args", "{d}"], ("args.json", "--model-args names a folder"),
                                        lambda e: {"d": (e.tmp / "args.json").mkdir() or e.tmp / "args.json"}),
    "eval: --arch and --factory": Case([EVAL, *M_I, "--arch", "test_resnet", "--factory", "m:f"],
                                       ("--arch", "--factory")),
    "eval: --std 0": Case([EVAL, *M_I, "--std", "0"], ("--std", "positive")),
    "eval: --mean of two values": Case([EVAL, *M_I, "--mean", "0.5,0.5"], ("--mean", "three")),
    "eval: --device cuda without CUDA": Case([EVAL, *M_I, "--device", "cuda"], ("--device cuda", "no CUDA"),
                                             no_cuda),
    # ---- eval: the data
    "eval: --data /dev/null": Case([EVAL, "{timm}", "--data", "/dev/null"], ("/dev/null", "special file")),
    "eval: missing data": Case([EVAL, "{timm}", "--data", "{tmp}/nodata"], ("nodata", "not found")),
    "eval: empty data folder": Case([EVAL, "{timm}", "--data", "{d}"], ("empty data folder",), one("d", empty_folder)),
    "eval: unknown label": Case([EVAL, "{timm}", "--data", "{d}"], ("'wolf' is not a class",),
                                lambda e: {"d": make_images(e.tmp / "data", classes=["cat", "wolf"], n_per_class=2)}),
    "eval: unreadable image": Case([EVAL, "{timm}", "--data", "{d}", "--no-cache"], ("000.png", "not an image of a format read here"),
                                   one("d", unreadable_image)),
    "eval: --text-col the label column": Case([EVAL, "{bert}", "--data", "{t}", "--text-col", "label"],
                                              ("t.csv", "the same column ('label')", "--text-col"),
                                              lambda e: {"t": text_file(e, "t.csv", "text,label\ngood,positive\n")}),
    "eval: --path-col the label column": Case([EVAL, "{timm}", "--data", "{t}", "--path-col", "label"],
                                              ("metadata.csv", "the same column ('label')", "--path-col"),
                                              lambda e: {"t": text_file(e, "metadata.csv", "path,label\na.png,cat\n")}),
    "eval: non-UTF-8 text": Case([EVAL, "{bert}", "--data", "{d}"], ("latin.csv", "not UTF-8"), one("d", latin1_texts)),
    "eval: missing group column": Case([EVAL, *M_I, "--group-by", "season"], ("no group column 'season'",)),
    "eval: image metadata.csv without a path column": Case(
        [EVAL, "{timm}", "--data", "{d}"], ("metadata.csv", "path", "--path-col"), one("d", no_path_column),
        absent=("--text-col",)),
    "eval: texts for an image model": Case([EVAL, "{timm}", "--data", "{texts}"], ("image input", "texts")),
    # ---- eval: the gate options
    "eval: --fail-under-wga 1.5": Case([EVAL, *M_I, "--group-by", "place", "--fail-under-wga", "1.5"],
                                       ("--fail-under-wga", "1.5%")),
    "eval: --fail-under-wga 150%": Case([EVAL, *M_I, "--group-by", "place", "--fail-under-wga", "150%"],
                                        ("--fail-under-wga", "100%")),
    "eval: --fail-under-wga 1_0%": Case([EVAL, *M_I, "--group-by", "place", "--fail-under-wga", "1_0%"],
                                        ("--fail-under-wga", "'1_0%'")),
    "eval: --fail-under-wga abc": Case([EVAL, *M_I, "--group-by", "place", "--fail-under-wga", "abc"],
                                       ("--fail-under-wga", "'abc'")),
    "eval: --fail-under-wga without --group-by": Case([EVAL, *M_I, "--fail-under-wga", "0.5"],
                                                      ("--fail-under-wga", "needs --group-by")),
    "eval: --expect-groups malformed": Case([EVAL, *M_I, "--group-by", "place", "--expect-groups", "cat,dog"],
                                            ("--expect-groups", "class|value")),
    "eval: --expect-groups unknown class": Case([EVAL, *M_I, "--group-by", "place", "--fail-under-acc", "0%",
                                                 "--expect-groups", "wolf|land"],
                                                ("--expect-groups", "'wolf' is not a class")),
    "eval: --batch-size 0": Case([EVAL, *M_I, "--batch-size", "0"], ("--batch-size",)),
    "eval: gate not met is exit 1": Case([EVAL, *M_I, "--fail-under-acc", "100%"], ("accuracy", "< 100%"), code=1),
    # ---- probe
    "probe: missing model": Case([PROBE, "{tmp}/nope", "--data", "{images}"], ("nope", "not found")),
    "probe: --data /dev/null": Case([PROBE, "{timm}", "--data", "/dev/null"], ("/dev/null", "special file")),
    "probe: empty data folder": Case([PROBE, "{timm}", "--data", "{d}"], ("empty data folder",),
                                     one("d", empty_folder)),
    "probe: --top 0": Case([PROBE, *M_I, "--top", "0"], ("--top",)),
    "probe: --group-by is not an option": Case([PROBE, *M_I, "--group-by", "place"], ("--group-by",)),
    # ---- fix: where the output goes
    "fix: --out under /proc": Case([FIX, *M_I, "--out", "/proc/fixed"],
                                   ("/proc/fixed", "cannot write", "does not accept new files")),
    "fix: --out below a regular file": Case([FIX, *M_I, "--out", "{f}/fixed"], ("plain.txt", "is a file"),
                                            lambda e: {"f": text_file(e, "plain.txt", "x")}),
    "fix: --out in a read-only folder": Case([FIX, *M_I, "--out", "{d}/fixed"], ("locked", "cannot write"),
                                             one("d", read_only_folder)),
    "fix: --out missing folder": Case([FIX, *M_I, "--out", "{tmp}/no/fixed"], ("does not exist",)),
    "fix: output exists": Case([FIX, *M_I, "--out", "{d}"], ("already exists", "--force"),
                               lambda e: {"d": text_file(e, "fixed", "mine")}),
    "fix: output == input model": Case([FIX, "{model}", "--data", "{images}", "--out", "{model}", "--force"],
                                       ("overwrite the input model",),
                                       one("model", lambda e: copy_of(e.timm, e.tmp / "m"))),
    "fix: output == --data": Case([FIX, "{timm}", "--data", "{d}", "--out", "{d}", "--force"],
                                  ("overwrite the repair data (--data)",),
                                  lambda e: {"d": copy_of(e.images, e.tmp / "data")}),
    "fix: output folder holds the model": Case(
        [FIX, "{tmp}/models/m", "--data", "{images}", "--out", "{tmp}/models", "--force"],
        ("holds the input model",), one("m", lambda e: copy_of(e.timm, e.tmp / "models" / "m"))),
    "fix: .onnx output of a safetensors file": Case([FIX, "{timm}/model.safetensors", "--data", "{images}",
                                                     "--out", "{out}/fixed.onnx"], ("fixed.onnx", "*.safetensors")),
    "fix: .onnx name for a folder output": Case([FIX, *M_I, "--out", "{out}/fixed.onnx"], ("fixed.onnx", "folder")),
    "fix: --report not .html": Case([*FIX_OUT, "--report", "{out}/r.txt"], ("r.txt", "--report", ".html")),
    "fix: --report under /proc": Case([*FIX_OUT, "--report", "/proc/r.html"], ("--report", "cannot write")),
    # ---- fix: the recipe and the options
    "fix: --recipe a folder": Case([*FIX_OUT, "--recipe", "{tmp}"], ("a recipe must be a YAML file", "folder")),
    "fix: --recipe unknown name": Case([*FIX_OUT, "--recipe", "dfrr"], ("unknown recipe 'dfrr'",)),
    "fix: recipe c_grid out of range": Case([*FIX_OUT, "--recipe", "{r}"], ("recipe.yaml", "c_grid", "> 0"),
                                            lambda e: {"r": recipe(e, NEG_C)}),
    "fix: recipe unknown setting": Case([*FIX_OUT, "--recipe", "{r}"], ("recipe.yaml", "'cgrid'", "unknown setting"),
                                        lambda e: {"r": recipe(e, NEG_C.replace("c_grid", "cgrid"))}),
    "fix: recipe unknown key": Case([*FIX_OUT, "--recipe", "{r}"], ("recipe.yaml", "unknown key 'colour'"),
                                    lambda e: {"r": recipe(e, "colour: red\n" + NEG_C)}),
    "fix: recipe not YAML": Case([*FIX_OUT, "--recipe", "{r}"], ("recipe.yaml", "not valid YAML"),
                                 lambda e: {"r": recipe(e, "candidates: [\n")}),
    "fix: --data /dev/null": Case([FIX, "{timm}", "--data", "/dev/null", "--out", "{out}/fixed"], ("/dev/null",)),
    "fix: --tolerance -1": Case([*FIX_OUT, "--export", "onnx", "--tolerance", "-1"], ("--tolerance", "positive")),
    "fix: --export tflite": Case([*FIX_OUT, "--export", "tflite"], ("--export", "'tflite'")),
    "fix: --seed -1": Case([*FIX_OUT, "--seed", "-1"], ("--seed",)),
    "fix: --budget abc": Case([*FIX_OUT, "--budget", "abc"], ("--budget", "'abc'")),
    "fix: --eval-group-by without --eval": Case([*FIX_OUT, "--eval-group-by", "place"], ("--eval-group-by", "--eval")),
    "fix: --device cuda without CUDA": Case([*FIX_OUT, "--device", "cuda"], ("--device cuda",), no_cuda),
    # ---- export
    "export: --opset 3": Case([*ONNX_OUT, "--opset", "3"], ("--opset", "got 3")),
    "export: --opset 999": Case([*ONNX_OUT, "--opset", "999"], ("--opset", "got 999")),
    "export: --opset abc": Case([*ONNX_OUT, "--opset", "abc"], ("--opset",)),
    "export: --tolerance -1": Case([*ONNX_OUT, "--tolerance", "-1"], ("--tolerance", "positive")),
    "export: --format xyz": Case([*ONNX_OUT, "--format", "xyz"], ("--format", "'xyz'")),
    "export: --exporter foo": Case([*ONNX_OUT, "--exporter", "foo"], ("--exporter", "'foo'")),
    "export: onnx without --data": Case([EXPORT, "{timm}", "--out", "{out}/m.onnx"], ("--data",)),
    "export: .txt output": Case([EXPORT, *M_I, "--out", "{out}/m.txt"], ("m.txt", ".onnx")),
    "export: safetensors file to .onnx name": Case(
        [EXPORT, "{timm}/model.safetensors", "--format", "safetensors", "--out", "{out}/m.onnx"],
        ("m.onnx", ".safetensors")),
    "export: safetensors folder to .onnx name": Case(
        [EXPORT, "{timm}", "--format", "safetensors", "--out", "{out}/m.onnx"], ("m.onnx", "folder")),
    "export: output == input model": Case(
        [EXPORT, "{m}/model.safetensors", "--format", "safetensors", "--out", "{m}/model.safetensors", "--force"],
        ("overwrite the input model",), lambda e: {"m": copy_of(e.timm, e.tmp / "m")}),
    "export: output == --data": Case([EXPORT, "{timm}", "--format", "safetensors", "--data", "{d}", "--out", "{d}",
                                      "--force"], ("overwrite the data (--data)",),
                                     lambda e: {"d": copy_of(e.images, e.tmp / "data")}),
    "export: --out under /proc": Case([EXPORT, *M_I, "--out", "/proc/m.onnx"], ("/proc/m.onnx", "cannot write")),
    "export: --out below a regular file": Case([EXPORT, *M_I, "--out", "{f}/m.onnx"], ("is a file",),
                                               lambda e: {"f": text_file(e, "plain.txt", "x")}),
    "export: output exists": Case([EXPORT, *M_I, "--out", "{f}"], ("already exists",),
                                  lambda e: {"f": text_file(e, "m.onnx", "mine")}),
    "export: --max-verify 0": Case([*ONNX_OUT, "--max-verify", "0"], ("--max-verify",)),
    # ---- verify
    "verify: not an .onnx file": Case([VERIFY, "{timm}/model.safetensors", "--reference", "{timm}",
                                       "--data", "{images}"],
                                      ("model.safetensors", ".onnx")),
    "verify: missing .onnx": Case([VERIFY, "{tmp}/no.onnx", "--reference", "{timm}", "--data", "{images}"],
                                  ("no.onnx", "not found")),
    "verify: missing reference": Case([VERIFY, "{o}", "--reference", "{tmp}/nope", "--data", "{images}"],
                                      ("nope", "reference model not found"), one("o", garbage_onnx)),
    "verify: --tolerance -1": Case([VERIFY, "{o}", "--reference", "{timm}", "--data", "{images}", "--tolerance", "-1"],
                                   ("--tolerance",), one("o", garbage_onnx)),
    "verify: garbage .onnx": Case([VERIFY, "{o}", "--reference", "{timm}", "--data", "{images}"],
                                  ("garbage.onnx", "cannot load"), one("o", garbage_onnx)),
    "verify: missing --reference": Case([VERIFY, "{o}", "--data", "{images}"], ("--reference",),
                                        one("o", garbage_onnx)),
    # ---- zoo MANIFEST
    "zoo: manifest not found": Case([ZOO, "{tmp}/zoo.yaml"], ("zoo.yaml", "not found")),
    "zoo: manifest is a folder": Case([ZOO, "{tmp}"], ("got a folder",)),
    "zoo: CSV manifest with an unterminated quote": Case(
        [ZOO, "{z}"], ("zoo.csv", "unterminated quote", "line 3"),
        lambda e: {"z": text_file(e, "zoo.csv", '# gate: 0.5\nname,checkpoint,data\n"a,m,d\n')}),
    "zoo: unknown field": Case([ZOO, "{z}", "--out-dir", "{tmp}/report"], ("row 2", "'grup_by'", "unknown field"),
                               lambda e: {"z": zoo_manifest(e, {"grup_by": "place"})}),
    "zoo: duplicate name": Case([ZOO, "{z}", "--out-dir", "{tmp}/report"], ("row 2", "duplicate name 'first'"),
                                lambda e: {"z": zoo_manifest(e, {"name": "first"})}),
    "zoo: bad gate": Case([ZOO, "{z}", "--out-dir", "{tmp}/report"], ("row 2", "gate", "0 to 1"),
                          lambda e: {"z": zoo_manifest(e, {"gate": 150})}),
    "zoo: missing checkpoint": Case([ZOO, "{z}", "--out-dir", "{tmp}/report"], ("row 2", "checkpoint", "not found"),
                                    lambda e: {"z": zoo_manifest(e, {"checkpoint": "nope"})}),
    "zoo: output == data": Case([ZOO, "{z}", "--out-dir", "{tmp}/report", "--force"], ("row 2", "output", "data"),
                                lambda e: {"z": zoo_manifest(e, {"data": str(copy_of(e.images, e.tmp / "data")),
                                                                 "output": "data"})}),
    "zoo: --mode foo": Case([ZOO, "{z}", "--mode", "foo"], ("--mode", "'foo'"), lambda e: {"z": zoo_manifest(e, {})}),
    # ---- found by an audit: each gave exit 3 or wrote a broken model
    "eval: head bias stored as bool": Case([EVAL, "{model}", "--data", "{images}"],
                                           ("model.safetensors", "'fc.bias' is stored as bool", "floating-point"),
                                           lambda e: {"model": head_stored_as(e, "bool")}),
    "fix: head bias stored as int64": Case([FIX, "{model}", "--data", "{images}", "--out", "{out}/fixed"],
                                           ("'fc.bias' is stored as int64",), lambda e: {"model": head_stored_as(e, "int64")}),
    "eval: config.json nested too deeply": Case([EVAL, "{model}", "--data", "{images}"],
                                                ("config.json", "not valid JSON", "nested too deeply"),
                                                one("model", deep_config)),
    "eval: a JSONL line naming a key twice": Case([EVAL, "{bert}", "--data", "{t}"],
                                                  ("t.jsonl", "line 2", "'label' is given twice"),
                                                  lambda e: {"t": text_file(e, "t.jsonl", '{"text": "good", "label": "positive"}\n'
                                                                            '{"text": "bad", "label": "negative", "label": "positive"}\n')}),
    "eval: a JSONL line nested too deeply": Case([EVAL, "{bert}", "--data", "{t}"], ("t.jsonl", "line 1", "nested too deeply"),
                                                 lambda e: {"t": jsonl_texts(e, '{"text": ' + "[" * 100000 + "]" * 100000
                                                                             + ', "label": "positive"}')}),
    "eval: a JSONL text that is an array": Case([EVAL, "{bert}", "--data", "{t}"], ("t.jsonl", "line 1", "'text'", "array"),
                                                lambda e: {"t": jsonl_texts(e, '{"text": ["good", "movie"], '
                                                                               '"label": "positive"}')}),
    "eval: NUL in a metadata.csv path": Case([EVAL, "{timm}", "--data", "{d}"], ("metadata.csv", "row 1", "NUL byte"),
                                             one("d", nul_in_a_path)),
    "eval: a --data name too long": Case([EVAL, "{timm}", "--data", "{tmp}/" + "a" * 300], ("a" * 300,)),
    "eval: --model-args of the wrong type": Case([EVAL, *M_I, "--model-args", '{{"drop_rate": "x"}}', "--no-cache"],
                                                 ("--model-args", "drop_rate='x'", "float")),
    "fix: --cache-dir is --out": Case([*FIX_OUT, "--cache-dir", "{out}/fixed"], ("--cache-dir", "--out")),
}


# ------------------------------------------------------------------ the checks
OUTPUT_FLAGS = ("--out", "-o", "--report", "--out-dir")
SPECIAL = ("/proc", "/dev", "/sys")


@dataclass
class Env:
    tmp: Path
    timm: Path
    images: Path
    bert: Path
    texts: Path
    cleanup: list = field(default_factory=list)


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (itself included): relative name -> sha256 of a file, 'dir' of a
    folder."""
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def ours(p: Path) -> bool:
    return not str(p).startswith(SPECIAL)


def exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError:                                  # a name too long to look up
        return False


def watched(e: Env, args: list[str]) -> tuple[list[Path], list[Path]]:
    """(inputs: every existing path argument, the fixtures and the case's folder; the folders the
    outputs would go in)."""
    inputs = {e.tmp, e.timm, e.images, e.bert, e.texts}
    inputs |= {Path(a) for a in args if a.startswith("/") and ours(Path(a)) and exists(Path(a))}
    outs = [Path(args[i + 1]) for i, a in enumerate(args[:-1]) if a in OUTPUT_FLAGS]
    if args[0] in (FIX, EXPORT) and not any(a in ("--out", "-o") for a in args):
        outs.append(Path(args[1]))                  # the default output goes beside the model
    parents = set()
    for o in outs:
        p = o.parent
        while not p.is_dir():                        # below a file / a missing folder: the nearest folder
            p = p.parent
        if ours(p):
            parents.add(p)
    return sorted(inputs), sorted(parents)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, timm_folder, image_data, bert_folder, text_data):
    case = CASES[name]
    e = Env(tmp_path / "case", timm_folder, image_data, bert_folder, text_data)
    e.tmp.mkdir()
    (tmp_path / "out").mkdir()
    try:
        built = (case.build(e) if case.build else None) or {}
        values = {"tmp": e.tmp, "out": tmp_path / "out", "timm": e.timm, "images": e.images, "bert": e.bert,
                  "texts": e.texts, **built}
        args = [str(a).format(**{k: str(v) for k, v in values.items()}) for a in case.args]
        inputs, parents = watched(e, args)
        parents.append(tmp_path / "out")
        before = {p: tree(p) for p in inputs}
        listing = {p: sorted(os.listdir(p)) for p in parents}

        code, out, err = run_cli(*args, "-q")

        # a failed gate (exit 1) may come with warnings about the figures (a class with a few samples)
        lines = [line for line in err.splitlines() if line.strip()
                 and not (case.code == 1 and line.startswith("warning: "))]
        assert code == case.code, f"{name}: exit {code}, stderr {err!r}"
        assert "Traceback" not in err and "internal error" not in err, err
        assert len(lines) == 1, f"{name}: stderr is not one line: {err!r}"
        line = lines[0]
        assert line.startswith("error: " if case.code == 2 else "FAILED: "), line
        for w in case.words:
            assert w in line, f"{name}: {w!r} not in {line!r}"
        for w in case.absent:
            assert w not in line, f"{name}: {w!r} in {line!r}"
        assert "Usage:" not in err and "╭" not in err
        for p in parents:
            assert sorted(os.listdir(p)) == listing[p], f"{name}: new files in {p}"
        for p in inputs:
            assert tree(p) == before[p], f"{name}: {p} changed"
    finally:
        for undo in e.cleanup:
            undo()


def test_the_matrix_covers_every_command():
    assert len(CASES) >= 40
    assert {c.args[0] for c in CASES.values()} == {EVAL, PROBE, FIX, EXPORT, VERIFY, ZOO}
    assert all(c.code in (1, 2) for c in CASES.values())


# ------------------------------------------------------------------ byte-identical outputs
def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_inputs_and_seed_give_byte_identical_files(timm_folder, image_data, tmp_path):
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        code, _, err = run_cli("fix", timm_folder / "model.safetensors", "--data", image_data, "--recipe", "dfr",
                               "--group-by", "place", "--export", "onnx", "--seed", "3",
                               "--out", tmp_path / run / "fixed.safetensors", "-q")
        assert code == 0, err
        code, _, err = run_cli("export", timm_folder, "--data", image_data, "--format", "onnx",
                               "--out", tmp_path / run / "exported.onnx", "-q")
        assert code == 0, err
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert sorted(a) == ["exported.onnx", "fixed.onnx", "fixed.safetensors"]
    assert a == b


# ------------------------------------------------------------------ stale temporary folders
def test_stale_temp_of_ours_is_removed_and_nothing_else(timm_folder, image_data, tmp_path):
    from repair.io import UNLOCKED_STALE_SECONDS, _temp_name_re

    out = tmp_path / "fixed"
    stale = tmp_path / ".fixed.k3x9q2ab.tmp"                 # atomic_output's name, no lock file
    others = [tmp_path / ".fixed.NOT-OURS.tmp", tmp_path / ".fixedcopy.k3x9q2ab.tmp", tmp_path / "fixed.k3x9q2ab.tmp"]
    assert _temp_name_re(out.name).fullmatch(stale.name)
    assert not any(_temp_name_re(out.name).fullmatch(o.name) for o in others)
    old = time.time() - UNLOCKED_STALE_SECONDS - 600
    for d in (stale, *others):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half-written")
        os.utime(d, (old, old))
    code, _, err = run_cli("fix", timm_folder, "--data", image_data, "--recipe", "dfr", "--out", out)
    assert code == 0, err
    assert not stale.exists() and out.is_dir()
    assert f"removed {stale}" in err
    for o in others:
        assert (o / "model.safetensors").read_bytes() == b"half-written"
        assert str(o) not in err


# ------------------------------------------------------------------ the design card
def test_fix_a_weights_file_in_a_timm_folder(timm_folder, image_data, tmp_path):
    from repair.adapters import load_model

    folder = copy_of(timm_folder, tmp_path / "timm")
    code, _, err = run_cli("fix", folder / "model.safetensors", "--data", image_data, "-q")
    assert code == 0, err
    out = folder / "model-repaired.safetensors"
    a = load_model(out)
    assert a.family == "timm" and a.class_names == load_model(timm_folder).class_names


def test_fix_a_weights_file_in_a_transformers_folder(bert_folder, text_data, tmp_path):
    from repair.adapters import load_model

    folder = copy_of(bert_folder, tmp_path / "bert")
    code, _, err = run_cli("fix", folder / "model.safetensors", "--data", text_data, "--recipe", "dfr", "-q")
    assert code == 0, err
    a = load_model(folder / "model-repaired.safetensors")
    assert a.family == "transformers" and a.class_names == ["negative", "positive"]


def test_bare_weights_of_an_architecture_built_with_model_args(image_data, tmp_path):
    import timm

    from repair.adapters import LoadOptions, load_model
    from repair.io import save_safetensors

    args = {"channels": [16, 32, 48, 64]}                  # test_resnet's default: (32, 48, 48, 96)
    model = timm.create_model("test_resnet", num_classes=3, **args)
    weights = tmp_path / "narrow.safetensors"
    save_safetensors(model.state_dict(), weights, {})
    code, _, err = run_cli("fix", weights, "--arch", "test_resnet", "--data", image_data, "-q")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--model-args" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["narrow.safetensors"]
    code, _, err = run_cli("fix", weights, "--arch", "test_resnet", "--model-args", json.dumps(args),
                           "--class-names", "cat,dog,fox", "--recipe", "dfr", "--data", image_data, "-q")
    assert code == 0, err
    a = load_model(tmp_path / "narrow-repaired.safetensors", LoadOptions(arch="test_resnet", model_args=args))
    assert a.head_params()[0].shape == (3, 64)


def test_a_model_args_file_is_named_when_its_args_do_not_fit_and_a_timm_config_without_them_gives_none(
        image_data, timm_folder, tmp_path):
    """``--model-args FILE.json`` whose arguments the architecture rejects: the one-line error names the file
    (it said only "--model-args do not fit"). A timm ``config.json`` given as the file stands for its
    ``model_args``, and timm before 1.0.30 leaves that key out when there are none: no arguments then, not the
    whole config as keyword arguments ("ResNet.__init__() got an unexpected keyword argument 'architecture'",
    seen with timm 1.0.29)."""
    weights = timm_folder / "model.safetensors"
    bad = tmp_path / "args.json"
    bad.write_text(json.dumps({"no_such_argument": 1}))
    code, _, err = run_cli("eval", weights, "--arch", "test_resnet", "--class-names", "cat,dog,fox",
                           "--model-args", bad, "--data", image_data, "-q")
    assert code == 2 and err.count("\n") == 1 and str(bad) in err and "do not fit" in err, err
    cfg = json.loads((timm_folder / "config.json").read_text())
    cfg.pop("model_args", None)
    old = tmp_path / "old-timm-config.json"
    old.write_text(json.dumps(cfg))
    code, out, err = run_cli("eval", weights, "--arch", "test_resnet", "--class-names", "cat,dog,fox",
                             "--model-args", old, "--data", image_data, "--json", "-q")
    assert code == 0 and 0 <= json.loads(out)["accuracy"] <= 1, err
    cfg["model_args"] = [1]
    old.write_text(json.dumps(cfg))
    code, _, err = run_cli("eval", weights, "--arch", "test_resnet", "--class-names", "cat,dog,fox",
                           "--model-args", old, "--data", image_data, "-q")
    assert code == 2 and err.count("\n") == 1 and str(old) in err and "model_args" in err, err


def test_a_model_given_as_data_and_a_folder_that_is_no_model_are_told_so(tmp_path, timm_folder, bert_folder):
    """Model and data swapped: the model folder's config.json and tokenizer.json read as "tables"
    (advice: --data minilm-cls/config.json); a parent folder given as the model, with the cache under
    it: refused for the cache. Each is now told what it is, before any work."""
    from conftest import make_images, make_texts, one_line_naming, run_cli

    texts = make_texts(tmp_path / "t.csv")
    code, _, err = run_cli("eval", texts, "--data", bert_folder, "-q")
    one_line_naming(code, err, bert_folder, "is a model folder", "first argument")
    images = make_images(tmp_path / "imgs", n_per_class=2)
    parent = tmp_path / "work"
    parent.mkdir()
    for cmd in (["eval"], ["probe"], ["fix", "--out", tmp_path / "o"]):
        code, _, err = run_cli(cmd[0], parent, "--data", images, *cmd[1:], "--cache-dir", parent / "cache", "-q")
        one_line_naming(code, err, parent, "not a timm hub folder")
    assert not (parent / "cache").exists() and not (tmp_path / "o").exists()
