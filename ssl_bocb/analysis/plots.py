"""PNG figures of what people would rather look at than read."""
import json
import os

from ..files import read_jsonl  # noqa: F401  (the figures read the run's logs)


def read_summary(run_dir: str) -> dict:
    """A run's summary.json (status and instability events); {} when it has none. It is written atomically, so
    only a hand-edited file is unreadable, and that too reads as none."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def training_curves(run_dir: str, out_png: str = None) -> str:
    """Loss, lr / momentum, gradient norm per step and kNN monitor / test accuracy per epoch -> curves.png."""
    steps = read_jsonl(os.path.join(run_dir, "steps.jsonl"))
    epochs = read_jsonl(os.path.join(run_dir, "log.jsonl"))
    if not steps and not epochs:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    src = steps or epochs
    x = [r["step"] for r in src]
    axes[0].plot(x, [r["loss"] for r in src], lw=1)
    axes[0].set(title="loss", xlabel="step")
    axes[1].plot(x, [r["lr"] for r in src], label="lr")
    axes[1].set(title="learning rate", xlabel="step")
    if "momentum" in src[0]:
        ax = axes[1].twinx()
        ax.plot(x, [r["momentum"] for r in src], color="tab:orange", label="EMA momentum")
        ax.set_ylabel("EMA momentum", color="tab:orange")
    summary = read_summary(run_dir)
    if "grad_norm" in src[0]:
        layers = list(dict.fromkeys(k for r in src for k in r.get("layer_grad_norm", {})))
        blocks = [n for n in layers if n not in ("first_layer", "projector", "predictor")]
        cmap = plt.get_cmap("viridis")
        for n in layers:  # per layer: the first layer in red, the blocks shallow to deep, the heads dashed
            style = (dict(color="tab:red", lw=1.2) if n == "first_layer" else
                     dict(color="tab:orange", lw=1.0) if n == "stem" else
                     dict(color="0.4", lw=0.8, ls="--") if n in ("projector", "predictor") else
                     dict(color=cmap(blocks.index(n) / max(1, len(blocks) - 1)), lw=0.6, alpha=0.8))
            axes[2].plot(x, [r.get("layer_grad_norm", {}).get(n, float("nan")) for r in src], label=n, **style)
        axes[2].plot(x, [r["grad_norm"] for r in src], lw=1.2, color="k", label="global")
        for e in summary.get("grad_spikes_list", []):
            axes[2].axvline(e["step"], color="tab:red", lw=0.6, alpha=0.5)
        axes[2].set_yscale("log")
        if layers:
            shown = [h for h, n in zip(*axes[2].get_legend_handles_labels())
                     if n in ("global", "first_layer", "stem", "projector", "predictor")]
            axes[2].legend(handles=shown, fontsize=7, loc="best")
    n_spikes = (summary.get("events") or {}).get("grad_spikes")
    axes[2].set(title="gradient norm" + (f" ({n_spikes} spikes: red lines)" if n_spikes else ""), xlabel="step")
    acc_key = "knn_top1" if any("knn_top1" in r for r in epochs) else "top1"
    pts = [(r["epoch"], r[acc_key]) for r in epochs if acc_key in r]
    if pts:
        axes[3].plot(*zip(*pts), marker="o")
        for e in summary.get("knn_dips_list", []):
            axes[3].plot(e["epoch"], e["knn_top1"], "v", color="tab:red", ms=8)
    axes[3].set(title="kNN monitor top-1 (%)" if acc_key == "knn_top1" else "test top-1 (%)", xlabel="epoch")
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    out_png = out_png or os.path.join(run_dir, "curves.png")
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
