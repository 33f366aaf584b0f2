"""The task owner's role: a node that borrows compute.

Its local RPC methods (``task.*``, :mod:`owner_role.service`) take a user's task, parse it once,
and forward it to a scheduler over ``/vmlend/tasks/1.0.0`` (:mod:`catalog.owner_protocol`); the
``vmlend submit / status / logs / wait / results / cancel / run`` commands (:mod:`owner_role.cli`)
are thin clients of those methods.
"""
