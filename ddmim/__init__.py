"""DDMIM: masked image modelling, contrastive and self-distillation pretraining for Swin backbones."""
__version__ = "0.1.0"
