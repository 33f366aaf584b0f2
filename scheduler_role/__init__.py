"""The scheduler role: queue, leases, matching, end conditions, federation.

``lifecycle`` (the task and replica transition tables), ``task`` (what the scheduler knows of a
task), ``end_conditions`` (the judge), ``matching`` and ``explain`` (offers against needs) and
``messages`` (the dispatch protocol) are sans-IO. ``queue`` keeps it all in ``<data>/scheduler.db``
(``schema``, ``queue_ops``, ``group_commit``); ``dispatch`` answers one decoded worker message.
"""
