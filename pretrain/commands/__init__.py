"""One module per `mtp` subcommand. Each exposes `register(subparsers)`, which adds its parser and
sets `func` (called with the parsed namespace, returns an exit code)."""
