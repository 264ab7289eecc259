"""The names the core accepts for its options, in a module that imports nothing heavy: the run
configuration and the command line read them from here (the algorithms' names are in
:mod:`fedmaml.meta.algorithms`)."""

#: how one call computes its episodes (or users): batched with ``torch.vmap``, one at a time, or
#: whichever is faster for the model (:func:`fedmaml.meta.engines.uses_vmap`)
BATCHING = ("auto", "vmap", "loop")

#: the server's optimizers of θ (:class:`fedmaml.meta.outer.MetaOptimizer`)
META_OPTIMIZERS = ("adam", "sgd")

#: which parameters an inner loop or a personalization adapts, by name (a collection of parameter
#: names is accepted too: :mod:`fedmaml.meta.adapted`)
ADAPTED = ("all", "head")
