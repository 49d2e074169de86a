"""The ML core: config, models, data, adapters, training, evaluation, privacy and the wire format.

Nothing here imports from ``strategies``, ``server``, ``client``, ``run``, ``deploy`` or the CLI.
"""
