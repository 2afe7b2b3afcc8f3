"""Fine-tune a pretrained (or random-init) backbone on a downstream dataset.

    python tools/finetune.py --config configs/eval/imagenette64.yaml checkpoint=runs/quickstart-<time>
    accelerate launch tools/finetune.py --config configs/eval/imagenette64.yaml checkpoint=<run> \
        finetune.optim.name=lars finetune.optim.base_lr=0.1
"""

from ssl_bocb import config
from ssl_bocb.cli import parse_args
from ssl_bocb.errors import cli_main
from ssl_bocb.tasks import run_finetune


@cli_main
def main(argv=None):
    files, overrides, _ = parse_args("Fine-tune a backbone on a labelled downstream dataset", argv, config.EvalConfig)
    run_finetune(config.load(config.EvalConfig, files, overrides))
