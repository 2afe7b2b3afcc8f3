"""The large-image data paths: crops (workers decode and crop, colour batch-wise on the device or in PIL on a CPU)
and dali (DALI's CPU backend here): their geometry against torchvision on the same boxes, their parameters against
the batched path's generator, the auto rule, and an exact resume."""
import io
import json
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from conftest import TINY
from ssl_bocb import config
from ssl_bocb.data import batched as B
from ssl_bocb.data import cache as C
from ssl_bocb.data.crops import CroppedViews, NormaliseViews, crop_pair, draft_scale, pil_colour
from ssl_bocb.data.datasets import build_base
from ssl_bocb.data.pipeline import dali_available, two_view_data
from ssl_bocb.tasks import pretrain
from ssl_bocb.errors import UserError


def data_cfg(*overrides):
    return config.load(config.PretrainConfig, [], list(overrides)).data


def photo(width, height, seed=0):
    """A smooth random picture with grain: decodes like a photo, and its resizes are comparable pixel by pixel."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 6, 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)[0]
    x = (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def jpeg_tree(root, sizes, classes=("a", "b"), quality=92):
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            photo(w, h, seed=hash((c, i)) % 1000).save(os.path.join(root, c, f"{i}.jpg"), "JPEG", quality=quality)


def test_crop_windows_are_the_batched_paths_boxes_and_flips():
    aug = B.BatchedTwoViews(32, 0.08, (0, 0, 0), (1, 1, 1), blur=True, solarize=True, seed=5)
    for i, (h, w) in enumerate([(300, 400), (480, 360), (40, 40)]):
        boxes, flips = aug.crop_windows(100 + i, 3, h, w)
        p = aug.host_params([7, 100 + i], 3, h, w)
        for v in range(2):
            assert np.array_equal(boxes[v], p[v]["boxes"][1]) and flips[v] == p[v]["flip"][1]


def test_crops_equal_torchvision_resized_crop_on_the_same_boxes():
    img = photo(400, 300)
    boxes = np.array([[20, 30, 150, 200], [0, 0, 300, 400]])
    out = np.zeros((2, 64, 64, 3), np.uint8)
    assert crop_pair(img, boxes, np.array([False, True]), 64, out) == 1  # a PNG-like image: no draft decoding
    for v, ((t, l, h, w), flip) in enumerate(zip(boxes.tolist(), (False, True))):
        ref = TF.resized_crop(img, t, l, h, w, [64, 64], antialias=True)
        ref = np.asarray(TF.hflip(ref) if flip else ref).astype(float)
        diff = np.abs(out[v].astype(float) - ref)
        assert diff.mean() < 0.5 and np.median(diff) <= 1, (v, diff.mean())  # PIL's resize of the same crop
        tensor = TF.resized_crop(torch.from_numpy(np.array(img)).permute(2, 0, 1), t, l, h, w, [64, 64],
                                 antialias=True)  # torchvision's op on a uint8 tensor (another memory layout)
        tensor = tensor.flip(2) if flip else tensor
        assert np.abs(out[v].astype(int) - tensor.permute(1, 2, 0).numpy()).max() <= 1


def test_jpeg_decoded_at_reduced_scale_where_the_crops_allow():
    buf = io.BytesIO()
    photo(1200, 960).save(buf, "JPEG", quality=92)
    boxes = np.array([[100, 50, 600, 700], [0, 0, 960, 1200]])
    assert draft_scale(boxes, 128) == 4 and draft_scale(boxes, 224) == 2 and draft_scale(boxes[:, :] // 8, 224) == 1
    fast, full = np.zeros((2, 128, 128, 3), np.uint8), np.zeros((2, 128, 128, 3), np.uint8)
    assert crop_pair(Image.open(io.BytesIO(buf.getvalue())), boxes, np.zeros(2, bool), 128, fast) == 4
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")  # decoded whole: no draft possible
    crop_pair(img, boxes, np.zeros(2, bool), 128, full)
    assert np.abs(fast.astype(float) - full).mean() < 2.0


def test_device_views_of_crops_equal_the_batched_views():
    """Where the box is the whole image at the output size, the batched path's crop is the identity: the crops path
    (workers crop and flip, the device colours) must then give the batched path's views."""
    aug = B.BatchedTwoViews(24, 1.0, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), blur=True, solarize=True, seed=3)
    u8 = torch.randint(0, 256, (10, 24, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    index = np.arange(10)
    p1, p2 = aug.params(index.tolist(), 4, 24, 24)
    assert (p1["boxes"] == torch.tensor([0, 0, 24, 24])).all()  # scale (1, 1) on a square: the whole image
    ref1, ref2 = aug(u8, index, 4)
    crops = torch.stack([torch.where(p["flip"].view(-1, 1, 1, 1), u8.flip(2), u8) for p in (p1, p2)], 1)
    got1, got2 = aug(crops, index, 4)
    assert torch.allclose(got1, ref1, atol=1e-4) and torch.allclose(got2, ref2, atol=1e-4)


def test_cpu_chunks_equal_one_pass():
    aug = B.BatchedTwoViews(64, 0.2, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), blur=True, solarize=True, seed=1)
    crops = torch.randint(0, 256, (9, 2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    whole = aug(crops, np.arange(9), 0)
    old = B.CPU_CHUNK_BYTES
    try:
        B.CPU_CHUNK_BYTES = 2 * 2 * 3 * 4 * 64 * 64  # two samples per pass: 5 passes
        assert len(list(aug.chunks(crops, np.arange(9), 0))) == 5
        chunked = aug(crops, np.arange(9), 0)
    finally:
        B.CPU_CHUNK_BYTES = old
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole, chunked))


def test_pil_colour_in_the_workers_is_close_to_the_device_colour():
    """On a CPU device the workers colour in PIL (uint8, rounding after each op); on the same parameters the views
    stay within a few grey levels of the float ops."""
    aug = B.BatchedTwoViews(32, 0.2, (0, 0, 0), (1, 1, 1), blur=True, solarize=True)
    crops = torch.stack([torch.from_numpy(np.array(photo(32, 32, seed=s))) for s in range(24)])
    crops = torch.stack([crops, crops.flip(2)], 1)
    dev1, dev2 = aug(crops, np.arange(24), 0)
    host = aug.host_params(list(range(24)), 0, 32, 32)
    diffs = []
    for v, dev in enumerate((dev1, dev2)):
        for i in range(24):
            p = {k: a[i] for k, a in host[v].items()}
            got = np.asarray(pil_colour(Image.fromarray(crops[i, v].numpy()), p)).astype(np.float32) / 255
            diffs.append(np.abs(got - dev[i].permute(1, 2, 0).numpy()).mean())
    assert np.mean(diffs) < 6 / 255 and np.max(diffs) < 20 / 255


def test_crops_dataset_skips_unreadable_files_and_ships_uint8(tmp_path):
    jpeg_tree(str(tmp_path / "train"), [(90, 70), (60, 80), (100, 100)])
    with open(tmp_path / "train" / "a" / "1.jpg", "wb") as f:
        f.write(b"not a jpeg")
    cfg = data_cfg("data.name=imagefolder", f"data.root={tmp_path}", "data.image_size=32", "data.num_workers=0")
    d = two_view_data(cfg, 0)
    assert d.kind == "crops" and isinstance(d.dataset, CroppedViews) and not d.dataset.finish
    (crops, idx), labels, n_bad = d.dataset.__getitems__([0, 1, 2, 3])
    assert crops.dtype == torch.uint8 and crops.shape == (4, 2, 32, 32, 3) and idx.tolist() == [0, 1, 2, 3]
    assert int(n_bad) == 1 and labels.tolist() == [0, 0, 0, 1]
    assert d.bytes_per_image == crops[0].nelement() == 2 * 32 * 32 * 3  # 4x fewer than two float32 views
    x1, x2, _ = d.views(((crops, idx), labels, n_bad), 0)
    assert x1.shape == (4, 3, 32, 32) and x1.dtype == torch.float32 and not torch.allclose(x1, x2)
    # with workers on a CPU device the workers colour too, and the device only normalises
    w = two_view_data(data_cfg("data.name=imagefolder", f"data.root={tmp_path}", "data.image_size=32",
                               "data.num_workers=1"), 0)
    assert w.dataset.finish and isinstance(w.views, NormaliseViews)
    (views, _), _, _ = w.dataset.__getitems__([0, 2])
    y1, _, _ = w.views(((views, np.array([0, 2])), None, 0), 0)
    assert views.dtype == torch.uint8 and y1.shape == (2, 3, 32, 32)


def test_auto_picks_crops_for_large_images_without_keying_every_file(tmp_path, monkeypatch, caplog):
    jpeg_tree(str(tmp_path / "train"), [(90, 70), (60, 80)])

    def no_key(*a, **k):
        raise AssertionError("the decoded-cache key was computed (a stat of every file)")
    monkeypatch.setattr(C, "_file_key", no_key)
    caplog.set_level("INFO")
    d = two_view_data(data_cfg("data.name=imagefolder", f"data.root={tmp_path}", "data.image_size=32"), 0)
    assert d.kind == "crops" and "larger than data.image_size=32" in d.reason and "not a GPU" in d.reason
    assert "data.pipeline=auto chose crops" in caplog.text
    monkeypatch.undo()
    small = two_view_data(data_cfg("data.name=fake", "data.image_size=32"), 0)
    assert small.kind == "batched"
    with pytest.raises(UserError, match="data.pipeline=batched cannot hold.*use data.pipeline=crops"):
        two_view_data(data_cfg("data.name=imagefolder", f"data.root={tmp_path}", "data.image_size=32",
                               "data.pipeline=batched"), 0)


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["crops", "dali"])
def test_large_image_paths_resume_exactly(tmp_path, pipeline):
    if pipeline == "dali" and not dali_available():
        pytest.skip("needs NVIDIA DALI: pip install -e '.[dev]'")
    jpeg_tree(str(tmp_path / "data" / "train"), [(50 + 7 * i, 40 + 5 * i) for i in range(8)])
    extra = TINY + ["data.name=imagefolder", f"data.root={tmp_path / 'data'}", "data.image_size=32",
                    "data.num_workers=1", "model.backbone_kwargs={drop_path_rate: 0.2}", "train.save_every_steps=3",
                    "train.batch_size=4", f"data.pipeline={pipeline}"]
    P = config.PretrainConfig
    full = pretrain(config.load(P, [], extra + [f"output_dir={tmp_path / 'full'}"]))
    part = pretrain(config.load(P, [], extra + [f"output_dir={tmp_path / 'part'}", "train.stop_at_step=5"]))
    pretrain(config.load(P, [], extra + [f"output_dir={tmp_path / 'part'}", "resume=auto"]))

    def losses(run_dir):
        return [json.loads(line)["loss"] for line in open(os.path.join(run_dir, "steps.jsonl"))]
    assert len(losses(full)) == 8 and losses(part) == losses(full)
    import yaml
    assert yaml.safe_load(open(os.path.join(full, "config.yaml")))["derived"]["data_pipeline"] == pipeline


