"""Plain classes that own a model on one device and do one job (no Ray imports here)."""
