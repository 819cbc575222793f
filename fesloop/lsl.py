"""Lab Streaming Layer helpers: machine-scope config and stream descriptions.

``configure_machine_scope`` must run before any other pylsl call in a process, so
that nothing is ever multicast off this machine unless a config says otherwise.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pylsl

# PortRange: each outlet takes a port from [16572, 16572 + PortRange); one beyond the range
# gets a random port that a machine-scope (unicast) resolve never asks, so the stream is
# invisible. liblsl's default 32 ports do not hold two sessions' outlets (19 each) next to
# the lab's other LSL apps.
MACHINE_SCOPE_CONFIG = """\
[ports]
IPv6 = disable
PortRange = 512

[multicast]
ResolveScope = machine

[lab]
KnownPeers = {127.0.0.1}

[log]
level = -2
"""

_configured = False

# Numeric LSL channel formats and the numpy dtype pull_chunk(dest_obj=...) fills.
NUMPY_DTYPES = {
    pylsl.cf_float32: np.float32,
    pylsl.cf_double64: np.float64,
    pylsl.cf_int32: np.int32,
    pylsl.cf_int16: np.int16,
    pylsl.cf_int8: np.int8,
}


def configure_machine_scope() -> None:
    """Keep LSL on this machine (idempotent). ``LSLAPICFG`` set by the user wins."""
    global _configured
    if _configured:
        return
    if not os.environ.get("LSLAPICFG"):
        pylsl.set_config_content(MACHINE_SCOPE_CONFIG)
    _configured = True


def stream_query(name: str, stream_type: str, source_id: str) -> str:
    """The XPath predicate selecting streams by every non-empty field, fesloop's own excluded.

    ValueError when no field is set or a field holds a quote.
    """
    fields = (("name", name), ("type", stream_type), ("source_id", source_id))
    parts = [f"{key}='{value}'" for key, value in fields if value]
    if not parts:
        raise ValueError("set at least one of name, type, source_id")
    for part in parts:
        if part.count("'") != 2:
            raise ValueError(f"{part} must not contain quotes")
    parts.append("not(starts-with(source_id, 'fesloop-'))")  # never our own outlets: no feedback loop
    return " and ".join(parts)


def machine_scope_env() -> dict[str, str]:
    """Environment for a child with its own liblsl (LabRecorderCLI): machine scope unless ``LSLAPICFG`` is set."""
    env = dict(os.environ)
    if not env.get("LSLAPICFG"):
        path = Path(tempfile.gettempdir()) / f"fesloop-lsl-{os.getpid()}.cfg"
        path.write_text(MACHINE_SCOPE_CONFIG)
        env["LSLAPICFG"] = str(path)
    return env


def make_outlet(
    name: str,
    stream_type: str,
    labels: list[str],
    rate_hz: float,
    source_id: str,
    channel_format: str = "float32",
    unit: str = "",
    extra_channel_fields: dict[str, list[str]] | None = None,
    chunk_size: int = 0,
    description: dict[str, str] | None = None,
) -> pylsl.StreamOutlet:
    """Create an outlet whose description names every channel (label, unit, type).

    ``description`` goes under ``<fesloop>`` in the stream's description (e.g. the
    resolved config as JSON), so a recording of the stream describes itself.
    """
    configure_machine_scope()
    info = pylsl.StreamInfo(name, stream_type, len(labels), rate_hz, channel_format, source_id)
    channels = info.desc().append_child("channels")
    for index, label in enumerate(labels):
        child = channels.append_child("channel")
        child.append_child_value("label", label)
        if unit:
            child.append_child_value("unit", unit)
        child.append_child_value("type", stream_type)
        for field, values in (extra_channel_fields or {}).items():
            child.append_child_value(field, values[index])
    info.desc().append_child("acquisition").append_child_value("manufacturer", "fesloop")
    fesloop = info.desc().append_child("fesloop")
    for key, value in (description or {}).items():
        fesloop.append_child_value(key, value)
    return pylsl.StreamOutlet(info, chunk_size=chunk_size, max_buffered=10)
