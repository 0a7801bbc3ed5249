"""The ``cuttlefish-hf`` command line."""
