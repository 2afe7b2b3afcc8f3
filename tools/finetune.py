#!/usr/bin/env python
"""Fine-tune a pretrained (or random-init) backbone on a downstream dataset.

Usage and options: ssl_bocb/cli/finetune.py (or --help). The same as `ssl-bocb finetune`."""
from ssl_bocb.cli.finetune import main

if __name__ == "__main__":
    main()
