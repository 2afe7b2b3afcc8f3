"""The batched two-view path: ops against torchvision on fixed parameters, parameter distributions against the PIL
recipe's, determinism in (seed, epoch, index), and the decoded cache."""
import math
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision import transforms as T

from ssl_bocb import config
from ssl_bocb.data import batched as B
from ssl_bocb.data.cache import DecodedImages
from ssl_bocb.data import cache as C
from ssl_bocb.data.pipeline import two_view_data
from ssl_bocb.errors import UserError
from conftest import make_tree


def data_cfg(*overrides):
    return config.load(config.PretrainConfig, [], list(overrides)).data


def images(n=6, size=20, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_resized_crop_and_flip_match_torchvision_on_fixed_boxes():
    x = images(5, 20)
    boxes = torch.tensor([[0, 0, 20, 20], [3, 5, 9, 12], [11, 2, 7, 7], [0, 13, 20, 7], [5, 5, 2, 3]])
    flip = torch.tensor([False, True, False, True, True])
    out = B.resized_crop(x, boxes, 16, flip)
    out_up = B.resized_crop(x, boxes, 24, flip)
    for i, (t, l, h, w) in enumerate(boxes.tolist()):
        for size, got in ((16, out), (24, out_up)):
            ref = TF.resized_crop(x[i], t, l, h, w, [size, size], antialias=False)
            if flip[i]:
                ref = TF.horizontal_flip(ref)
            assert (got[i] - ref).abs().max() < 1e-5, (i, size)


@pytest.mark.parametrize("op,ref,lo,hi", [
    (B.brightness, TF.adjust_brightness, 0.6, 1.4), (B.contrast, TF.adjust_contrast, 0.6, 1.4),
    (B.saturation, TF.adjust_saturation, 0.8, 1.2), (B.hue, TF.adjust_hue, -0.1, 0.1)])
def test_colour_ops_match_torchvision_per_sample(op, ref, lo, hi):
    x = images(8, 12)
    x[0] = 0.5  # grey: no hue
    x[1, :, :4] = x[1, 0:1, :4]  # ties between channels
    f = torch.linspace(lo, hi, 8)
    got = op(x.clone(), f)
    for i in range(8):
        assert (got[i] - ref(x[i], float(f[i]))).abs().max() < 2e-5, (op.__name__, i)


def test_grayscale_blur_solarize_match_torchvision():
    x = images(4, 16)
    assert (B.grayscale(x).expand_as(x) - TF.rgb_to_grayscale(x, num_output_channels=3)).abs().max() < 1e-6
    sig = torch.tensor([0.1, 0.7, 1.3, 2.0])
    k = B.blur_kernel_size(2.0)
    got = B.gaussian_blur(x, sig, k)
    for i in range(4):
        ref = TF.gaussian_blur(x[i], [k, k], [float(sig[i])] * 2)
        assert (got[i] - ref).abs().max() < 1e-5
    aug = B.BatchedTwoViews(16, 0.2, (0, 0, 0), (1, 1, 1), blur=False, solarize=True)
    p = aug.params(range(4), 0, 16, 16)[1]
    p.update(boxes=torch.tensor([[0, 0, 16, 16]] * 4), flip=torch.zeros(4, dtype=torch.bool),
             jitter=torch.zeros(4, dtype=torch.bool), gray=torch.zeros(4, dtype=torch.bool),
             solarize=torch.tensor([True, False, True, False]))
    got = aug.view(x, p, normalize=False)
    for i in range(4):
        ref = TF.solarize(x[i], 128 / 255) if i % 2 == 0 else x[i]
        assert (got[i] - ref).abs().max() < 1e-6


def test_a_whole_view_equals_torchvision_ops_in_the_samples_own_order():
    aug = B.BatchedTwoViews(24, 0.2, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), blur=True, solarize=True, seed=3)
    x = images(32, 24, seed=1)
    ps = aug.params(range(32), 0, 24, 24)
    mean, std = torch.tensor(aug.mean).view(3, 1, 1), torch.tensor(aug.std).view(3, 1, 1)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for v, p in enumerate(ps):
        got = aug.view(x, p)
        for i in range(32):
            t, l, h, w = p["boxes"][i].tolist()
            y = TF.resized_crop(x[i], t, l, h, w, [24, 24], antialias=False)
            if p["jitter"][i]:
                for op in p["order"][i].tolist():
                    y = ops[op](y, float(p["factors"][i, op]))
            if p["gray"][i]:
                y = TF.rgb_to_grayscale(y, num_output_channels=3)
            if p["blur"][i]:
                y = TF.gaussian_blur(y, [aug.kernel] * 2, [float(p["sigma"][i])] * 2)
            if p["solarize"][i]:
                y = TF.solarize(y, 128 / 255)
            if p["flip"][i]:
                y = TF.horizontal_flip(y)
            assert (got[i] - (y - mean) / std).abs().max() < 1e-4, (v, i)


