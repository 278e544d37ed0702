"""timm checkpoints: the hub folder ``save_for_hf`` writes (or a weights file inside such a
folder: the folder's config with that file's weights), or a bare weights file + ``--arch``
(+ ``--model-args``)."""
from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Optional, Sequence

import torch
from torch import nn

from .. import provenance
from ..errors import BadInput
from ..io import PICKLE_SUFFIXES, load_state_dict_file
from ..rules import Worded
from . import LoadOptions, checked_class_names, names_by_index, register_family
from .base import check_model_folder, config_unreadable, names_of_its_own, read_json
from .images import resolve_image_config
from .torch_module import TorchImageAdapter, linear_head, load_weights_strict, module_name


def _check_arch(arch: str, where: Optional[Path]) -> None:
    import timm

    # a user path must never reach create_model as a model name (it would try a hub download)
    if not isinstance(arch, str) or not arch or any(c in arch for c in "/\\:") or not timm.is_model(arch):
        raise BadInput(f"unknown timm architecture {arch!r}", where)


#: ``timm.create_model`` arguments that load weights from a file (``checkpoint_path``, any
#: ``torch.load``) or download them (``pretrained``; a ``file`` / ``url`` / hub id in a pretrained
#: config): never taken from a config.json or --model-args, the weights are the checkpoint's own
LOADING_ARGS = ("checkpoint_path", "pretrained", "cache_dir")
PRETRAINED_CFG_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay")
WEIGHT_SOURCE_KEYS = ("file", "url", "hf_hub_id", "hf_hub_filename", "state_dict")


def _check_model_args(args: dict, what: str, where: Optional[Path]) -> None:
    """:class:`BadInput` naming ``what`` (``model_args`` of ``where``, or ``--model-args``) and the key
    when an argument would make timm read a file or reach the network."""
    for key in LOADING_ARGS:
        if args.get(key):
            raise BadInput(f"{what} {key}={args[key]!r} is refused: timm would read weights from a file or the "
                           "network; the weights are the checkpoint's own", where)
    for key in PRETRAINED_CFG_ARGS:
        cfg = args.get(key)
        found = [k for k in WEIGHT_SOURCE_KEYS if isinstance(cfg, dict) and cfg.get(k)]
        if found:
            raise BadInput(f"{what} {key} with {found[0]!r} is refused: it names weights timm would read from a "
                           "file or the network; the weights are the checkpoint's own", where)


def _check_arg_types(model, args: dict, where: Optional[Path], what: str, arch: str) -> None:
    """:class:`BadInput` for an argument whose value is not of the kind the architecture takes
    (``drop_rate: "x"``): timm builds the model with it and fails only in the forward pass. A parameter
    annotated plainly ``int`` / ``float`` / ``bool`` takes only those (an int for a float); one with a
    number or bool default and another annotation (``img_size: int | tuple``) refuses only a text; a
    size (an ``int`` parameter named ``*size``) may be a list or tuple of ints (``to_2tuple``);
    the rest (no default, ``**kwargs``) is left to the constructor."""
    import inspect

    try:
        params = inspect.signature(type(model).__init__).parameters
    except (TypeError, ValueError):
        return
    for key, value in args.items():
        if key not in params:
            continue
        default, note = params[key].default, params[key].annotation
        note = getattr(note, "__name__", note) if isinstance(note, type) else str(note)
        kinds = {"bool": (bool,), "int": (int,), "float": (int, float)}.get(note)
        if kinds is not None:
            def fits(v):
                return isinstance(v, kinds) and (note == "bool" or not isinstance(v, bool))
            # a size may be a list or tuple of them: timm's constructors take sizes through to_2tuple
            # (``img_size: int = 224`` given (32, 32)), and its save_for_hf writes img_size as a list
            ok = fits(value) or (note == "int" and key.endswith("size") and isinstance(value, (list, tuple))
                                 and bool(value) and all(fits(v) for v in value))
        elif isinstance(default, (bool, int, float)):
            ok = not isinstance(value, str)
        else:
            continue
        if not ok:
            kind = note if kinds is not None else type(default).__name__
            raise BadInput(f"{what} {key}={value!r} does not fit {arch}: it takes {kind} values (default "
                           f"{default!r})", where)


