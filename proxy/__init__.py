"""Turnout: a traffic-splitting reverse proxy."""
