"""data.name=folder: pretraining on a folder of unlabelled images (flat or nested; JPEG, PNG, WebP), corrupt and
truncated files skipped and counted, nothing written into the folder, a clear error where nothing can be read."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import run_tool
from ssl_bocb import config
from ssl_bocb.data.datasets import UnlabelledFolder, build_base
from ssl_bocb.errors import UserError

SMALL = ["data.name=folder", "data.num_workers=0", "data.subset=0", "monitor.knn_every=0", "model.hidden_dim=64",
         "model.out_dim=32", "train.batch_size=8", "train.epochs=1", "train.warmup_epochs=0", "train.log_every=1"]


def make_folder(root, n=24, sizes=((40, 48), (36, 36))):
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = ["", "a", os.path.join("a", "b")][i % 3]
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        h, w = sizes[i % len(sizes)]
        ext = ["jpg", "png", "webp", "JPEG"][i % 4]
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(os.path.join(root, sub, f"im{i}.{ext}"))
    with open(os.path.join(root, "broken.jpg"), "wb") as f:
        f.write(b"not an image")
    whole = open(os.path.join(root, "im0.jpg"), "rb").read()
    with open(os.path.join(root, "a", "truncated.jpg"), "wb") as f:
        f.write(whole[: len(whole) // 2])
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not listed")
    os.makedirs(os.path.join(root, ".thumbs"))
    Image.new("RGB", (8, 8)).save(os.path.join(root, ".thumbs", "x.png"))
    return root


def tree(root):
    """Every file under root with its size and modification time."""
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            p = os.path.join(folder, f)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def test_the_folder_lists_every_image_at_any_depth_and_nothing_else(tmp_path):
    root = make_folder(str(tmp_path / "imgs"))
    ds = UnlabelledFolder(root)
    rel = [os.path.relpath(p, root) for p, _ in ds.samples]
    assert len(ds) == 26 and rel == sorted(rel)  # 24 images + the 2 broken ones (found when read)
    assert "notes.txt" not in rel and not any(r.startswith(".thumbs") for r in rel)
    assert {os.path.splitext(r)[1] for r in rel} == {".jpg", ".png", ".webp", ".JPEG"}
    assert set(ds.targets) == {-1} and ds.classes == []
    img, label = ds[rel.index(os.path.join("a", "b", "im2.webp"))]  # nested two deep
    assert img.size == (48, 40) and label == -1
    with pytest.raises(OSError):
        ds[rel.index("broken.jpg")]


def test_the_folder_refuses_what_it_cannot_use(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(UserError, match="no image files under .*at any depth"):
        UnlabelledFolder(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="is not a folder"):
        UnlabelledFolder(str(tmp_path / "missing"))
    cfg = config.load(config.PretrainConfig, [], ["data.name=folder"])
    with pytest.raises(UserError, match="reads the images under data.root: set data.root"):
        build_base(cfg.data, "train")
    cfg = config.load(config.PretrainConfig, [], ["data.name=folder", f"data.root={tmp_path}"])
    with pytest.raises(UserError, match="pretraining only, it has no 'test' split; set monitor.knn_every=0"):
        build_base(cfg.data, "test")


@pytest.mark.slow
def test_pretraining_on_a_folder_skips_and_counts_broken_files_and_writes_nothing_there(tmp_path):
    root = make_folder(str(tmp_path / "imgs"))
    before = tree(root)
    for pipeline in ("crops", "pil"):
        out = tmp_path / f"run-{pipeline}"
        proc = run_tool("pretrain", "--config", "configs/quickstart.yaml", *SMALL, f"data.root={root}",
                        f"data.pipeline={pipeline}", f"output_dir={out}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        text = proc.stdout + proc.stderr
        assert "data.name=folder: 26 image files under" in text
        assert "skipping unreadable image" in text and "broken.jpg" in text
        row = [json.loads(line) for line in open(out / "log.jsonl")][-1]
        assert row["skipped_images"] >= 2 and "unreadable images" in open(out / "train.log").read()
        assert os.path.isfile(out / "backbone.safetensors")
    assert tree(root) == before  # not a file added, changed or touched in the user's folder


@pytest.mark.slow
def test_a_folder_of_nothing_readable_stops_with_one_line(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(4):
        (root / f"x{i}.jpg").write_bytes(b"garbage")
    proc = run_tool("pretrain", "--config", "configs/quickstart.yaml", *SMALL, f"data.root={root}",
                    "train.batch_size=2", f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: no readable image")
    assert sorted(os.listdir(root)) == [f"x{i}.jpg" for i in range(4)]


@pytest.mark.slow
def test_a_folder_of_small_images_of_one_size_is_held_decoded_outside_the_folder(tmp_path):
    root = make_folder(str(tmp_path / "imgs"), n=16, sizes=((32, 32),))
    before = tree(root)
    out = tmp_path / "run"
    proc = run_tool("pretrain", "--config", "configs/quickstart.yaml", *SMALL, f"data.root={root}",
                    "data.image_size=32", f"output_dir={out}", env={"SSL_BOCB_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "data.pipeline=auto chose batched" in proc.stdout + proc.stderr
    assert os.listdir(tmp_path / "cache" / "decoded")  # the decoded copy lives in the cache ...
    assert tree(root) == before  # ... and nothing in the user's folder
    assert [json.loads(line) for line in open(out / "log.jsonl")][-1]["skipped_images"] >= 1
