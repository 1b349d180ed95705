"""Training of the models the defenses stand on: classifiers (ERM, mixup, IAT, PGD-AT) and the diffusion UNet."""
