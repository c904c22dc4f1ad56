"""`python -m femtogpt`: the `femtogpt` command (femtogpt/app/cli.py)."""
import sys

from .app.cli import main

sys.exit(main())
