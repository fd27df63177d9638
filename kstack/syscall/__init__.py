"""The syscall channel between application processes and the modeled kernel.

ring.py     the single-producer single-consumer record ring over shared memory (both ends)
channel.py  the handshake over AF_UNIX (a sealed memfd and two eventfds by SCM_RIGHTS), ops
server.py   SyscallServer: the kernel's end, dispatching calls to Socks, parking blocked ones
client.py   KernelChannel: the application's end (kstack.socket is built on it)
"""
from kstack.syscall.channel import Layout, Op
from kstack.syscall.ring import RingCorrupt

__all__ = ["Layout", "Op", "RingCorrupt"]
