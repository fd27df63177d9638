"""The orchestration layer: what a user runs, above the device (nicemu), the drivers (driver)
and the stack (kstack). The only package that imports all three: `nicemu demo` and the other
lab commands live here, each command one module listed in lab.commands."""
