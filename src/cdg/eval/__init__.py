"""Evaluation protocols: features, kNN, linear probe (fast and SGD), fine-tuning."""
