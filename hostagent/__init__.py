"""hostagent: billing-grade per-instance usage collection for KVM/QEMU hosts."""

__version__ = "0.1.0"
