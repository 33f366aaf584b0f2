"""The scheduler role: queue, leases, matching, end conditions, federation."""
