"""`python -m kstack`: the kernel process (kstack.kernel)."""
from __future__ import annotations

import sys

from kstack.kernel import main

if __name__ == "__main__":
    sys.exit(main())
