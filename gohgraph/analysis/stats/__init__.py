"""Routing statistics: head and expert load, co-activation, flow, balance, drops, drift, tokens."""
