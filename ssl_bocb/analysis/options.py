"""The report's settings (``tools/analyze.py``'s options)."""
from dataclasses import dataclass
from typing import Optional


@dataclass
class Options:
    metric: Optional[str] = None
    rule: str = "eq1"
    threshold: Optional[float] = None       # gamma (eq1) or t (iqr); None = 3 (eq1) / 1.5 (iqr)
    ci: str = "t"
    level: float = 0.95
    weights: bool = True
    sharpness: bool = False
    sharpness_batch: int = 64
    sharpness_iters: int = 20
    pca_frac: float = 0.1
    bins: int = 100
