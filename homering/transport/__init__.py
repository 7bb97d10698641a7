"""How processes reach each other, below the wire format it carries: the MQTT connection (:mod:`.mqtt`:
broker addresses, credentials, reconnecting; :mod:`.bus`: one connection and one router per process),
the local broker (:mod:`.broker`), ring links over TCP (:mod:`.links`), window file downloads
(:mod:`.windows`) and the order of a request's stream events (:mod:`.streams`)."""
