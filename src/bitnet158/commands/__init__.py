"""CLI subcommands that drive the generation engine: generate, chat."""
