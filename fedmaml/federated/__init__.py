"""Flower adapters: the only part of fedmaml that imports Flower.

The apps: ``client_app`` (each client is a task: adapt, reply a meta-gradient; failures become
one plain line through ``client_errors``) and ``server_app`` (one run: its start, central
evaluation, checkpoints). The server's parts: ``strategy`` (MetaStrategy: the meta-optimizer
wrapped around a Flower aggregation strategy), ``replies`` (the checks every reply passes),
``roles`` (who each node is), ``round_log`` (the rows a round leaves), ``keys`` (every record
and metric key, defined once), ``records`` (tensors <-> Flower records). Private
meta-gradients: ``privacy`` (clipping on the device, the DP noise, the budget check),
``secagg_server`` / ``secagg_client`` / ``secagg_vector`` (SecAgg+ on the Message API: the
server's stages, the ClientApp mod, the masked vectors). Running Flower:
``flower_cli`` (SuperLink and SuperNode command lines, the connection file), ``processes``
(environment, ports, readiness, stops by pid and run token, signals), ``simulation`` (a managed
local simulation), ``deployment`` (a SuperLink and SuperNodes on this machine), ``node`` (a
node's identity and data), ``app_logging`` (fedmaml's log lines in Flower's log).
"""
