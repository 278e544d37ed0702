"""Trust in the lower floors (issue 18): what the data, the embeddings cache, the adapters, the
splits and the metrics promise on hostile or odd input.

Each case asserts the exit code (or the exception), the one line naming the file and the problem,
that nothing was written beside the output and that every input is byte for byte as it was.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_deployed_onnx, make_images, run_cli, time_limit
from repair.data import DataOptions, duplicate_stats, load_data, read_image
from repair.errors import BadInput


# ------------------------------------------------------------------ helpers
def snapshot(*roots: Path) -> dict:
    """sha256 of every file under ``roots`` (symlinks as their target text): to prove nothing
    changed and nothing was added."""
    out = {}
    for root in roots:
        root = Path(root)
        paths = [root] if not root.is_dir() else sorted(root.rglob("*"))
        for p in paths:
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p)] = "dir"
            else:
                out[str(p)] = "special"
    return out


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def cli_refuses(args, *words, inputs=(), out_dir=None, code=2) -> str:
    """Run ``repair ARGS``; assert exit ``code``, one error line holding ``words``, inputs unchanged,
    ``out_dir`` (if given) left empty."""
    before = snapshot(*inputs)
    before_out = snapshot(out_dir) if out_dir is not None else None
    args = [*args, "-q"] if "-q" not in args else list(args)     # progress off: warnings and errors stay
    with time_limit(120):
        rc, out, err = run_cli(*args)
    assert rc == code, (rc, out, err)
    line = one_error_line(err)
    for w in words:
        assert str(w) in line, (w, line)
    assert snapshot(*inputs) == before
    if out_dir is not None:
        assert snapshot(out_dir) == before_out
    return line


def write_csv(path: Path, rows: list[dict], fields=("img_filename", "y", "place")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        w.writerows(rows)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path: Path, side: int = 40000) -> Path:
    """A tiny PNG whose header claims side x side pixels (grey, 8 bit): a decompression bomb."""
    raw = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + png_chunk(b"IDAT", raw) + png_chunk(b"IEND", b""))
    return path


@pytest.fixture()
def images(tmp_path) -> Path:
    return make_images(tmp_path / "data", n_per_class=2)


# ================================================================== 1. images
def save(img, path: Path) -> Path:
    img.save(path)
    return path


def test_16bit_and_float_images_are_scaled_not_clipped(tmp_path):
    """A 16-bit PNG used to turn pure white (``convert("RGB")`` clips I;16): now every deep mode is
    scaled by its bit depth (16-bit) or its value range (floats), and the gradient survives."""
    from PIL import Image

    ramp16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)   # 0..65520
    p16 = save(Image.fromarray(ramp16), tmp_path / "deep.png")
    with Image.open(p16) as im:
        assert im.mode == "I;16"
    rgb = np.asarray(read_image(p16))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    expect = np.rint(ramp16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expect) and np.array_equal(rgb[..., 2], expect)
    assert rgb.min() == 0 and len(np.unique(rgb)) > 200 and (rgb == 255).mean() < 0.01   # not white

    big = Image.frombytes("I;16B", (64, 64), ramp16.astype(">u2").tobytes())      # big-endian 16-bit
    assert np.array_equal(np.asarray(read_image(save(big, tmp_path / "big.tif")))[..., 1], expect)

    as_i = Image.fromarray(ramp16.astype(np.int32), "I")      # 32-bit integers holding 16-bit values
    assert np.array_equal(np.asarray(read_image(save(as_i, tmp_path / "i.tif")))[..., 0], expect)

    unit = (ramp16 / 65535.0).astype(np.float32)              # floats in 0..1
    got = np.asarray(read_image(save(Image.fromarray(unit, "F"), tmp_path / "f.tif")))[..., 0]
    assert np.abs(got.astype(int) - expect.astype(int)).max() <= 1

    nan = unit.copy()
    nan[3, 3] = np.nan
    with pytest.raises(BadInput) as e:
        read_image(save(Image.fromarray(nan, "F"), tmp_path / "nan.tif"))
    assert e.value.path.endswith("nan.tif") and "non-finite" in e.value.problem


def test_deep_images_are_scaled_by_their_mode_never_by_their_content(tmp_path):
    """Found by an audit: a 32-bit integer (``I``) image was read as 8-bit when every pixel was 0..255,
    else as 16-bit, and a float (``F``) one as 0..1 or 0..255 values by its range: two files of one
    16-bit source mapped the raw value 200 to 200 in one, to 1 in the other. Now the mode decides:
    ``I`` as 16-bit values, ``F`` as 0..1 values; a value outside that range is refused naming the
    image (never stretched by the image's own range)."""
    from PIL import Image

    a = np.full((4, 4), 200, np.int32)
    b = a.copy()
    b[0, 0] = 300                                 # the same source, one brighter pixel
    ga = np.asarray(read_image(save(Image.fromarray(a, "I"), tmp_path / "a.tif")))[..., 0]
    gb = np.asarray(read_image(save(Image.fromarray(b, "I"), tmp_path / "b.tif")))[..., 0]
    assert ga[1, 1] == gb[1, 1] == round(200 * 255 / 65535)          # 200 -> 1 in both
    with Image.open(tmp_path / "a.tif") as im:
        assert im.mode == "I"
    for bad, what in ((np.full((4, 4), 70000, np.int32), "70000"), (np.full((4, 4), -5, np.int32), "-5")):
        with pytest.raises(BadInput) as e:
            read_image(save(Image.fromarray(bad, "I"), tmp_path / "wide.tif"))
        assert e.value.path.endswith("wide.tif") and what in e.value.problem and "16-bit" in e.value.problem

    f = np.full((4, 4), 0.5, np.float32)
    g = f.copy()
    g[0, 0] = 1.0
    fa = np.asarray(read_image(save(Image.fromarray(f, "F"), tmp_path / "f.tif")))[..., 0]
    fb = np.asarray(read_image(save(Image.fromarray(g, "F"), tmp_path / "g.tif")))[..., 0]
    assert fa[1, 1] == fb[1, 1] == 128
    for bad in (np.full((4, 4), 200.0, np.float32), np.full((4, 4), -0.5, np.float32)):
        with pytest.raises(BadInput) as e:       # 0..255 floats, or any other range: no guess
            read_image(save(Image.fromarray(bad, "F"), tmp_path / "fw.tif"))
        assert e.value.path.endswith("fw.tif") and "0..1" in e.value.problem


def test_a_thin_image_is_refused_by_the_size_the_models_resize_makes_of_it(tmp_path, timm_folder):
    """Found by an audit: ``--max-pixels`` checked the image's own size, not what the model's resize
    makes of it: a 10000 x 1 PNG of 114 bytes became 2,560,000 x 256 pixels on a 224 model (+2.6 GB),
    50000 x 1 got the run killed for memory. Now the resized size is checked from the header, before
    anything is decoded or resized: exit 2 naming the image."""
    from PIL import Image

    from repair.adapters import load_model

    config = {"input_size": [3, 224, 224], "crop_pct": 0.875, "crop_mode": "center",
              "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
    thin = save(Image.fromarray(np.zeros((1, 10000, 3), np.uint8)), tmp_path / "thin.png")
    with pytest.raises(BadInput) as e:
        read_image(thin, data_config=config)
    assert e.value.path.endswith("thin.png") and "2560000x256" in e.value.problem and "limit" in e.value.problem
    assert read_image(thin).size == (10000, 1)                     # read alone (no resize): within the limit
    tall = save(Image.fromarray(np.zeros((10000, 1, 3), np.uint8)), tmp_path / "tall.png")
    with pytest.raises(BadInput, match="256x2560000"):
        read_image(tall, data_config=config)
    assert read_image(tall, data_config={**config, "crop_mode": "squash"}).size == (1, 10000)

    # through a model (32 x 32, crop 1.0: 320000 x 32 = 10,240,000 pixels) and the command line
    d = make_images(tmp_path / "data", n_per_class=2)
    Image.fromarray(np.zeros((1, 10000, 3), np.uint8)).save(d / "cat" / "thin.png")
    write_csv(d / "metadata.csv", [{"img_filename": f"{c}/{i:03d}.png", "y": c, "place": "land"}
                                   for c in ("cat", "dog", "fox") for i in range(2)]
              + [{"img_filename": "cat/thin.png", "y": "cat", "place": "land"}])
    adapter = load_model(timm_folder)
    adapter.max_pixels = 10_000_000
    with pytest.raises(BadInput) as e:
        adapter.collate([d / "cat" / "thin.png"])
    assert "320000x32 = 10,240,000 pixels" in e.value.problem
    cli_refuses(["eval", timm_folder, "--data", d, "--no-cache", "--max-pixels", "10000000"], "thin.png",
                "320000x32", "--max-pixels", inputs=[d, timm_folder])


def test_alpha_palette_bilevel_and_cmyk_modes(tmp_path):
    from PIL import Image

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200          # red under the alpha
    rgba[:4, ..., 3] = 255      # top half opaque, bottom half transparent
    got = np.asarray(read_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")))
    assert got[0, 0].tolist() == [200, 0, 0] and got[7, 7].tolist() == [255, 255, 255]   # over white

    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 0] = 10
    la[:, :4, 1] = 255
    got = np.asarray(read_image(save(Image.fromarray(la, "LA"), tmp_path / "la.png")))
    assert got[0, 0].tolist() == [10, 10, 10] and got[0, 7].tolist() == [255, 255, 255]

    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    pal.paste(0, (0, 0, 8, 4))
    pal.info["transparency"] = 0          # index 0 is transparent
    got = np.asarray(read_image(save(pal, tmp_path / "p.png")))
    assert got[0, 0].tolist() == [255, 255, 255] and got[7, 7].tolist() == [0, 128, 0]

    bw = Image.new("1", (8, 8), 0)
    bw.paste(1, (0, 0, 4, 8))
    got = np.asarray(read_image(save(bw, tmp_path / "bw.png")))
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 7].tolist() == [0, 0, 0]

    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))   # no cyan, full magenta and yellow: red
    got = np.asarray(read_image(save(cmyk, tmp_path / "c.jpg")))
    assert got[4, 4, 0] > 200 and got[4, 4, 1] < 60 and got[4, 4, 2] < 60

    grey = Image.new("L", (8, 8), 77)
    assert np.asarray(read_image(save(grey, tmp_path / "l.png")))[2, 2].tolist() == [77, 77, 77]


