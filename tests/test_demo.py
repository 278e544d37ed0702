"""The procedural Waterbirds demo: files, metadata, reloadable model, visible shortcut."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from repair.demo import CLASS_NAMES, PLACE_NAMES, DemoArtifacts, build_demo, render, to_tensor  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> DemoArtifacts:
    messages: list[str] = []
    art = build_demo(tmp_path_factory.mktemp("demo"), seed=0, size="tiny", progress=messages.append)
    assert messages, "progress messages should be reported"
    return art


def _metadata(split_dir: Path) -> list[dict]:
    with (split_dir / "metadata.csv").open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["img_filename", "y", "place"]
        return list(reader)


def _labels(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    y = np.array([int(r["y"]) for r in rows])
    place = np.array([PLACE_NAMES.index(r["place"]) for r in rows])
    return y, place


def test_layout(tiny: DemoArtifacts):
    root = tiny.model_dir.parent
    assert tiny.model_dir == root / "model"
    assert (tiny.model_dir / "config.json").is_file()
    assert (tiny.model_dir / "model.safetensors").is_file()
    for name, d in (("train", tiny.train_dir), ("val", tiny.val_dir), ("test", tiny.test_dir)):
        assert d == root / "data" / name
        assert sorted(p.name for p in d.iterdir() if p.is_dir()) == sorted(CLASS_NAMES)
    assert tiny.erm_train_seconds > 0


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_metadata_matches_folders(tiny: DemoArtifacts, split: str):
    d = getattr(tiny, f"{split}_dir")
    rows = _metadata(d)
    listed = {r["img_filename"] for r in rows}
    on_disk = {p.relative_to(d).as_posix() for p in d.rglob("*.png")}
    assert listed == on_disk and len(listed) == len(rows)
    for r in rows:
        assert r["place"] in PLACE_NAMES
        assert r["img_filename"].split("/")[0] == CLASS_NAMES[int(r["y"])]
    from PIL import Image

    with Image.open(d / rows[0]["img_filename"]) as im:
        assert im.mode == "RGB" and im.size[0] == im.size[1]


def test_group_structure(tiny: DemoArtifacts):
    y, place = _labels(_metadata(tiny.train_dir))
    assert set(y) == {0, 1}
    for c in (0, 1):
        assert abs((place[y == c] == c).mean() - 0.95) < 0.02      # background agrees with the class
    for d in (tiny.val_dir, tiny.test_dir):
        y, place = _labels(_metadata(d))
        for c in (0, 1):
            n_land, n_water = (place[y == c] == 0).sum(), (place[y == c] == 1).sum()
            assert n_land > 0 and abs(int(n_land) - int(n_water)) <= 1   # balanced within each class


def test_config_json(tiny: DemoArtifacts):
    cfg = json.loads((tiny.model_dir / "config.json").read_text())
    assert cfg["num_classes"] == 2
    assert cfg["label_names"] == list(CLASS_NAMES)
    assert "num_classes" not in cfg["model_args"]
    pc = cfg["pretrained_cfg"]
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct"):
        assert key in pc
    assert pc["crop_pct"] == 1.0


def _load(model_dir: Path):
    cfg = json.loads((model_dir / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg["num_classes"],
                              **cfg["model_args"])
    timm.models.load_checkpoint(model, str(model_dir / "model.safetensors"), strict=True)
    return model.eval(), cfg


def _eval_split(model, cfg, split_dir: Path):
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    tf = create_transform(**resolve_data_config(pretrained_cfg=cfg["pretrained_cfg"]), is_training=False)
    rows = _metadata(split_dir)
    raw, xs = [], []
    for r in rows:
        with Image.open(split_dir / r["img_filename"]) as im:
            im = im.convert("RGB")
            raw.append(np.asarray(im))
            xs.append(tf(im))
    x = torch.stack(xs)
    # timm's eval transform from pretrained_cfg reproduces the training preprocessing
    assert torch.allclose(x, to_tensor(np.stack(raw)), atol=1e-5)
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    y, place = _labels(rows)
    return pred, y, place


def test_model_reloads_and_shows_shortcut(tiny: DemoArtifacts):
    model, cfg = _load(tiny.model_dir)
    pred, y, place = _eval_split(model, cfg, tiny.test_dir)
    mean = float((pred == y).mean())
    # groups in class x place order: landbird/land, landbird/water, waterbird/land, waterbird/water
    groups = [float((pred[(y == c) & (place == p)] == c).mean()) for c in (0, 1) for p in (0, 1)]
    wga = min(groups)
    # the majority groups (background agrees with the class) are right: the model is no constant ...
    assert groups[0] >= 0.9 and groups[3] >= 0.9, groups
    # ... but it leans on the background: a minority group is far worse than the mean
    assert int(np.argmin(groups)) in (1, 2), groups
    assert mean - wga >= 0.25, (mean, groups)


def test_render_is_deterministic():
    a = render(np.random.default_rng(5), 1, 0)
    b = render(np.random.default_rng(5), 1, 0)
    assert a.dtype == np.uint8 and a.shape[2] == 3 and np.array_equal(a, b)


def test_unknown_size(tmp_path):
    with pytest.raises(ValueError):
        build_demo(tmp_path, size="huge")


def test_demo_writes_its_checkpoint_with_a_timm_that_takes_no_data_config(tmp_path, monkeypatch):
    """timm before 1.0.30 has ``save_for_hf(model, dir, model_config, model_args, safe_serialization)`` and
    no ``data_config``: ``repair demo`` ended "internal error: TypeError: save_for_hf() got an unexpected
    keyword argument 'data_config'" on the lent GPU machine's timm 1.0.29. The checkpoint is written there
    too, its preprocessing in ``pretrained_cfg`` and ``num_classes`` kept out of ``model_args``."""
    import inspect

    import timm.models

    from repair.demo import MEAN, STD, save_model

    real = timm.models.save_for_hf
    calls = []

    def old_save_for_hf(model, save_directory, model_config=None, model_args=None, safe_serialization=False):
        calls.append(save_directory)
        return real(model, save_directory, model_config=model_config, model_args=model_args,
                    safe_serialization=safe_serialization)

    assert "data_config" not in inspect.signature(old_save_for_hf).parameters
    monkeypatch.setattr(timm.models, "save_for_hf", old_save_for_hf)
    model = timm.create_model("resnet18", pretrained=False, num_classes=2, channels=(8, 8, 8, 8))
    out = tmp_path / "model"
    out.mkdir()
    save_model(model, out, model_args={"channels": [8, 8, 8, 8]})
    assert calls == [str(out)]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pretrained_cfg"]["mean"] == list(MEAN) and cfg["pretrained_cfg"]["std"] == list(STD)
    assert cfg["pretrained_cfg"]["crop_pct"] == 1.0 and "num_classes" not in cfg["model_args"]
    assert (out / "model.safetensors").exists()
