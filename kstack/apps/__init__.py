"""Applications that run in their own processes over kstack.socket.

ping       ICMP echo with iputils' output (python -m kstack.apps.ping -c 3 198.18.0.2)
udp_echo   a UDP echo server
udp_send   a UDP sender at a rate or as fast as it can, with sequence numbers
udp_sink   a UDP receiver reporting datagrams/s, bytes/s and loss from the sequence numbers

Each takes --kernel PATH (or NICEMU_KERNEL) and ends with one JSON line of its results and its
own costs (CPU ns, context switches, calls to the kernel, bytes copied).
"""
