"""The worker role: agent, lending policy, VM backend, guest init."""
