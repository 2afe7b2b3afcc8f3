"""Linear-probe evaluation (MoCo v3 protocol; cached or full) of a pretrained or random-init backbone.

    python tools/linprobe.py checkpoint=runs/quickstart-<time> linear.mode=full
    accelerate launch tools/linprobe.py --config configs/eval/cifar10.yaml checkpoint=<run> [key=value ...]
"""

from ssl_bocb import config
from ssl_bocb.cli import parse_args
from ssl_bocb.errors import cli_main
from ssl_bocb.eval.stages import run_linprobe


@cli_main
def main(argv=None):
    files, overrides, _ = parse_args("Linear-probe evaluation (MoCo v3 protocol; cached or full) of a pretrained or random-init backbone",
                                     argv, config.EvalConfig)
    run_linprobe(config.load(config.EvalConfig, files, overrides))
