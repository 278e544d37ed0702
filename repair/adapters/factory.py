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

from .. import provenance
from ..errors import BadInput, users_code
from ..io import load_state_dict_file
from . import LoadOptions, checked_class_names, register_family
from .images import PREPROCESS_FILE, image_config_from_options, image_options
from .base import files_beside, names_of_its_own
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


# What repair saw of each module of the code a factory's network may run, the first time it met the
# module in this process (its import by repair, or right after the factory's call that imported it):
# name -> (the module, weakly; its identity then: ("file", path, sha256) or ("dist", "name==version")).
# The key is made of these -- the code that runs --, never of the files as they are at the time of the key.
_SEEN: dict = {}
# factory module name -> the names of the modules its last load reached (a network module the factory
# imports only when called is followed at the next load, as the factory's own module is).
_REACHED: dict = {}
# installed packages left out of the key: torch's version is in every torch model's key (network_id)
_VERSIONED_ELSEWHERE = frozenset({"torch"})


def _changed_message(path: str) -> str:
    return f"{path} changed since it was imported in this process: restart Python to load the new code"


def _drop_changed(reached: dict, mod_name: str) -> bool:
    """When a file of ``reached`` (code a factory's network may run) has changed since this process imported
    it: drops from ``sys.modules`` that code -- all of the user's modules in ``reached``, and the factory's
    module --, so the import that follows runs the files as they are now, as a new process would (Python
    kept running the old code, while a key of the files as they are now would have stored the old code's
    embeddings under the new code's key), and says True. A changed ``__main__`` cannot be imported again:
    :class:`BadInput` naming the file."""
    changed = _changed_files(reached)
    if not changed:
        return False
    if "__main__" in changed:
        raise BadInput(_changed_message(changed["__main__"]))
    for name, (_, ident) in reached.items():
        if ident[0] == "file" and name != "__main__":
            sys.modules.pop(name, None)
            _SEEN.pop(name, None)
    sys.modules.pop(mod_name, None)
    return True


def import_factory(spec: str):
    if ":" not in spec:
        raise BadInput(f"--factory must look like package.module:function, got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    # the code the last load of this factory reached (a network module its call imported included)
    names = sorted({mod_name} | set(_REACHED.get(mod_name, ())))
    _drop_changed(_reachable([sys.modules.get(n) for n in names]), mod_name)
    try:
        with _current_folder_importable(), users_code(f"factory module {mod_name!r}, imported,"):
            mod = importlib.import_module(mod_name)
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"cannot import factory module {mod_name!r} ({type(e).__name__}: {e})") from None
    _reachable([mod])                     # its code's digests, as imported: what the key names
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise BadInput(f"factory {spec!r}: {fn_name!r} is not a function in {mod_name}")
    return fn


