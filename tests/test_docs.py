"""The README stays true: CI runs its test command, and every config key is documented."""
import os
import re

import pytest

from conftest import REPO
from ssl_bocb import config


def readme():
    return open(os.path.join(REPO, "README.md")).read()


def quickstart_commands():
    return re.findall(r"```bash\n(python3 -m venv .venv[^\n]*)\n```", readme())


def test_ci_runs_the_readme_test_command():
    cmds = quickstart_commands()
    assert len(cmds) == 2
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert cmds[1] in ci.splitlines()


def test_every_config_key_is_in_the_readme():
    text = readme()
    keys = list(config.schema_keys(config.PretrainConfig))
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, missing


def test_every_eval_key_is_in_the_readme():
    text = readme()
    keys = [k for k in config.schema_keys(config.EvalConfig)
            if not k.startswith(("data.", "model.", "finetune.optim.", "finetune.stability."))]
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, missing
    assert "`finetune.optim.*`" in text and "`finetune.stability.*`" in text


@pytest.mark.slow
def test_readme_holds_the_optimizer_table_as_the_tool_prints_it():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "optimizers.py"), "--markdown"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out.count("\n") >= 26 and out in readme()


def test_every_sweep_file_key_and_ablation_overlay_is_in_the_readme():
    from ssl_bocb.sweep.plan import SweepConfig
    text = readme()
    missing = [k for k in config.schema_keys(SweepConfig) if f"{k.rsplit('.', 1)[-1]}:" not in text]
    assert not missing, missing
    overlays = sorted(os.listdir(os.path.join(REPO, "configs", "ablations")))
    assert len(overlays) >= 15
    missing = [f for f in overlays if f"`{f}`" not in text]
    assert not missing, missing


def test_every_analyze_option_is_in_the_readme():
    import re
    import subprocess
    import sys
    help_text = subprocess.run([sys.executable, os.path.join(REPO, "tools", "analyze.py"), "--help"],
                               capture_output=True, text=True, check=True, env=dict(os.environ, COLUMNS="200")).stdout
    options = sorted(set(re.findall(r"(--[a-z][a-z-]+)", help_text)) - {"--help"})
    assert len(options) >= 12
    missing = [o for o in options if f"`{o}" not in readme()]
    assert not missing, missing
