"""Per-user personalization: adapt the global meta-parameters θ to one user's own data.

A user's examples are split into a support set S (to adapt on) and an evaluation set E (held
out from adaptation). From θ, K plain gradient steps on S give the personalized parameters:

    θ'_0 = θ,   θ'_{k+1} = θ'_k − α ⊙ ∇_θ' L_S(θ'_k),   k = 0..K−1

K, α and the adapted parameters default to the checkpoint's personalization recipe, chosen on
validation users at the end of training (:mod:`.recipe`; K = 0 when no recipe beats the global
model there); explicit arguments override it. Without a recipe, α is the checkpoint's learned
per-parameter step size when it has ``inner_lr.<name>`` keys (Meta-SGD), else one scalar ``lr``
(default: the checkpoint's ``inner-lr``); an explicit ``lr`` replaces learned step sizes.
``adapt="head"`` adapts the last layer only and leaves the rest as it is (the default for a
model trained with ANIL). The metric m is the MSE (regression: a
model with one output) or the accuracy (classification: one output per class) on E, computed
for every k = 0..K (the adaptation curve of :func:`fedmaml.meta.evaluate.adaptation_curve`):

    metric_before = m(θ; E),   metric_after = m(θ'_K; E)
    gain = metric_before − metric_after   (MSE: lower is better)
    gain = metric_after − metric_before   (accuracy: higher is better)

so a positive gain always means personalization helped. The personalized model holds θ'_K only;
learned step sizes are a training-time quantity and are not saved with it.

:func:`personalize` handles one user, :func:`personalize_many` a population (a table with a user
column, a folder of one table per user, or in-memory clients), batching users of equal data
shapes with ``torch.func.vmap``; :func:`personalize_client` is the on-device entry point that
returns metrics only; :func:`fit_recipe` chooses the recipe on validation users. Users come as
in-memory data, tables, LEAF JSON, ``.npz`` or image folders (:mod:`.user_files`), prepared by
the checkpoint's recorded input preprocessing.

Modules: ``global_model`` (the checkpoint to personalize and the defaults of its run
configuration), ``user_data`` (checks and the support/evaluation split), ``curves`` (users'
adaptation curves, computed by ``fedmaml.meta``), ``personalized`` (the :class:`Personalized`
result, saving and loading it), ``user_tables`` (users read from tables), ``one_user``,
``many_users`` and ``on_device`` (the entry points), ``plot``.
"""

from fedmaml.personalize.many_users import personalize_many
from fedmaml.personalize.on_device import personalize_client
from fedmaml.personalize.one_user import personalize
from fedmaml.personalize.personalized import Personalized, load_personalized
from fedmaml.personalize.plot import plot_gain
from fedmaml.personalize.recipe import Recipe, fit_recipe

__all__ = [
    "Personalized",
    "Recipe",
    "fit_recipe",
    "load_personalized",
    "personalize",
    "personalize_client",
    "personalize_many",
    "plot_gain",
]
