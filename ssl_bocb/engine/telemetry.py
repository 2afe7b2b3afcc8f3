"""Instability telemetry of a pretraining run: per-layer gradient norms, spike / dip / non-finite events, and the
run's ``summary.json``.

Layers: the first layer (a ViT's patch projection, else the first convolution), each block (ViT ``block<i>``,
ResNet ``layer<s>.<b>``), what the backbone trains outside its blocks (``stem`` before them: class token, position
embedding, a ResNet's first BN; ``top`` after them: the final norm), the projector and the predictor. Their
gradient norms are computed on the device in one pass (one norm per tensor, summed per layer by index), so the
whole telemetry adds no host read per parameter: the training loop reads one small vector per step (loss, global
norm, layer norms), which is also what the non-finite guard decides on.

Rules (``stability.*`` settings; the same as the BOCB report's, see :mod:`ssl_bocb.engine.stability`):

- gradient spike: a step whose global gradient norm exceeds ``spike_factor`` x the median of the previous
  ``spike_window`` steps' norms (at least ``spike_min_history`` of them); consecutive spiking steps are one event.
  Each layer runs the same rule on its own norm; the event names the layer whose spike began first in the
  ``spike_window`` steps up to the event (ties: the shallower layer), or, when no layer spiked alone, the layer
  with the largest norm / median ratio at the event's step;
- loss spike: the same rule on the loss;
- kNN dip: a monitor reading more than ``dip_drop`` points below the best reading before it; consecutive dipping
  readings are one event;
- non-finite step: a non-finite loss or gradient; the step is skipped (no optimizer or momentum-encoder update).
  fp16 loss-scaler overflow skips are counted apart (``overflow_skips``).
"""
from __future__ import annotations

import logging
import math
import re
from collections import Counter
from typing import Dict, List, Optional

import torch
from torch import nn

from ..files import strict
from .stability import DipDetector, SpikeDetector

log = logging.getLogger(__name__)

MAX_LISTED = 200  # events listed one by one in summary.json (counts are always complete)
_BLOCK = re.compile(r"^(?:blocks|layers|stages)\.(\d+)\.|^(layer\d+)\.(\d+)\.")


def layer_names(model: nn.Module, params: List[nn.Parameter]) -> List[str]:
    """The telemetry layer of each of ``params`` (in order): of a MoCo model (``backbone`` with ``projector`` and
    ``predictor`` beside it), or of a classifier being fine-tuned (a timm model: its classifier is ``head``)."""
    from ..models.backbones import first_layer_parameters
    inner = getattr(model, "backbone", None)
    backbone = inner if isinstance(inner, nn.Module) else model
    try:
        first = {id(p) for p in first_layer_parameters(backbone)}
    except Exception:  # a backbone without a first convolution: no first-layer group
        first = set()
    classifier = set()
    if backbone is model and hasattr(model, "get_classifier"):
        classifier = {id(p) for p in model.get_classifier().parameters()}
    names, seen_block = {}, False
    for name, p in model.named_parameters():
        if id(p) in first:
            names[id(p)] = "first_layer"
            continue
        if id(p) in classifier:
            names[id(p)] = "head"
            continue
        head, _, rest = ("backbone", "", name) if backbone is model else name.partition(".")
        if head in ("projector", "predictor"):
            names[id(p)] = head
        elif head == "backbone":
            m = _BLOCK.match(rest)
            seen_block = seen_block or m is not None
            # outside the blocks: the stem (class token, position embedding, a ResNet's first BatchNorm) before
            # them, the final norm after them
            names[id(p)] = (("top" if seen_block else "stem") if m is None else
                            f"block{m.group(1)}" if m.group(1) is not None else f"{m.group(2)}.{m.group(3)}")
        else:
            names[id(p)] = head
    return [names.get(id(p), "other") for p in params]


