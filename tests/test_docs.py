"""The docs stay true: CI runs the README's test command, every config key is documented, and the site builds."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from ssl_bocb import config

DOCS = os.path.join(REPO, "docs")
QUICKSTART = r"```bash\n(python3 -m venv .venv[^\n]*)\n```"


def readme():
    return open(os.path.join(REPO, "README.md")).read()


def doc(name):
    return open(os.path.join(DOCS, name)).read()


def doc_pages():
    """Every Markdown page under docs/, as a path relative to docs/."""
    pages = []
    for folder, _, files in os.walk(DOCS):
        pages += [os.path.relpath(os.path.join(folder, f), DOCS).replace(os.sep, "/") for f in files if f.endswith(".md")]
    return sorted(pages)


def quickstart_commands(text=None):
    return re.findall(QUICKSTART, readme() if text is None else text)


def slug(heading):
    """The anchor of a heading, as mkdocs (Python-Markdown's toc) and GitHub make it for plain ASCII headings."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[-\s]+", "-", text).strip("-")


def test_ci_runs_the_readme_test_command():
    cmds = quickstart_commands()
    assert len(cmds) == 2
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert cmds[1] in ci.splitlines()


def test_getting_started_holds_the_readme_quickstart_commands():
    assert quickstart_commands(doc("getting-started.md")) == quickstart_commands()


def test_readme_is_at_most_15000_bytes():
    size = os.path.getsize(os.path.join(REPO, "README.md"))
    assert size <= 15000, f"README.md is {size} bytes; move text into docs/"


def test_readme_links_into_docs_resolve():
    links = re.findall(r"\]\(((?:docs/|CHANGELOG)[^)#\s]*)(?:#([^)\s]+))?\)", readme())
    assert len(links) >= 15
    bad = []
    for path, anchor in links:
        target = os.path.join(REPO, path)
        if not os.path.isfile(target):
            bad.append(path)
        elif anchor:
            anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", open(target).read(), re.M)}
            if anchor not in anchors:
                bad.append(f"{path}#{anchor}")
    assert not bad, bad


def test_every_docs_page_is_in_the_nav():
    import yaml

    def entries(nav):
        if isinstance(nav, str):
            return [nav]
        if isinstance(nav, list):
            return [e for item in nav for e in entries(item)]
        if isinstance(nav, dict):
            return [e for value in nav.values() for e in entries(value)]
        return []

    cfg = yaml.safe_load(open(os.path.join(REPO, "mkdocs.yml")))
    nav = [e for e in entries(cfg["nav"]) if not re.match(r"[a-z]+://", e)]
    pages = doc_pages()
    assert len(pages) >= 15
    assert sorted(set(pages) - set(nav)) == [], "pages missing from mkdocs.yml's nav"
    assert sorted(set(nav) - set(pages)) == [], "nav entries without a page"


@pytest.mark.slow
def test_docs_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", os.path.join(REPO, "mkdocs.yml"),
                           "-d", str(site)], capture_output=True, text=True, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in doc_pages():
        name = page[:-len(".md")]
        built = site / ("index.html" if name == "index" else os.path.join(name, "index.html"))
        assert built.is_file(), page


def test_every_config_key_is_in_the_docs():
    text = doc("config.md")
    keys = list(config.schema_keys(config.PretrainConfig))
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, missing


def test_every_eval_key_is_in_the_docs():
    text = doc("config.md")
    keys = [k for k in config.schema_keys(config.EvalConfig)
            if not k.startswith(("data.", "model.", "finetune.optim.", "finetune.stability."))]
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, missing
    assert "`finetune.optim.*`" in text and "`finetune.stability.*`" in text


@pytest.mark.slow
def test_docs_hold_the_optimizer_table_as_the_tool_prints_it():
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "optimizers.py"), "--markdown"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out.count("\n") >= 26 and out in doc("optimizers.md")


def test_every_sweep_file_key_and_ablation_overlay_is_in_the_docs():
    from ssl_bocb.sweep.plan import SweepConfig
    text = doc("sweeps.md")
    missing = [k for k in config.schema_keys(SweepConfig) if f"{k.rsplit('.', 1)[-1]}:" not in text]
    assert not missing, missing
    text = doc("ablations.md")
    overlays = sorted(os.listdir(os.path.join(REPO, "configs", "ablations")))
    assert len(overlays) >= 15
    missing = [f for f in overlays if f"`{f}`" not in text]
    assert not missing, missing


@pytest.mark.slow
def test_every_analyze_option_is_in_the_docs():
    help_text = subprocess.run([sys.executable, os.path.join(REPO, "tools", "analyze.py"), "--help"],
                               capture_output=True, text=True, check=True, env=dict(os.environ, COLUMNS="200")).stdout
    options = sorted(set(re.findall(r"(--[a-z][a-z-]+)", help_text)) - {"--help"})
    assert len(options) >= 12
    text = doc("report.md")
    missing = [o for o in options if f"`{o}" not in text]
    assert not missing, missing
