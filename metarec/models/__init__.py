"""Recommenders: the MeLU meta-learner, the support-set ensemble, transfer and classic baselines."""
