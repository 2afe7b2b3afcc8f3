import tarfile

import pytest
import torch

from conftest import make_tree
from ssl_bocb import config
from ssl_bocb.data import build_dataset, eval_transform, per_class_subset, pretrain_transform
from ssl_bocb.data.archive import unpack_once
from ssl_bocb.errors import UserError


def data_cfg(*overrides):
    return config.load(config.PretrainConfig, [], list(overrides)).data


def test_two_views_differ_and_follow_the_asymmetry():
    cfg = data_cfg("data.name=fake", "data.image_size=64")
    t = pretrain_transform(cfg)
    ds = build_dataset(cfg, "train", t)
    (v1, v2), label, skipped = ds[0]
    assert v1.shape == v2.shape == (3, 64, 64)
    assert not torch.allclose(v1, v2)
    assert skipped == 0
    names1 = [type(op).__name__ for op in t.t1.transforms]
    names2 = [type(op).__name__ for op in t.t2.transforms]
    assert "RandomSolarize" not in names1 and "RandomSolarize" in names2
    blur1 = next(op for op in t.t1.transforms if type(op).__name__ == "RandomGaussianBlur")
    blur2 = next(op for op in t.t2.transforms if type(op).__name__ == "RandomGaussianBlur")
    assert (blur1.p, blur2.p) == (1.0, 0.1)


def test_small_images_drop_blur_by_default():
    t = pretrain_transform(data_cfg("data.image_size=32"))
    assert all(type(op).__name__ != "RandomGaussianBlur" for op in t.t1.transforms)
    t = pretrain_transform(data_cfg("data.image_size=32", "data.blur=true"))
    assert any(type(op).__name__ == "RandomGaussianBlur" for op in t.t1.transforms)


def test_augmentation_is_a_function_of_seed_epoch_index():
    cfg = data_cfg("data.name=fake")
    a = build_dataset(cfg, "train", pretrain_transform(cfg), seed=3)
    b = build_dataset(cfg, "train", pretrain_transform(cfg), seed=3)
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(a[5][0][0], b[5][0][0])
    state = torch.get_rng_state()
    a[1]
    assert torch.equal(state, torch.get_rng_state())  # and it is left untouched
    a.set_epoch(1)
    assert not torch.equal(a[5][0][0], b[5][0][0])


def test_per_class_subset_is_deterministic():
    targets = [0, 1, 0, 2, 1, 0, 2, 2]
    assert per_class_subset(targets, 2) == [0, 1, 2, 3, 4, 6]
    assert per_class_subset(targets, 0) == list(range(8))


def test_archive_is_unpacked_once(tmp_path):
    src = tmp_path / "src"
    make_tree(str(src / "cifar10" / "train"))
    make_tree(str(src / "cifar10" / "test"))
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar10", arcname="cifar10")
    cache = tmp_path / "cache"
    cfg = data_cfg("data.name=cifar10", f"data.root={root}", f"data.cache_dir={cache}")
    ds = build_dataset(cfg, "train", eval_transform(cfg))
    assert len(ds) == 6 and ds.classes == ["a", "b"]
    marker = cache / "cifar10-jpeg" / ".complete"
    assert marker.exists()
    mtime = marker.stat().st_mtime_ns
    build_dataset(cfg, "test", eval_transform(cfg))
    assert marker.stat().st_mtime_ns == mtime  # not unpacked again
    assert unpack_once(str(root / "cifar10-jpeg.tar.gz"), str(cache)) == str(cache / "cifar10-jpeg")


def test_corrupt_archive_is_a_clear_error(tmp_path):
    bad = tmp_path / "cifar10-jpeg.tar.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    cfg = data_cfg("data.name=cifar10", f"data.root={tmp_path}", f"data.cache_dir={tmp_path / 'c'}")
    with pytest.raises(UserError, match="cannot unpack"):
        build_dataset(cfg, "train", eval_transform(cfg))


def test_unpacked_tree_and_imagefolder(tmp_path):
    make_tree(str(tmp_path / "cifar10" / "train"))
    cfg = data_cfg("data.name=cifar10", f"data.root={tmp_path}")
    assert len(build_dataset(cfg, "train", eval_transform(cfg))) == 6
    make_tree(str(tmp_path / "folder" / "train"), classes=("x", "y", "z"))
    cfg = data_cfg("data.name=imagefolder", f"data.root={tmp_path / 'folder'}", "data.subset=2")
    ds = build_dataset(cfg, "train", eval_transform(cfg))
    assert len(ds) == 6 and sorted(set(ds.targets)) == [0, 1, 2]