def test_unsupported_mode_is_refused_by_name(tmp_path, timm_folder):
    """A LAB TIFF: no silent conversion; exit 2 naming the image and the mode, before any model work."""
    from PIL import Image

    d = make_images(tmp_path / "data", n_per_class=2)
    Image.new("LAB", (36, 36), (50, 0, 0)).save(d / "dog" / "001.png".replace(".png", ".tif"))
    rows = list(csv.DictReader(open(d / "metadata.csv")))
    rows[3]["img_filename"] = "dog/001.tif"
    write_csv(d / "metadata.csv", rows)
    from repair.data import check_image

    with pytest.raises(BadInput) as e:
        check_image(load_data(d).items[3])
    assert e.value.path.endswith("001.tif") and "'LAB'" in e.value.problem
    out = tmp_path / "out"
    out.mkdir()
    cli_refuses(["fix", timm_folder, "--data", d, "--out", out / "m"], "001.tif", "mode 'LAB'",
                inputs=[d, timm_folder], out_dir=out)


def test_decompression_bomb_is_exit_2_naming_the_image(tmp_path, timm_folder):
    d = make_images(tmp_path / "data", n_per_class=2)
    bomb_png(d / "cat" / "001.png")                 # 40000 x 40000 claimed by a 100-byte file
    line = cli_refuses(["eval", timm_folder, "--data", d, "--no-cache"], "001.png", "pixels", "limit",
                       inputs=[d, timm_folder])
    assert "DecompressionBomb" not in line
    # the limit is an option: a 36 x 36 image is over a 1100-pixel limit (one the 32 x 32 model's own resize,
    # 1,024 pixels, meets: a lower one is refused once, naming --max-pixels), and within the default
    from repair.adapters import load_model
    from repair.embeddings import extract

    small = load_data(make_images(tmp_path / "small", n_per_class=1), DataOptions(max_pixels=1100))
    assert small.max_pixels == 1100
    with pytest.raises(BadInput) as e:
        extract(load_model(timm_folder), small, use_cache=False, progress=False)
    assert "1,296 pixels" in e.value.problem and e.value.path.endswith(".png")
    ok = load_data(tmp_path / "small", DataOptions(max_pixels=1296))
    assert extract(load_model(timm_folder), ok, use_cache=False, progress=False).X.shape[0] == 3


def test_fifo_among_images_is_refused_without_blocking(tmp_path, timm_folder):
    d = make_images(tmp_path / "data", n_per_class=2)
    (d / "fox" / "001.png").unlink()
    os.mkfifo(d / "fox" / "001.png")              # listed in metadata.csv, never written to
    cli_refuses(["eval", timm_folder, "--data", d, "--no-cache"], "001.png", "not a regular file",
                inputs=[d, timm_folder])
    # class-folder data (no table) and a FIFO named like an image: refused too, not skipped
    (d / "metadata.csv").unlink()
    with time_limit(60), pytest.raises(BadInput) as e:
        load_data(d)
    assert e.value.path.endswith("001.png") and "regular file" in e.value.problem
    # and the decoder itself never blocks on one (a file swapped after the data was read)
    with time_limit(60), pytest.raises(BadInput):
        read_image(d / "fox" / "001.png")


def test_collate_honours_the_datas_pixel_limit(tmp_path, timm_folder):
    """The limit a dataset was read with travels to the decoder (``extract`` sets it)."""
    from repair.adapters import load_model
    from repair.embeddings import extract

    d = make_images(tmp_path / "data", n_per_class=1, size=40)
    data = load_data(d, DataOptions(max_pixels=40 * 40))
    adapter = load_model(timm_folder)
    emb = extract(adapter, data, use_cache=False, progress=False)
    assert adapter.max_pixels == 1600 and emb.X.shape[0] == 3
    # from the cache too (a model repair then reads the images through the adapter)
    cached = load_model(timm_folder)
    extract(cached, data, cache_dir=tmp_path / "c", progress=False)
    again = load_model(timm_folder)
    assert extract(again, data, cache_dir=tmp_path / "c", progress=False).from_cache and again.max_pixels == 1600
    adapter.max_pixels = 1599
    with pytest.raises(BadInput) as e:
        adapter.collate(data.items[:1])
    assert "more than the limit of 1,599" in e.value.problem and e.value.path == str(data.items[0])


