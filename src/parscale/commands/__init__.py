"""CLI subcommands; each module has ``register(subparsers)`` (see ``parscale.cli``)."""
