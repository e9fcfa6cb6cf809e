"""spoa-lease: connection-granular publishing and predictive leases for HAProxy."""

__version__ = "0.1.0"
