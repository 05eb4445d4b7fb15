"""Fine-tune an ImageNet ResNet-50 on CIFAR-10 or a folder of your own images, then evaluate,
predict, export and serve it."""

__version__ = "0.1.0"
