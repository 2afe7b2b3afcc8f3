"""Run by tests/engine/test_scaleout.py under `accelerate launch --multi_gpu --num_processes N` (gloo on CPU processes).
Each process writes what it saw to <out>/rank<i>.json.

    data <out> <data.root> <cache>   cold-cache start from an archive (unpacks and decodes counted), the random
                                     streams after seeding, the kNN stage (where its neighbour search ran)
    sophia <out> <run> [noavg]       Sophia pretraining; a digest of the process's weights after every step
                                     (noavg: without the Hessian averaging, to show what it fixes)
"""
import hashlib
import json
import os
import sys
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from ssl_bocb import config  # noqa: E402


def counted(module, name, counts, key):
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        counts[key] += 1
        return original(*args, **kwargs)
    setattr(module, name, wrapper)


def data_scenario(out, root, cache):
    from accelerate.utils import set_seed

    from ssl_bocb.data import cache as cache_mod
    from ssl_bocb.data.pipeline import eval_images, two_view_data
    from ssl_bocb.engine.setup import make_accelerator, seed_process_streams
    from ssl_bocb.eval import stages
    counts = dict(unpacks=0, decodes=0, knn_searches=0)
    counted(tarfile, "open", counts, "unpacks")
    counted(cache_mod, "_decode_all", counts, "decodes")
    counted(stages, "knn_classify", counts, "knn_searches")
    data = ["data.name=imagenette", f"data.root={root}", f"data.cache_dir={cache}", "data.image_size=16",
            "data.test_split=val",
            "data.subset=0", "data.num_workers=0"]
    cfg = config.load(config.PretrainConfig, [], data)
    acc = make_accelerator(cfg.train)
    train = two_view_data(cfg.data, 0).dataset
    test = eval_images(cfg.data, "val")
    images = hashlib.sha256(train.images[:].tobytes() + test.images.images[:].tobytes()).hexdigest()
    set_seed(0)
    seed_process_streams(acc, 0)
    draws = torch.rand(3).tolist()
    knn = stages.run_knn(config.load(config.EvalConfig, [], data + [
        "model.backbone=resnet18", f"output_dir={os.path.join(out, 'knn')}", "cache_features=false",
        "knn.k=3", "knn.ks=[3]", "batch_size=4"]))
    write(out, acc.process_index, dict(counts, images=images, memmapped=isinstance(train.images, __import__(
        "numpy").memmap), draws=draws, knn_top1=knn["top1"], n_train=len(train)))


def sophia_scenario(out, run_dir, noavg):
    from ssl_bocb.engine import loop as loop_mod
    from ssl_bocb.tasks import pretrain
    from ssl_bocb.optim import hessian
    if noavg:
        hessian.average_hessian_across_processes = lambda optimizer: None
    digests, step = [], loop_mod.TrainLoop.train_step

    def recorded(self, batch, epoch):
        outcome = step(self, batch, epoch)
        h = hashlib.sha256()
        for p in self.task.model.parameters():
            h.update(p.detach().cpu().numpy().tobytes())
        digests.append(h.hexdigest())
        return outcome
    loop_mod.TrainLoop.train_step = recorded
    optim = os.environ.get("MP_OPTIM", "optim.name=sophia;optim.kwargs={update_period: 2}")  # another to compare
    cfg = config.load(config.PretrainConfig, [], [
        "data.name=fake", "data.num_workers=0", "model.hidden_dim=64", "model.out_dim=32", "train.batch_size=16",
        "train.epochs=3", "train.warmup_epochs=1", "train.log_every=1",
        "model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs={img_size: 32, patch_size: 8, depth: 2}",
        f"output_dir={run_dir}"] + optim.split(";"))
    pretrain(cfg)
    write(out, int(os.environ["RANK"]), dict(digests=digests))


def write(out, index, record):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{index}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    scenario, out, *rest = sys.argv[1:]
    if scenario == "data":
        data_scenario(out, *rest)
    else:
        sophia_scenario(out, rest[0], rest[1:] == ["noavg"])
