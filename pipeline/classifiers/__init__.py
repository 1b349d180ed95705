"""Image classifiers (SmallCNN for digits, ResNet-18 for CIFAR) and their training (ERM, mixup, IAT, PGD-AT)."""
