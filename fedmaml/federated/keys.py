"""The names of everything the ServerApp and the ClientApp exchange, defined once.

Records in a message's RecordDict, the keys inside them, and the query message types. Metric
names computed by the core (``loss_after``) travel hyphenated (``loss-after``):
:func:`metric_key` is the one place that renames them.
"""

from __future__ import annotations

from flwr.app import MessageType

# records
ARRAYS = "arrays"  # θ (to a node) or the update Δ = −g (from a node)
METRICS = "metrics"
CONFIG = "config"
#: ConfigRecord of a personalize message: the run's personalization recipe (steps, adapt, lr)
RECIPE = "recipe"
DESCRIBE = "describe"

# query message types
DESCRIBE_TYPE = f"{MessageType.QUERY}.describe"
PERSONALIZE_TYPE = f"{MessageType.QUERY}.personalize"

# keys in the records
META_ROUND = "meta-round"
SERVER_ROUND = "server-round"
ROLE = "role"
CLIENT_INDEX = "client-index"
CLIENT_ID = "client-id"
NUM_EXAMPLES = "num-examples"
NUM_PARTITIONS = "num-partitions"
HELDOUT = "heldout"
#: the aggregation weight, written by the server into each checked reply (never the node's)
WEIGHT = "aggregation-weight"

ROLES = ("train", "heldout")

#: metrics that identify a reply rather than measure it (kept out of means over nodes)
IDENTITY = (NUM_EXAMPLES, WEIGHT, CLIENT_INDEX, HELDOUT)


def metric_key(name: str) -> str:
    """A core metric name as it travels in a MetricRecord: ``loss_after`` -> ``loss-after``."""
    return name.replace("_", "-")


# secure aggregation (SecAgg+): every protocol message is a ``train`` message holding the
# ConfigRecord SECAGG; its stage says which step of the protocol it is
SECAGG = "secagg"
SECAGG_STATE = "secagg-state"  # the client's protocol state, in context.state
STAGE = "stage"
SETUP, SHARE_KEYS, COLLECT_MASKED, UNMASK = "setup", "share-keys", "collect-masked", "unmask"
STAGES = (SETUP, SHARE_KEYS, COLLECT_MASKED, UNMASK)
SHARE_NUM = "share-num"
THRESHOLD = "threshold"
CLIP_RANGE = "clip-range"
BITS = "bits"
PK1, PK2 = "pk1", "pk2"
NODES = "nodes"
CIPHERTEXTS = "ciphertexts"
MASKED = "masked"
METRIC_NAMES = "metric-names"
ACTIVE, DEAD = "active", "dead"
SEED_SHARES, KEY_SHARES = "seed-shares", "key-shares"
#: a client's training metric: 1 when it clipped its update to the norm bound, else 0
CLIPPED_ON_DEVICE = "clipped-on-device"
#: a client's training metric: the seconds its meta-gradient took on its node (a user's equal
#: share of its node's batch); ``rounds.csv`` holds its mean as ``train-compute-s``
COMPUTE_S = "compute-s"


# ---------------------------------------------------------------- users (fedmaml.federated.users)
#: in a message's config: the users (``train-3``, ``heldout-0``) the node computes for; their
#: replies travel in records named ``<record>.<user>`` (:func:`user_record`), except the
#: training updates, stacked (below)
USERS = "users"
#: ArrayRecord of a many-users training reply: each of θ's arrays with the users' updates Δ_u
#: stacked along a first axis, one row per user of USER_ROWS
USER_ARRAYS = "user-arrays"
#: ConfigRecord of a many-users training reply: ``users``, the user of each row of USER_ARRAYS
USER_ROWS = "user-rows"
#: ConfigRecord of a many-users reply: each failed user's one-line reason
USER_ERRORS = "user-errors"
#: ConfigRecord of a many-users reply: each user's data identity (client id)
USER_NAMES = "user-names"


def user_record(record: str, user: str) -> str:
    """The name of ``user``'s ``record`` in a many-users reply: ``arrays.train-3``."""
    return f"{record}.{user}"
