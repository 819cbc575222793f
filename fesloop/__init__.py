"""fesloop shared spine: wire protocol, clock, config, sockets, LSL, supervisor, CLI."""

__version__ = "0.1.0"
