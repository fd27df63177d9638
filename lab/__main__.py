"""`python -m lab ...` is the installed `nicemu` command (device and lab commands), no install needed."""
import sys

from lab.cli import main

sys.exit(main())
