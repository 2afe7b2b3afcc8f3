"""The quickstart job: MoCo v3 pretraining, then kNN and a cached linear probe of the result and of the same
backbone at random init, printed side by side.

    python tools/quickstart.py                       # configs/quickstart.yaml
    python tools/quickstart.py --config configs/quickstart.yaml train.epochs=1
"""
from ssl_bocb import config, quickstart
from ssl_bocb.cli import parse_args
from ssl_bocb.errors import cli_main


@cli_main
def main(argv=None):
    files, overrides, name = parse_args("Quickstart: pretrain, then kNN and linear probe vs random init",
                                        argv, config.PretrainConfig)
    files = files or ["quickstart"]  # the shipped configs/quickstart.yaml
    name = name if name != "run" else "quickstart"
    quickstart.run(config.load(config.PretrainConfig, files, overrides), name)