def save_timm_folder(model, folder: Path, *, label_names: Sequence[str], data_config: dict, model_args: dict,
                     pretrained_cfg: Optional[dict] = None) -> dict:
    """Write ``model`` as a timm hub folder (``config.json`` + ``model.safetensors``, timm's
    ``save_for_hf``) that reads back the same whichever timm wrote it: ``model_args`` always present and
    without ``num_classes`` (the root's: both would clash in ``create_model``), the preprocessing
    ``data_config`` (and ``pretrained_cfg``'s extra keys) inside ``pretrained_cfg``. timm before 1.0.30
    takes no ``data_config`` and leaves ``model_args`` out when there are none. Returns the config."""
    import inspect
    import json

    from timm.models import save_for_hf

    pcfg = {**data_config, **(pretrained_cfg or {})}
    extra = {"data_config": dict(data_config)} if "data_config" in inspect.signature(save_for_hf).parameters else {}
    save_for_hf(model, str(folder), model_config={"label_names": list(label_names), "pretrained_cfg": dict(pcfg)},
                model_args=dict(model_args), safe_serialization=True, **extra)
    cfg_path = Path(folder) / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    args = cfg.get("model_args") or {}
    args.pop("num_classes", None)
    cfg["model_args"] = args
    cfg["pretrained_cfg"] = {**(cfg.get("pretrained_cfg") or {}), **json.loads(json.dumps(pcfg))}
    cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return cfg


def is_timm_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.exists()):
        return False
    try:
        return "architecture" in read_json(cfg)
    except BadInput:
        return False


def _weights_in_folder(folder: Path, allow_pickle: bool) -> Path:
    st = folder / "model.safetensors"
    if st.exists():
        return st
    for name in ("pytorch_model.bin", "model.pt", "model.pth"):
        if (folder / name).exists():
            if not allow_pickle:
                raise Worded("only a pickle weights file here; convert to model.safetensors[ or pass "
                             "{allow_pickle} (loaded with weights_only=True)]", path=folder / name)
            return folder / name
    raise BadInput("no model.safetensors in the timm folder", folder)


def _check_classes_before_building(arch: str, pretrained_cfg: Optional[dict], tensors: dict, num_classes,
                                   weights: Path) -> None:
    """A class count (config.json's ``num_classes`` or ``model_args``) the weights' head disagrees
    with is refused before the network is built: built first, a config saying 10^7 classes allocated
    a 10^7-row head (4.5 GB) only to be refused after. The head is found by the pretrained config's
    ``classifier`` (the folder's, else the architecture's); when it names none, the check after the
    build stands alone."""
    import timm

    try:
        wanted = int(num_classes) if num_classes is not None else None
    except (TypeError, ValueError):
        return                                # the build refuses it, naming it
    if not wanted:
        return
    names = (pretrained_cfg or {}).get("classifier")
    if not names:
        try:
            default = timm.models.get_pretrained_cfg(arch)
        except Exception:
            default = None
        names = getattr(default, "classifier", None)
    for name in ([names] if isinstance(names, str) else list(names or ())):
        w = tensors.get(f"{name}.weight")
        if isinstance(w, torch.Tensor) and w.dim() == 2 and int(w.shape[0]) != wanted:
            raise BadInput(f"head {name}.weight has {int(w.shape[0])} classes but the configuration says "
                           f"num_classes={wanted}", weights)


def _one_class_count(num_classes, model_args: dict, pretrained_cfg: dict, cfg_path: Path, given_args: Optional[dict],
                     args_from):
    """The class count of a hub folder as timm reads it: config.json's ``num_classes`` replaces
    ``pretrained_cfg.num_classes`` (an older timm left the source's 1000 there), and the network is built
    with ``model_args.num_classes`` (with --model-args over the folder's) where given, else with that count.
    timm loads the file's head only when the two agree: where they do not, a plain timm load gets a random
    head (or fails) where this tool would measure the file's -- refused, naming both."""
    said = [(f, v) for f, v in (("num_classes", num_classes),
                                ("pretrained_cfg.num_classes", pretrained_cfg.get("num_classes")))
            if v is not None and not isinstance(v, bool)][:1]           # the top-level count, where given, wins
    built = model_args.get("num_classes")
    if built is not None and not isinstance(built, bool) and said and str(said[0][1]) != str(built):
        where = f" (model_args.num_classes from {args_from})" if "num_classes" in (given_args or {}) else ""
        raise BadInput(f"the class counts disagree: {said[0][0]} {said[0][1]}, model_args.num_classes {built}{where}; "
                       "timm would build the head with one and drop the file's head -- give one count", cfg_path)
    return built if built is not None and not isinstance(built, bool) else (said[0][1] if said else None)


