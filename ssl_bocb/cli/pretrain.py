"""MoCo v3 pretraining.

    accelerate launch tools/pretrain.py --config configs/cifar10_resnet18.yaml [key=value ...]
    python tools/pretrain.py --config configs/quickstart.yaml          # one process, no launcher needed
"""

from ssl_bocb import config
from ssl_bocb.cli import parse_args
from ssl_bocb.tasks import pretrain
from ssl_bocb.errors import cli_main


@cli_main
def main(argv=None):
    files, overrides, name = parse_args("MoCo v3 self-supervised pretraining", argv, config.PretrainConfig)
    cfg = config.load(config.PretrainConfig, files, overrides)
    pretrain(cfg, name)