def test_a_view_is_close_to_the_pil_recipe_on_uint8_images():
    """PIL works in uint8 and rounds after every op; on the same parameters the float path stays within a few
    grey levels."""
    aug = B.BatchedTwoViews(32, 0.2, (0, 0, 0), (1, 1, 1), blur=False, solarize=True)
    u8 = (images(16, 32, seed=2) * 255).round().to(torch.uint8)
    p = aug.params(range(16), 0, 32, 32)[1]
    p["jitter"][:] = True
    p["order"][:] = torch.tensor([0, 1, 2, 3])
    got = aug.view(u8.float() / 255, p, normalize=False)
    diffs = []
    for i in range(16):
        img = Image.fromarray(u8[i].permute(1, 2, 0).numpy())
        t, l, h, w = p["boxes"][i].tolist()
        f = p["factors"][i].tolist()
        img = img.resize((32, 32), Image.BILINEAR, box=(l, t, l + w, t + h))
        img = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img, f[0]), f[1]), f[2]),
                            f[3])
        if p["gray"][i]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if p["solarize"][i]:
            img = TF.solarize(img, 128)
        if p["flip"][i]:
            img = TF.horizontal_flip(img)
        diffs.append((got[i] - T.functional.to_tensor(img)).abs().mean())
    assert float(torch.stack(diffs).mean()) < 6 / 255


def ks(a, b):
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    return np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                  - np.searchsorted(np.sort(b), grid, "right") / len(b)).max()


def test_crop_parameters_follow_torchvision_random_resized_crop():
    n, height, width = 20000, 24, 32
    u = B.uniforms(0, 0, range(n), 1, B._DRAWS)[:, 0, B._CROP:B._FLIP]
    ours = B.crop_boxes(u, height, width, (0.08, 1.0)).astype(float)
    torch.manual_seed(0)
    img = torch.zeros(3, height, width)
    ref = np.array([T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)], float)
    for name, f in (("area", lambda b: b[:, 2] * b[:, 3]), ("ratio", lambda b: b[:, 3] / b[:, 2]),
                    ("top", lambda b: b[:, 0] / (height - b[:, 2] + 1)),
                    ("left", lambda b: b[:, 1] / (width - b[:, 3] + 1))):
        assert ks(f(ours), f(ref)) < 0.025, name
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    # a scale range no attempt can satisfy (crops larger than the image) gives torchvision's central fallback
    tall = B.crop_boxes(u[:50], 40, 10, (1.0, 1.0))
    assert set(map(tuple, tall.tolist())) == {tuple(T.RandomResizedCrop.get_params(torch.zeros(3, 40, 10),
                                                                                     [1.0, 1.0], [3 / 4, 4 / 3]))}


