"""``ssl-bocb <command> [args]``: the installed entry point of every command (``python -m ssl_bocb`` is the same).

    ssl-bocb pretrain --config quickstart                  # = python tools/pretrain.py --config configs/quickstart.yaml
    accelerate launch -m ssl_bocb pretrain --config cifar10_resnet18
    ssl-bocb recipes                                        # the shipped recipes, by name
"""
import importlib
import sys

# command -> (module of ssl_bocb.cli, one line of help)
COMMANDS = {
    "pretrain": ("pretrain", "MoCo v3 pretraining (accelerate launch -m ssl_bocb pretrain for several processes)"),
    "knn": ("knn", "kNN evaluation of a pretrained backbone or a run folder"),
    "linprobe": ("linprobe", "linear probe on frozen features"),
    "finetune": ("finetune", "fine-tune the whole network on a labelled set"),
    "quickstart": ("quickstart", "pretrain, then kNN and a linear probe against random init, side by side"),
    "sweep": ("sweep", "plan, run, collect or submit (SLURM) a sweep of cells"),
    "analyze": ("analyze", "tables, figures and BOCB statistics of a sweep's results"),
    "floors": ("floors", "the kNN floors of a study: raw pixels and random-init backbones"),
    "export": ("export", "a timm-loadable backbone folder (and the Hugging Face Hub, if asked)"),
    "optimizers": ("optimizers", "the optimizer table"),
    "recipes": ("recipes", "the shipped recipes and sweep files, by name"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: ssl-bocb <command> [--help] [args ...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from .. import __version__
        print(f"ssl-bocb {__version__}")
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "`ssl-bocb --help` lists the commands"
        print(f"error: unknown command '{name}'; {hint}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"ssl-bocb {name}"] + rest  # argparse's usage line names the command
    module = importlib.import_module(f"ssl_bocb.cli.{COMMANDS[name][0]}")
    module.main(rest)
