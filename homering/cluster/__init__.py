"""The cluster: MQTT control plane, TCP data plane, agents and the controller."""
