"""Files that run inside the guest: ``init.sh`` is the tiny OS's /init (busybox sh)."""
