"""Stimulator drivers: the edge where output reaches (or would reach) hardware."""
