"""ssl_bocb: MoCo v3 self-supervised pretraining for backbone-optimizer coupling bias (BOCB) studies."""
__version__ = "0.1.0"
