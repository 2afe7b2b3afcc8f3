"""Linear probe (MoCo v3 protocol): a Linear head on a frozen backbone.

Head init N(0, 0.01), bias 0; SGD momentum 0.9, wd 0; cosine lr per epoch, no warmup; lr = base_lr * batch / 256
with base_lr 0.1 (CNN) or 3.0 (ViT). ``full`` runs RandomResizedCrop + flip images through the frozen backbone
in eval mode and checks afterwards that its weights did not change; ``cached`` trains the same head on cached
features of un-augmented images (seconds instead of hours; the fast variant for sweeps).
"""
import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.pipeline import worker_options
from ..optim.schedules import scaled_lr
from .features import weights_digest


def default_base_lr(family: str) -> float:
    return 3.0 if family == "vit" else 0.1


def make_head(in_dim: int, num_classes: int) -> nn.Linear:
    head = nn.Linear(in_dim, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def cosine_epoch_lr(lr: float, epoch: int, epochs: int) -> float:
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[float, float]:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    correct = top == labels[:, None]
    return 100.0 * correct[:, 0].float().mean().item(), 100.0 * correct.any(dim=1).float().mean().item()


@torch.no_grad()
def evaluate(model, loader, accelerator) -> Dict[str, float]:
    """Top-1 / top-5 (in %) of ``model`` (a module, put in eval mode, or any callable) over a prepared loader of
    (x, label, n_skipped) batches, gathered over processes without the padding of the last batch."""
    if isinstance(model, nn.Module):
        model.eval()
    logits, labels = [], []
    for x, y, _ in loader:
        with accelerator.autocast():
            out = model(x)
        out, y = accelerator.gather_for_metrics((out.float(), y))
        logits.append(out.cpu())
        labels.append(y.cpu())
    top1, top5 = topk_accuracy(torch.cat(logits), torch.cat(labels))
    return {"top1": top1, "top5": top5}


def train_linear_cached(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                        num_classes: int, epochs: int = 90, batch_size: int = 1024, base_lr: float = 0.1,
                        momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
                        device: torch.device = torch.device("cpu"), progress: bool = True) -> Dict:
    """Train the probe head on feature tensors [N, D]; returns top1 / top5 (in %) on the test features."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = make_head(train_f.shape[1], num_classes).to(device)
    lr = scaled_lr(base_lr, batch_size, "linear")
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    xs, ys = train_f.float().to(device), train_y.long().to(device)
    n = xs.shape[0]
    bar = tqdm(range(epochs), desc="linear probe (cached)", unit="epoch", disable=not progress, dynamic_ncols=True)
    for epoch in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_epoch_lr(lr, epoch, epochs)
        perm = torch.randperm(n, generator=g).to(device)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            loss = F.cross_entropy(head(xs[idx]), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    with torch.no_grad():
        top1, top5 = topk_accuracy(head(test_f.float().to(device)), test_y.long().to(device))
        train_top1, _ = topk_accuracy(head(xs), ys)
    return {"top1": top1, "top5": top5, "train_top1": train_top1, "lr": lr, "final_loss": loss.item()}


def linear_probe_full(backbone: nn.Module, train_ds, test_ds, accelerator, num_classes: int, epochs: int,
                      batch_size: int, base_lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                      num_workers: int = 2, seed: int = 0) -> Dict:
    """The full MoCo v3 probe. ``batch_size`` is global; every process takes its share."""
    before = weights_digest(backbone)
    backbone.requires_grad_(False)
    backbone.eval()
    backbone.to(accelerator.device)
    head = make_head(backbone.num_features, num_classes)
    lr = scaled_lr(base_lr, batch_size, "linear")
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    per_device = max(batch_size // accelerator.num_processes, 1)
    train_loader = DataLoader(train_ds, batch_size=per_device, shuffle=True, drop_last=False,
                              generator=torch.Generator().manual_seed(seed), **worker_options(num_workers))
    test_loader = DataLoader(test_ds, batch_size=per_device, shuffle=False, **worker_options(num_workers))
    head, opt, train_loader, test_loader = accelerator.prepare(head, opt, train_loader, test_loader)
    bar = tqdm(total=epochs * len(train_loader), desc="linear probe (full)", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    for epoch in range(epochs):
        train_ds.set_epoch(epoch)
        for group in opt.param_groups:
            group["lr"] = cosine_epoch_lr(lr, epoch, epochs)
        head.train()
        for x, y, _ in train_loader:
            with torch.no_grad(), accelerator.autocast():
                f = backbone(x)
            loss = F.cross_entropy(head(f.float()), y)
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            opt.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    head.eval()
    res = evaluate(lambda x: head(backbone(x).float()), test_loader, accelerator)
    top1, top5 = res["top1"], res["top5"]
    unchanged = weights_digest(backbone) == before
    if not unchanged:
        raise RuntimeError("the backbone's weights changed during the linear probe; this is a bug, please report it")
    return {"top1": top1, "top5": top5, "lr": lr, "backbone_unchanged": unchanged}
