"""Control laws: per stimulation channel, inputs in, intensity 0..1 out (no I/O, time passed in).

The controller loop holds a :class:`controller.laws.channels.ChannelLaws`.
"""

from controller.laws.base import CrankState, Law, LawEvent, LawInputs
from controller.laws.proportional import proportional

__all__ = ["CrankState", "Law", "LawEvent", "LawInputs", "proportional"]