def load_factory_model(weights: Path, factory: str, *, allow_pickle: bool,
                       data_config: Optional[dict], class_names: Optional[Sequence[str]] = None,
                       model_args: Optional[dict] = None,
                       options: Optional[dict] = None) -> TorchImageAdapter:
    """``data_config``: the preprocessing of the options over a ``preprocess.json`` beside the weights;
    ``options``: the options' part alone (input_size/mean/std given). A file ``repair fix`` wrote is read
    with the preprocessing it records (what its figures were measured with), the options over it."""
    mod_name = factory.split(":", 1)[0]
    named = _files_named(model_args)          # before the factory reads them (a later write changes them)
    for attempt in (1, 2):
        fn = import_factory(factory)
        try:
            with _current_folder_importable(), users_code(f"factory {factory!r}"):
                model = fn(**(model_args or {}))
        except BadInput:
            raise
        except Exception as e:   # the user's code, called with the user's arguments
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            raise BadInput(f"factory {factory!r}{' with --model-args' if model_args else ''} failed ({why})") from None
        if not isinstance(model, nn.Module):
            raise BadInput(f"factory {factory!r} returned {type(model).__name__}, not a torch nn.Module")
        reached, loose = _network_modules(model, fn, mod_name)
        # a module imported before this load (by another factory, by the factory's call) and changed
        # since: dropped, and the network built again from the files as they are now
        if attempt == 1 and _drop_changed(reached, mod_name):
            continue
        changed = _changed_files(reached)
        if changed:
            raise BadInput(_changed_message(sorted(changed.values())[0]))
        break
    _REACHED[mod_name] = frozenset(reached)
    code = _code_identity(reached, loose, fn)
    tensors, metadata = load_state_dict_file(weights, allow_pickle=allow_pickle)
    try:
        head_name, head = last_linear(model)
    except BadInput as e:
        raise BadInput(f"factory {factory!r}: {e.problem}", weights) from None
    load_weights_strict(model, tensors, weights, head_name)
    recorded = provenance.recorded_image_preprocess(metadata, weights)
    if recorded is not None:
        from .images import described_image_config

        data_config = described_image_config({**recorded, **(options or {})}, weights)
    # a file repair fix wrote records its classes: its own names (a --class-names in another order is
    # refused by load_model, as for a checkpoint with a config that names them)
    rec = provenance.recorded_classes(metadata, weights, head.out_features)
    own = None
    if rec is not None:
        own = checked_class_names(rec, provenance.RECORDED_CLASSES_HOME, weights, distinct=False)
        own = own if names_of_its_own(own, len(own)) else None
    names = own or (list(class_names) if class_names else [str(i) for i in range(head.out_features)])
    adapter = TorchImageAdapter(family="torch", source=weights, weights_path=weights, model=model,
                                head_name=head_name, tensors=tensors, metadata=metadata,
                                class_names=names, data_config=data_config)
    if own is not None:
        adapter.class_names_home = provenance.RECORDED_CLASSES_HOME
    adapter.build = {"factory": factory, "model_args": model_args or {}, **code}
    if named:
        adapter.build["model_args_files"] = named
    return adapter


def _files_named(value, found: Optional[dict] = None) -> dict:
    """``{path: [size, mtime_ns, ctime_ns, inode]}`` of every existing file a string in ``value``
    (``--model-args``, at any depth) names, as the factory's process sees it (relative to the working
    directory), taken before the factory runs: a network shaped by a config file its factory reads is
    another network when that file changes, so this is in the embedding cache key (:meth:`network_id`
    holds ``build``), as a data file's fingerprint is (by its metadata, not its bytes: a large file named
    there costs nothing; a write changes its change time, which cannot be set back). A folder is not
    walked; a name that cannot be looked up is left out (the factory's own read decides about it)."""
    import os

    found = {} if found is None else found
    if isinstance(value, str):
        try:
            if value and value not in found and os.path.isfile(value):
                st = os.stat(value)
                found[value] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        except (OSError, ValueError):
            pass
    elif isinstance(value, dict):
        for v in value.values():
            _files_named(v, found)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _files_named(v, found)
    return found


def _code_digest(fn) -> Optional[str]:
    """sha256 of the file that defines the factory as it is now, or None when it has no source file."""
    import inspect

    from ..io import sha256_file

    try:
        return sha256_file(Path(inspect.getsourcefile(fn) or ""))
    except (OSError, TypeError):
        return None


def _network_modules(model: nn.Module, fn, mod_name: str) -> tuple[dict, set]:
    """The code that builds and runs ``model``: :func:`_reachable` from the factory's module and the module
    of every class in its module tree (a network module the factory imports only when called, and what
    that module imports), as this process imported them; and the user's source files of classes whose
    module is no longer in ``sys.modules`` (as they are now)."""
    import inspect
    import os

    starts, loose = [sys.modules.get(mod_name), inspect.getmodule(fn)], set()
    for cls in {type(m) for m in model.modules()}:
        mod = sys.modules.get(cls.__module__)
        if mod is not None:
            starts.append(mod)
            continue
        try:
            real = _classify(os.path.realpath(inspect.getsourcefile(cls) or ""), cls.__module__)
        except (TypeError, OSError):          # a built-in or generated class: no source file
            continue
        if real is not None and real[0] == "user":
            loose.add(real[1])
    return _reachable(starts), loose