def test_a_pixel_limit_refuses_the_same_images_with_a_warm_cache(tmp_path, timm_folder):
    """Found by an audit: a cache hit decodes no image, so ``--max-pixels`` refused an image only
    when the cache was cold. An entry made under one limit no longer serves another limit."""
    from conftest import run_cli

    d = make_images(tmp_path / "data", n_per_class=1, size=36)
    cache = tmp_path / "cache"
    code, _, err = run_cli("eval", timm_folder, "--data", d, "--cache-dir", cache, "-q")
    assert code == 0 and len(list(cache.glob("*.safetensors"))) == 1, err
    # (a limit the model's own 32 x 32 resize meets: a lower one is refused once, naming --max-pixels)
    code, _, err = run_cli("eval", timm_folder, "--data", d, "--cache-dir", cache, "--max-pixels", "1100", "-q")
    assert code == 2 and "more than the limit of 1,100 " in err and err.count("\n") == 1, err
    # the limit the entry was made under serves its own runs from the cache
    code, _, err = run_cli("eval", timm_folder, "--data", d, "--cache-dir", cache, "--max-pixels", "1296", "-q")
    assert code == 0, err
    entries = len(list(cache.glob("*.safetensors")))
    code, _, err = run_cli("eval", timm_folder, "--data", d, "--cache-dir", cache, "--max-pixels", "1296", "-q")
    assert code == 0 and len(list(cache.glob("*.safetensors"))) == entries == 2, err


# ================================================================== 2. table paths
def test_table_paths_outside_the_data_folder_are_refused(tmp_path, timm_folder):
    """``../`` paths, absolute paths elsewhere and symlinks leaving the folder: exit 2 naming the table,
    the row and the path; ``allow_outside_paths`` lets them in (and ``files()`` lists them)."""
    d = make_images(tmp_path / "data", n_per_class=2)
    elsewhere = make_images(tmp_path / "elsewhere", n_per_class=1, with_metadata=False)
    rows = list(csv.DictReader(open(d / "metadata.csv")))
    out = tmp_path / "out"
    out.mkdir()

    bad = [dict(r) for r in rows]
    bad[2]["img_filename"] = "../elsewhere/cat/000.png"
    write_csv(d / "metadata.csv", bad)
    cli_refuses(["fix", timm_folder, "--data", d, "--out", out / "m", "--force"], "metadata.csv", "row 3",
                "../elsewhere/cat/000.png", "outside the data folder", inputs=[d, elsewhere, timm_folder],
                out_dir=out)

    bad[2]["img_filename"] = str(elsewhere / "dog" / "000.png")         # absolute, elsewhere
    write_csv(d / "metadata.csv", bad)
    cli_refuses(["eval", timm_folder, "--data", d], "metadata.csv", "row 3", "outside the data folder",
                inputs=[d, elsewhere])

    bad[2]["img_filename"] = "cat/link.png"                             # a symlink leaving the folder
    (d / "cat" / "link.png").symlink_to(elsewhere / "fox" / "000.png")
    write_csv(d / "metadata.csv", bad)
    cli_refuses(["eval", timm_folder, "--data", d], "metadata.csv", "row 3", "cat/link.png",
                inputs=[d, elsewhere])

    data = load_data(d, DataOptions(allow_outside_paths=True))
    files = data.files()
    assert (elsewhere / "fox" / "000.png").resolve() in files and (d / "metadata.csv").resolve() in files
    assert len(files) == len(rows) + 1 and all(p.is_absolute() for p in files)

    # an absolute path inside the folder is fine
    good = [dict(r) for r in rows]
    good[0]["img_filename"] = str(d / rows[0]["img_filename"])
    write_csv(d / "metadata.csv", good)
    assert load_data(d).files()[1] == (d / rows[0]["img_filename"]).resolve()


def test_symlink_out_of_a_class_folder_tree_is_refused(tmp_path):
    d = make_images(tmp_path / "data", n_per_class=2, with_metadata=False)
    secret = tmp_path / "secret.png"
    shutil.copy(d / "cat" / "000.png", secret)
    (d / "dog" / "zzz.png").symlink_to(secret)
    with pytest.raises(BadInput) as e:
        load_data(d)
    assert e.value.path.endswith("zzz.png") and "outside the data folder" in e.value.problem
    assert secret.resolve() in load_data(d, DataOptions(allow_outside_paths=True)).files()


def test_a_symlinked_folder_inside_a_class_folder_is_read_by_the_class_folder_rule(tmp_path):
    """A symlinked folder inside a class folder is entered as a symlinked class folder is (its images were
    skipped silently, even with ``allow_outside_paths``): leading outside the data folder it is refused
    naming it, unless allowed; inside it is read; one leading back to a folder it is in (a loop) is refused."""
    d = make_images(tmp_path / "data", n_per_class=4, with_metadata=False)
    extra = tmp_path / "extra_cats"
    extra.mkdir()
    for name in ("002.png", "003.png"):
        shutil.move(d / "cat" / name, extra / name)
    (d / "cat" / "more").symlink_to(extra)
    with pytest.raises(BadInput) as e:
        load_data(d)
    assert e.value.path == str(d / "cat" / "more") and "outside the data folder" in e.value.problem, e.value
    data = load_data(d, DataOptions(allow_outside_paths=True))
    cats = [p for p, y in zip(data.items, data.labels) if y == "cat"]
    assert cats == [d / "cat" / "000.png", d / "cat" / "001.png", d / "cat" / "more" / "002.png",
                    d / "cat" / "more" / "003.png"]
    assert (extra / "002.png").resolve() in data.files()
    (d / "cat" / "more").unlink()
    shutil.move(extra, d / ".store")                    # a hidden folder inside the data folder: no class
    (d / "cat" / "more").symlink_to(d / ".store")
    assert [p for p, y in zip(load_data(d).items, load_data(d).labels) if y == "cat"] == cats
    (d / "dog" / "again").symlink_to(d / "dog")
    with pytest.raises(BadInput) as e:
        load_data(d, DataOptions(allow_outside_paths=True))
    assert e.value.path == str(d / "dog" / "again") and "a loop" in e.value.problem, e.value


def test_a_metadata_json_symlinked_out_of_the_data_folder_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """The folder's ``metadata.json`` leading outside it was opened (to tell a table from a description)
    before the containment check, then ignored: refused now, naming it, nothing of it read."""
    import repair.data as data_mod

    d = make_images(tmp_path / "data", n_per_class=2, with_metadata=False)
    outside = tmp_path / "outside" / "notes.json"
    outside.parent.mkdir()
    outside.write_text('{"note": "a file outside the data folder"}')
    (d / "metadata.json").symlink_to(outside)
    opened = []
    real_open = data_mod.open_regular
    monkeypatch.setattr(data_mod, "open_regular", lambda p, *a, **k: opened.append(Path(p)) or real_open(p, *a, **k))
    with pytest.raises(BadInput) as e:
        load_data(d)
    assert e.value.path == str(d / "metadata.json") and "leading outside the folder" in e.value.problem, e.value
    assert opened == [], opened
    data = load_data(d, DataOptions(allow_outside_paths=True))        # allowed: read, a description
    assert data.table is None and len(data.items) == 6


