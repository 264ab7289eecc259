"""Flower adapters: the only part of fedmaml that imports Flower.

``client_app`` (each client is a task: adapt, reply a meta-gradient), ``strategy`` (the
meta-optimizer wrapped around a Flower aggregation strategy), ``server_app`` (the run),
``simulation`` (a managed local simulation for ``fedmaml simulate``).
"""