def _code_identity(reached: dict, loose: set, fn) -> dict:
    """The code that builds and runs the network (:func:`_network_modules`), for the embedding cache key:
    ``code``, the sha256 of the factory's file (an edited factory builds another network); ``classes_code``,
    one sha256 of the other source files the user wrote that the network may run (or of an installed
    package no distribution describes), by content only -- never their paths --, in a stable order
    (absent when there is none: the key of a factory defining its network in its own file is as before);
    ``packages``, ``name==version`` of each installed distribution it reaches but torch (absent when
    none). Each as this process imported it, never as the file is now."""
    import hashlib
    import inspect
    import os

    from ..io import sha256_file

    files = {ident[1]: ident[2] for _, ident in reached.values() if ident[0] == "file"}
    try:
        own = os.path.realpath(inspect.getsourcefile(fn) or "")
    except TypeError:
        own = ""
    out: dict = {"code": files.get(own) or _code_digest(fn)}
    digests = [d for f, d in files.items() if f != own]
    for f in loose - set(files) - {own}:
        try:
            digests.append(sha256_file(Path(f)))
        except OSError:
            continue
    if digests:
        out["classes_code"] = hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()
    packages = sorted({ident[1] for _, ident in reached.values() if ident[0] == "dist"})
    if packages:
        out["packages"] = packages
    return out


def _roots() -> tuple[list[str], list[str]]:
    """The folders (resolved) of Python's standard library, and of installed packages."""
    import os
    import site
    import sysconfig

    paths = sysconfig.get_paths()
    std = [paths.get(k) for k in ("stdlib", "platstdlib")]
    installed = [paths.get(k) for k in ("purelib", "platlib")]
    try:
        installed += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:                 # a virtualenv's old site module
        pass
    return ([os.path.realpath(r) for r in std if r], [os.path.realpath(r) for r in installed if r])


def _classify(real: str, name: str, roots: Optional[tuple] = None) -> Optional[tuple[str, str]]:
    """``("user", real)`` for a source file the user wrote, ``("installed", real)`` for one of an installed
    package (a ``site-packages`` folder), None for the standard library, repair, torch (its version is in
    the key already) or no file."""
    import os

    if not real or not os.path.isfile(real):
        return None
    std, installed = roots or _roots()
    parts = Path(real).parts

    def under(folders):
        return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in folders)

    here = os.path.realpath(Path(__file__).parents[1])          # the repair package
    if real.startswith(here + os.sep):
        return None
    if "site-packages" in parts or "dist-packages" in parts or under(installed):
        return None if name.split(".")[0] in _VERSIONED_ELSEWHERE else ("installed", real)
    if under(std):
        return None
    return ("user", real)


def _distribution(name: str, real: str) -> Optional[str]:
    """``name==version`` of the installed distribution that holds the file ``real`` of module ``name``
    (its ``RECORD`` lists the file; else its ``top_level.txt`` names the package), looked for by the
    top-level package's name, then among the distributions of that same folder only; or None (a folder
    on the path named site-packages that no distribution describes)."""
    import importlib.metadata as md

    parts = name.split(".")
    p = Path(real)
    try:
        site_dir = p.parents[len(parts) if p.stem == "__init__" else len(parts) - 1]
        rel = p.relative_to(site_dir).as_posix()
    except (IndexError, ValueError):
        return None

    def holds(d) -> Optional[str]:
        try:
            if Path(str(d.locate_file(""))).resolve() != site_dir.resolve():
                return None
            record = d.read_text("RECORD")
            if record is not None:
                if ("\n" + record).find("\n" + rel + ",") < 0:
                    return None
            elif parts[0] not in (d.read_text("top_level.txt") or "").split():
                return None
            return f"{d.metadata['Name']}=={d.version}"
        except Exception:                  # unreadable metadata: not this distribution
            return None

    try:
        found = holds(md.distribution(parts[0]))
    except Exception:                      # PackageNotFoundError, or a name it cannot take
        found = None
    if found is None:
        try:
            for d in md.distributions(path=[str(site_dir)]):
                found = holds(d)
                if found is not None:
                    break
        except Exception:
            found = None
    return found