class GradNorms:
    """Per-layer gradient L2 norms of ``params`` computed on their device, and the global norm they sum to."""

    def __init__(self, model: nn.Module, params: List[nn.Parameter]):
        per_param = layer_names(model, params)
        order = list(dict.fromkeys(per_param))
        # the first layer first, the heads last, the blocks in the order the model holds them
        order.sort(key=lambda n: (n != "first_layer", n in ("projector", "predictor", "head"), n == "predictor"))
        self.names = order
        self.params = params
        self._group = [order.index(n) for n in per_param]
        self._index = None

    def __call__(self) -> torch.Tensor:
        """A float32 vector: the global norm, then one norm per layer (0 for a layer without gradients)."""
        present = [(p.grad, g) for p, g in zip(self.params, self._group) if p.grad is not None]
        device = self.params[0].device
        if not present:
            return torch.zeros(len(self.names) + 1, device=device)
        grads, groups = zip(*present)
        if self._index is None or self._index.numel() != len(groups):
            self._index = torch.tensor(groups, device=device)
        norms = torch._foreach_norm(list(grads))
        sq = torch.stack([n.float() for n in norms]).square()
        per_layer = torch.zeros(len(self.names), device=device).index_add_(0, self._index, sq)
        return torch.cat([per_layer.sum().view(1), per_layer]).sqrt()