def _as_timm_builds(pretrained_cfg: dict, model_args: dict) -> dict:
    """The preprocessing configuration as timm reads it for a network built with ``model_args`` (a plain
    ``create_model("local-dir:...")`` then ``resolve_data_config``): ``in_chans`` sets the input's channels,
    ``img_size`` its size where the network takes one size only (``fixed_input_size``), and a network
    built for any size (``dynamic_img_size``, ``strict_img_size: false``) takes any. A folder that an
    older timm wrote keeps the architecture's default size beside ``img_size``: read raw, its images were
    fed at another size than the network's (other figures; a strict ViT failed)."""
    cfg = dict(pretrained_cfg)
    if model_args.get("dynamic_img_size") or model_args.get("strict_img_size") is False or model_args.get("use_naflex"):
        cfg["fixed_input_size"] = False
    chans = model_args.get("in_chans")
    if chans is not None:
        for key in ("input_size", "test_input_size", "min_input_size"):
            size = cfg.get(key) if key != "input_size" or not cfg else cfg.get(key, (3, 224, 224))   # timm's default
            if isinstance(size, (list, tuple)) and len(size) == 3:
                cfg[key] = (chans, *size[1:])
    size = model_args.get("img_size")
    if size is not None and cfg.get("fixed_input_size", False) and isinstance(cfg.get("input_size"), (list, tuple)) \
            and cfg["input_size"]:
        hw = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (list, tuple)) else ()
        if len(hw) == 2:
            cfg["input_size"] = (cfg["input_size"][0], *hw)
    return cfg


