"""The driver side: the transport to the device, the kernel-style e1000 driver and the PMD."""