class RunEvents:
    """The online detectors and event counts of one run; ``state()`` goes into each checkpoint's meta.json so that
    a resumed run continues the same counts and the same detection windows."""

    def __init__(self, layers: List[str], factor: float, window: int, min_history: int, dip_drop: float,
                 monitor: bool, dip_metric: str = "knn_top1"):
        self.layers = layers
        self.rules = dict(spike_factor=factor, spike_window=window, spike_min_history=min_history,
                          dip_drop=dip_drop)
        self.grad = SpikeDetector(factor, window, min_history)
        self.loss = SpikeDetector(factor, window, min_history)
        self.per_layer = {n: SpikeDetector(factor, window, min_history) for n in layers}
        self.dip = DipDetector(dip_drop)
        self.monitor = monitor
        # the epoch-end value watched for dips: pretraining's kNN monitor, a fine-tune's validation top-1
        self.dip_metric = dip_metric
        self.dip_key = "knn_dips" if dip_metric == "knn_top1" else f"{dip_metric}_dips"
        self.counts = {"grad_spikes": 0, "loss_spikes": 0, self.dip_key: 0, "nonfinite_steps": 0, "overflow_skips": 0,
                       "rollbacks": 0}
        self.lists = {"grad_spikes": [], "loss_spikes": [], self.dip_key: [], "nonfinite_steps": [], "rollbacks": []}
        self.first_layers = Counter()
        self.layer_onset: Dict[str, Optional[int]] = {n: None for n in layers}  # start of each layer's spike run
        self.in_spike = dict(grad=False, loss=False, knn=False)
        self.lr_scale = 1.0

    def _add(self, kind: str, entry: Dict) -> None:
        self.counts[kind] += 1
        if len(self.lists[kind]) < MAX_LISTED:
            self.lists[kind].append(entry)

    def observe(self, step: int, loss: float, grad_norm: float, layer_norms: List[float]) -> List[Dict]:
        """Feed one applied step's values; returns the events that began at it."""
        out = []
        ratios = {}
        # each layer's spike run starts at its first spiking step; the onset is kept for a window after the layer
        # stops spiking, so that a global spike a few steps later can still name it
        for n, v in zip(self.layers, layer_norms):
            spiking, med = self.per_layer[n].update(v)
            ratios[n] = v / med if med and math.isfinite(med) else 0.0
            if spiking and self.layer_onset[n] is None:
                self.layer_onset[n] = step
            elif not spiking and self.layer_onset[n] is not None and step - self.layer_onset[n] > self.grad.window:
                self.layer_onset[n] = None
        spiking, med = self.grad.update(grad_norm)
        if spiking and not self.in_spike["grad"]:
            recent = [(onset, i, n) for i, n in enumerate(self.layers)
                      if (onset := self.layer_onset[n]) is not None and step - onset <= self.grad.window]
            first = min(recent)[2] if recent else max(ratios, key=ratios.get)
            self.first_layers[first] += 1
            ev = dict(step=step, grad_norm=grad_norm, median=med, first_layer=first,
                      layer_onsets={n: o for o, _, n in sorted(recent)})
            self._add("grad_spikes", ev)
            out.append(dict(kind="grad_spike", **ev))
        self.in_spike["grad"] = spiking
        spiking, med = self.loss.update(loss)
        if spiking and not self.in_spike["loss"]:
            ev = dict(step=step, loss=loss, median=med)
            self._add("loss_spikes", ev)
            out.append(dict(kind="loss_spike", **ev))
        self.in_spike["loss"] = spiking
        return out

    def observe_dip(self, step: int, epoch: int, value: float) -> List[Dict]:
        """Feed one epoch-end reading of the watched metric; returns the dip event that began at it, if any."""
        best = self.dip.best
        dipping = self.dip.update(value)
        out = []
        if dipping and not self.in_spike["knn"]:
            ev = {"step": step, "epoch": epoch, self.dip_metric: value, "best": best}
            self._add(self.dip_key, ev)
            out.append(dict(kind="dip", metric=self.dip_metric, value=value, **ev))
        self.in_spike["knn"] = dipping
        return out

    def nonfinite(self, step: int, loss: float, grad_norm: float) -> None:
        self._add("nonfinite_steps", dict(step=step, loss=loss, grad_norm=grad_norm))

    def overflow(self) -> None:
        self.counts["overflow_skips"] += 1

    def rollback(self, at_step: int, to_step: int, checkpoint: str, factor: float) -> None:
        self.lr_scale *= factor
        self._add("rollbacks", dict(at_step=at_step, to_step=to_step, checkpoint=checkpoint, lr_scale=self.lr_scale))

    # --- persistence --------------------------------------------------------------------------------------------
    def state(self) -> Dict:
        return dict(counts=dict(self.counts), lists={k: list(v) for k, v in self.lists.items()},
                    first_layers=dict(self.first_layers), layer_onset=dict(self.layer_onset),
                    in_spike=dict(self.in_spike), lr_scale=self.lr_scale,
                    best_knn=self.dip.best if math.isfinite(self.dip.best) else None,
                    grad=self.grad.state(), loss=self.loss.state(),
                    per_layer={n: d.state() for n, d in self.per_layer.items()})

    def load(self, state: Dict) -> None:
        self.counts.update(state["counts"])
        self.lists.update({k: list(v) for k, v in state["lists"].items()})
        self.first_layers = Counter(state["first_layers"])
        self.layer_onset.update({k: v for k, v in state["layer_onset"].items() if k in self.layer_onset})
        self.in_spike.update(state["in_spike"])
        self.lr_scale = state["lr_scale"]
        self.dip.best = -math.inf if state["best_knn"] is None else state["best_knn"]
        self.grad.load(state["grad"])
        self.loss.load(state["loss"])
        for n, s in state["per_layer"].items():
            if n in self.per_layer:
                self.per_layer[n].load(s)

    def summary(self, status: str, step: int, total_steps: int, extra: Optional[Dict] = None) -> Dict:
        """What ``summary.json`` holds: the counts (``events``), the events one by one (the first MAX_LISTED of each
        kind), how often each layer spiked first, the lr scale left by rollbacks, and the rules."""
        events = dict(self.counts)
        if not self.monitor:
            events[self.dip_key] = None
        out = dict(status=status, step=step, total_steps=total_steps, events=events,
                   first_layer_counts=dict(self.first_layers.most_common()), lr_scale=self.lr_scale,
                   rules=self.rules, layers=self.layers,
                   **{f"{k}_list": v for k, v in self.lists.items()})
        out.update(extra or {})
        return strict_json(out)


def strict_json(o):
    """``o`` with every non-finite float written as a string ("nan", "inf"), so that the file is strict JSON and
    the values stay readable (a diverged step's loss)."""
    return strict(o, nonfinite="string")
