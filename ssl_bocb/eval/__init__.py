from .features import cached_features, extract_features, load_eval_backbone, weights_digest
from .knn import knn_classify

__all__ = ["cached_features", "extract_features", "load_eval_backbone", "weights_digest", "knn_classify"]