def test_per_sample_probabilities_factors_and_order():
    aug = B.BatchedTwoViews(32, 0.2, (0, 0, 0), (1, 1, 1), blur=True, solarize=True)
    n = 24000
    p1, p2 = aug.params(range(n), 5, 32, 32)
    tol = 4 * math.sqrt(0.25 / n)
    for p, blur, sol in ((p1, 1.0, 0.0), (p2, 0.1, 0.2)):
        rates = dict(flip=0.5, jitter=0.8, gray=0.2, blur=blur, solarize=sol)
        for k, want in rates.items():
            assert abs(float(p[k].float().mean()) - want) < tol, k
        f = p["factors"]
        for j, (lo, hi) in enumerate(((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))):
            assert lo <= float(f[:, j].min()) and float(f[:, j].max()) <= hi
            assert abs(float(f[:, j].mean()) - (lo + hi) / 2) < 0.01 * (hi - lo)
        s = p["sigma"]
        assert 0.1 <= float(s.min()) and float(s.max()) <= 2.0 and abs(float(s.mean()) - 1.05) < 0.02
        perms = {}
        for row in p["order"].tolist():
            perms[tuple(row)] = perms.get(tuple(row), 0) + 1
        assert len(perms) == 24 and max(abs(c / n - 1 / 24) for c in perms.values()) < 0.006
    assert not torch.equal(p1["flip"], p2["flip"])  # the two views draw independently


def test_parameters_are_a_function_of_seed_epoch_and_index_only():
    aug = B.BatchedTwoViews(16, 0.2, (0, 0, 0), (1, 1, 1), blur=True, solarize=True, seed=7)
    a = aug.params([5, 9], 2, 16, 16)
    b = aug.params([100, 9, 3, 5], 2, 16, 16)
    for pa, pb in zip(a, b):
        for k in pa:
            assert torch.equal(pa[k][0], pb[k][3]) and torch.equal(pa[k][1], pb[k][1]), k
    other_epoch = aug.params([5, 9], 3, 16, 16)[0]
    other_seed = B.BatchedTwoViews(16, 0.2, (0, 0, 0), (1, 1, 1), True, True, seed=8).params([5, 9], 2, 16, 16)[0]
    assert not torch.equal(a[0]["boxes"], other_epoch["boxes"])
    assert not torch.equal(a[0]["boxes"], other_seed["boxes"])


def test_pipeline_auto_chooses_batched_for_small_images_and_crops_otherwise(tmp_path):
    d = two_view_data(data_cfg("data.name=fake", "data.image_size=32"), 0)
    assert d.kind == "batched" and d.loader_kwargs["num_workers"] == 0
    batch = d.dataset.__getitems__([3, 0, 5])
    x1, x2, n_bad = d.views(batch, 0)
    assert x1.shape == x2.shape == (3, 3, 32, 32) and not torch.allclose(x1, x2) and int(n_bad) == 0
    again = d.views(d.dataset.__getitems__([5]), 0)[0]
    assert torch.allclose(again[0], x1[2], atol=1e-6)  # the same image and index give the same view in any batch
    big = data_cfg("data.name=fake", "data.image_size=32", "data.cache_max_gb=1e-6")
    d = two_view_data(big, 0)
    assert d.kind == "crops" and "more than data.cache_max_gb" in d.reason
    make_tree(str(tmp_path / "train"), size=40)
    folder = data_cfg("data.name=imagefolder", f"data.root={tmp_path}", "data.image_size=32")
    d = two_view_data(folder, 0)
    assert d.kind == "crops" and "larger than data.image_size=32" in d.reason
    assert two_view_data(data_cfg("data.name=imagefolder", f"data.root={tmp_path}", "data.image_size=32",
                                  "data.pipeline=pil"), 0).kind == "pil"
    with pytest.raises(UserError, match="data.pipeline=batched cannot hold.*larger.*use data.pipeline=crops"):
        two_view_data(data_cfg("data.name=imagefolder", f"data.root={tmp_path}", "data.image_size=32",
                               "data.pipeline=batched"), 0)


