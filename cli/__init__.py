"""The `headscope` command line (installed as the package `headscope_cli`)."""