def load_timm(path: Path, *, arch: Optional[str] = None, allow_pickle: bool = False,
              class_names: Optional[Sequence[str]] = None, model_args: Optional[dict] = None,
              weights: Optional[Path] = None, preprocess: Optional[dict] = None,
              args_file: Optional[Path] = None) -> TorchImageAdapter:
    """``path``: a hub folder (``weights``: another weights file to read with its config; the
    adapter is then that file's) or a bare weights file with ``arch``. ``model_args`` (given by
    the user) update the folder's; ``args_file``: the file they were read from (named in errors);
    ``preprocess``: input_size/mean/std for a bare file."""
    import timm

    path = Path(path)
    source = path
    given = model_args               # --model-args (a file's model_args are the folder's own)
    args_from = (Path(args_file) if args_file is not None else "--model-args") if model_args is not None else None
    if model_args is not None:
        _check_model_args(model_args, "--model-args", args_file)
    if path.is_dir():
        check_model_folder(path)         # a FIFO or device in it: refused before anything is read
        cfg_path = path / "config.json"
        cfg = read_json(cfg_path)
        folder_arch = cfg.get("architecture")
        _check_arch(folder_arch, cfg_path)
        if arch is not None and arch != folder_arch:
            raise BadInput(f"--arch {arch} disagrees with the folder's architecture {folder_arch!r}", cfg_path)
        arch = folder_arch
        if weights is None:
            weights = _weights_in_folder(path, allow_pickle)
        else:
            source = weights = Path(weights)
        folder_args = cfg.get("model_args") or {}
        if not isinstance(folder_args, dict):
            raise BadInput("model_args must be an object", cfg_path)
        _check_model_args(folder_args, "model_args", cfg_path)
        model_args = {**folder_args, **(model_args or {})}
        # --model-args change the network measured and repaired: the output folder's config.json says
        # so, or a plain timm load of it would build the folder's network
        config_updates = {"model_args": dict(model_args)} if given and model_args != folder_args else {}
        args_from = args_from or cfg_path
        num_classes = cfg.get("num_classes")
        pretrained_cfg = cfg.get("pretrained_cfg") or {}
        if not isinstance(pretrained_cfg, dict):
            raise BadInput(f"pretrained_cfg must be an object (timm's pretrained configuration), got "
                           f"{type(pretrained_cfg).__name__} {json.dumps(pretrained_cfg)[:60]}", cfg_path)
        clf = pretrained_cfg.get("classifier")
        if clf is not None and not (isinstance(clf, str) or (
                isinstance(clf, list) and all(isinstance(c, str) for c in clf))):
            raise BadInput(f"pretrained_cfg.classifier must be the head's module name or a list of them, got "
                           f"{json.dumps(clf)[:60]}", cfg_path)
        names = cfg.get("label_names")
    else:
        if arch is None:
            raise BadInput("a bare weights file needs --arch NAME (the timm architecture)", path)
        _check_arch(arch, None)
        if path.suffix.lower() not in PICKLE_SUFFIXES | {".safetensors"}:
            raise Worded("expected a .safetensors file[ (or a pickle with {allow_pickle})]", path=path)
        weights, cfg_path, num_classes, pretrained_cfg, names = path, None, None, None, None
        model_args = dict(model_args or {})
        config_updates = {}

    tensors, metadata = load_state_dict_file(weights, allow_pickle=allow_pickle)
    model_args = dict(model_args)
    recorded_args = None
    if cfg_path is None:
        # a bare file repair fix wrote records the network it measured (repair.model_args): built so again,
        # --model-args over it key by key (as its recorded preprocessing and classes are read back)
        recorded_args = provenance.recorded_model_args(metadata, weights)
        if recorded_args:
            _check_model_args(recorded_args, "repair.model_args", weights)
            model_args = {**recorded_args, **model_args}
            args_from = args_from if given is not None else weights
    _check_classes_before_building(arch, pretrained_cfg, tensors, num_classes if num_classes is not None
                                   else model_args.get("num_classes"), weights)
    if cfg_path is not None:            # a folder: its counts agree (config.json, model_args, pretrained_cfg)
        num_classes = _one_class_count(num_classes, model_args, pretrained_cfg, cfg_path, given, args_from)
    args_classes = model_args.pop("num_classes", None)
    if num_classes is None:
        num_classes = args_classes
    try:
        model = timm.create_model(arch, pretrained=False, **({"num_classes": int(num_classes)} if num_classes else {}),
                                  **model_args)
    except Exception as e:   # the architecture's constructor rejects the arguments (any error type)
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if isinstance(args_from, Path):
            raise BadInput(f"model_args do not fit {arch} ({why})", args_from) from None
        raise BadInput(f"--model-args do not fit {arch} ({why})" if args_from else
                       f"cannot build {arch} ({why})", None if args_from else weights) from None
    _check_arg_types(model, model_args, args_from if isinstance(args_from, Path) else None,
                     "model_args" if isinstance(args_from, Path) and args_file is None else "--model-args", arch)
    head = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    if not isinstance(head, nn.Module):       # features_only=True, a distilled model's two heads
        raise BadInput(f"{arch} built with these model_args has no single classifier head",
                       args_from if isinstance(args_from, Path) else weights)
    head_name = module_name(model, head)
    linear_head(head, head_name, weights)     # a NormLinear or a Conv2d head: said as such, not as a missing tensor
    key_w = f"{head_name}.weight"
    if key_w not in tensors:
        raise BadInput(f"no head tensor {key_w} for {arch}", weights)
    file_classes = int(tensors[key_w].shape[0])
    if num_classes is not None and int(num_classes) != file_classes:
        raise BadInput(f"head {key_w} has {file_classes} classes but config.json says "
                       f"num_classes={num_classes}", weights)
    if model.get_classifier().weight.shape[0] != file_classes:  # bare file: classes from the head tensor
        model.reset_classifier(file_classes)
        head_name = module_name(model, model.get_classifier())
    load_weights_strict(model, tensors, weights, head_name)
    user = None
    if pretrained_cfg is None:
        # a bare file: the architecture's preprocessing, the one repair fix recorded in it over that (as its
        # classes are read back), the user's options over both
        pretrained_cfg = dict(model.pretrained_cfg or {})
        pretrained_cfg.update(provenance.recorded_image_preprocess(metadata, weights) or {})
        user = preprocess or None
    home = None
    if names is not None:   # the folder's label_names (timm writes a dict {index: name} where indices have gaps)
        if isinstance(names, dict):
            names = names_by_index(names, file_classes, "label_names", cfg_path, gaps=True)
        names = checked_class_names(names, "label_names", cfg_path, distinct=False)
        if len(names) != file_classes:
            raise BadInput(f"label_names has {len(names)} entries, the head has {file_classes} classes", cfg_path)
        home = f"{cfg_path.name} label_names"
    elif cfg_path is None:  # a bare file repair fix wrote records its classes
        rec = provenance.recorded_classes(metadata, weights, file_classes)
        if rec is not None:
            names = checked_class_names(rec, provenance.RECORDED_CLASSES_HOME, weights, distinct=False)
            home = provenance.RECORDED_CLASSES_HOME
    if names is not None and not names_of_its_own(names, file_classes):
        names = home = None        # placeholders (0.., LABEL_0..): the user's names may replace them
    own_names = names is not None
    if names is None:     # --class-names name a checkpoint that names none (load_model checks their count)
        names = (list(class_names) if class_names and len(class_names) == file_classes
                 else [str(i) for i in range(file_classes)])
        if class_names and len(class_names) == file_classes and cfg_path is not None:
            # the written folder names them, as the run read them (a later eval reads them from there)
            config_updates = {**config_updates, "label_names": [str(n) for n in class_names]}
    def resolved(cfg: dict) -> dict:
        try:
            return resolve_image_config(cfg, cfg_path or weights)
        except BadInput as e:   # a size the user gave is the option's problem, not the weights file's
            if user and "input_size" in user and e.problem.startswith("input_size") and "out of range" in e.problem:
                raise BadInput(f"--image-size {user['input_size'][-1]}: {e.problem}") from None
            raise

    # every value that will be read checked as written (the options over the file's), before timm's rewrite
    resolved({**pretrained_cfg, **(user or {})})
    pretrained_cfg = _as_timm_builds(pretrained_cfg, model_args)
    if user and "input_size" in user and isinstance(pretrained_cfg.get("input_size"), (list, tuple)):
        # --image-size sets the height and width; the channels stay the network's (model_args' in_chans)
        user = {**user, "input_size": [pretrained_cfg["input_size"][0], *user["input_size"][1:]]}
    data_config = resolved({**pretrained_cfg, **(user or {})})      # options given win, after the rewrite
    adapter = TorchImageAdapter(family="timm", source=source, weights_path=weights, model=model,
                                head_name=head_name, tensors=tensors, metadata=metadata,
                                class_names=[str(n) for n in names], data_config=data_config)
    adapter.build = {"architecture": arch, "model_args": model_args, "timm": timm.__version__}
    adapter.config_updates = config_updates
    if own_names:
        adapter.class_names_home = home
    if given or recorded_args:   # the network measured: recorded in the output's provenance, the one record a bare file has
        adapter.save_metadata_defaults = MappingProxyType(
            {f"{provenance.PREFIX}model_args": provenance.canonical_json(model_args)})
    adapter.preprocess_from_options = bool(preprocess) and not path.is_dir()
    if path.is_dir():
        adapter.model_folder = path
    return adapter


