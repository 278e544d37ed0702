"""An adapter's network, prepared for model repairs (``Adapter.trainable()``).

:class:`TrainableModel` is what a model repair receives: the torch module with its
preprocessing (and train-time augmentation), the parameter blocks in order from the
input to the head (so "train the last N blocks" means the same for a ResNet, a ViT
and a BERT), BatchNorm frozen when asked (a small repair set's batch statistics are
noise, and checkpoints with BN folded into their weights -- the shared TFLite
MobileNetV2 has running mean 0, variance 1 -- must never use batch statistics), and
the bookkeeping of which tensors a repair changed.

Images are run through the model's own eval preprocessing once (:meth:`encode`); the
augmentation (:meth:`augment`: flips, small translations) works on those tensors, so
pixel-space mixing happens after the model's own normalisation. Texts are tokenised
per batch by the adapter's tokenizer.

Mixing repairs (:meth:`mixed_logits`) interpolate two inputs inside the network: images
in that preprocessed pixel space, texts at a *mix point* (:meth:`mix_points`: 0 = the
token embeddings, k = the output of encoder layer k), through forward hooks, so any
transformers encoder works without its own code. :meth:`lora` wraps chosen layers with
``peft`` LoRA adapters for the length of a training run and merges them back into the
weights, so the saved checkpoint needs no ``peft``.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ..config import SettingRefused
from ..errors import BadInput

_BN = nn.modules.batchnorm._BatchNorm


from ..rules import install_hint  # noqa: E402  (the one wording of an extra's install command)


def missing_package(module: str, needed_by: str, extra: str) -> str:
    """The message for ``needed_by`` (an option, a setting) needing the optional package ``module`` of the
    extra ``extra``, not installed."""
    return f"{needed_by} needs the optional {module} package: {install_hint(extra)}"


def require_package(module: str, needed_by: str, extra: str, where=None) -> None:
    """:class:`BadInput` (:func:`missing_package`, naming ``where``) unless ``module`` is importable; it
    imports nothing, so a run checks it before any work."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):          # a broken parent package, a module without a spec
        found = False
    if not found:
        raise BadInput(missing_package(module, needed_by, extra), where)
AUGMENTATIONS = ("none", "flip", "crop", "flip_crop")


def check_scope(scope: Any, extra: Sequence[str] = ()) -> str:
    """A ``scope`` setting (the one check): ``head``, ``all``, ``last:N`` with N >= 1, ``names:REGEX``
    with a valid regular expression, or one of ``extra`` (``auto`` for mixft); ValueError naming the
    setting otherwise (a recipe's error, exit 2)."""
    known = ("head", "all", *extra)
    if not isinstance(scope, str):
        raise ValueError(f"setting 'scope': must be text, got {scope!r}")
    if scope in known:
        return scope
    if scope.startswith("last:"):
        n = scope.split(":", 1)[1]
        if not (n.isascii() and n.isdigit() and int(n) >= 1):
            raise ValueError(f"setting 'scope': last:N needs a whole number N >= 1 (the blocks before the head), "
                             f"got {scope!r}")
        return scope
    if scope.startswith("names:"):
        try:
            re.compile(scope.split(":", 1)[1])
        except re.error as e:
            raise ValueError(f"setting 'scope': {scope!r} is not a valid regular expression ({e})") from None
        return scope
    raise ValueError(f"setting 'scope': must be {', '.join(known)}, last:N or names:REGEX, got {scope!r}")


