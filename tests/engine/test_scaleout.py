"""Scale-out correctness shown on CPU processes: host reads only at the read points in log mode, per-process random
streams, Sophia's replicas, the cold-cache start and the kNN stage on several processes, the torch floor."""
import os
import sys

import pytest
import torch

from conftest import TINY
from ssl_bocb import config
from ssl_bocb.tasks import pretrain

P = config.PretrainConfig

# Where train.host_reads=log reads the device on purpose inside a step: the window's flush (one read per log step).
# (The epoch end, checkpoints and the summary read too, outside the steps.) Any other read in a step stalls a GPU.
READ_POINTS = {("guard.py", "flush")}
# Reads of tensors that stay on the host on a GPU too: the samplers' index tensors (torch.randperm(...).tolist()) and
# torch.optim's step counters (kept on the CPU unless capturable=True).
HOST_SIDE = (os.sep + os.path.join("torch", "utils", "data") + os.sep, os.path.join("accelerate", "data_loader.py"),
             os.sep + os.path.join("torch", "optim") + os.sep)


class ReadSpy:
    """Wraps the Tensor methods that copy a value to the host and records each call made outside the read points
    while a step runs (between the loop's ``train_step`` entry and exit)."""
    METHODS = ("item", "tolist", "__bool__", "nonzero", "numpy", "__int__", "__float__")

    def __init__(self, monkeypatch):
        self.reads = []
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))
        original_nonzero = torch.nonzero
        monkeypatch.setattr(torch, "nonzero", self._wrap("torch.nonzero", original_nonzero))

    def _wrap(self, name, original):
        spy = self

        def wrapped(*args, **kwargs):
            spy.check(name)
            return original(*args, **kwargs)
        return wrapped

    def check(self, name):
        frames, f = [], sys._getframe(2)
        while f is not None:
            frames.append((os.path.basename(f.f_code.co_filename), f.f_code.co_name, f.f_lineno, f.f_code.co_filename))
            f = f.f_back
        if not any(fn == "train_step" and base == "loop.py" for base, fn, _, _ in frames):
            return  # not inside a training step
        if any((base, fn) in READ_POINTS for base, fn, _, _ in frames):
            return
        if any(h in frames[0][3] for h in HOST_SIDE):
            return
        self.reads.append(f"{name} at " + " <- ".join(f"{b}:{line} {fn}" for b, fn, line, _ in frames[:6]))


@pytest.mark.parametrize("extra", [
    ["model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs={img_size: 32, patch_size: 8, depth: 2}"],
    ["optim.sam.rho=0.05", "optim.grad_clip=1.0"],
], ids=["vit-batched-views", "sam-clip"])
@pytest.mark.slow
def test_log_mode_reads_the_host_only_at_read_points(tmp_path, monkeypatch, extra):
    spy = ReadSpy(monkeypatch)
    out = pretrain(config.load(P, [], TINY + [f"output_dir={tmp_path / 'r'}", "train.host_reads=log",
                                               "train.log_every=4", *extra]))
    assert os.path.isfile(os.path.join(out, "backbone.safetensors"))
    assert not spy.reads, "host reads outside the read points:\n" + "\n".join(spy.reads[:10])


def test_the_spy_catches_a_read_in_a_step(tmp_path, monkeypatch):
    """The check above can fail: an .item() added to the loss is caught."""
    spy = ReadSpy(monkeypatch)
    step_mod = sys.modules["ssl_bocb.tasks.pretrain"]  # the module (ssl_bocb.tasks.pretrain names the function)
    original = step_mod.contrastive_loss

    def loss_with_a_read(*args, **kwargs):
        loss = original(*args, **kwargs)
        loss.item()
        return loss
    monkeypatch.setattr(step_mod, "contrastive_loss", loss_with_a_read)
    pretrain(config.load(P, [], TINY + [f"output_dir={tmp_path / 'r'}", "train.host_reads=log", "train.log_every=4",
                                        "train.stop_at_step=2"]))
    assert spy.reads and spy.reads[0].startswith("item at ")


# The first torch release with each API the code calls; the floor in setup.cfg must cover every one in use.
TORCH_APIS = {"torch.accelerator": (2, 6), "get_total_norm": (2, 6), "clip_grads_with_norm_": (2, 6),
              "sdpa_kernel": (2, 3), "part.compile()": (2, 2)}


