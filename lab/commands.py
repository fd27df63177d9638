"""The lab's commands: name -> module. Each module has `add_parser(sub)` (adds its
subparser and returns it) and `run(args) -> int` (the exit status). A new command is one
module plus one row here; lab.cli puts them after nicemu's device commands (show, serve, up).

Modules are imported when the parser is built, so keep their heavy imports inside run().
"""
from __future__ import annotations

# name -> module, in the order `nicemu --help` lists them
COMMANDS: dict[str, str] = {
    "demo": "lab.demo",
    "drivers": "lab.drivers",
    "stats": "lab.stats",
    "bench": "lab.bench",
    "trace": "lab.trace",
}
