"""The modeled Linux-style kernel network stack (later issues)."""
