#!/usr/bin/env python
"""Fine-tune a pretrained (or random-init) backbone on a downstream dataset.

    python tools/finetune.py --config configs/eval/imagenette64.yaml checkpoint=runs/quickstart-<time>
    accelerate launch tools/finetune.py --config configs/eval/imagenette64.yaml checkpoint=<run> \
        finetune.optim.name=lars finetune.optim.base_lr=0.1
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, when not installed

from ssl_bocb.cli.finetune import main  # noqa: E402

if __name__ == "__main__":
    main()
