"""Closed-loop simulation of a deployed recommender: a ground-truth preference oracle, a choice
model of how users react to a shown list, the exploration policies, and the round loop.

Knows nothing of audits: it produces logs (what was shown, accepted, rated and predicted); the
metrics and tests over them live in `audit.feedback`.
"""
