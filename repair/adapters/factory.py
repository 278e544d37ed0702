"""The ``torch`` family: any image classifier module, built by ``--factory
package.module:function`` and loaded from a state-dict file; the head is its last
``nn.Linear``. Preprocessing from ``--image-size/--mean/--std`` or a
``preprocess.json`` beside the weights."""
from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from ..errors import BadInput
from ..io import load_state_dict_file
from . import LoadOptions, register_family
from .images import PREPROCESS_FILE, image_config_from_options
from .base import files_beside
from .torch_module import TorchImageAdapter, last_linear, load_weights_strict


@contextmanager
def _current_folder_importable():
    """The current folder on ``sys.path`` while the factory's module is imported and called (users
    point at a module in the folder they run from), and only then: a module imported later (by
    the exporter, onnxruntime) never comes from a same-named file there."""
    added = "" not in sys.path and "." not in sys.path
    if added:
        sys.path.insert(0, "")
    try:
        yield
    finally:
        if added:
            try:
                sys.path.remove("")
            except ValueError:
                pass


class _ToStderr:
    """A stream the user's code writes to while it runs inside repair: every write goes on, at once, to
    the stderr of the moment it was made (never stdout: ``--json`` is one document), and the last line
    written is kept (to name it when the code exits). A handler the code creates (``logging.basicConfig``
    at import) keeps writing through it, to stderr, for the rest of the run."""

    def __init__(self, target):
        self.target, self.last = target, ""

    def write(self, text: str) -> int:
        lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
        if lines:
            self.last = lines[-1]
        return self.target.write(text)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.target, name)


@contextmanager
def _users_code(what: str):
    """Around the user's code (the factory module's import, the factory's call): what it prints goes to
    stderr as it prints it; its ``sys.exit`` (a module that parses arguments when imported) is
    :class:`BadInput` naming it with the last line it printed, never this command's exit status -- a
    gate must not pass, nor fail, by the factory's exit."""
    from contextlib import redirect_stderr, redirect_stdout

    out = _ToStderr(sys.stderr)
    try:
        with redirect_stdout(out), redirect_stderr(out):
            yield
    except SystemExit as e:
        raise BadInput(f"{what} exited (SystemExit {e.code!r})" + (f"; it printed: {out.last[:200]}" if out.last
                                                                    else "")) from None