@pytest.mark.parametrize("pipeline", ["crops", "dali"])
def test_each_process_gets_its_shard_and_the_same_views_as_one_process(tmp_path, pipeline):
    """Under Accelerate's sharding (seedable sampler), two processes' batches together are the one-process batch,
    and each sample's views are the same whichever process makes them (they depend on seed, epoch and position)."""
    if pipeline == "dali" and not dali_available():
        pytest.skip("needs NVIDIA DALI: pip install -e '.[dev]'")
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader
    jpeg_tree(str(tmp_path / "train"), [(50 + 7 * i, 40 + 5 * i) for i in range(6)])
    d = two_view_data(data_cfg("data.name=imagefolder", f"data.root={tmp_path}", "data.image_size=24",
                               "data.num_workers=0", f"data.pipeline={pipeline}"), 0)

    def first_batch(batch, processes, rank):
        loader = DataLoader(d.dataset, batch_size=batch, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(0), **d.loader_kwargs)
        loader = prepare_data_loader(loader, num_processes=processes, process_index=rank, use_seedable_sampler=True,
                                     data_seed=0)
        loader.set_epoch(1)
        d.dataset.set_epoch(1)
        out = next(iter(loader))
        x1, x2, _ = d.views(out, 1)
        return out[0][-1], x1, x2
    whole, w1, w2 = first_batch(8, 1, 0)
    shards = [first_batch(4, 2, r) for r in range(2)]
    idx = np.concatenate([s[0] for s in shards])
    assert sorted(idx.tolist()) == sorted(whole.tolist()) and len(set(idx.tolist())) == 8
    for index, x1, x2 in shards:
        rows = [whole.tolist().index(i) for i in index.tolist()]
        assert torch.allclose(x1, w1[rows], atol=1e-5) and torch.allclose(x2, w2[rows], atol=1e-5)


