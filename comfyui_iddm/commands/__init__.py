"""Sub-commands of the `iddm` CLI that live in their own modules; each has add_parser(subparsers)."""
