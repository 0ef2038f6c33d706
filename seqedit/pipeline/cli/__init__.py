"""The `seqedit` command line and what each command does."""
