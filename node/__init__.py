"""The vmlend node: identity, config, p2p adapter, wire framing, store, local RPC, CLI, daemon."""

__version__ = "0.1.0"
