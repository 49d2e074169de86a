"""Names shared by the two ends of the wire: the round scalars the server adds to a downlink
and the metrics a client reports (one constant per key, so client and server cannot drift).
tests/test_architecture.py refuses these strings typed anywhere else in the product."""

# Flower run config key: the resolved config as JSON, sent to every client once per run
RUN_CONFIG_KEY = "config-json"
# Flower run config key: "1" when the clients are the simulation's virtual clients, whose
# partitions (and so their real example counts) the server knows
SIMULATION_KEY = "simulation"

# Downlink scalars
ROUND = "fedpeft.round"
PARTITION = "fedpeft.partition"
RANK = "fedpeft.rank"

# Reply metrics
NUM_EXAMPLES = "num-examples"  # the aggregation weight a client claims (Flower's convention)
TRAIN_S = "train_s"  # seconds of local training
TRAIN_TOKENS = "train_tokens"  # tokens (attention-mask ones) the client's training steps ran on
TRAIN_LOSS = "train_loss"
CLIENT_S = "client_s"  # seconds of the whole client round (load, train, uplink)
PARTITION_ID = "partition_id"  # the partition the client trained on
CLIENT_RANK = "rank"  # the LoRA rank the client trained at
EPSILON = "epsilon"  # the client's DP-SGD epsilon so far
NEXT_RANK = "next_rank"  # the LoRA rank the client holds from now on
RANK_MISMATCH = "rank_mismatch"  # 1: the client holds another rank than it was sent
BUDGET_SPENT = "budget_spent"  # 1: the client refused to train (its privacy budget is spent)
NEEDS_SYNC = "needs_sync"  # 1: the client held no usable global state (FLoRA, Ferret resync)

# Node config (``fedpeft client`` flags) whose names a reply metric shares
NODE_RANK = CLIENT_RANK  # --node-config rank=N: the LoRA rank this device holds
NODE_EPSILON = EPSILON  # --node-config epsilon=E: the device's own lifetime DP budget

# Evaluation reply metrics (eval.where = 'clients'/'both'): figures on the client's own holdout;
# the example count travels as NUM_EXAMPLES
EVAL_ACCURACY = "eval_accuracy"  # share of held-out examples classified right (label tasks)
EVAL_LOSS = "eval_loss"  # mean held-out loss (per example; per response token for a causal LM)
EVAL_PERPLEXITY = "eval_perplexity"  # exp(eval_loss), causal LM
EVAL_SECONDS = "eval_s"  # seconds the client spent (personalisation steps included)

# Reply strings: a ConfigRecord named REPLY_INFO (a MetricRecord holds numbers only)
REPLY_INFO = "fedpeft.info"
BASE_FINGERPRINT = "base_fingerprint"  # the client's frozen-base digest (core/fingerprint.py)