def test_empty_path_cell_and_empty_group_cell_name_the_row(tmp_path, timm_folder):
    d = make_images(tmp_path / "data", n_per_class=2)
    rows = list(csv.DictReader(open(d / "metadata.csv")))
    bad = [dict(r) for r in rows]
    bad[4]["img_filename"] = ""
    write_csv(d / "metadata.csv", bad)
    cli_refuses(["eval", timm_folder, "--data", d], "metadata.csv", "row 5", "empty image path", inputs=[d])
    write_csv(d / "metadata.csv", rows)
    lines = (d / "metadata.csv").read_text().splitlines()
    lines[3] = lines[3].split(",")[0]                       # a short row: only the path
    (d / "metadata.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(BadInput) as e:
        load_data(d)
    assert e.value.problem == "row 3 has an empty label" and e.value.path.endswith("metadata.csv")
    t = tmp_path / "t.jsonl"                                # a JSONL row without the text key: no sample
    t.write_text('{"text": "good", "label": "positive"}\n{"label": "negative"}\n{"text": "x"}\n')
    with pytest.raises(BadInput) as e:
        load_data(t)
    assert e.value.problem == "row 2 has an empty text ('text'); 1 row(s) without one" and e.value.path == str(t)
    t.write_text('{"text": "good", "label": "positive"}\n{"text": "bad", "label": "negative"}\n{"text": "x"}\n')
    with pytest.raises(BadInput) as e:                      # ... nor without the label key
        load_data(t)
    assert e.value.problem == "row 3 has an empty label" and e.value.path == str(t)

    bad = [dict(r) for r in rows]
    bad[1]["place"] = ""
    bad[3]["place"] = "  "
    write_csv(d / "metadata.csv", bad)
    cli_refuses(["eval", timm_folder, "--data", d, "--group-by", "place"], "metadata.csv", "row 2", "'place'",
                inputs=[d])
    # without --group-by the empty cells do not matter
    assert len(load_data(d)) == len(rows)
    # the same rule holds for a group column named later (encode: --eval-group-by)
    from repair.data import encode

    with pytest.raises(BadInput) as e:
        encode(load_data(d), ["cat", "dog", "fox"], "place")
    assert "row 2" in e.value.problem and e.value.path.endswith("metadata.csv")


# ================================================================== 3. DataOptions
@pytest.mark.parametrize("kwargs, flag", [
    ({"group_by": ""}, "--group-by"), ({"label_col": "  "}, "--label-col"), ({"path_col": 3}, "--path-col"),
    ({"text_col": ""}, "--text-col"), ({"max_pixels": 0}, "--max-pixels"), ({"max_pixels": -5}, "--max-pixels"),
    ({"max_pixels": True}, "--max-pixels"), ({"max_pixels": "100"}, "--max-pixels"),
    ({"max_pixels": 1.5}, "--max-pixels"), ({"allow_outside_paths": "yes"}, "--allow-outside-paths"),
    ({"path_col": "file", "text_col": "text"}, "--path-col"),
])
def test_data_options_validate_themselves(kwargs, flag):
    with pytest.raises(BadInput) as e:
        DataOptions(**kwargs)
    assert flag in str(e.value) and e.value.path is None
    import dataclasses

    ok = DataOptions(group_by="place", max_pixels=10)
    with pytest.raises(BadInput):        # replace() validates too
        dataclasses.replace(ok, **kwargs)


def test_empty_group_by_flag_is_exit_2(tmp_path, timm_folder, images):
    cli_refuses(["eval", timm_folder, "--data", images, "--group-by", ""], "--group-by", inputs=[images])


# ================================================================== 7. duplicates and splits
def duplicated_image_data(root: Path, copies=(1, 2, 3, 4, 1, 6)) -> Path:
    """A metadata.csv listing images many times over (same file several rows, and byte-identical
    copies under other names)."""
    d = make_images(root, n_per_class=len(copies))
    rows = list(csv.DictReader(open(d / "metadata.csv")))
    out = []
    for i, r in enumerate(rows):
        for c in range(copies[i % len(copies)]):
            if c % 2:              # an identical copy under another name
                name = r["img_filename"].replace(".png", f"-copy{c}.png")
                shutil.copy(d / r["img_filename"], d / name)
                out.append({**r, "img_filename": name})
            else:
                out.append(dict(r))
    write_csv(d / "metadata.csv", out)
    return d


def assert_clusters_whole(ids: torch.Tensor, parts) -> None:
    side = {}
    for k, p in enumerate(parts):
        for i in p.tolist():
            assert side.setdefault(int(ids[i]), k) == k, f"duplicate cluster {int(ids[i])} crosses parts"


def test_duplicate_ids_and_stats(tmp_path):
    d = duplicated_image_data(tmp_path / "data")
    unread = load_data(d, DataOptions(group_by="place"))
    from PIL import Image

    lone = tmp_path / "lone"                                         # files of distinct sizes: none is read
    for k, side in enumerate((8, 12, 16, 20)):
        (lone / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (side, side), (k * 40, 10, 10)).save(lone / f"c{k % 2}" / f"{k}.png")
    solo = load_data(lone)
    assert len({Path(p).stat().st_size for p in solo.items}) == len(solo) == 4
    assert solo.duplicate_ids().tolist() == [0, 1, 2, 3] and solo._hashes is None
    assert unread.duplicate_ids().tolist() == load_data(d, DataOptions(group_by="place")).duplicate_ids().tolist()
    data = load_data(d, DataOptions(group_by="place"))
    ids = data.duplicate_ids()
    assert ids.dtype == torch.long and ids.shape == (len(data),)
    digests = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in data.items]
    for i in range(len(data)):
        for j in range(len(data)):
            assert (ids[i] == ids[j]) == (digests[i] == digests[j])
    stats = duplicate_stats(ids)
    n_unique = len(set(digests))
    assert stats["n_samples"] == len(data) and stats["n_unique"] == n_unique == 18
    assert stats["n_duplicates"] == len(data) - n_unique and stats["n_clusters"] == 12   # 4 of 6 per class repeat
    assert stats["largest_cluster"] == 6
    # duplicate_ids reads only the images whose size another image has (here: all of them); a subset
    # keeps the hashes the data had (each image is read once)
    data.content_hashes()
    sub = data.subset(list(range(6)))
    first: dict = {}
    assert sub.duplicate_ids().tolist() == [first.setdefault(int(i), len(first)) for i in ids[:6]]
    assert sub._hashes == data._hashes[:6]
    # texts: same text = same sample
    from repair.data import RepairData

    t = RepairData(Path("."), "text", ["a b", "c", "a b", "a  b", "c"], ["x"] * 5)
    assert t.duplicate_ids().tolist() == [0, 1, 0, 2, 1]
    assert duplicate_stats(t.duplicate_ids())["n_clusters"] == 2


