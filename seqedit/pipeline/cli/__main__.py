"""`python -m seqedit.pipeline.cli`: the `seqedit` command."""

from seqedit.pipeline.cli.main import main

raise SystemExit(main())
