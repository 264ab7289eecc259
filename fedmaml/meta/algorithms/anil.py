"""ANIL ("Almost No Inner Loop"): Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature
Reuse? Towards Understanding the Effectiveness of MAML", ICLR 2020.

MAML whose inner loop adapts only the head h (the model's last layer with parameters,
:func:`fedmaml.meta.adapted.head_names`); the body b keeps θ_b:

    θ'_h = θ_h − α ∇_h L_S(θ_b, θ_h)  (K times),   θ'_b = θ_b
    g = 1/n Σ_i ∇_(θ_b, θ_h) L_Qi(θ_b, θ'_{i,h}(θ_b, θ_h))

The outer gradient is second order through the head's inner steps, so the body gets its
gradient both directly and through them (θ'_h depends on θ_b via the features the head sees).
The inner steps differentiate the head only, which stops their backward passes at the head.
Evaluation and personalization of an ANIL model adapt the head too.
"""

from __future__ import annotations

from fedmaml.meta.algorithms.maml import MAML


class ANIL(MAML):
    name = "anil"
    adapted = "head"


ALGORITHM = ANIL()
