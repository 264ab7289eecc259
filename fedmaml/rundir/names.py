"""The files of a run directory, named once."""

CHECKPOINT = "checkpoint.pt"  # θ, meta-optimizer state, config, round (fedmaml.checkpoint)
ROUNDS = "rounds.csv"  # one row per round
CLIENTS = "clients.csv"  # one row per client reply or failure
SUMMARY = "summary.json"  # configuration, how the run ended, final metrics, wall time
SUMMARY_MD = "summary.md"  # the report's summary
CURVES_PNG = "learning_curves.png"
GAINS_PNG = "client_gains.png"
COMPARISON_MD = "comparison.md"  # fedmaml simulate --compare: the runs side by side
COMPARISON_PNG = "comparison.png"
FLOWER_LOG = "flower.log"  # the Flower processes' log (fedmaml simulate)
LOCK = ".lock"  # held by the run that writes the directory
SPLIT = "clients_split.csv"  # every client's group (train, validation, test, dropped) and sizes
RECIPE = "recipe.csv"  # the personalization recipe's candidates on the validation clients
TEST_USERS = "test_users.csv"  # each test client personalized by the recipe, curve at_0..at_K
