"""Bridges to other systems: Home Assistant's MQTT discovery (:mod:`.homeassistant`)."""
