"""A tiny kernel-bypass application on driver.pmd: send N frames from one device and count
the ones that come back (a `python -m driver.pmd --app echo` on the peer device sends them back).

    python docs/examples/bypass_ping.py SOCKET PEER_MAC [N]

No interrupt, no system call and no register read per packet: the frames are built in DMA
memory, handed to the TX ring with tx_burst, and the RX ring is polled with rx_burst.
"""
import sys
import time

from driver.pmd import Pmd
from driver.vfio_user_client import VfioUserBus


def main() -> int:
    socket_path, peer = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    bus = VfioUserBus(socket_path, mem_size=8 << 20)  # connect to the emulated device
    pmd = Pmd(bus, mode="poll")  # reset, rings, buffer pool, RX and TX on, interrupts off
    try:
        me = bytes.fromhex(pmd.mac.replace(":", ""))
        frame = bytes.fromhex(peer.replace(":", "")) + me + b"\x88\xb5"  # local experimental EtherType
        frame += b"hello from a bypass application".ljust(46, b"\0")  # 60 bytes; the NIC adds the FCS
        back = 0
        for seq in range(n):
            m = pmd.alloc().set_data(frame)  # a buffer of the pool, in DMA memory
            while pmd.tx_burst([m]) == 0:  # the mbuf now belongs to the driver
                pass
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:  # busy-poll the RX ring
                got = pmd.rx_burst(32)
                for r in got:
                    if bytes(r.data[6:12]) != me:  # from the peer (addresses swapped by its echo)
                        back += 1
                    r.free()
                if got:
                    break
        print(f"sent {n} frames, {back} came back; {pmd.xstats()['tx_doorbells']} TX doorbells, "
              f"{pmd.xstats()['interrupts']} interrupts")
        return 0 if back == n else 1
    finally:
        pmd.close()
        bus.close()


if __name__ == "__main__":
    sys.exit(main())
