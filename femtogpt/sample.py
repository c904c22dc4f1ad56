"""`python -m femtogpt.sample`: the same as `femtogpt sample` (femtogpt/app/sample.py)."""
import sys

from .app.sample import main

if __name__ == "__main__":
    sys.exit(main())
