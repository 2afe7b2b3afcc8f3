from .features import cached_features, extract_features, load_eval_backbone, weights_digest
from .knn import knn_classify
