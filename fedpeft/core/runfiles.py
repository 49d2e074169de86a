"""Names of the files a run writes into its output folder (shared by the server that writes them
and the commands that read them; importing this module costs nothing)."""

ERROR_FILE = "error.json"  # why the ServerApp stopped (user error or crash), for the CLI
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.toml"
CHECKPOINT_DIR = "checkpoint"  # the server state after its last finished round (checkpoint.py)
STATE_FILE = "state.safetensors"  # in CHECKPOINT_DIR
