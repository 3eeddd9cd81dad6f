"""mnv-train: MobileNetV4 training recipes on PyTorch + timm."""
__version__ = '0.1.0'