# --------------------------------------------------------------------------------------------------------- DALI
needs_dali = pytest.mark.skipif(not dali_available(), reason="needs NVIDIA DALI: pip install -e '.[dev]'")


@needs_dali
def test_dali_crops_equal_the_workers_crops(tmp_path):
    from ssl_bocb.data.dali import EncodedFiles
    jpeg_tree(str(tmp_path / "train"), [(90, 70), (160, 120), (100, 100)])
    with open(tmp_path / "train" / "b" / "0.jpg", "wb") as f:
        f.write(b"not a jpeg")
    cfg = data_cfg("data.name=imagefolder", f"data.root={tmp_path}", "data.image_size=32", "data.pipeline=dali",
                   "data.num_workers=0")
    d = two_view_data(cfg, 0)
    assert d.kind == "dali" and isinstance(d.dataset, EncodedFiles)
    index = [0, 1, 2, 3, 5]  # 3 is the unreadable file: the next readable one (4) takes its place
    (encoded, (boxes, flips), idx), labels, n_bad = d.dataset.__getitems__(index)
    assert int(n_bad) == 1 and labels.tolist() == [0, 0, 0, 1, 1] and idx.tolist() == index
    assert sum(len(e) for e in encoded) < 5 * 2 * 32 * 32 * 3  # encoded bytes cross, not pixels
    got = d.views.crops(encoded, boxes, flips)
    assert got.shape == (5, 2, 32, 32, 3) and got.dtype == torch.uint8
    ref = CroppedViews(build_base(cfg, "train"), list(range(6)), d.views.augment)
    (want, _), _, _ = ref.__getitems__(index)
    assert (got.float() - want.float()).abs().mean() < 1.5  # the same boxes and flips, another JPEG decoder
    x1, x2, _ = d.views(((encoded, (boxes, flips), idx), labels, n_bad), 0)
    assert x1.shape == x2.shape == (5, 3, 32, 32)


def test_dali_missing_is_one_clear_error(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_dali(name, *a, **k):
        if name.startswith("nvidia.dali") or name == "nvidia":
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_dali)
    with pytest.raises(UserError, match=r"needs NVIDIA DALI, which is not installed: pip install -e \"\.\[dali\]\""):
        two_view_data(data_cfg("data.name=fake", "data.image_size=32", "data.pipeline=dali"), 0)