def test_torch_floor_covers_the_apis_the_code_calls():
    import configparser
    import re
    from conftest import REPO
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    reqs = [r.strip() for r in cfg["options"]["install_requires"].splitlines()]
    floor = next(tuple(int(x) for x in r.split(">=")[1].split(".")[:2]) for r in reqs if re.match(r"torch>=", r))
    code = ""
    for folder in ("ssl_bocb", "tools"):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            code += "".join(open(os.path.join(root, f)).read() for f in files if f.endswith(".py"))
    used = {api: v for api, v in TORCH_APIS.items() if api in code}
    assert "get_total_norm" in used and "torch.accelerator" in used  # the scan sees the code
    assert floor >= max(used.values()), f"setup.cfg admits torch {floor}, the code calls {used}"


def _launch(n, *args, timeout=600):
    import subprocess
    from conftest import REPO
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           os.path.join(REPO, "tests", "engine", "mp_worker.py"), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _ranks(out, n):
    import json
    return [json.load(open(os.path.join(out, f"rank{i}.json"))) for i in range(n)]


def _archive(root):
    """A small Imagenette-style archive: imagenette/{train,val}/<class>/*.png inside imagenette64-jpeg.tar.gz."""
    import tarfile
    from conftest import make_tree
    tree = os.path.join(root, "tree", "imagenette")
    make_tree(os.path.join(tree, "train"), per_class=8, size=16)
    make_tree(os.path.join(tree, "val"), per_class=4, size=16)
    with tarfile.open(os.path.join(root, "imagenette64-jpeg.tar.gz"), "w:gz") as tar:
        tar.add(tree, arcname="imagenette")


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_cold_cache_start_on_several_processes(tmp_path, n):
    """The archive is unpacked and each split decoded once (by the node's main process), the others wait and
    memory-map the same files; nothing is left behind. The random streams differ per process (process 0 keeps the
    seed's own), and the kNN stage searches once, on the main process, every process getting its result."""
    _archive(tmp_path)
    cache = tmp_path / "cache"
    _launch(n, "data", tmp_path / "out", tmp_path, cache)
    ranks = _ranks(tmp_path / "out", n)
    assert sum(r["unpacks"] for r in ranks) == 1 and ranks[0]["unpacks"] == 1
    assert sum(r["decodes"] for r in ranks) == 2 and ranks[0]["decodes"] == 2  # train and val, once each
    assert len({r["images"] for r in ranks}) == 1 and all(r["memmapped"] for r in ranks)
    assert all(r["n_train"] == 16 for r in ranks)
    assert sorted(os.listdir(cache)) == ["decoded", "imagenette64-jpeg"]
    assert all(not f.startswith(".") and not f.endswith(".tmp") for f in os.listdir(cache / "decoded"))
    assert len(os.listdir(cache / "decoded")) == 4  # .npy + .json per split
    torch.manual_seed(0)
    assert ranks[0]["draws"] == torch.rand(3).tolist()
    assert len({tuple(r["draws"]) for r in ranks}) == n
    assert [r["knn_searches"] for r in ranks] == [1] + [0] * (n - 1)
    assert len({r["knn_top1"] for r in ranks}) == 1
    assert os.path.isfile(tmp_path / "out" / "knn" / "knn_metrics.json")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sophia_replicas_stay_identical_under_ddp(tmp_path):
    """Sophia's Hessian estimate averaged over the processes keeps the two replicas' weights bit-identical at every
    step; without the averaging (each process its own estimate and probes) they drift apart."""
    _launch(2, "sophia", tmp_path / "avg", tmp_path / "run_avg")
    a, b = _ranks(tmp_path / "avg", 2)
    assert len(a["digests"]) == 12 and a["digests"] == b["digests"]
    _launch(2, "sophia", tmp_path / "noavg", tmp_path / "run_noavg", "noavg")
    a, b = _ranks(tmp_path / "noavg", 2)
    assert a["digests"][-1] != b["digests"][-1]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_resume_continues_every_process_stream(tmp_path):
    """Drop-path draws from each process's own stream; a two-process run stopped mid-epoch and resumed on two
    processes logs the same losses and ends with the same weights as the uninterrupted run."""
    import json
    import subprocess

    import safetensors.torch
    from conftest import REPO

    def launch(out, *extra):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               os.path.join(REPO, "tools", "pretrain.py"), *TINY, "model.backbone_kwargs={drop_path_rate: 0.3}",
               "train.save_every_steps=2", f"output_dir={out}", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch(tmp_path / "full")
    launch(tmp_path / "part", "train.stop_at_step=3")
    launch(tmp_path / "part", "resume=auto")
    rows = [[json.loads(line)["loss"] for line in open(tmp_path / d / "steps.jsonl")] for d in ("full", "part")]
    assert len(rows[0]) == 8 and rows[0] == rows[1]
    a, b = (safetensors.torch.load_file(tmp_path / d / "backbone.safetensors") for d in ("full", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_persistent_workers_see_each_epoch():
    """Workers are forked once per loader (persistent) and still augment each epoch differently: the epoch lives in
    shared memory. Their batches equal those of a loader without workers, epoch by epoch."""
    from torch.utils.data import DataLoader

    from ssl_bocb.data import build_dataset, pretrain_transform
    from ssl_bocb.data.pipeline import two_view_data, worker_options
    cfg = config.load(P, [], TINY + ["data.pipeline=pil", "data.num_workers=2"]).data
    assert two_view_data(cfg, 0).loader_kwargs == dict(num_workers=2, persistent_workers=True)

    def epochs(num_workers):
        ds = build_dataset(cfg, "train", pretrain_transform(cfg), seed=0, subset=4)
        loader = DataLoader(ds, batch_size=8, **worker_options(num_workers))
        out = []
        for epoch in range(2):
            ds.set_epoch(epoch)
            out.append(torch.cat([x1 for (x1, _), _, _ in loader]))
        return out, loader
    (a0, a1), loader = epochs(2)
    assert loader.persistent_workers and loader._iterator is not None  # the same workers served both epochs
    b0, b1 = epochs(0)[0]
    assert torch.equal(a0, b0) and torch.equal(a1, b1) and not torch.equal(a0, a1)


def test_feature_loader_keeps_workers_only_where_the_dataset_uses_them():
    """Decoded evaluation images need no workers (and a loader without workers cannot persist them); PIL ones keep
    theirs alive across passes."""
    from ssl_bocb.data.pipeline import eval_images
    from ssl_bocb.engine.setup import make_accelerator
    from ssl_bocb.eval.features import feature_loader
    cfg = config.load(P, [], TINY + ["data.num_workers=2"])
    acc = make_accelerator(cfg.train)
    decoded = feature_loader(eval_images(cfg.data, "test"), acc, 8, 2)
    assert decoded.num_workers == 0 and not decoded.persistent_workers and len(list(decoded)) > 0
    cfg.data.pipeline = "pil"
    pil = feature_loader(eval_images(cfg.data, "test"), acc, 8, 2)
    assert pil.num_workers == 2 and pil.persistent_workers and len(list(pil)) > 0


def test_a_file_that_vanishes_while_decoding_stops_the_run_and_is_not_cached(tmp_path, monkeypatch):
    """Listed, then gone (another process changing the folder): one clear error, and no decoded cache that would
    count it as unreadable in every later run."""
    from ssl_bocb.data import cache as cache_mod
    from ssl_bocb.errors import UserError
    from conftest import make_tree
    make_tree(tmp_path / "data" / "train", per_class=4, size=16)
    cfg = config.load(P, [], ["data.name=imagefolder", f"data.root={tmp_path / 'data'}", "data.image_size=16",
                              f"data.cache_dir={tmp_path / 'cache'}"]).data
    gone = str(tmp_path / "data" / "train" / "b" / "1.png")
    key = cache_mod._file_key

    def key_then_remove(*args):  # the files were listed and their key made; then one goes
        k = key(*args)
        os.remove(gone)
        return k
    monkeypatch.setattr(cache_mod, "_file_key", key_then_remove)
    with pytest.raises(UserError, match="disappeared while decoding"):
        cache_mod.decoded_dataset(cfg, "train")
    assert not os.path.exists(tmp_path / "cache" / "decoded") or not os.listdir(tmp_path / "cache" / "decoded")

