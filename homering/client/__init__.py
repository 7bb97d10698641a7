"""The cluster's clients over MQTT: :class:`~homering.client.client.ClusterClient` (an async context manager
that reconnects), the front ends of ``homering chat`` and ``homering up`` (:mod:`.chat`, with the terminal's
pieces in :mod:`.terminal`) and the local launcher of ``homering up`` (:mod:`.local`)."""