def test_no_duplicate_crosses_any_split(tmp_path):
    """fit/report (Holdout), every K-fold of every repeat, and a plain three-way split: whole clusters,
    while each part stays near its share of every stratum."""
    from repair.data import encode
    from repair.selection import Criterion, Holdout, KFold, select_and_refit, stratified_split

    d = duplicated_image_data(tmp_path / "data", copies=(1, 5, 2, 3, 1, 7, 2, 1))
    data = load_data(d, DataOptions(group_by="place"))
    enc = encode(data, ["cat", "dog", "fox"], "place")
    ids = data.duplicate_ids()
    assert duplicate_stats(ids)["n_duplicates"] > len(data) // 2
    for seed in range(10):
        fit, report = stratified_split(enc.groups, [0.25], seed, clusters=ids)
        assert_clusters_whole(ids, [fit, report])
        assert fit.numel() + report.numel() == len(data) and report.numel() > 0
        assert abs(report.numel() - 0.25 * len(data)) <= 0.2 * len(data)
        for g in torch.unique(enc.groups).tolist():          # every stratum kept in the fit part
            assert (enc.groups[fit] == g).any()
        parts = stratified_split(enc.groups, [0.2, 0.2, 0.2], seed, clusters=ids)
        assert_clusters_whole(ids, parts)
        assert sorted(torch.cat(parts).tolist()) == list(range(len(data)))

    seen_folds = []

    def fit_fn(train_idx, which):
        seen_folds.append(train_idx)
        return train_idx

    def predict(fitted, idx):
        return torch.zeros(2, idx.numel(), dtype=torch.long)

    crit = Criterion("worst_group")
    sel = select_and_refit(2, fit_fn, predict, enc.y, criterion=crit, score_strata=enc.groups,
                           scheme=KFold(3, repeats=2, clusters=ids), seed=1, refit=False)
    assert len(sel.folds) == 3 and len(seen_folds) == 6
    assert_clusters_whole(ids, sel.folds)
    for train in seen_folds:                       # each fit's rows vs. the rest: no shared cluster
        held = torch.tensor(sorted(set(range(len(data))) - set(train.tolist())))
        assert_clusters_whole(ids, [train, held])
    sel = select_and_refit(2, fit_fn, predict, enc.y, criterion=crit, score_strata=enc.groups,
                           scheme=Holdout(0.5, clusters=ids), seed=3, refit=False)
    held = sel.folds[0]
    rest = torch.tensor(sorted(set(range(len(data))) - set(held.tolist())))
    assert_clusters_whole(ids, [rest, held])
    # and without clusters the same data does leak (the test can fail)
    leaks = 0
    for seed in range(10):
        fit, report = stratified_split(enc.groups, [0.25], seed)
        leaks += bool(set(ids[fit].tolist()) & set(ids[report].tolist()))
    assert leaks > 0


def test_singleton_clusters_change_no_split():
    from repair.selection import stratified_split

    gen = torch.Generator().manual_seed(0)
    for seed in range(15):
        n = int(torch.randint(3, 120, (1,), generator=gen))
        strata = torch.randint(0, 4, (n,), generator=gen)
        a = stratified_split(strata, [0.3, 0.2], seed, min_per_part=2)
        b = stratified_split(strata, [0.3, 0.2], seed, min_per_part=2, clusters=torch.arange(n) * 3 + 5)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError):
        stratified_split(torch.zeros(5), [0.5], 0, clusters=torch.arange(4))


# ================================================================== 8. metrics: exact counts
def test_evaluate_reports_exact_counts():
    """42 of 60 right is exactly 70%: the counts are there for a gate to compare k of n, and the
    accuracy is k/n in double precision (float32 made it 0.699999988)."""
    from repair.metrics import evaluate

    y = torch.tensor([0] * 30 + [1] * 30)
    pred = y.clone()
    pred[:9] = 1                       # class 0: 21 of 30
    pred[30:39] = 0                    # class 1: 21 of 30
    logits = torch.nn.functional.one_hot(pred, 2).float()
    groups = torch.tensor(([0, 1] * 15) + ([2, 3] * 15))
    r = evaluate(logits, y, ["a", "b"], groups, ["a|x", "a|z", "b|x", "b|z"])
    assert (r["n_correct"], r["n"]) == (42, 60) and r["accuracy"] == 42 / 60 == 0.7
    assert r["accuracy"] >= 0.7                           # a 70% gate passes on the figure itself
    assert [(c["n_correct"], c["n"]) for c in r["per_class"]] == [(21, 30), (21, 30)]
    assert (r["worst_class"], r["worst_class_n_correct"], r["worst_class_n"]) == ("a", 21, 30)
    g = {row["name"]: (row["n_correct"], row["n"]) for row in r["per_group"]}
    assert g == {"a|x": (10, 15), "a|z": (11, 15), "b|x": (10, 15), "b|z": (11, 15)}
    assert (r["worst_group"], r["worst_group_n_correct"], r["worst_group_n"]) == ("a|x", 10, 15)
    assert r["worst_group_accuracy"] == 10 / 15
    # a group of the names without samples: n 0, accuracy None, never the worst
    r = evaluate(logits, y, ["a", "b", "c"], groups, ["a|x", "a|z", "b|x", "b|z", "c|x"])
    assert r["per_class"][2] == {"name": "c", "n": 0, "n_correct": 0, "accuracy": None}
    assert r["worst_group"] == "a|x"


