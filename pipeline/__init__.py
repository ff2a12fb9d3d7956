"""Distributed ResNet batch-training pipeline."""
