"""The recipes shipped with the package (``configs/`` of the checkout, package data of a wheel), found by path or name.

``--config`` and the files named in a sweep take a path (``configs/quickstart.yaml``, ``my/recipe.yaml``) or a
recipe's name (``quickstart``, ``ablations/patch_frozen``, ``sweeps/cifar_bocb``): a path that exists is used as
it is; otherwise the name is looked up among the shipped recipes, with or without its leading ``configs/`` and its
``.yaml``. So the same commands work in a checkout and after ``pip install ssl_bocb`` from any folder.
"""
import os
from typing import List, Optional, Sequence

from .errors import UserError


def recipes_dir() -> str:
    """The folder of the shipped recipes (``ssl_bocb/configs``: the checkout's ``configs/``, linked; a wheel's copy)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def _relative(name: str) -> str:
    """``name`` inside the recipes folder: without a leading ``./`` or ``configs/``."""
    rel = name.replace("\\", "/")
    if rel.startswith("./"):
        rel = rel[2:]
    return rel[len("configs/"):] if rel.startswith("configs/") else rel


def _candidates(name: str) -> List[str]:
    rel = _relative(name)
    names = [rel] if rel.endswith((".yaml", ".yml")) else [rel + ".yaml", rel]
    return [os.path.join(recipes_dir(), n) for n in names]


def find(path: str, beside: Sequence[str] = (), what: str = "config file") -> str:
    """The absolute path of ``path``: as given, else beside each folder of ``beside``, else a shipped recipe."""
    tried = [path] + [os.path.join(b, path) for b in beside]
    for candidate in tried + _candidates(path):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    near = _nearest(path)
    hint = f"; did you mean '{near}'?" if near else "; `ssl-bocb recipes` lists the shipped ones"
    where = "the current folder, beside the sweep file" if beside else "the current folder"
    raise UserError(f"{what} '{path}' does not exist (looked in {where} and among the shipped recipes){hint}")


def names(under: Optional[str] = None) -> List[str]:
    """Every shipped recipe's name (``quickstart``, ``ablations/patch_frozen``, ...), sorted; ``under`` a folder."""
    root = recipes_dir()
    out = []
    for folder, _, files in os.walk(root, followlinks=True):
        for f in files:
            if f.endswith(".yaml"):
                out.append(os.path.relpath(os.path.join(folder, f), root)[:-len(".yaml")].replace(os.sep, "/"))
    if under:
        out = [n for n in out if n.startswith(under.rstrip("/") + "/")]
    return sorted(out)


def _nearest(path: str) -> Optional[str]:
    import difflib
    stem = _relative(path)
    stem = stem[:-len(".yaml")] if stem.endswith(".yaml") else stem
    close = difflib.get_close_matches(stem, names(), n=1, cutoff=0.75)
    return close[0] if close else None