def test_evaluate_picks_the_worst_by_exact_fraction():
    """1 of 3 (0.333...) is worse than 2 of 6 only in float noise: they tie exactly, the first wins;
    33 of 100 is worse than 1 of 3."""
    from repair.metrics import evaluate

    y = torch.zeros(109, dtype=torch.long)
    pred = torch.ones(109, dtype=torch.long)
    groups = torch.tensor([0] * 3 + [1] * 6 + [2] * 100)
    pred[0] = 0
    pred[3:5] = 0
    pred[9:42] = 0
    logits = torch.nn.functional.one_hot(pred, 2).float()
    r = evaluate(logits, y, ["a", "b"], groups, ["g0", "g1", "g2"])
    assert (r["worst_group"], r["worst_group_n_correct"], r["worst_group_n"]) == ("g2", 33, 100)
    r = evaluate(logits[:9], y[:9], ["a", "b"], groups[:9], ["g0", "g1"])
    assert (r["worst_group"], r["worst_group_n_correct"], r["worst_group_n"]) == ("g0", 1, 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_evaluate_refuses_non_finite_logits(bad):
    from repair.metrics import evaluate

    logits = torch.randn(6, 3)
    logits[4, 1] = bad
    with pytest.raises(BadInput) as e:
        evaluate(logits, torch.zeros(6, dtype=torch.long), ["a", "b", "c"], where="model/")
    assert "non-finite" in e.value.problem and "1 of 6" in e.value.problem and e.value.path == "model/"


def test_probe_refuses_a_head_whose_logits_overflow_as_eval_does(tmp_path, timm_folder, images):
    """Found by an audit: finite head weights of ~3e38 give infinite logits; `repair eval` is exit 2, but
    `repair probe` printed an accuracy and a per-class table from them (exit 0). Now the same exit 2;
    and its accuracy is the exact k/n with its count, as eval's."""
    from safetensors.torch import load_file, save_file

    big = tmp_path / "big"
    shutil.copytree(timm_folder, big)
    sd = load_file(str(big / "model.safetensors"))
    w = sd["fc.weight"]
    sd["fc.weight"] = (w / w.abs().max() * 3e38).contiguous()
    sd["fc.bias"] = torch.full_like(sd["fc.bias"], 3.3e38)
    save_file(sd, str(big / "model.safetensors"))
    for cmd in ("eval", "probe"):
        code, out, err = run_cli(cmd, big, "--data", images, "-q", "--no-cache")
        assert code == 2 and "non-finite" in err and err.count("\n") == 1, (cmd, err)
    code, out, err = run_cli("probe", timm_folder, "--data", images, "--json", "-q", "--no-cache")
    code2, out2, _ = run_cli("eval", timm_folder, "--data", images, "--json", "-q", "--no-cache")
    assert code == code2 == 0, err
    p, e = json.loads(out), json.loads(out2)
    assert (p["n_correct"], p["accuracy"]) == (e["n_correct"], e["accuracy"])


# ================================================================== 5. non-finite, config.json, input_size
def timm_copy(src: Path, dst: Path, change=None, config=None) -> Path:
    """A copy of a timm folder with tensors changed (``change(tensors)``) or config.json updated."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if change is not None:
        t = load_file(str(dst / "model.safetensors"))
        change(t)
        save_file(t, str(dst / "model.safetensors"))
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        if callable(config):
            config(cfg)
        else:
            cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_nan_in_a_batchnorm_buffer_is_exit_2_and_fails_the_gate(tmp_path, timm_folder, images):
    """A NaN in a BatchNorm running_var used to be scored "accuracy 50.0%" and passed a 50% gate."""
    def nan_var(t):
        t["layer1.0.bn1.running_var"][3] = float("nan")
    m = timm_copy(timm_folder, tmp_path / "m", nan_var)
    for extra in ([], ["--fail-under-acc", "0.0"]):
        cli_refuses(["eval", m, "--data", images, *extra], "model.safetensors", "layer1.0.bn1.running_var",
                    "non-finite", inputs=[m, images])

    def inf_head(t):
        t["fc.weight"][0, 0] = float("-inf")
    m2 = timm_copy(timm_folder, tmp_path / "m2", inf_head)
    out = tmp_path / "out"
    out.mkdir()
    line = cli_refuses(["fix", m2, "--data", images, "--out", out / "fixed"], "'fc.weight'", "non-finite",
                       inputs=[m2, images], out_dir=out)
    assert "did not load" not in line


def test_nan_weights_of_a_transformers_model(tmp_path, bert_folder):
    from safetensors.torch import load_file, save_file

    from repair.adapters import load_model

    m = tmp_path / "bert"
    shutil.copytree(bert_folder, m)
    t = load_file(str(m / "model.safetensors"))
    name = next(k for k in sorted(t) if k.endswith("LayerNorm.weight"))
    t[name][1] = float("nan")
    save_file(t, str(m / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BadInput) as e:
        load_model(m)
    assert name in e.value.problem and e.value.path.endswith("model.safetensors")


def test_non_finite_embeddings_name_the_model_and_data(tmp_path, timm_folder, images):
    """Finite weights that overflow on this data: BadInput naming the model and the data (it used to
    end in ``_LinAlgError``, exit 3)."""
    from repair.adapters import load_model
    from repair.embeddings import extract

    def huge(t):
        t["conv1.0.weight"].fill_(3e38)
    m = timm_copy(timm_folder, tmp_path / "m", huge)
    cache = tmp_path / "cache"
    with pytest.raises(BadInput) as e:
        extract(load_model(m), load_data(images), use_cache=True, cache_dir=cache, progress=False)
    assert str(m) in e.value.problem and "non-finite" in e.value.problem
    assert e.value.path.endswith("metadata.csv")
    assert not cache.exists() or not any(cache.iterdir())          # nothing cached
    out = tmp_path / "out"
    out.mkdir()
    cli_refuses(["fix", m, "--data", images, "--out", out / "fixed", "-q"], "metadata.csv", "non-finite",
                inputs=[m, images], out_dir=out)


def test_config_json_not_json_says_so(tmp_path, timm_folder, images):
    m = tmp_path / "m"
    shutil.copytree(timm_folder, m)
    (m / "config.json").write_text('{"architecture": "test_resnet",')
    line = cli_refuses(["eval", m, "--data", images], "config.json", "not valid JSON", inputs=[m])
    assert "not a timm hub folder" not in line
    (m / "config.json").write_text("[1, 2]")
    cli_refuses(["eval", m, "--data", images], "config.json", "JSON object", inputs=[m])


@pytest.mark.parametrize("cfg, words", [
    ({"input_size": [3, 40000, 40000]}, ("input_size 3x40000x40000", "4096")),
    ({"input_size": [3, 32, 5000]}, ("input_size", "out of range")),
    ({"input_size": [3, 0, 32]}, ("input_size", "out of range")),
    ({"input_size": "big"}, ("input_size", "three whole numbers")),
    ({"crop_pct": -0.5}, ("crop_pct", "above 0")),
    ({"crop_pct": 0.0001}, ("crop_pct", "resize")),
])
def test_absurd_input_size_is_exit_2_naming_config_json(tmp_path, timm_folder, images, cfg, words):
    m = timm_copy(timm_folder, tmp_path / "m", config=lambda c: c["pretrained_cfg"].update(cfg))
    cli_refuses(["eval", m, "--data", images, "--no-cache"], "config.json", *words, inputs=[m])


# ================================================================== 4. model folders
def test_fifo_in_the_model_folder_is_exit_2(tmp_path, timm_folder, images):
    m = tmp_path / "m"
    shutil.copytree(timm_folder, m)
    os.mkfifo(m / "notes.txt")
    out = tmp_path / "out"
    out.mkdir()
    cli_refuses(["fix", m, "--data", images, "--out", out / "fixed"], "notes.txt", "FIFO",
                inputs=[images, m / "config.json", m / "model.safetensors"], out_dir=out)
    (m / "notes.txt").unlink()
    (m / "README.md").symlink_to("/dev/zero")               # would copy zeros until the disk is full
    cli_refuses(["eval", m, "--data", images], "README.md", "device", inputs=[m])


def test_symlink_out_of_the_model_folder_is_never_copied(tmp_path, timm_folder, images):
    """``notes.txt -> ~/.aws/credentials``: the repaired folder would hold the secret as a regular file."""
    secret = tmp_path / "home" / "credentials"
    secret.parent.mkdir()
    secret.write_text("aws_secret_access_key = hunter2\n")
    m = tmp_path / "m"
    shutil.copytree(timm_folder, m)
    (m / "notes.txt").symlink_to(secret)
    out = tmp_path / "out"
    out.mkdir()
    cli_refuses(["fix", m, "--data", images, "--out", out / "fixed", "--recipe", "dfr", "-q"], "notes.txt",
                "outside", inputs=[images, m, secret], out_dir=out)
    from repair.adapters import load_model

    with pytest.raises(BadInput) as e:              # the check the pipeline can make before any work
        load_model(m).check_save()
    assert e.value.path.endswith("notes.txt")
    # a symlink inside the folder is copied as the regular file it points to
    (m / "notes.txt").unlink()
    (m / "docs").mkdir()
    (m / "docs" / "card.md").write_text("model card\n")
    (m / "README.md").symlink_to(m / "docs" / "card.md")
    rc, _, err = run_cli("fix", m, "--data", images, "--out", out / "fixed", "--recipe", "dfr")
    assert rc == 0, err
    got = out / "fixed" / "README.md"
    assert got.is_file() and not got.is_symlink() and got.read_text() == "model card\n"
    assert (out / "fixed" / "docs" / "card.md").read_text() == "model card\n"
    assert not any(p.is_symlink() for p in (out / "fixed").rglob("*"))


def test_source_files_list_every_checkpoint_file(tmp_path, timm_folder, bert_folder):
    from repair.adapters import LoadOptions, load_model

    a = load_model(timm_folder)
    assert set(a.source_files()) == {(timm_folder / n).resolve() for n in ("config.json", "model.safetensors")}
    b = load_model(bert_folder)
    files = set(b.source_files())
    assert (bert_folder / "model.safetensors").resolve() in files and (bert_folder / "config.json").resolve() in files
    assert any(p.name.startswith("tokenizer") or p.name == "vocab.txt" for p in files)
    assert all(p.is_absolute() and p.is_file() for p in files)
    w = tmp_path / "w.safetensors"
    shutil.copy(timm_folder / "model.safetensors", w)
    c = load_model(w, LoadOptions(arch="test_resnet", image_size=32))
    assert c.source_files() == [w.resolve()]


# ================================================================== 6. embedding cache
def _figures(stdout: str) -> dict:
    """A command's JSON without what legitimately differs between a cached and a fresh run."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()
                    if k not in ("seconds", "from_cache", "cached", "device", "extract_seconds", "timing",
                                 "elapsed", "wall_seconds", "embedding_seconds")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip(json.loads(stdout))


def _cache_entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("*.safetensors"))


