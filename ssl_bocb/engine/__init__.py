from .pretrain import make_accelerator, pretrain