def _in_folder(path: Path) -> bool:
    """A weights file inside a hub folder."""
    return path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES | {".safetensors"} and is_timm_folder(path.parent)


def detect(path: Path, o: LoadOptions) -> bool:
    """A hub folder (config.json with ``architecture``), a weights file inside one, or a bare
    weights file with ``--arch``. A folder whose config.json is not valid JSON is claimed too, so
    the error says so (rather than "not a timm hub folder")."""
    if path.is_dir():
        return is_timm_folder(path) or config_unreadable(path)
    return bool(o.arch) or _in_folder(path)


def _preprocess(o: LoadOptions) -> dict:
    out: dict = {}
    if o.image_size is not None:
        out.update(input_size=[3, int(o.image_size), int(o.image_size)], crop_pct=1.0)
    if o.mean is not None:
        out["mean"] = list(o.mean)
    if o.std is not None:
        out["std"] = list(o.std)
    return out


def load(path: Path, o: LoadOptions) -> TorchImageAdapter:
    args_file = Path(o.files[0]) if o.files else None       # the --model-args file, when they came from one
    if path.is_dir():
        return load_timm(path, arch=o.arch, allow_pickle=o.allow_pickle, class_names=o.class_names,
                         model_args=o.model_args, args_file=args_file)
    if _in_folder(path) and not o.arch:
        return load_timm(path.parent, allow_pickle=o.allow_pickle, class_names=o.class_names,
                         model_args=o.model_args, weights=path, args_file=args_file)
    return load_timm(path, arch=o.arch, allow_pickle=o.allow_pickle, class_names=o.class_names,
                     model_args=o.model_args, preprocess=_preprocess(o), args_file=args_file)


register_family("timm", detect=detect, load=load, priority=80, model_args=True,
                summary="timm hub folder (config.json + model.safetensors) or a weights file in one, or a bare "
                        "weights file + --arch (+ --model-args)")
