import os
import subprocess
import sys

import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("SSL_BOCB_TEST_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))

# train.mixed_precision=auto picks bf16 on CPUs with AVX-512 BF16 / AMX: the tests answer "emulated" everywhere, so
# that they compute in fp32 and give the same results on every CI machine (test_precision.py tests the detection).
os.environ["SSL_BOCB_CPU_BF16"] = "0"

# Tiny, fast pretraining settings on the synthetic dataset.
TINY = ["data.name=fake", "data.num_workers=0", "model.hidden_dim=64", "model.out_dim=32", "train.batch_size=16",
        "train.epochs=2", "train.warmup_epochs=1", "train.log_every=1", "optim.base_lr=1e-3"]


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need a CUDA device: without one they are reported as skipped, with the reason."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here): run the suite on a GPU host")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SSL_BOCB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def shared_data():
    if not os.path.isfile(os.path.join(SHARED_DATA, "cifar10-jpeg.tar.gz")):
        pytest.fail(f"shared test data missing at {SHARED_DATA} (set SSL_BOCB_TEST_DATA)")
    return SHARED_DATA


def run_tool(tool, *args, env=None, timeout=600):
    """Run tools/<tool>.py in a subprocess; returns CompletedProcess with text output."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=REPO)


def make_tree(root, classes=("a", "b"), per_class=3, size=16, corrupt=()):
    """An ImageFolder tree of small PNGs under ``root`` (one folder per class); ``corrupt``: (class, i) written as
    garbage."""
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            path = os.path.join(root, c, f"{i}.png")
            if (c, i) in corrupt:
                with open(path, "wb") as f:
                    f.write(b"not an image at all")
            else:
                color = (40 * i, 200 if c == "a" else 20, 90)
                Image.new("RGB", (size, size), color).save(path)
