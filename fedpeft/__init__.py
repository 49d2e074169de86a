"""fedpeft: federated parameter-efficient fine-tuning on Flower."""

import warnings

# peft 0.21 calls a transformers 5 alias deprecated in favour of is_activation_checkpointing;
# harmless, and it would otherwise print once in every process that builds an adapter.
warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