def import_factory(spec: str):
    if ":" not in spec:
        raise BadInput(f"--factory must look like package.module:function, got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    try:
        with _current_folder_importable(), _users_code(f"factory module {mod_name!r}, imported,"):
            mod = importlib.import_module(mod_name)
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"cannot import factory module {mod_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise BadInput(f"factory {spec!r}: {fn_name!r} is not a function in {mod_name}")
    return fn


def load_factory_model(weights: Path, factory: str, *, allow_pickle: bool,
                       data_config: Optional[dict], class_names: Optional[Sequence[str]] = None,
                       model_args: Optional[dict] = None) -> TorchImageAdapter:
    fn = import_factory(factory)
    try:
        with _current_folder_importable(), _users_code(f"factory {factory!r}"):
            model = fn(**(model_args or {}))
    except BadInput:
        raise
    except Exception as e:   # the user's code, called with the user's arguments
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        raise BadInput(f"factory {factory!r}{' with --model-args' if model_args else ''} failed ({why})") from None
    if not isinstance(model, nn.Module):
        raise BadInput(f"factory {factory!r} returned {type(model).__name__}, not a torch nn.Module")
    tensors, metadata = load_state_dict_file(weights, allow_pickle=allow_pickle)
    try:
        head_name, head = last_linear(model)
    except BadInput as e:
        raise BadInput(f"factory {factory!r}: {e.problem}", weights) from None
    load_weights_strict(model, tensors, weights, head_name)
    names = list(class_names) if class_names else [str(i) for i in range(head.out_features)]
    adapter = TorchImageAdapter(family="torch", source=weights, weights_path=weights, model=model,
                                head_name=head_name, tensors=tensors, metadata=metadata,
                                class_names=names, data_config=data_config)
    adapter.build = {"factory": factory, "model_args": model_args or {}, "code": _code_digest(fn)}
    classes = _classes_code_digest(model, fn, _reachable_users_files(sys.modules.get(factory.split(":", 1)[0])))
    if classes is not None:
        adapter.build["classes_code"] = classes
    return adapter


def _code_digest(fn) -> Optional[str]:
    """sha256 of the file that defines the factory (an edited factory builds another network;
    part of the embedding cache key), or None when it has no source file."""
    import inspect

    from .base import sha256_file

    try:
        return sha256_file(Path(inspect.getsourcefile(fn) or ""))
    except (OSError, TypeError):
        return None


def _installed_roots() -> list[str]:
    """The folders of Python's standard library and installed packages (resolved)."""
    import os
    import site
    import sysconfig

    roots = [sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    try:
        roots += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:                 # a virtualenv's old site module
        pass
    return [os.path.realpath(r) for r in roots if r]


def _users_file(src: Optional[str], roots: Sequence[str]) -> Optional[str]:
    """``src`` resolved when it is a source file the user wrote: not of an installed package or the
    standard library (torch, timm, transformers: their versions are in the key), nor of repair."""
    import os

    if not src:
        return None
    real = os.path.realpath(src)
    parts = Path(real).parts
    here = os.path.realpath(Path(__file__).parents[1])          # the repair package
    if ("site-packages" in parts or "dist-packages" in parts or real.startswith(here + os.sep)
            or any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)):
        return None
    return real if os.path.isfile(real) else None


def _reachable_users_files(module) -> frozenset:
    """The source files the user wrote that the factory's module reaches through its names -- a module
    it imported (``import helpers``), the module of a function or class it imported (``from helpers
    import act``) --, and so on from each of those files: code its network may run that no module class
    defines. Found from the modules themselves, so the same whatever this process imported before."""
    import inspect
    import types

    if module is None:
        return frozenset()
    roots = _installed_roots()
    seen, files, todo = {id(module)}, set(), [module]
    while todo:
        mod = todo.pop()
        for value in list(vars(mod).values()):
            target = value if isinstance(value, types.ModuleType) else inspect.getmodule(value) \
                if isinstance(value, (types.FunctionType, type)) else None
            if target is None or id(target) in seen:
                continue
            seen.add(id(target))
            f = _users_file(getattr(target, "__file__", None), roots)
            if f is not None:
                files.add(f)
                todo.append(target)
    return frozenset(files)


def _classes_code_digest(model: nn.Module, fn, imported: Sequence[str] = ()) -> Optional[str]:
    """sha256 of the source files the user wrote that the network may run, other than the factory's own
    file: those of the module classes in ``model``'s tree (a network class imported by the factory from
    another file: its ``forward`` is code ``repr(model)`` never sees) and ``imported``, the user's modules
    the factory's import brought in (a helper function a ``forward`` calls); by content only -- never
    their paths --, in a stable order; installed packages, the standard library and repair left out.
    None when there is no such file (the key of a factory defining its network in its own file is as
    before)."""
    import inspect
    import os

    from .base import sha256_file

    roots = _installed_roots()
    try:
        own = os.path.realpath(inspect.getsourcefile(fn) or "")
    except TypeError:
        own = ""
    files: set = {f for f in imported if f != own}
    for cls in {type(m) for m in model.modules()}:
        try:
            src = inspect.getsourcefile(cls)
        except (TypeError, OSError):         # a built-in or generated class: no source file
            continue
        real = _users_file(src, roots)
        if real is not None and real != own:
            files.add(real)
    if not files:
        return None
    digests = []
    for f in files:
        try:
            digests.append(sha256_file(Path(f)))
        except OSError:
            continue
    if not digests:
        return None
    import hashlib

    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


def detect(path: Path, o: LoadOptions) -> bool:
    return bool(o.factory)  # --factory wins over everything else


def load(path: Path, o: LoadOptions) -> TorchImageAdapter:
    side_json = (path if path.is_dir() else path.parent) / PREPROCESS_FILE
    files_beside(side_json.parent, (PREPROCESS_FILE,))      # a symlink leading out of the folder: refused
    cfg = image_config_from_options(o.image_size, o.mean, o.std, side_json)
    adapter = load_factory_model(path, o.factory, allow_pickle=o.allow_pickle, data_config=cfg,
                                 class_names=o.class_names, model_args=o.model_args)
    if side_json.is_file():
        adapter.extra_files = [side_json]
    adapter.preprocess_from_options = True
    return adapter


register_family("torch", detect=detect, load=load, priority=100, model_args=True,
                summary="--factory package.module:function + a state-dict file (head: the last nn.Linear)")
