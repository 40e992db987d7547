"""Evaluation: the feature network, sample sets, FID/IS through torch-fidelity, power-law fits, the report."""
