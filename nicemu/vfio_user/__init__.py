"""vfio-user: the transport between the emulator process (server) and the driver (client).

`protocol` is the sans-IO message codec both sides use; `server` serves one Nic on an AF_UNIX
socket. The client is driver/vfio_user_client.py (it belongs to the driver side).
"""
from nicemu.vfio_user.protocol import Command, ProtocolError

__all__ = ["Command", "ProtocolError"]