def _identity(module, kind: str, real: str) -> Optional[tuple]:
    """What the key names of ``module``: as repair first saw this very module object in this process
    (kept in :data:`_SEEN`), else as it is now (then kept): ``("dist", "name==version")`` for an
    installed distribution's module, ``("file", real, sha256)`` for any other."""
    import weakref

    from ..io import sha256_file

    name = getattr(module, "__name__", None)
    if not isinstance(name, str):
        return None
    rec = _SEEN.get(name)
    if rec is not None and rec[0]() is module:
        return rec[1]
    label = _distribution(name, real) if kind == "installed" else None
    if label is not None:
        ident: tuple = ("dist", label)
    else:
        try:
            ident = ("file", real, sha256_file(Path(real)))
        except OSError:
            return None
    try:
        _SEEN[name] = (weakref.ref(module), ident)
    except TypeError:                      # not weakly referable: not kept
        pass
    return ident


def _reachable(starts) -> dict:
    """The modules of the code a factory's network may run, from ``starts`` (the factory's module, the
    module of each class in its network), through their names -- a module imported (``import helpers``),
    the module of a function or class imported (``from helpers import act``) --, and so on from each
    module of a source file: the user's files and installed packages (``name==version``: not followed
    further), never the standard library, repair or torch. Found from the modules themselves, so the same
    whatever this process imported before. name -> (module, :func:`_identity`)."""
    import inspect
    import os
    import types

    roots = _roots()
    seen, reached, todo = set(), {}, []

    def visit(mod) -> None:
        if mod is None or id(mod) in seen:
            return
        seen.add(id(mod))
        src = getattr(mod, "__file__", None)
        if not isinstance(src, str):
            return
        kind = _classify(os.path.realpath(src), str(getattr(mod, "__name__", "")), roots)
        if kind is None:
            return
        ident = _identity(mod, *kind)
        if ident is None:
            return
        reached[mod.__name__] = (mod, ident)
        if ident[0] == "file":
            todo.append(mod)

    for m in starts:
        visit(m)
    while todo:
        mod = todo.pop()
        for value in list(vars(mod).values()):
            if isinstance(value, types.ModuleType):
                visit(value)
            elif isinstance(value, (types.FunctionType, type)):
                visit(inspect.getmodule(value))
    return reached


def _changed_files(reached: dict) -> dict:
    """name -> file, for each module in ``reached`` whose file is no longer what this process imported."""
    from ..io import sha256_file

    out = {}
    for name, (_, ident) in reached.items():
        if ident[0] != "file":
            continue
        try:
            now = sha256_file(Path(ident[1]))
        except OSError:
            now = None
        if now != ident[2]:
            out[name] = ident[1]
    return out


def detect(path: Path, o: LoadOptions) -> bool:
    return bool(o.factory)  # --factory wins over everything else


def load(path: Path, o: LoadOptions) -> TorchImageAdapter:
    side_json = (path if path.is_dir() else path.parent) / PREPROCESS_FILE
    files_beside(side_json.parent, (PREPROCESS_FILE,))      # a symlink leading out of the folder: refused
    cfg = image_config_from_options(o.image_size, o.mean, o.std, side_json)
    adapter = load_factory_model(path, o.factory, allow_pickle=o.allow_pickle, data_config=cfg,
                                 class_names=o.class_names, model_args=o.model_args,
                                 options=image_options(o.image_size, o.mean, o.std))
    if side_json.is_file():
        adapter.extra_files = [side_json]
    adapter.preprocess_from_options = True
    return adapter


register_family("torch", detect=detect, load=load, priority=100, model_args=True,
                summary="--factory package.module:function + a state-dict file (head: the last nn.Linear)")
