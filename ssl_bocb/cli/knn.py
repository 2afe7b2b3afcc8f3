"""kNN evaluation (DINO protocol) of a pretrained or random-init backbone.

    python tools/knn.py checkpoint=runs/quickstart-<time> data.root=../shared/data
    accelerate launch tools/knn.py --config configs/eval/cifar10.yaml checkpoint=<run> [key=value ...]
"""

from ssl_bocb import config
from ssl_bocb.cli import parse_args
from ssl_bocb.errors import cli_main
from ssl_bocb.eval.stages import run_knn


@cli_main
def main(argv=None):
    files, overrides, _ = parse_args("kNN evaluation (DINO protocol) of a pretrained or random-init backbone",
                                     argv, config.EvalConfig)
    run_knn(config.load(config.EvalConfig, files, overrides))