class TrainableModel:
    """See the module docstring. ``adapter``: a torch-module adapter (timm, transformers,
    torch factory)."""

    def __init__(self, adapter):
        if adapter.model is None or adapter.head is None:
            raise BadInput(f"{adapter.family} models cannot be fine-tuned", adapter.source)
        self.adapter = adapter
        self.module: nn.Module = adapter.model
        self.head: nn.Linear = adapter.head
        self.head_name: str = adapter.head_name
        self.modality: str = adapter.modality
        self._groups: Optional[list[tuple[str, list[str]]]] = None
        self._mix_points: Optional[list[nn.Module]] = None

    # ------------------------------------------------------------------ inputs
    def encode(self, items: Sequence[Any], chunk: int = 256):
        """Model-ready inputs for ``items``: images -> one (N,3,H,W) float tensor (the
        model's eval preprocessing); texts -> the list of texts (tokenised per batch)."""
        if self.modality == "text":
            return list(items)
        parts = [self.adapter.collate(list(items[i:i + chunk])) for i in range(0, len(items), chunk)]
        return torch.cat(parts) if parts else torch.zeros(0)

    def batch(self, encoded, idx: torch.Tensor, device) -> Any:
        """The rows ``idx`` of :meth:`encode`'s output as a batch on ``device``."""
        if self.modality == "text":
            b = self.adapter.collate([encoded[i] for i in idx.tolist()])
            return {k: v.to(device) for k, v in b.items()}
        return encoded[idx].to(device)

    @staticmethod
    def augment(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
        """Train-time augmentation of an image batch (N,3,H,W): ``flip`` (horizontal, p=0.5),
        ``crop`` (a random translation by up to 1/8 of the side, edges replicated),
        ``flip_crop`` (both), ``none``. Seeded by ``generator`` (CPU)."""
        if kind not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {kind!r}")
        if kind == "none" or x.dim() != 4:
            return x
        n, _, h, w = x.shape
        if kind in ("flip", "flip_crop"):
            flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        if kind in ("crop", "flip_crop"):
            ph, pw = max(1, h // 8), max(1, w // 8)
            padded = torch.nn.functional.pad(x, (pw, pw, ph, ph), mode="replicate")
            dy = torch.randint(0, 2 * ph + 1, (n,), generator=generator).tolist()
            dx = torch.randint(0, 2 * pw + 1, (n,), generator=generator).tolist()
            x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
        return x

    # ------------------------------------------------------------------ compute
    def logits(self, batch) -> torch.Tensor:
        if isinstance(batch, dict):
            out = self.module(**batch)
            return out.logits if hasattr(out, "logits") else out[0]
        return self.module(batch)

    def features_and_logits(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding = the head's input, logits), with gradients."""
        box: dict = {}
        h = self.head.register_forward_pre_hook(lambda m, a: box.__setitem__("x", a[0]))
        try:
            lg = self.logits(batch)
        finally:
            h.remove()
        return box["x"], lg

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Eval mode for the block; every module's mode is restored afterwards."""
        modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        try:
            yield
        finally:
            for m, t in modes:
                m.training = t

    @torch.no_grad()
    def predict(self, encoded, idx: torch.Tensor, device, batch_size: int = 128) -> torch.Tensor:
        """(n, C) float32 CPU logits of rows ``idx`` in eval mode (every module's mode is
        restored afterwards, frozen BatchNorm included)."""
        with self._eval_mode():
            out = [self.logits(self.batch(encoded, idx[i:i + batch_size], device)).float().cpu()
                   for i in range(0, idx.numel(), batch_size)]
        C = self.head.out_features
        return torch.cat(out) if out else torch.zeros(0, C)

    @torch.no_grad()
    def embed(self, encoded, idx: torch.Tensor, device, batch_size: int = 128) -> torch.Tensor:
        """(n, D) float32 CPU embeddings (the head's input) of rows ``idx`` in eval mode."""
        with self._eval_mode():
            out = [self.features_and_logits(self.batch(encoded, idx[i:i + batch_size], device))[0].float().cpu()
                   for i in range(0, idx.numel(), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.head.in_features)

    # ------------------------------------------------------------------ mixing
    def mix_points(self) -> list[nn.Module]:
        """Text models: the modules whose outputs can be mixed, ``[token embeddings, layer 1,
        ..., layer L]`` (index = mix point). Images mix in pixel space only (``[]``)."""
        if self.modality != "text":
            return []
        if self._mix_points is None:
            self._mix_points = _text_mix_points(self.module)
        return self._mix_points

    def check_mix_point(self, asked: int) -> None:
        """A text model's ``mix_point`` setting (0 = token embeddings, k = output of layer k; -1 = chosen
        from what trains) within this model's layers: :class:`SettingRefused` otherwise (the caller names
        the recipe and candidate). Images mix in pixel space: a mix point given for one is refused too,
        rather than recorded in the provenance as if it had been used."""
        if int(asked) < 0:
            return
        if self.modality != "text":
            raise SettingRefused(f"setting 'mix_point': {int(asked)} applies to text models only (an image model "
                                 "mixes its images in pixel space); leave it out")
        n = len(self.mix_points())
        if int(asked) >= n:
            raise SettingRefused(f"setting 'mix_point': {int(asked)} is beyond this model's last layer (mix points "
                                 f"0..{n - 1}: 0 = token embeddings, k = the output of layer k)")

    def mixed_logits(self, encoded, idx: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor, device, *,
                     point: int = 0, augment: str = "none",
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Logits (with gradients) of rows ``idx`` mixed with rows ``partner``:
        ``(1 - lam) * x + lam * partner`` per row (``lam``: (n,) weights of the partner).

        Images: in the preprocessed pixel space (after :meth:`augment` of both). Texts: the
        pair is tokenised to one length; the partner is run (without gradients) up to mix
        point ``point`` and its hidden states, zero at its padding, are mixed into the
        sample's at that point. At point 0 (token embeddings) the sample's padding is zeroed
        too and its attention mask becomes the union of both; later points keep the
        sample's mask (the partner's hidden states are contextual, so its visible
        positions carry the whole partner text)."""
        lam = lam.float()
        if self.modality != "text":
            x = self.batch(encoded, idx, device)
            s = self.batch(encoded, partner, device)
            if generator is not None:
                x, s = self.augment(x, augment, generator), self.augment(s, augment, generator)
            w = lam.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
            return self.logits(x + w * (s - x))
        points = self.mix_points()
        if not 0 <= point < len(points):
            raise BadInput(f"mix point {point} is out of range: this model has points 0..{len(points) - 1} "
                           "(0 = token embeddings, k = output of layer k)")
        n = idx.numel()
        both = self.adapter.collate([encoded[i] for i in torch.cat([idx, partner]).tolist()])
        both = {k: v.to(device) for k, v in both.items()}
        xb = {k: v[:n] for k, v in both.items()}
        sb = {k: v[n:] for k, v in both.items()}
        mx = xb["attention_mask"].unsqueeze(-1).float() if "attention_mask" in xb else None
        ms = sb["attention_mask"].unsqueeze(-1).float() if "attention_mask" in sb else None
        target = points[point]
        with torch.no_grad():
            hs = _run_until(self, target, sb)
        if ms is not None:
            hs = hs * ms.to(hs.dtype)
        if point == 0 and mx is not None:
            xb["attention_mask"] = torch.maximum(xb["attention_mask"], sb["attention_mask"])
        w = lam.to(device).view(-1, 1, 1)

        def mix(_module, _args, out):
            h = out[0] if isinstance(out, tuple) else out
            hx = h * mx.to(h.dtype) if (point == 0 and mx is not None) else h
            mixed = hx + w.to(h.dtype) * (hs.to(h.dtype) - hx)
            return (mixed,) + tuple(out[1:]) if isinstance(out, tuple) else mixed

        handle = target.register_forward_hook(mix)
        try:
            return self.logits(xb)
        finally:
            handle.remove()

    # ------------------------------------------------------------------ LoRA
    def lora_targets(self, names: Sequence[str]) -> list[str]:
        """Module names LoRA can wrap among the modules owning parameters ``names``:
        ``nn.Linear`` and ungrouped ``nn.Conv2d`` layers, the head excluded."""
        owners = {n.rsplit(".", 1)[0] for n in names if "." in n}
        out = []
        for mname, mod in self.module.named_modules():
            if mname in owners and mname != self.head_name and (
                    isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1)):
                out.append(mname)
        return out

    @contextmanager
    def lora(self, modules: Sequence[str], rank: int = 8, alpha: float = 16.0,
             dropout: float = 0.0) -> Iterator[list[str]]:
        """``peft`` LoRA adapters on ``modules`` (names from :meth:`lora_targets`) for the
        length of the block; yields the adapter parameter names to train. On a normal exit
        the adapters are merged into the wrapped layers' weights and removed (the module
        tree is the original one again, with new weights); on an error they are removed
        unmerged. Without ``peft`` installed: :class:`BadInput`."""
        try:
            from peft import LoraConfig
            from peft.tuners.lora import LoraModel
        except ImportError:
            raise BadInput(missing_package("peft", "LoRA (lora: true)", "peft")) from None
        if not modules:
            raise BadInput("LoRA: no Linear or Conv2d layer in the chosen scope to put adapters on")
        req = {n: p.requires_grad for n, p in self.module.named_parameters()}
        cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
                         target_modules=list(modules), bias="none")
        wrapped = LoraModel(self.module, cfg, "default")
        ok = False
        try:
            yield [n for n, _ in self.module.named_parameters() if ".lora_" in n]
            ok = True
        finally:
            if ok:
                wrapped.merge_and_unload()
            else:
                wrapped.unload()
            for n, p in self.module.named_parameters():
                p.requires_grad_(req.get(n, p.requires_grad))

    # ------------------------------------------------------------------ parameters
    def blocks(self) -> list[tuple[str, list[str]]]:
        """Parameter blocks ``[(name, [parameter names])]`` from the input to the head (the
        head is the last block). timm: the model's own ``group_matcher``; transformers:
        embeddings, each encoder layer, the rest; other modules: top-level children."""
        if self._groups is None:
            self._groups = _param_blocks(self.module, self.head_name)
        return self._groups

    def select(self, scope: str) -> list[str]:
        """Names of the parameters a scope trains: ``head``; ``all``; ``last:N`` (the head
        and the N blocks before it: all of them when the model has fewer, see :meth:`scope_notes`);
        ``names:REGEX`` (parameters whose name matches; one that matches none is
        :class:`repair.config.SettingRefused`, a BadInput the caller names the recipe of)."""
        check_scope(scope)
        params = dict(self.module.named_parameters())
        head = [n for n in params if n.startswith(self.head_name + ".")]
        if scope == "head":
            return head
        if scope == "all":
            return list(params)
        if scope.startswith("last:"):
            n = int(scope.split(":", 1)[1])
            body = self._body(head)
            chosen = [p for _, names in body[max(0, len(body) - n):] for p in names]
            return [p for p in params if p in set(chosen) | set(head)]
        rx = re.compile(scope.split(":", 1)[1])
        found = [n for n in params if rx.search(n)]
        if not found:
            raise SettingRefused(f"setting 'scope': {scope!r} matches no parameter of the model (its parameters "
                                 f"are named like {', '.join(list(params)[:3])}, ...)")
        return found

    def scope_notes(self, scope: str, who: str = "") -> list[str]:
        """What the user should hear of ``scope`` on this model (a model repair puts them in its
        diagnostics' ``warnings``, which the run says on stderr and in its report): ``last:N`` with N
        above the blocks before the head trains every one of them -- said, not refused, as one recipe
        serves models of different depths. ``who``: the method, put before each note."""
        if not (isinstance(scope, str) and scope.startswith("last:")):
            return []
        n = int(check_scope(scope).split(":", 1)[1])
        head = [p for p, _ in self.module.named_parameters() if p.startswith(self.head_name + ".")]
        k = len(self._body(head))
        if n <= k:
            return []
        return [f"{who + ': ' if who else ''}scope {scope}: the model has {k} block{'' if k == 1 else 's'} before "
                f"its head; all of them are trained (as scope all)"]

    def _body(self, head: Sequence[str]) -> list[tuple[str, list[str]]]:
        """The parameter blocks before the head (:meth:`blocks` without the head's)."""
        return [b for b in self.blocks() if not all(p in head for p in b[1])]

    @contextmanager
    def training(self, trainable: Sequence[str], freeze_bn: bool = True) -> Iterator[list[nn.Parameter]]:
        """Train mode with only ``trainable`` parameters requiring gradients and BatchNorm
        in eval mode (``freeze_bn``: running statistics untouched, affine parameters may
        still train); restores modes and ``requires_grad`` on exit."""
        params = dict(self.module.named_parameters())
        unknown = [n for n in trainable if n not in params]
        if unknown:
            raise ValueError(f"no parameter {unknown[0]!r}")
        req = {n: p.requires_grad for n, p in params.items()}
        modes = [(m, m.training) for m in self.module.modules()]
        keep = set(trainable)
        for n, p in params.items():
            p.requires_grad_(n in keep)
        self.module.train()
        if freeze_bn:
            for m in self.module.modules():
                if isinstance(m, _BN):
                    m.eval()
        try:
            yield [params[n] for n in trainable]
        finally:
            for n, p in params.items():
                p.requires_grad_(req[n])
            for m, t in modes:
                m.training = t

    def running_stats(self, freeze_bn: bool = True) -> list[torch.Tensor]:
        """The buffers training changes besides the parameters: every BatchNorm's running statistics
        (and batch count) unless ``freeze_bn`` keeps them; pass them to the loop (``train(buffers=)``)
        so the best state it restores and the soups it averages hold them too."""
        if freeze_bn:
            return []
        return [b for m in self.module.modules() if isinstance(m, _BN)
                for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]

    def state(self, names: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the named tensors (parameters and buffers)."""
        sd = self.module.state_dict()
        keys = list(sd) if names is None else list(names)
        return {k: sd[k].detach().cpu().clone() for k in keys}

    def changed(self, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors of ``before`` whose current value differs (their new values)."""
        now = self.state(list(before))
        return {k: v for k, v in now.items() if not torch.equal(v, before[k])}


def _param_blocks(module: nn.Module, head_name: str) -> list[tuple[str, list[str]]]:
    names = [n for n, _ in module.named_parameters()]
    # timm models know their own blocks
    matcher = getattr(module, "group_matcher", None)
    if callable(matcher):
        try:
            from timm.models import group_parameters

            groups = group_parameters(module, matcher(coarse=False), reverse=False)
            out = [(f"group{k}", list(v)) for k, v in sorted(groups.items(), key=lambda kv: kv[0])]
            if sum(len(v) for _, v in out) == len(names):
                return _head_last(out, head_name)
        except Exception:
            pass
    # transformers encoders: embeddings, layer.N, the rest
    layer = re.compile(r"^(.*?\.(?:layer|layers|h|block|blocks)\.(\d+))\.")
    blocks: dict[str, list[str]] = {}
    order: list[str] = []
    for n in names:
        m = layer.match(n)
        if m:
            key = m.group(1)
        elif ".embeddings." in f".{n}" or n.split(".")[0] in ("embeddings", "embed", "wte", "wpe"):
            key = "embeddings"
        else:
            key = n.split(".")[0] if "." in n else n
        if key not in blocks:
            blocks[key] = []
            order.append(key)
        blocks[key].append(n)
    return _head_last([(k, blocks[k]) for k in order], head_name)


class _Stop(Exception):
    pass


def _run_until(tm: "TrainableModel", target: nn.Module, batch: dict) -> torch.Tensor:
    """The output of ``target`` for ``batch`` (the forward pass stops there)."""
    box: dict = {}

    def grab(_module, _args, out):
        box["h"] = out[0] if isinstance(out, tuple) else out
        raise _Stop

    handle = target.register_forward_hook(grab)
    try:
        tm.logits(batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "h" not in box:
        raise BadInput("text mixing: the mix point was not reached by the forward pass")
    return box["h"]


def _text_mix_points(module: nn.Module) -> list[nn.Module]:
    """[token-embedding module, encoder layer 1, ..., L] of a transformers encoder."""
    base = getattr(module, "base_model", module)
    emb = getattr(base, "embeddings", None)
    layers = None
    for name, mod in base.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and re.search(r"(^|\.)(layer|layers|h|block|blocks)$", name):
            layers = list(mod)
            break
    if emb is None or layers is None:
        raise BadInput(f"text mixing needs a transformers encoder with embeddings and a list of layers; "
                       f"{type(module).__name__} has {'no embeddings' if emb is None else 'no layer list'}")
    return [emb] + layers


def _head_last(blocks: list[tuple[str, list[str]]], head_name: str) -> list[tuple[str, list[str]]]:
    """Move the head's parameters into a final block of their own."""
    head = [n for _, ns in blocks for n in ns if n.startswith(head_name + ".")]
    rest = [(k, [n for n in ns if n not in head]) for k, ns in blocks]
    return [(k, ns) for k, ns in rest if ns] + [("head", head)]


__all__ = ["TrainableModel", "AUGMENTATIONS"]