def test_decoded_cache_is_built_once_reused_and_skips_corrupt_files(tmp_path, monkeypatch):
    make_tree(str(tmp_path / "data" / "train"), per_class=3, size=16, corrupt={("a", 1)})
    cfg = data_cfg("data.name=imagefolder", f"data.root={tmp_path / 'data'}", "data.image_size=16",
                   f"data.cache_dir={tmp_path / 'cache'}")
    first, why = C.decoded_dataset(cfg, "train")
    assert why is None and first.image_shape == (16, 16) and int(first.bad.sum()) == 1
    files = os.listdir(tmp_path / "cache" / "decoded")
    assert len([f for f in files if f.endswith(".npy")]) == 1

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")
    monkeypatch.setattr(C, "_decode_all", no_decoding)
    second, _ = C.decoded_dataset(cfg, "train")
    assert isinstance(second.images, np.memmap) and np.array_equal(np.asarray(second.images), first.images)
    (imgs, idx), labels, n_bad = second.__getitems__([0, 1, 2])
    assert int(n_bad) == 1 and torch.equal(imgs[1], imgs[2])  # the corrupt image's place: the next readable one
    assert labels.tolist() == [0, 0, 0] and idx.tolist() == [0, 1, 2]
    # a changed file gives a new key: decoded again
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "data" / "train" / "b" / "0.png")
    monkeypatch.undo()
    third, _ = C.decoded_dataset(cfg, "train")
    assert not np.array_equal(np.asarray(third.images), first.images)
    assert len([f for f in os.listdir(tmp_path / "cache" / "decoded") if f.endswith(".npy")]) == 2


def test_evaluation_images_from_the_decoded_cache_equal_the_pil_transform(tmp_path):
    from ssl_bocb.data import build_dataset, eval_transform
    from ssl_bocb.data.pipeline import NormalisedImages, eval_images
    cfg = data_cfg("data.name=fake", "data.image_size=32")
    fast, slow = eval_images(cfg, "test", subset=3), build_dataset(cfg, "test", eval_transform(cfg), subset=3)
    assert isinstance(fast, NormalisedImages) and len(fast) == len(slow) == 12 and fast.targets == slow.targets
    x, labels, n_bad = fast.__getitems__(list(range(12)))
    ref = torch.stack([slow[i][0] for i in range(12)])
    assert x.shape == ref.shape and torch.allclose(x, ref, atol=1e-5) and int(n_bad) == 0
    assert labels.tolist() == slow.targets
    assert not isinstance(eval_images(data_cfg("data.name=fake", "data.image_size=32", "data.pipeline=pil"), "test"),
                          NormalisedImages)
    make_tree(str(tmp_path / "test"), size=40)  # larger than the crop: resize + centre crop, the PIL transform
    big = data_cfg("data.name=imagefolder", f"data.root={tmp_path}", "data.image_size=32")
    assert not isinstance(eval_images(big, "test"), NormalisedImages)


def test_the_one_upload_path_equals_the_reference_views():
    """__call__ (parameters and row numbers packed host-side, one copy each) gives the views of view() with the
    per-view tensors of params(), bit for bit; the positions arrive as a host array from the decoded dataset."""
    aug = B.BatchedTwoViews(16, 0.2, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), blur=True, solarize=True, seed=11)
    u8 = torch.randint(0, 256, (12, 20, 20, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    index = np.arange(100, 112)
    v1, v2 = aug(u8, index, 3)
    x = u8.permute(0, 3, 1, 2).float().div_(255)
    p1, p2 = aug.params(index.tolist(), 3, 20, 20)
    assert torch.equal(v1, aug.view(x, p1)) and torch.equal(v2, aug.view(x, p2))
    (images, idx), _, _ = DecodedImages(u8.numpy(), [0] * 12, ["a"]).__getitems__([3, 5])
    assert isinstance(idx, np.ndarray) and idx.tolist() == [3, 5]
