"""`python -m nicemu ...` is the `nicemu` command (tests run it this way: no install needed)."""
import sys

from nicemu.cli import main

sys.exit(main())
