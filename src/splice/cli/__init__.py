"""The `splice` command line: thin subcommands over the library."""
