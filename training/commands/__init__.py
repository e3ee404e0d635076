"""One module per ``fdn`` subcommand; each exposes ``register(subparsers)``."""

COMMAND_MODULES = (
    "phantom",
    "inspect",
    "train",
    "eval_model",
    "export",
    "index",
    "query",
    "eval_retrieval",
    "demo",
)