def _flip(path: Path, where: str) -> None:
    blob = bytearray(path.read_bytes())
    if where == "data":              # a bit in the last float: still a readable file, wrong numbers
        blob[-3] ^= 0x10
    elif where == "header":          # garbage in the JSON header: unreadable
        blob[10:20] = b"\xff" * 10
    else:                            # truncated
        blob = blob[: len(blob) // 2]
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("damage", ["data", "header", "truncated"])
def test_corrupt_cache_entry_is_recomputed_with_a_notice(tmp_path, timm_folder, images, damage):
    cache = tmp_path / "cache"
    base = ["eval", timm_folder, "--data", images, "--group-by", "place", "--json", "-q"]
    rc, fresh, _ = run_cli(*base, "--no-cache")
    assert rc == 0
    rc, first, err = run_cli(*base, "--cache-dir", cache)
    assert rc == 0 and "notice" not in err
    (entry,) = _cache_entries(cache)
    sound = entry.read_bytes()
    _flip(entry, damage)
    rc, again, err = run_cli(*base, "--cache-dir", cache)
    assert rc == 0, err
    assert f"embedding cache entry {entry} was corrupt" in err and "recomputed" in err      # survives -q
    assert _figures(again) == _figures(fresh) == _figures(first)
    assert entry.read_bytes() == sound                       # rewritten, bit for bit the sound entry
    rc, third, err = run_cli(*base, "--cache-dir", cache)
    assert rc == 0 and "notice" not in err and _figures(third) == _figures(fresh)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []   # no temp left behind


def test_fix_from_a_corrupted_cache_equals_no_cache(tmp_path, timm_folder, images):
    """The issue's case: bytes flipped in a cached file made ``fix`` choose another head."""
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    # figures on data of their own: the 6-sample set cannot spare a held-out part
    ev = make_images(tmp_path / "ev", n_per_class=2, seed=3)
    args = ["fix", timm_folder, "--data", images, "--eval", ev, "--group-by", "place", "--recipe", "auto", "-q"]
    rc, _, err = run_cli(*args, "--out", tmp_path / "warm", "--cache-dir", cache)
    assert rc == 0, err
    for entry in _cache_entries(cache):
        blob = bytearray(entry.read_bytes())
        for i in range(len(blob) - 400, len(blob), 7):       # many embeddings changed, header intact
            blob[i] ^= 0x40
        entry.write_bytes(bytes(blob))
    rc, out_c, err = run_cli(*args, "--out", tmp_path / "from-cache", "--cache-dir", cache, "--json")
    assert rc == 0, err
    assert "was corrupt" in err and "recomputed" in err
    rc, out_n, err = run_cli(*args, "--out", tmp_path / "no-cache", "--no-cache", "--json")
    assert rc == 0, err
    a = load_file(str(tmp_path / "from-cache" / "model.safetensors"))
    b = load_file(str(tmp_path / "no-cache" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa, fb = _figures(out_c), _figures(out_n)
    for key in ("before", "after", "chosen", "method", "recipe"):
        if key in fa or key in fb:
            assert fa.get(key) == fb.get(key), key


def test_cache_entry_carries_and_checks_its_digest(tmp_path, timm_folder, images):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from repair.adapters import load_model
    from repair.embeddings import cache_digest, extract

    adapter, data = load_model(timm_folder), load_data(images)
    cache = tmp_path / "cache"
    e1 = extract(adapter, data, cache_dir=cache, progress=False)
    (entry,) = _cache_entries(cache)
    with safe_open(str(entry), framework="pt") as f:
        meta = f.metadata()
        assert meta["sha256"] == cache_digest(f.get_tensor("embeddings")) == cache_digest(e1.X)
        assert meta["key"] == e1.key == entry.stem
    assert extract(adapter, data, cache_dir=cache, progress=False).from_cache
    # a well-formed entry with other numbers and no (or a stale) digest: not trusted
    save_file({"embeddings": e1.X + 1}, str(entry), metadata={"key": e1.key, "sha256": meta["sha256"]})
    e2 = extract(adapter, data, cache_dir=cache, progress=False)
    assert not e2.from_cache and torch.equal(e2.X, e1.X)
    save_file({"embeddings": e1.X}, str(entry), metadata={"key": e1.key})
    assert not extract(adapter, data, cache_dir=cache, progress=False).from_cache
    # a FIFO where the entry should be: never read (it would block), replaced
    entry.unlink()
    os.mkfifo(entry)
    with time_limit(60):
        e3 = extract(adapter, data, cache_dir=cache, progress=False)
    assert not e3.from_cache and entry.is_file() and torch.equal(e3.X, e1.X)
    # an image set's entry holds its input digests, checked as the embeddings are: other digests are
    # not trusted (they decide which samples are copies of one another)
    with safe_open(str(entry), framework="pt") as f:
        meta = f.metadata()
        assert meta["inputs_sha256"] == cache_digest(f.get_tensor("inputs")) == cache_digest(e1.inputs)
    save_file({"embeddings": e1.X, "inputs": e1.inputs ^ 1}, str(entry), metadata=meta)
    e4 = extract(adapter, data, cache_dir=cache, progress=False)
    assert not e4.from_cache and torch.equal(e4.inputs, e1.inputs)


def test_nan_initializer_in_an_onnx_model(tmp_path):
    import onnx
    from onnx import numpy_helper

    from repair.adapters import LoadOptions, load_model

    out, _ = make_deployed_onnx(tmp_path / "deployed.onnx", dynamic_batch=False)
    (tmp_path / "preprocess.json").write_text(json.dumps({"input_size": [3, 32, 32]}))
    a = load_model(out, LoadOptions(class_names=["a", "b", "c"]))
    assert set(a.source_files()) == {out.resolve(), (tmp_path / "preprocess.json").resolve()}
    proto = onnx.load(str(out))
    init = next(i for i in proto.graph.initializer if numpy_helper.to_array(i).dtype == np.float32
                and numpy_helper.to_array(i).size > 4)
    arr = numpy_helper.to_array(init).copy()
    arr.reshape(-1)[2] = np.inf
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(proto, str(out))
    with pytest.raises(BadInput) as e:
        load_model(out, LoadOptions(class_names=["a", "b", "c"]))
    assert init.name in e.value.problem and "non-finite" in e.value.problem and e.value.path == str(out)


def test_onnx_external_data_files_are_source_files(tmp_path):
    import onnx

    from repair.adapters import LoadOptions, load_model

    first, m = make_deployed_onnx(tmp_path / "first.onnx", dynamic_batch=False, seed=0)
    d = tmp_path / "deployed"
    d.mkdir()
    onnx.save_model(onnx.load(str(first)), str(d / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    a = load_model(d / "m.onnx", LoadOptions(class_names=["a", "b", "c"], image_size=32))
    assert set(a.source_files()) == {(d / "m.onnx").resolve(), (d / "weights.bin").resolve()}
    W, _ = a.head_params()
    assert torch.allclose(W, m.get_classifier().weight.detach())


def test_resolving_with_a_folder_cache_is_resolve(tmp_path):
    # the data loaders resolve thousands of image paths through a cache of resolved folders: every
    # kind of path (plain, a symlinked file, a symlinked folder, '..', missing, a loop) resolves
    # exactly as Path.resolve() does (None for a loop)
    import os

    from repair.data import _real

    d = tmp_path
    (d / "a").mkdir()
    (d / "b").mkdir()
    (d / "a" / "x.png").write_bytes(b"1")
    os.symlink(d / "a" / "x.png", d / "b" / "link.png")
    os.symlink(d / "a", d / "alink")
    os.symlink(d / "loop", d / "loop")
    cache: dict = {}
    for c in [d / "a" / "x.png", d / "b" / "link.png", d / "alink" / "x.png", d / "a" / ".." / "b" / "link.png",
              d / "a" / "missing.png", d / "loop", d / "a" / "..", d / "alink", d / "alink" / "x.png"]:
        try:
            ref = c.resolve()
        except (OSError, RuntimeError):
            ref = None
        assert _real(c, cache) == ref, c
    assert cache, "the folder cache was used"


def test_a_cache_temporary_left_by_a_killed_run_is_swept_by_the_next_write(tmp_path, timm_folder, image_data):
    """An audit's note: a run killed outright while writing a cache entry leaves its `.emb-*.tmp`
    (`finally` never runs), and nothing removed it. The next cache write removes this user's
    temporaries older than an hour and leaves a young one (a write in progress) alone."""
    import os
    import time

    from repair.adapters import load_model
    from repair.data import load_data
    from repair.embeddings import extract

    cache = tmp_path / "c"
    cache.mkdir()
    old, young, other = cache / ".emb-abc.tmp", cache / ".emb-def.tmp", cache / "notes.tmp"
    for p in (old, young, other):
        p.write_bytes(b"partial")
    long_ago = time.time() - 2 * 3600
    os.utime(old, (long_ago, long_ago))
    os.utime(other, (long_ago, long_ago))
    extract(load_model(timm_folder), load_data(image_data), cache_dir=cache, progress=False)
    assert not old.exists() and young.exists() and other.exists()


def test_a_huge_text_is_cut_before_it_is_tokenized_to_the_very_same_tokens(bert_folder):
    """A tokenizer reads a whole text before truncating it: one 200 MB field took 4 GB and aborted the
    process (SIGABRT). A text is cut first to what decides its first tokens -- the same ids, whether it
    is dense, sparse (a long run of spaces: cut, tokenized, widened until it holds enough tokens) or
    short -- and the tokenizer never sees more than the bound of a dense one."""
    from repair.adapters import load_model
    from repair.adapters.text import MIN_CHARS_KEPT, bounded_texts, collate_texts

    tok = load_model(bert_folder).tokenizer
    dense = "great movie , truly not bad " * 20000
    sparse = " " * 300000 + "great movie " * 100
    texts = [dense, sparse, "short", dense[:5000]]
    for n in (8, 32):
        mine = collate_texts(tok, texts, n)["input_ids"]
        whole = tok(texts, padding=True, truncation=True, max_length=n, return_tensors="pt")["input_ids"]
        assert torch.equal(mine, whole)
    cut = bounded_texts(tok, texts, 32)
    assert len(cut[0]) == MIN_CHARS_KEPT and cut[2] == "short" and cut[1] == sparse
    seen = []

    class Recording:
        pad_token = tok.pad_token           # (texts are read in batches only by a tokenizer that pads)

        def __call__(self, t, **kw):
            seen.append(max(map(len, [t] if isinstance(t, str) else t)))
            return tok(t, **kw)

    collate_texts(Recording(), [dense * 10], 32)
    assert max(seen) == MIN_CHARS_KEPT
    # a tokenizer that truncates on the left keeps the text's last tokens: the cut keeps its tail
    left = load_model(bert_folder).tokenizer
    left.truncation_side = "left"
    tail = dense + " ".join(["awful never"] * 50)
    mine = collate_texts(left, [tail, sparse], 16)["input_ids"]
    assert torch.equal(mine, left([tail, sparse], padding=True, truncation=True, max_length=16,
                                  return_tensors="pt")["input_ids"])
    assert bounded_texts(left, [tail], 16)[0] == tail[-MIN_CHARS_KEPT:]


def test_tokenizing_in_threads_leaves_the_processs_stderr_as_it_was(bert_folder):
    """Descriptor 2 is held only while the main thread tokenizes: threads that tokenize at once
    swapped it in turns, and one could leave the process's stderr on a deleted temporary file."""
    import threading

    from repair.adapters import load_model
    from repair.adapters.text import collate_texts

    tok = load_model(bert_folder).tokenizer
    before = os.fstat(2)
    workers = [threading.Thread(target=lambda: [collate_texts(tok, ["great movie"] * 8, 16) for _ in range(200)])
               for _ in range(3)]
    for w in workers:
        w.start()
    for _ in range(200):
        collate_texts(tok, ["awful plot"] * 8, 16)
    for w in workers:
        w.join()
    after = os.fstat(2)
    assert (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)


def test_a_tokenizer_that_panics_on_the_data_is_one_line_exit_2(bert_folder, tmp_path, capfd):
    """A tokenizer.json whose pre-tokenizer regex backtracks past the regex engine's limit: the
    tokenizers library panics (a BaseException, past every ``except Exception``) and Rust prints a few
    lines per thread -- it was exit 1 (a gate's code: CI went on) with a 100-line traceback. Now exit 2,
    one line naming the tokenizer."""
    d = tmp_path / "m"
    shutil.copytree(bert_folder, d)
    t = json.loads((d / "tokenizer.json").read_text())
    t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False},
        {"type": "BertPreTokenizer"}]}
    (d / "tokenizer.json").write_text(json.dumps(t))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "PreTrainedTokenizerFast"}))
    data = tmp_path / "t.csv"
    write_csv(data, [{"text": "a" * 30 + "! " + ("great" if i % 2 else "awful"),
                      "label": "positive" if i % 2 else "negative"} for i in range(6)], fields=("text", "label"))
    with time_limit(120):
        code, out, err = run_cli("eval", d, "--data", data, "-q")
    assert code == 2 and "panicked" in one_error_line(err) and str(d) in err, err
    assert "panicked at" not in capfd.readouterr().err          # Rust's own lines on descriptor 2 are dropped


def test_a_damaged_tiff_is_one_error_line_without_pils_warning(tmp_path, timm_folder, recwarn):
    """A TIFF header claiming 65,535 directory entries: PIL warns ("Corrupt EXIF data") while opening
    it, and that warning came on stderr before the error line. (pytest records warnings instead of
    printing them: ``recwarn`` holds any PIL raised, which the command line would have printed.)"""
    data = make_images(tmp_path / "d", n_per_class=2)
    (data / "cat" / "000.png").write_bytes(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 65535) + b"\x00" * 120)
    cli_refuses(["eval", timm_folder, "--data", data], "cat/000.png", "not an image")
    assert not [str(w.message) for w in recwarn if "PIL" in str(w.filename)]