def test_missing_data_names_what_was_searched(tmp_path):
    cfg = data_cfg("data.name=cifar10", f"data.root={tmp_path}")
    with pytest.raises(UserError, match="cifar10 train data not found.*cifar10-jpeg.tar.gz.*data.download=true"):
        build_dataset(cfg, "train", eval_transform(cfg))


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    make_tree(str(tmp_path / "train"), per_class=3, corrupt={("a", 1)})
    cfg = data_cfg("data.name=imagefolder", f"data.root={tmp_path}", "data.image_size=16")
    ds = build_dataset(cfg, "train", eval_transform(cfg))
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    total_skipped = sum(int(s.sum()) for _, _, s in loader)
    assert total_skipped == 1
    x, y, skipped = ds[1]
    assert skipped == 1 and x.shape == (3, 16, 16)


def _write_pickle(path, obj):
    import pickle
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_native_cifar10_and_cifar100_files(tmp_path):
    import numpy as np
    rng = np.random.default_rng(0)
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write_pickle(c10 / name, {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]})
    _write_pickle(c10 / "batches.meta", {"label_names": ["a", "b", "c", "d"]})
    cfg = data_cfg("data.name=cifar10", f"data.root={tmp_path}", "data.subset=1")
    ds = build_dataset(cfg, "train", eval_transform(cfg))
    assert len(ds) == 4 and ds.classes == ["a", "b", "c", "d"] and ds[0][0].shape == (3, 32, 32)
    assert len(build_dataset(cfg, "test", eval_transform(cfg), subset=0)) == 4
    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    for name in ("train", "test"):
        _write_pickle(c100 / name, {"data": rng.integers(0, 255, (6, 3072), dtype=np.uint8),
                                    "fine_labels": [0, 1, 2, 0, 1, 2], "coarse_labels": [0] * 6})
    _write_pickle(c100 / "meta", {"fine_label_names": ["x", "y", "z"]})
    cfg = data_cfg("data.name=cifar100", f"data.root={tmp_path}")
    assert len(build_dataset(cfg, "train", eval_transform(cfg))) == 6
    (c100 / "meta").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cifar100 files under .* are unreadable"):
        build_dataset(cfg, "train", eval_transform(cfg))


class _RunsCode:
    """Unpickling this writes a file: what a tampered dataset file could do with a plain ``pickle.load``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_tampered_cifar_file_is_refused_without_running_its_code(tmp_path):
    import numpy as np
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    marker = tmp_path / "ran"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write_pickle(c10 / name, {"data": np.zeros((2, 3072), dtype=np.uint8), "labels": [0, 1]})
    _write_pickle(c10 / "batches.meta", {"label_names": ["a", "b"], "x": _RunsCode(marker)})
    cfg = data_cfg("data.name=cifar10", f"data.root={tmp_path}")
    with pytest.raises(UserError, match="cifar10 files under .* are unreadable .*open is not an array"):
        build_dataset(cfg, "train", eval_transform(cfg))
    assert not marker.exists()


def test_native_stl10_files(tmp_path):
    import numpy as np
    rng = np.random.default_rng(0)
    d = tmp_path / "stl10_binary"
    d.mkdir()
    for split, n in (("train", 4), ("test", 2)):
        rng.integers(0, 255, (n, 3, 96, 96), dtype=np.uint8).tofile(d / f"{split}_X.bin")
        np.array([1, 2] * (n // 2), dtype=np.uint8).tofile(d / f"{split}_y.bin")
    rng.integers(0, 255, (3, 3, 96, 96), dtype=np.uint8).tofile(d / "unlabeled_X.bin")
    (d / "class_names.txt").write_text("airplane\nbird\n")
    cfg = data_cfg("data.name=stl10", f"data.root={tmp_path}", "data.image_size=96")
    train = build_dataset(cfg, "train", eval_transform(cfg))
    assert len(train) == 4 and sorted(set(train.targets)) == [0, 1] and train.classes == ["airplane", "bird"]
    both = build_dataset(cfg, "train+unlabeled", eval_transform(cfg))
    assert len(both) == 7 and both.targets.count(-1) == 3
    assert build_dataset(cfg, "test", eval_transform(cfg))[0][0].shape == (3, 96, 96)
