"""`python -m nicemu ...` runs the device commands (show, serve, up; tests run them this way,
no install needed). The installed `nicemu` command is lab.cli, which adds the lab's commands
(`python -m lab ...` without an install)."""
import sys

from nicemu.cli import main

sys.exit(main())
