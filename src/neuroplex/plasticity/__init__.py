"""Plasticity: the rewiring schedule, the prune/regrow arithmetic and lottery-ticket pruning."""
